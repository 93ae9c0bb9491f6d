"""Answering "can I trust this cache?": ``verify`` (with recomputation) and ``explain``.

* :func:`verify` runs the structural checks of :mod:`featurecache.cache.maintenance` and then,
  for a random sample of a view's images, rebuilds the model from the stored spec, re-decodes
  (and re-augments) each image and compares with the stored features. Only that sees drift in
  the numbers themselves, e.g. a TensorFlow upgrade that changed a kernel: library versions are
  recorded per unit, not keyed, so drift is measured instead of silently re-keyed.
* :func:`explain` says whether an extract would be a hit and, if not, how many images are new
  and how many are reused, or which spec fields differ from the nearest feature store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from featurecache.cache import maintenance
from featurecache.cache import store as store_mod
from featurecache.cache import views as views_mod
from featurecache.cache.keys import UNKEYED_DEFAULTS
from featurecache.errors import FeatureCacheError, UsageError
from featurecache.extraction.options import KEYED_FIELDS, ExtractOptions, expands_options

__all__ = ["Difference", "ExplainReport", "Mismatch", "VerifyReport", "explain", "verify"]

#: Relative tolerance of a recomputed feature, as a fraction of the largest value in its row.
DEFAULT_RTOL = {"float32": 1e-4, "float16": 2e-3}


@dataclass(frozen=True)
class Mismatch:
    """One sampled feature vector that differs from its recomputation."""

    split: str
    view: int
    index: int
    id: str
    max_abs_diff: float
    tolerance: float


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` checked and what it found.

    ``problems`` lists everything found; ``remaining`` those that ``repair`` did not fix (all of
    them without ``repair``). ``ok`` is True when none remains: a repair that fixed everything
    leaves the cache correct.
    """

    name: str
    key: str
    problems: tuple[str, ...]
    units_checked: int
    sampled: int
    max_abs_diff: float | None
    mismatches: tuple[Mismatch, ...] = ()
    repaired: tuple[str, ...] = ()
    remaining: tuple[str, ...] | None = None

    @property
    def left(self) -> tuple[str, ...]:
        """The problems still there (``problems`` less what ``repair`` fixed)."""
        return self.problems if self.remaining is None else self.remaining

    @property
    def ok(self) -> bool:
        """True when no problem is left (none was found, or ``repair`` fixed every one)."""
        return not self.left

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "name": self.name,
            "key": self.key,
            "ok": self.ok,
            "problems": list(self.problems),
            "units_checked": self.units_checked,
            "sampled": self.sampled,
            "max_abs_diff": self.max_abs_diff,
            "mismatches": [m.__dict__ for m in self.mismatches],
            "repaired": list(self.repaired),
            "remaining": list(self.left),
        }


def verify(
    ref: str,
    *,
    sample: int = 8,
    seed: int = 0,
    data: str | None = None,
    weights: str | None = None,
    rtol: float | None = None,
    batch_size: int = 32,
    repair: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> VerifyReport:
    """Check a feature set (or a whole feature store): intact, consistent, and reproducible.

    Parameters
    ----------
    ref
        A feature set's key, key prefix (>= 6 hex digits), name or path; or a feature store's
        name or key.
    sample
        Feature vectors of a feature set to recompute from the images; ``0`` checks structure
        and checksums only (which already catches missing, moved and altered chunks).
    seed
        Seed of the sample draw, so a failure can be reproduced.
    data
        Where the images are now, if not at the recorded ``dataset_source``.
    weights
        The backbone weights, if not the recorded ``weights_source``.
    rtol
        Allowed difference as a fraction of a vector's largest absolute value; default
        ``1e-4`` (float32), ``2e-3`` (float16).
    batch_size
        Backbone batch size of the recomputation.
    repair
        Remove damaged units and the views that read them, and views whose metadata were
        edited, and restore an edited store spec from a view over the store, so the next
        extract rewrites those views from the store's rows and recomputes exactly the images
        of the removed units.
    cache_dir
        Cache root.

    Returns
    -------
    VerifyReport
        ``report.ok`` is False when a problem is left; ``report.problems`` says what was found,
        ``report.repaired`` what was restored or removed, ``report.remaining`` what is left.

    Raises
    ------
    EntryNotFoundError, AmbiguousEntryError
        ``ref`` names nothing, or several feature sets.
    UsageError
        ``sample`` is negative or ``rtol`` is not positive.
    """
    if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or sample < 0:
        raise UsageError(
            f"sample must be a non-negative int, got {sample!r}; pass e.g. --sample 8, or 0 to skip recomputation"
        )
    if rtol is not None and not rtol > 0:
        raise UsageError(f"rtol must be > 0, got {rtol!r}; pass e.g. 1e-4")
    root = store_mod.resolve_cache_dir(cache_dir)
    target = maintenance.find_target(ref, cache_dir=root)
    result = maintenance.check(target)
    problems = list(result.problems)
    sampled, max_diff = 0, None
    mismatches: list[Mismatch] = []
    if sample and isinstance(target, views_mod.FeatureSet) and not result.problems:
        try:
            sampled, max_diff, mismatches, more = _check_sample(
                target,
                sample=int(sample),
                seed=seed,
                data=data,
                weights=weights,
                rtol=rtol,
                batch_size=batch_size,
                root=root,
            )
            problems.extend(more)
        except FeatureCacheError as exc:
            problems.append(f"cannot recompute samples: {exc}")
    repaired = tuple(maintenance.repair(result, cache_dir=root)) if repair and result.needs_repair else ()
    remaining = [p for p in problems if p not in result.fixable] + result.unrepaired if repaired else None
    return VerifyReport(
        name=result.name,
        key=result.key,
        problems=tuple(problems),
        units_checked=result.units_checked,
        sampled=sampled,
        max_abs_diff=max_diff,
        mismatches=tuple(mismatches),
        repaired=repaired,
        remaining=None if remaining is None else tuple(remaining),
    )


def _check_sample(
    fs: views_mod.FeatureSet,
    *,
    sample: int,
    seed: int,
    data: str | None,
    weights: str | None,
    rtol: float | None,
    batch_size: int,
    root: Any,
) -> tuple[int, float | None, list[Mismatch], list[str]]:
    from featurecache import backbones
    from featurecache.cache.store import augment_index
    from featurecache.data import augment_batch, load_dataset
    from featurecache.extraction.pipeline import build_model, compiled_forward, forward_in_batches, load_resized

    spec = fs.spec
    memo = store_mod.memo_dir(root)
    bspec = backbones.get_backbone(str(spec["backbone"]))
    source = backbones.recorded_weights_source(str(spec["weights"]), weights or fs.attrs.get("weights_source"))
    if source is None:
        return (
            0,
            None,
            [],
            [
                f"{fs.name} does not record which weights file made it (identity {spec['weights']}); pass --weights PATH to that file"
            ],
        )
    ref = backbones.parse_weights(source, seed=int(spec["seed"]))
    identity = backbones.weights_identity(ref, bspec, memo_dir=memo)
    if identity != spec["weights"]:
        return (
            0,
            None,
            [],
            [
                f"weights {source!r} have identity {identity} but the features were made with {spec['weights']}; pass --weights with the weights used at extraction"
            ],
        )
    data_source = data or fs.attrs.get("dataset_source")
    if not data_source:
        return (
            0,
            None,
            [],
            [f"{fs.name} does not record its dataset source; pass --data with the images it was made from"],
        )
    dataset = load_dataset(str(data_source), memo_dir=memo, limit=fs.attrs.get("dataset_limit"))
    if dataset.digest() != spec["dataset_digest"]:
        return (
            0,
            None,
            [],
            [
                f"the dataset at {data_source!r} has digest {dataset.digest()[:12]} but {fs.name} was made from {str(spec['dataset_digest'])[:12]}: "
                "images, labels or splits changed since extraction (pass --data if it moved)"
            ],
        )
    cells = [(s, v, i) for s in fs.splits for v in range(fs.layout(s).views) for i in range(fs.layout(s).n)]
    k = min(sample, len(cells))
    picked = (
        sorted(cells[int(j)] for j in np.random.default_rng(seed).choice(len(cells), size=k, replace=False))
        if k
        else []
    )
    p = _plan_from(fs, dataset, bspec, ref, root)
    model = build_model(p)
    forward = compiled_forward(model, p.spec.input_size)
    dtype = str(spec["dtype"])
    tol_rel = rtol if rtol is not None else DEFAULT_RTOL.get(dtype, 1e-4)
    mismatches: list[Mismatch] = []
    problems: list[str] = []
    max_diff = 0.0
    groups: dict[tuple[str, int], list[int]] = {}
    for s, v, i in picked:
        groups.setdefault((s, v), []).append(i)
    for (split, view), rows in sorted(groups.items()):
        ds_split = dataset.splits[split]
        ids, digests, valid = fs.ids(split), fs.digests(split), fs.valid(split)
        parts = [load_resized(ds_split, i, i + 1, size=p.spec.input_size, method=p.spec.resize) for i in rows]
        x = np.concatenate([q[0] for q in parts])
        decoded = np.concatenate([q[1] for q in parts])
        for j, i in enumerate(rows):
            if decoded[j] != valid[i]:
                state = (
                    "decodes now but is stored as invalid"
                    if decoded[j]
                    else "no longer decodes but has stored features"
                )
                problems.append(f"{split}/{ids[i]} {state}")
        if view > 0:
            x = augment_batch(
                x, p.augment, seed=p.spec.seed, view=view, indices=[augment_index(str(digests[i])) for i in rows]
            )
        x = backbones.preprocess_input(bspec, x)
        feats, _ = forward_in_batches(forward, x, batch_size=batch_size, feature_shape=fs.feature_shape, pad=True)
        feats[~decoded] = 0
        expected = feats.astype(dtype).astype(np.float64)
        stored = np.asarray(fs.feature_array(split)[view, np.asarray(rows)], dtype=np.float64)
        for j, i in enumerate(rows):
            diff = float(np.max(np.abs(stored[j] - expected[j]))) if stored[j].size else 0.0
            scale = float(max(np.max(np.abs(expected[j]), initial=0.0), np.max(np.abs(stored[j]), initial=0.0)))
            max_diff = max(max_diff, diff)
            if diff > tol_rel * scale:
                mismatches.append(Mismatch(split, view, i, str(ids[i]), diff, tol_rel * scale))
    if mismatches:
        problems.append(_mismatch_line(fs, mismatches, k))
    return k, (max_diff if k else None), mismatches, problems


def _plan_from(fs: views_mod.FeatureSet, dataset: Any, bspec: Any, ref: Any, root: Any) -> Any:
    """The extraction plan the stored spec describes (the same builder as extraction)."""
    from featurecache.cache.keys import FeatureSpec
    from featurecache.data import AugmentSpec
    from featurecache.extraction.pipeline import Plan

    spec = fs.spec
    fields_ = {k: v for k, v in spec.items() if k not in ("format_version", "dataset_name", "dataset_digest")}
    feature_spec = FeatureSpec(**{**fields_, "augment_splits": tuple(fields_.get("augment_splits", ()))})
    aug = AugmentSpec(**spec["augment"]) if spec.get("augment") else AugmentSpec()
    return Plan(spec=feature_spec, dataset=dataset, backbone=bspec, weights=ref, cache_dir=root, augment=aug)


def _mismatch_line(fs: views_mod.FeatureSet, mismatches: list[Mismatch], k: int) -> str:
    from featurecache._runtime.versions import library_versions

    then, now = fs.attrs.get("versions", {}), library_versions()
    changed = {
        key: f"{then.get(key)} -> {now.get(key)}"
        for key in sorted(set(then) | set(now))
        if then.get(key) != now.get(key)
    }
    why = (
        f"library versions changed since extraction ({', '.join(f'{a} {b}' for a, b in changed.items())}), which can change numerics"
        if changed
        else "the library versions are those recorded, so the stored values were altered"
    )
    worst = max(mismatches, key=lambda m: m.max_abs_diff)
    return (
        f"{len(mismatches)} of {k} recomputed feature vectors differ from the stored ones "
        f"(max abs diff {worst.max_abs_diff:.3g} at {worst.split}/{worst.id} view {worst.view}, tolerance {worst.tolerance:.3g}); "
        f"{why}; remove the feature set (`featurecache cache rm {fs.name} --yes`) and extract again"
    )


# ------------------------------------------------------------------------------ explain
@dataclass(frozen=True)
class Difference:
    """One spec field in which the requested features differ from a cached store."""

    field: str
    cached: Any
    requested: Any

    def __str__(self) -> str:
        return f"{self.field} {_show(self.field, self.cached)} -> {_show(self.field, self.requested)}"


@dataclass(frozen=True)
class ExplainReport:
    """Why an extract would (not) be a cache hit.

    Attributes
    ----------
    key, name
        The requested feature set's key and name.
    status
        ``"hit"`` (the view exists), ``"reuse"`` (its feature store exists: only new images
        would be computed) or ``"miss"`` (no store with this spec).
    new, reused
        Image views that would be computed, and that the store already holds.
    nearest
        On a miss, the closest feature store (fewest differing spec fields).
    differences
        The spec fields that differ from ``nearest``.
    """

    key: str
    name: str
    status: str
    new: int = 0
    reused: int = 0
    nearest: str | None = None
    differences: tuple[Difference, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def message(self) -> str:
        """One line for the user."""
        if self.status == "hit":
            return f"hit: {self.name} is in the cache"
        if self.status == "reuse":
            return f"reuse: {self.name} is new, but its feature store holds {self.reused} of the image views it needs; {self.new} would be computed"
        if self.nearest is None:
            return f"miss: {self.name} would be new ({self.new} image views to compute); the cache has no feature store to compare with"
        return (
            f"miss: {self.name} needs a new feature store ({self.new} image views to compute); its spec differs from {self.nearest}: "
            + ", ".join(str(d) for d in self.differences)
        )

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "key": self.key,
            "name": self.name,
            "status": self.status,
            "new": self.new,
            "reused": self.reused,
            "nearest": self.nearest,
            "differences": [{"field": d.field, "cached": d.cached, "requested": d.requested} for d in self.differences],
            "notes": list(self.notes),
            "message": self.message,
        }


def _show(name: str, value: Any) -> str:
    if value is None and name in UNKEYED_DEFAULTS:
        return str(UNKEYED_DEFAULTS[name])
    if name == "weights" and isinstance(value, str) and "sha256=" in value:
        head, _, digest = value.partition("sha256=")
        return f"{head}sha256={digest[:12]}"
    if name == "augment" and isinstance(value, Mapping):
        on = {k: v for k, v in value.items() if v not in (0, 0.0, False, None, "reflect")}
        return ",".join(k if v is True else f"{k}={v}" for k, v in sorted(on.items())) or "none"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


@expands_options(*KEYED_FIELDS)
def explain(
    data: str | Any,
    options: ExtractOptions | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    **overrides: Any,
) -> ExplainReport:
    """Say whether ``extract(data, options)`` would hit the cache, and what it would compute.

    Parameters
    ----------
    data
        The dataset source, as for :func:`featurecache.extract`.
    options
        The :class:`~featurecache.options.ExtractOptions`; its keyed fields may also be passed
        (or overridden) as keywords, as for :func:`featurecache.plan`.
    cache_dir
        Cache root.
    limit
        At most this many images per split, as for :func:`featurecache.extract`.

    Returns
    -------
    ExplainReport
        ``report.message`` says hit / reuse (how many images new and reused) / miss (which spec
        fields differ from the nearest store).

    Raises
    ------
    FeatureCacheError
        The options are invalid (as ``extract`` would raise).
    """
    from featurecache.extraction.extract import missing_digests, needed_digests, plan

    p = plan(
        data,
        ExtractOptions.merge(options, overrides, allowed=KEYED_FIELDS, caller="explain"),
        cache_dir=cache_dir,
        limit=limit,
    )
    if views_mod.find_by_key(p.cache_dir, p.key) is not None:
        return ExplainReport(p.key, p.name, "hit")
    needed = sum(len(d) for d in needed_digests(p).values())
    st = store_mod.open_store(p.cache_dir, p.spec.key)
    if st is not None:
        new = sum(len(d) for d in missing_digests(p, st).values())
        return ExplainReport(p.key, p.name, "reuse", new=new, reused=needed - new)
    wanted = p.spec.key_fields()
    best: tuple[int, store_mod.FeatureStore, list[Difference]] | None = None
    for other in store_mod.iter_stores(p.cache_dir):
        if not isinstance(other, store_mod.FeatureStore):
            continue
        have = {k: v for k, v in other.spec.items() if k != "weights_label"}
        diffs = [
            Difference(k, have.get(k), wanted.get(k))
            for k in sorted(set(wanted) | set(have))
            if json.dumps(have.get(k), sort_keys=True) != json.dumps(wanted.get(k), sort_keys=True)
        ]
        if best is None or len(diffs) < best[0]:
            best = (len(diffs), other, diffs)
    if best is None:
        return ExplainReport(p.key, p.name, "miss", new=needed)
    return ExplainReport(p.key, p.name, "miss", new=needed, nearest=best[1].name, differences=tuple(best[2]))
