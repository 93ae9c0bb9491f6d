"""Keeping a cache trustworthy and tidy: ``verify``, ``gc`` and ``explain``.

* :func:`verify` re-derives everything an entry claims: that its stored spec hashes to its key
  and name, that every write unit has its marker, that every chunk reads back (the arrays carry
  a CRC32C codec, so a flipped bit fails the read instead of decoding to plausible numbers),
  that invalid rows hold zeros and match the failures list, and, for a random sample of
  images, that rebuilding the model from the stored spec and re-decoding (and re-augmenting)
  the image gives the stored features. The last check is the only one that sees drift in the
  numbers themselves, e.g. a TensorFlow upgrade that changed a kernel: library versions are
  recorded in an entry, not keyed, so that drift is measured instead of silently re-keyed.
* :func:`gc` removes what interrupted runs leave behind: incomplete entries nobody is working
  on, leases of dead holders, and temporary files. Anything under a live lease is left alone.
* :func:`explain` answers "why did this extract miss the cache?" by naming the key fields in
  which the planned feature set differs from the closest existing entry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.cache import store
from featurecache.cache.keys import FORMAT_VERSION, UNKEYED_DEFAULTS, FeatureSpec, digest_of
from featurecache.errors import FeatureCacheError, ImageDecodeError, UsageError

__all__ = [
    "Difference",
    "ExplainReport",
    "GcItem",
    "GcReport",
    "Mismatch",
    "VerifyReport",
    "explain",
    "gc",
    "parse_age",
    "verify",
]

#: Spec fields that only make names readable; they are stored but not keyed.
_LABEL_FIELDS = ("dataset_name", "weights_label")
#: Relative tolerance of a recomputed feature, as a fraction of the largest value in its row.
#: float32 recomputation differs only by kernel / batch-composition round-off; float16 storage
#: rounds each value by up to half an ulp (~5e-4 relative).
DEFAULT_RTOL = {"float32": 1e-4, "float16": 2e-3}


# ------------------------------------------------------------------------------- verify
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

    Attributes
    ----------
    name, key
        The entry.
    problems
        One line per failed check; empty when the entry is sound.
    units_checked
        Write units whose marker was present and whose chunks were read back.
    sampled
        Feature vectors recomputed from the images.
    max_abs_diff
        Largest absolute difference between stored and recomputed features (None if none sampled).
    mismatches
        The sampled vectors outside tolerance.
    """

    name: str
    key: str
    problems: tuple[str, ...]
    units_checked: int
    sampled: int
    max_abs_diff: float | None
    mismatches: tuple[Mismatch, ...] = ()

    @property
    def ok(self) -> bool:
        """True when no check failed."""
        return not self.problems

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
    cache_dir: str | os.PathLike[str] | None = None,
) -> VerifyReport:
    """Check that a cache entry is complete, intact, and reproduces its features.

    Parameters
    ----------
    ref
        Full key, key prefix (>= 6 hex digits), entry name or entry path.
    sample
        How many stored feature vectors (over all splits and views) to recompute from the
        images; ``0`` checks structure and checksums only.
    seed
        Seed of the sample draw, so a failure can be reproduced.
    data
        Where the images are now, if not at the recorded ``dataset_source`` (moved folder).
    weights
        The backbone weights, if not the recorded ``weights_source`` (moved weights file);
        their identity must equal the stored one.
    rtol
        Allowed difference as a fraction of the largest absolute value of the vector;
        default ``1e-4`` for float32 entries, ``2e-3`` for float16.
    batch_size
        Backbone batch size of the recomputation.
    cache_dir
        Cache root (default ``$FEATURECACHE_DIR`` or ``./cache``).

    Returns
    -------
    VerifyReport
        ``report.ok`` is False when anything failed; ``report.problems`` says what, one line each.

    Raises
    ------
    EntryNotFoundError, AmbiguousEntryError
        ``ref`` names no entry, or several.
    UsageError
        ``sample`` is negative or ``rtol`` is not positive.
    """
    if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or sample < 0:
        raise UsageError(f"sample must be a non-negative int, got {sample!r}; pass e.g. --sample 8, or 0 to skip recomputation")
    if rtol is not None and not rtol > 0:
        raise UsageError(f"rtol must be > 0, got {rtol!r}; pass e.g. 1e-4")
    fs = store.find_entry(ref, cache_dir=cache_dir)
    problems: list[str] = []
    problems.extend(_check_key(fs))
    done, missing = _check_units(fs)
    problems.extend(missing)
    read_problems, invalid_rows, unreadable = _check_chunks(fs, done)
    problems.extend(read_problems)
    readable = [u for u in done if u not in unreadable]
    sampled, max_diff, mismatches = 0, None, []
    if sample and readable:
        try:
            sampled, max_diff, mismatches, sample_problems = _check_sample(
                fs, readable, invalid_rows, sample=int(sample), seed=seed, data=data, weights=weights, rtol=rtol,
                batch_size=batch_size, cache_dir=cache_dir,
            )
            problems.extend(sample_problems)
        except FeatureCacheError as exc:
            problems.append(f"cannot recompute samples: {exc}")
        except Exception as exc:  # noqa: BLE001 - e.g. an unreadable ids array; a checker reports, never crashes
            problems.append(f"cannot recompute samples: {_one_line(exc)}")
    return VerifyReport(
        name=fs.name,
        key=fs.key,
        problems=tuple(problems),
        units_checked=len(done),
        sampled=sampled,
        max_abs_diff=max_diff,
        mismatches=tuple(mismatches),
    )


def _check_key(fs: store.FeatureSet) -> list[str]:
    spec = dict(fs.spec)
    fields_ = {k: v for k, v in spec.items() if k not in _LABEL_FIELDS}
    out = []
    try:
        recomputed = digest_of(fields_)
    except FeatureCacheError as exc:
        return [f"the stored spec cannot be hashed ({exc}); remove the entry with `featurecache cache rm {fs.name} --yes`"]
    if recomputed != fs.key:
        out.append(
            f"the stored spec hashes to {recomputed[:12]}, not to the stored key {fs.key[:12]}: the spec or the key was altered; "
            f"remove the entry with `featurecache cache rm {fs.name} --yes`"
        )
    if not fs.name.endswith(f"--{fs.key[:12]}"):
        out.append(f"the entry directory {fs.name!r} does not end with its key's first 12 digits {fs.key[:12]!r}; it was renamed or copied by hand")
    version = fields_.pop("format_version", None)
    if version != FORMAT_VERSION:
        out.append(
            f"the entry has format version {version!r} but this featurecache writes {FORMAT_VERSION}; it will never be a cache hit, "
            "remove it with `featurecache cache gc` or `cache rm`"
        )
    try:
        rebuilt = FeatureSpec(**{**fields_, "augment_splits": tuple(fields_.get("augment_splits", ()))})
    except (TypeError, FeatureCacheError) as exc:
        out.append(f"the stored spec is not a valid FeatureSpec ({' '.join(str(exc).split())})")
    else:
        if version == FORMAT_VERSION and rebuilt.key != fs.key:
            out.append(f"the stored spec's FeatureSpec key is {rebuilt.key[:12]}, not {fs.key[:12]}")
    return out


def _check_units(fs: store.FeatureSet) -> tuple[list[store.Unit], list[str]]:
    units = fs.units()
    done = [u for u in units if fs.unit_done(u)]
    out = []
    if len(done) < len(units):
        first = next(u for u in units if not fs.unit_done(u))
        out.append(
            f"{len(units) - len(done)} of {len(units)} write units have no completion marker (first: {first.marker}); "
            "run the same extract command again to finish them"
        )
    elif not fs.complete:
        out.append(f"every unit is done but the entry was never sealed ({store.COMPLETE_MARKER} is missing); run the same extract command again")
    return done, out


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _check_chunks(fs: store.FeatureSet, done: Sequence[store.Unit]) -> tuple[list[str], dict[str, np.ndarray], set[store.Unit]]:
    """Read back every chunk of the done units: problems, each split's invalid mask, unreadable units."""
    import zarr

    out: list[str] = []
    invalid_rows: dict[str, np.ndarray] = {}
    unreadable: set[store.Unit] = set()
    try:
        group = zarr.open_group(str(fs.path), mode="r")
    except Exception as exc:  # noqa: BLE001 - any failure to open is a finding, not a crash
        return [f"the Zarr group cannot be opened: {_one_line(exc)}"], invalid_rows, set(done)
    failures_by_split: dict[str, set[str]] = {}
    for f in fs.failures():
        failures_by_split.setdefault(f["split"], set()).add(str(f["id"]))
    fix = f"remove the entry (`featurecache cache rm {fs.name} --yes`) and extract again"
    for split in fs.splits:
        lay = fs.layout(split)
        small = {}
        for name in ("labels", "ids", "valid"):
            try:
                small[name] = group[f"{split}/{name}"][:]
            except Exception as exc:  # noqa: BLE001
                out.append(f"{split}/{name} is unreadable ({_one_line(exc)}); {fix}")
        if "labels" in small and len(small["labels"]) and (small["labels"].min() < 0 or small["labels"].max() >= len(fs.classes)):
            out.append(f"{split}/labels hold values outside 0..{len(fs.classes) - 1}; {fix}")
        valid = small.get("valid")
        view0_done = {u.chunk for u in done if u.split == split and u.view == 0}
        if valid is not None and "ids" in small:
            rows = np.zeros(lay.n, dtype=bool)
            for u in done:
                if u.split == split and u.view == 0:
                    rows[u.start : u.stop] = True
            invalid = rows & ~valid.astype(bool)
            invalid_rows[split] = invalid
            stored_ids = {str(i) for i in np.asarray(small["ids"], dtype=object)[invalid]}
            listed = failures_by_split.get(split, set())
            if stored_ids != listed:
                out.append(
                    f"{split}: the valid array marks {len(stored_ids)} rows invalid but the unit markers list {len(listed)} failures "
                    f"(e.g. {sorted(stored_ids ^ listed)[:3]}); {fix}"
                )
        try:
            arr = group[f"{split}/features"]
        except Exception as exc:  # noqa: BLE001
            out.append(f"{split}/features cannot be opened ({_one_line(exc)}); {fix}")
            unreadable.update(u for u in done if u.split == split)
            continue
        for u in done:
            if u.split != split:
                continue
            try:
                block = arr[u.view, u.start : u.stop]
            except Exception as exc:  # noqa: BLE001 - a checksum error is zarr's own type
                out.append(f"chunk {split}/features view {u.view} rows {u.start}:{u.stop} is unreadable ({_one_line(exc)}); {fix}")
                unreadable.add(u)
                continue
            if not np.isfinite(block).all():
                out.append(f"chunk {split}/features view {u.view} rows {u.start}:{u.stop} holds NaN or infinite values; {fix}")
            if split in invalid_rows and u.chunk in view0_done:
                bad = invalid_rows[split][u.start : u.stop]
                if bad.any() and np.any(block[bad] != 0):
                    out.append(f"chunk {split}/features view {u.view} rows {u.start}:{u.stop} has non-zero features for invalid images; {fix}")
    return out, invalid_rows, unreadable


def _weights_source(fs: store.FeatureSet, override: str | None) -> str:
    from featurecache import backbones

    recorded = str(fs.spec["weights"])
    source = backbones.recorded_weights_source(recorded, override or fs.attrs.get("weights_source"))
    if source is None:
        raise UsageError(f"{fs.name} does not record which weights file made it (identity {recorded}); pass --weights PATH to that file")
    return source


def _check_sample(
    fs: store.FeatureSet,
    done: Sequence[store.Unit],
    invalid_rows: Mapping[str, np.ndarray],
    *,
    sample: int,
    seed: int,
    data: str | None,
    weights: str | None,
    rtol: float | None,
    batch_size: int,
    cache_dir: str | os.PathLike[str] | None,
) -> tuple[int, float | None, list[Mismatch], list[str]]:
    from featurecache import backbones
    from featurecache.data import AugmentSpec, augment_batch, load_dataset, resize_image

    spec = fs.spec
    memo = store.memo_dir(store.resolve_cache_dir(cache_dir))
    problems: list[str] = []

    # Rebuild the inputs from what the entry recorded, and prove they are the same inputs.
    bspec = backbones.get_backbone(str(spec["backbone"]))
    source = _weights_source(fs, weights)
    ref = backbones.parse_weights(source, seed=int(spec["seed"]))
    identity = backbones.weights_identity(ref, bspec, memo_dir=memo)
    if identity != spec["weights"]:
        return 0, None, [], [
            f"weights {source!r} have identity {identity} but the entry was made with {spec['weights']}; "
            "pass --weights with the weights used at extraction"
        ]
    data_source = data or fs.attrs.get("dataset_source")
    if not data_source:
        return 0, None, [], [f"{fs.name} does not record its dataset source; pass --data with the images it was made from"]
    dataset = load_dataset(str(data_source), memo_dir=memo, limit=fs.attrs.get("dataset_limit"))
    if dataset.digest() != spec["dataset_digest"]:
        return 0, None, [], [
            f"the dataset at {data_source!r} has digest {dataset.digest()[:12]} but the entry was made from {str(spec['dataset_digest'])[:12]}: "
            "images, labels or splits changed since extraction (pass --data if it moved)"
        ]

    # Draw the sample among the rows of finished units: (split, view, row).
    candidates = [(u.split, u.view, u.start, u.stop) for u in done]
    sizes = np.array([stop - start for _, _, start, stop in candidates], dtype=np.int64)
    total = int(sizes.sum())
    k = min(sample, total)
    flat = np.sort(np.random.default_rng(seed).choice(total, size=k, replace=False)) if k else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    groups: dict[tuple[str, int], list[int]] = {}
    for f in flat:
        j = int(np.searchsorted(offsets, f, side="right") - 1)
        split, view, start, _ = candidates[j]
        groups.setdefault((split, view), []).append(start + int(f - offsets[j]))

    from featurecache.extract import Plan, build_model

    size = int(spec["input_size"])
    aug = AugmentSpec(**spec["augment"]) if spec.get("augment") else AugmentSpec()
    key_fields = {k: v for k, v in spec.items() if k not in ("format_version", "dataset_name", "weights_label")}
    feature_spec = FeatureSpec(**{**key_fields, "augment_splits": tuple(key_fields.get("augment_splits", ()))})
    # The same builder as extraction (compute precision included), fed the recorded spec.
    model = build_model(Plan(spec=feature_spec, dataset=dataset, backbone=bspec, weights=ref, cache_dir=store.resolve_cache_dir(cache_dir), augment=aug))
    dtype = str(spec["dtype"])
    tol_rel = rtol if rtol is not None else DEFAULT_RTOL.get(dtype, 1e-4)
    mismatches: list[Mismatch] = []
    max_diff = 0.0
    stored_arrays = {s: fs.feature_array(s) for s in fs.splits}
    for (split, view), rows in sorted(groups.items()):
        ds_split = dataset.splits[split]
        ids = fs.ids(split)
        x = np.zeros((len(rows), size, size, 3), dtype=np.float32)
        decoded = np.ones(len(rows), dtype=bool)
        for j, i in enumerate(rows):
            try:
                x[j] = resize_image(ds_split.load(i), size, method=str(spec["resize"]))
            except ImageDecodeError:
                decoded[j] = False
        stored_invalid = invalid_rows.get(split, np.zeros(len(ids), bool))[rows]
        for j, i in enumerate(rows):
            if decoded[j] == stored_invalid[j]:
                state = "decodes now but is stored as invalid" if decoded[j] else "no longer decodes but has stored features"
                problems.append(f"{split}/{ids[i]} {state}")
        if view > 0:
            x = augment_batch(x, aug, seed=int(spec["seed"]), view=view, indices=rows)
        x = backbones.preprocess_input(bspec, x)
        feats = np.concatenate(
            [np.asarray(model(x[b : b + batch_size], training=False), dtype=np.float32) for b in range(0, len(x), batch_size)]
        )
        feats[~decoded] = 0
        expected = feats.astype(dtype).astype(np.float64)
        stored = np.stack([np.asarray(stored_arrays[split][view, i], dtype=np.float64) for i in rows])
        for j, i in enumerate(rows):
            diff = float(np.max(np.abs(stored[j] - expected[j]))) if stored[j].size else 0.0
            scale = float(max(np.max(np.abs(expected[j]), initial=0.0), np.max(np.abs(stored[j]), initial=0.0)))
            tol = tol_rel * scale
            max_diff = max(max_diff, diff)
            if diff > tol:
                mismatches.append(Mismatch(split, view, i, str(ids[i]), diff, tol))
    if mismatches:
        from featurecache.extract import library_versions

        then, now = fs.attrs.get("versions", {}), library_versions()
        changed = {k: f"{then.get(k)} -> {now.get(k)}" for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)}
        why = (
            f"library versions changed since extraction ({', '.join(f'{k} {v}' for k, v in changed.items())}), which can change numerics"
            if changed else "the library versions are those recorded, so the stored values were altered"
        )
        worst = max(mismatches, key=lambda m: m.max_abs_diff)
        problems.append(
            f"{len(mismatches)} of {k} recomputed feature vectors differ from the stored ones "
            f"(max abs diff {worst.max_abs_diff:.3g} at {worst.split}/{worst.id} view {worst.view}, tolerance {worst.tolerance:.3g}); "
            f"{why}; remove the entry (`featurecache cache rm {fs.name} --yes`) and extract again"
        )
    return k, (max_diff if k else None), mismatches, problems


# ----------------------------------------------------------------------------------- gc
@dataclass(frozen=True)
class GcItem:
    """One thing :func:`gc` removes (or would remove)."""

    path: Path
    kind: str
    size_bytes: int
    reason: str


@dataclass(frozen=True)
class GcReport:
    """What :func:`gc` found; ``removed`` is False for a dry run."""

    cache_dir: Path
    items: tuple[GcItem, ...]
    removed: bool

    @property
    def size_bytes(self) -> int:
        """Bytes the items take (freed, unless a dry run)."""
        return sum(i.size_bytes for i in self.items)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "cache_dir": str(self.cache_dir),
            "removed": self.removed,
            "size_bytes": self.size_bytes,
            "items": [{"path": str(i.path), "kind": i.kind, "size_bytes": i.size_bytes, "reason": i.reason} for i in self.items],
        }


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(value: str | float | int) -> float:
    """Seconds in an age such as ``"24h"``, ``"30m"``, ``"7d"``, ``"90s"``, ``"2w"`` or ``3600``.

    Raises
    ------
    UsageError
        The text is not a non-negative number with an optional s/m/h/d/w unit.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise UsageError(f"--older-than must be >= 0, got {value!r}")
        return float(value)
    m = _AGE.match(str(value))
    if not m:
        raise UsageError(f"--older-than {value!r} is not an age; use a number with a unit s, m, h, d or w, e.g. 24h, 30m, 7d")
    return float(m.group(1)) * _AGE_UNITS[m.group(2).lower()]


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        try:
            return path.lstat().st_size
        except OSError:
            return 0
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.lstat().st_size
        except OSError:
            pass
    return total


def _newest_mtime(path: Path) -> float:
    try:
        newest = path.lstat().st_mtime
    except OSError:
        return 0.0
    if path.is_dir() and not path.is_symlink():
        for p in path.rglob("*"):
            try:
                newest = max(newest, p.lstat().st_mtime)
            except OSError:
                pass
    return newest


def _live_leases(root: Path) -> set[str]:
    """Keys whose lease is held by a live holder."""
    live = set()
    for lease_file in (root / store.LOCKS_DIR).glob("*.lease"):
        key = lease_file.name[: -len(".lease")]
        if not store.Lease(root, key).is_stale():
            live.add(key)
    return live


def gc(
    *,
    older_than: str | float = "24h",
    dry_run: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> GcReport:
    """Remove incomplete entries nobody works on, stale leases and temporary debris.

    Removed are: incomplete entries whose newest file is older than ``older_than`` and whose
    key has no live lease; leases whose holder is dead or silent; and, for keys without a live
    lease, temporary files older than ``older_than`` (entries built aside in ``.tmp/``, zarr's
    and our ``*.partial`` files, leases moved aside, digest-memo temp files). Complete entries
    are never touched (use ``cache rm``).

    Parameters
    ----------
    older_than
        Minimum age: seconds, or text like ``"24h"``, ``"30m"``, ``"7d"``.
    dry_run
        Only report (the default); pass False to delete.
    cache_dir
        Cache root (default ``$FEATURECACHE_DIR`` or ``./cache``).

    Returns
    -------
    GcReport
        The items with their sizes; ``removed`` says whether they were deleted.

    Raises
    ------
    UsageError
        ``older_than`` is not an age.
    """
    age = parse_age(older_than)
    root = store.resolve_cache_dir(cache_dir)
    now = time.time()
    items: list[GcItem] = []
    if not root.is_dir():
        return GcReport(root, (), removed=not dry_run)
    live = _live_leases(root)
    live12 = {k[:12] for k in live}

    def old(path: Path) -> bool:
        return now - _newest_mtime(path) >= age

    def untouched(path: Path) -> float | None:
        """Seconds since ``path`` (or anything in it) changed, when that is at least ``age``."""
        idle = now - _newest_mtime(path)
        return idle if idle >= age else None

    for lease_file in sorted((root / store.LOCKS_DIR).glob("*.lease")):
        key = lease_file.name[: -len(".lease")]
        if key not in live:
            holder = store.Lease(root, key).holder() or {}
            items.append(GcItem(lease_file, "stale lease", _size(lease_file), f"holder pid {holder.get('pid', '?')} on {holder.get('host', '?')} is gone or silent"))
    for aside in sorted((root / store.LOCKS_DIR).glob("*.lease.stale-*")):
        items.append(GcItem(aside, "temporary", _size(aside), "lease moved aside by a breaker that did not finish"))
    for tmp in sorted((root / store.TMP_DIR).glob("*")):
        owner = tmp.name.split("-", 1)[0]
        if owner not in live12 and old(tmp):
            what = "entry removal that did not finish" if tmp.name.startswith("rm-") else "entry built aside and never renamed into place"
            items.append(GcItem(tmp, "temporary", _size(tmp), what))
    for memo_tmp in sorted(store.memo_dir(root).glob(".*.tmp")):
        if old(memo_tmp):
            items.append(GcItem(memo_tmp, "temporary", _size(memo_tmp), "digest memo temp file"))
    for child in sorted(root.iterdir()):
        if child.name.startswith((".", "_")) or not child.is_dir():
            continue
        key12 = child.name.rsplit("--", 1)[-1]
        if key12 in live12:
            continue
        try:
            fs = store.FeatureSet(child)
        except FeatureCacheError:
            continue  # not ours: never delete what we cannot identify
        if not fs.complete:
            idle = untouched(child)
            if idle is not None:
                total = len(fs.units())
                done = total - len(fs.missing_units())
                items.append(GcItem(child, "incomplete entry", _size(child), f"{done} of {total} units done, untouched for {_human_age(idle)}"))
            continue
        for partial in sorted(child.rglob("*.partial")):
            if old(partial):
                items.append(GcItem(partial, "temporary", _size(partial), "temp file of a killed writer"))
    if not dry_run:
        for item in items:
            _remove(item, root)
    return GcReport(root, tuple(items), removed=not dry_run)


def _remove(item: GcItem, root: Path) -> None:
    path = item.path
    if item.kind == "incomplete entry":
        # Take the entry's lease so an extract that starts resuming it meanwhile is not
        # pulled out from under; if one already holds it, the entry is in use after all.
        try:
            fs = store.FeatureSet(path)
        except FeatureCacheError:
            return
        lease = store.Lease(root, fs.key)
        if not lease.try_acquire():
            return
        try:
            store.remove_entry(fs)  # renamed aside first, so no reader sees half an entry
        finally:
            lease.release()
    elif item.kind == "stale lease":
        lease = store.Lease(root, path.name[: -len(".lease")])
        judged = lease.holder()
        if lease.is_stale():  # judged again: a live process may have taken it since the scan
            lease.break_stale(judged)
    elif path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _human_age(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f}{unit}"
    return f"{seconds:.0f}s"


# ------------------------------------------------------------------------------ explain
@dataclass(frozen=True)
class Difference:
    """One key field in which the requested feature set differs from a cached one."""

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
        The requested feature set's key and entry name.
    status
        ``"hit"`` (complete entry exists), ``"incomplete"`` (exists, would resume), or ``"miss"``.
    nearest
        Name of the closest existing entry on a miss (fewest differing key fields), else None.
    differences
        The key fields that differ from ``nearest``.
    notes
        Extra hints (e.g. the same dataset source now has other content, or another --limit).
    """

    key: str
    name: str
    status: str
    nearest: str | None = None
    differences: tuple[Difference, ...] = ()
    notes: tuple[str, ...] = ()
    missing_units: int = 0

    @property
    def message(self) -> str:
        """One line for the user."""
        if self.status == "hit":
            return f"hit: {self.name} is complete in the cache"
        if self.status == "incomplete":
            return f"incomplete: {self.name} exists with {self.missing_units} units missing; the same extract command resumes it"
        if self.nearest is None:
            return f"miss: {self.name} would be new; the cache has no entries to compare with"
        line = f"miss: {self.name} differs from {self.nearest}: " + ", ".join(str(d) for d in self.differences)
        return line + (f" ({'; '.join(self.notes)})" if self.notes else "")

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "key": self.key,
            "name": self.name,
            "status": self.status,
            "nearest": self.nearest,
            "differences": [{"field": d.field, "cached": d.cached, "requested": d.requested} for d in self.differences],
            "notes": list(self.notes),
            "message": self.message,
        }


def _show(name: str, value: Any) -> str:
    if value is None and name in UNKEYED_DEFAULTS:
        return str(UNKEYED_DEFAULTS[name])  # the default is left out of the keyed document
    if name == "dataset_digest" and isinstance(value, str):
        return value[:12]
    if name == "weights" and isinstance(value, str) and "sha256=" in value:
        head, _, digest = value.partition("sha256=")
        return f"{head}sha256={digest[:12]}"
    if name == "augment" and isinstance(value, Mapping):
        on = {k: v for k, v in value.items() if v not in (0, 0.0, False, None, "reflect")}
        return ",".join(k if v is True else f"{k}={v}" for k, v in sorted(on.items())) or "none"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def explain(
    data: str | Any,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    **options: Any,
) -> ExplainReport:
    """Say whether ``extract(data, **options)`` would hit the cache, and if not, why not.

    Parameters
    ----------
    data
        The dataset source, as for :func:`featurecache.extract`.
    cache_dir
        Cache root (default ``$FEATURECACHE_DIR`` or ``./cache``).
    **options
        The other :func:`featurecache.plan` options (backbone, weights, size, layer, pooling,
        resize, augment, views, augment_splits, seed, dtype, limit).

    Returns
    -------
    ExplainReport
        ``report.message`` names the differing key fields, e.g.
        ``"miss: ... differs from mobilenetv2-random-32-avg--digits--abc123: input_size 32 -> 48"``.

    Raises
    ------
    FeatureCacheError
        The options are invalid (as ``extract`` would raise), with the valid choices.
    """
    from featurecache.extract import plan

    p = plan(data, cache_dir=cache_dir, **options)
    name = p.spec.entry_name()
    found = store.find_by_key(p.cache_dir, p.key)
    if found is not None:
        if found.complete:
            return ExplainReport(p.key, name, "hit")
        return ExplainReport(p.key, name, "incomplete", missing_units=len(found.missing_units()))
    wanted = p.spec.key_fields()
    best: tuple[tuple[int, int, str], store.FeatureSet, list[Difference]] | None = None
    for fs in store.iter_entries(p.cache_dir):
        have = {k: v for k, v in fs.spec.items() if k not in _LABEL_FIELDS}
        diffs = [
            Difference(k, have.get(k), wanted.get(k))
            for k in sorted(set(wanted) | set(have))
            if json.dumps(have.get(k), sort_keys=True) != json.dumps(wanted.get(k), sort_keys=True)  # tuples dump as lists
        ]
        rank = (len(diffs), 0 if fs.complete else 1, fs.attrs.get("created") or "")
        if best is None or rank[:2] < best[0][:2] or (rank[:2] == best[0][:2] and rank[2] > best[0][2]):
            best = (rank, fs, diffs)
    if best is None:
        return ExplainReport(p.key, name, "miss")
    _, fs, diffs = best
    notes = []
    if any(d.field == "dataset_digest" for d in diffs):
        then_limit, now_limit = fs.attrs.get("dataset_limit"), p.limit
        if then_limit != now_limit:
            notes.append(f"--limit {then_limit} -> {now_limit}")
        if str(fs.attrs.get("dataset_source")) == str(p.dataset.source) and then_limit == now_limit:
            notes.append(f"the images, labels or splits under {p.dataset.source} changed since that entry was made")
        elif fs.spec.get("dataset_name") != p.spec.dataset_name:
            notes.append(f"dataset {fs.spec.get('dataset_name')} -> {p.spec.dataset_name}")
    return ExplainReport(p.key, name, "miss", nearest=fs.name, differences=tuple(diffs), notes=tuple(notes))

