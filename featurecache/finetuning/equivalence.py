"""Check that the rebuilt model reproduces the head's cached-feature predictions.

How it works
------------
Before any training the rebuilt model runs on the run's clean validation images (raw, through
its own Resizing layer) and must reproduce ``predictions.npz`` within ``tolerance``; otherwise
:class:`~featurecache.errors.EquivalenceError` names the largest difference, where, and the
likely cause. The cause is diagnosed against the cached features when the entry is still in
the cache: features that differ point at resize, preprocessing or weights; features that match
point at the head's Keras conversion. A mismatch is an error, never a warning.

Round-off is not a mismatch. The rebuilt backbone computes the features again, with kernels that
oneDNN picks per CPU and per batch shape, so they carry float32 round-off of ~1e-6 of their
largest value (measured: MobileNetV2, default and AVX2 kernels). The head's own conversion to
Keras is exact to ~2e-6 in probability (logreg, linear SVM, ridge, SGD, dense heads on cached
features), but a head can amplify round-off in its inputs: a standardising head on features with
a tiny spread (random weights) turned 1.3e-6 into 9e-5, and into 1.1e-4 on an AVX-512 CPU. So
when a probability is over ``tolerance``, the check measures how far the head itself moves its
probabilities under a perturbation of ``FEATURE_ROUNDOFF`` (8x the measured round-off) of the
features, and accepts differences within that bound; a real mismatch (resize, preprocessing,
weights) moves features by 1e-2 and more, far outside it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from featurecache.errors import EquivalenceError, UsageError
from featurecache.finetuning.inference import ImagePredictor, load_images, model_draft

if TYPE_CHECKING:
    from featurecache.finetuning.assemble import Assembled
    from featurecache.finetuning.rebuild import Rebuilt
    from featurecache.finetuning.run_data import RunData

__all__ = ["FEATURE_ROUNDOFF", "EquivalenceReport", "check_equivalence", "roundoff_bound"]

#: Relative size (of each image's largest feature) of the round-off recomputed features may carry.
FEATURE_ROUNDOFF = 1e-5


@dataclass(frozen=True)
class EquivalenceReport:
    """How closely the rebuilt model reproduces the head's cached-feature predictions."""

    n: int
    max_abs_diff: float
    worst_id: str
    n_over: int
    tolerance: float
    top1_agreement: float
    roundoff: float = 0.0

    @property
    def limit(self) -> float:
        """The difference allowed: ``tolerance``, or the head's round-off bound when larger."""
        return max(self.tolerance, self.roundoff)

    @property
    def passed(self) -> bool:
        """Whether every probability is within :attr:`limit`."""
        return self.n_over == 0

    def summary(self) -> str:
        """One line: how many images, the largest difference and the limit it was held to."""
        line = f"{self.n} validation images, max |dp| {self.max_abs_diff:.2g} <= {self.limit:g}"
        if self.roundoff > self.tolerance:
            line += f" (the head's float32 round-off bound; --tolerance {self.tolerance:g})"
        return line

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values."""
        return {
            "n": self.n,
            "max_abs_diff": self.max_abs_diff,
            "worst_id": self.worst_id,
            "n_over": self.n_over,
            "tolerance": self.tolerance,
            "top1_agreement": self.top1_agreement,
            "roundoff": self.roundoff,
            "passed": self.passed,
        }


def check_equivalence(
    rebuilt: Rebuilt | Assembled,
    run_data: RunData,
    predictions: Mapping[str, np.ndarray],
    *,
    tolerance: float = 1e-4,
    max_samples: int | None = 512,
    batch_size: int = 32,
    cache_dir: str | os.PathLike[str] | None = None,
    predictor: ImagePredictor | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> EquivalenceReport:
    """Check the rebuilt model against the run's cached-feature predictions.

    Parameters
    ----------
    rebuilt
        From :func:`featurecache.finetune.rebuild_model`.
    run_data
        From :func:`featurecache.finetune.load_run_data`.
    predictions
        The run's ``predictions.npz`` (``val_ids``, ``val_proba``).
    tolerance
        Largest allowed absolute difference of any probability.
    max_samples
        Check at most this many validation images (evenly spaced); ``None`` checks all.
    batch_size
        Images per forward pass.
    cache_dir
        Cache root: when the run's feature set is still cached, a mismatch is diagnosed by
        comparing the rebuilt features with the cached ones.
    predictor
        An :class:`ImagePredictor` of ``rebuilt.model`` to reuse (its trace); default: a new one.
    pool
        Threads to decode the images on (:func:`image_pool`); ``None`` decodes in this thread.

    Returns
    -------
    EquivalenceReport
        A passing report.

    Raises
    ------
    EquivalenceError
        Some probability differs by more than ``tolerance``; the message says by how much, where,
        and the likely cause.
    """
    if not tolerance > 0:
        raise UsageError(f"--tolerance must be > 0, got {tolerance!r}")
    expected_all = np.asarray(predictions["val_proba"], dtype=np.float64)
    ids_all = np.asarray(predictions["val_ids"]).astype(str)
    pick = np.arange(len(ids_all))
    if max_samples is not None and len(pick) > max_samples:
        pick = np.unique(np.linspace(0, len(pick) - 1, int(max_samples)).round().astype(np.int64))
    split = run_data.dataset.splits[run_data.val_split]
    rows = run_data.val_rows[pick]
    images = load_images(split, rows, pool=pool, draft=model_draft(rebuilt))
    got = (predictor or ImagePredictor(rebuilt.model, batch_size=batch_size))(images)
    expected = expected_all[pick]
    if got.shape != expected.shape:
        raise EquivalenceError(
            f"the rebuilt model gives {got.shape[1]} probabilities per image but the run's predictions have {expected.shape[1]}; "
            "the run's head and config disagree -- retrain the head"
        )
    diff = np.abs(got - expected)
    per_sample = diff.max(axis=1) if len(diff) else np.zeros(0)
    worst = int(np.argmax(per_sample)) if len(per_sample) else 0
    report = EquivalenceReport(
        n=len(pick),
        max_abs_diff=float(per_sample.max()) if len(per_sample) else 0.0,
        worst_id=str(ids_all[pick][worst]) if len(pick) else "",
        n_over=int((per_sample > tolerance).sum()),
        tolerance=float(tolerance),
        top1_agreement=float((got.argmax(1) == expected.argmax(1)).mean()) if len(pick) else 1.0,
    )
    if report.passed:
        return report
    roundoff = roundoff_bound(rebuilt, images, batch_size=batch_size)
    if roundoff > tolerance:
        report = replace(report, roundoff=roundoff, n_over=int((per_sample > roundoff).sum()))
        if report.passed:
            return report
    cause = _diagnose(rebuilt, run_data, images, ids_all[pick], cache_dir=cache_dir, batch_size=batch_size)
    raise EquivalenceError(
        f"the rebuilt model does not reproduce the head's cached-feature predictions: max |dp| = {report.max_abs_diff:.3g} "
        f"at validation image {report.worst_id!r} ({report.n_over} of {report.n} images over tolerance {tolerance:g}, "
        f"top-1 agreement {report.top1_agreement:.0%}); likely cause: {cause}"
    )


def roundoff_bound(rebuilt: Rebuilt | Assembled, images: list[np.ndarray], *, batch_size: int = 32) -> float:
    """How far the model's head moves its probabilities under float32 round-off of its features.

    Each branch's features of ``images`` are perturbed by ``FEATURE_ROUNDOFF`` times each image's
    largest feature, with random signs (seeded), and the largest change of any probability over
    two draws is returned.
    """
    import keras

    branches = rebuilt.branches
    head = keras.Model([b.features.outputs[0] for b in branches], rebuilt.model.outputs[0])
    feats = [ImagePredictor(b.features, batch_size=batch_size)(images).astype(np.float32) for b in branches]
    base = np.asarray(head.predict(feats, batch_size=batch_size, verbose=0), dtype=np.float64)
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(2):
        moved = []
        for f in feats:
            scale = np.abs(f).max(axis=tuple(range(1, f.ndim)), keepdims=True)
            moved.append((f + FEATURE_ROUNDOFF * scale * rng.choice([-1.0, 1.0], size=f.shape)).astype(np.float32))
        out = np.asarray(head.predict(moved, batch_size=batch_size, verbose=0), dtype=np.float64)
        worst = max(worst, float(np.abs(out - base).max()) if out.size else 0.0)
    return worst


def _diagnose(
    rebuilt: Any, run_data: RunData, images: list[np.ndarray], ids: np.ndarray, *, cache_dir: Any, batch_size: int
) -> str:
    """The most likely reason for a mismatch, in words (one line).

    ``rebuilt`` is a ``Rebuilt`` or an ``Assembled`` model: each of its backbone branches is
    compared with its cached features, named by its feature set when there are several.
    """
    branches = rebuilt.branches
    causes: list[str] = []
    for branch in branches:
        found = _diagnose_branch(branch, run_data, images, ids, cache_dir=cache_dir, batch_size=batch_size)
        causes += [f"{branch.name or branch.key[:12]}: {c}" if len(branches) > 1 else c for c in found]
    if any(str(b.spec.get("dtype", "float32")) == "float16" for b in branches):
        causes.append(
            "the features were cached as float16, whose rounding alone moves probabilities by ~1e-3 (pass --tolerance 1e-2)"
        )
    if not causes:
        recipes = "; ".join(_recipe(b.spec) for b in branches)
        causes.append(
            f"different resize, preprocessing or weights than the cached features ({recipes}), or images changed since extraction"
        )
    return "; ".join(causes)


def _recipe(spec: Mapping[str, Any]) -> str:
    return (
        f"resize {spec['resize']!r} to {spec['input_size']} px, preprocessing {spec['preprocess']!r}, weights {spec['weights']}, "
        f"layer {spec['layer']!r}, pooling {spec['pooling']!r}"
    )


def _diagnose_branch(
    branch: Any, run_data: RunData, images: list[np.ndarray], ids: np.ndarray, *, cache_dir: Any, batch_size: int
) -> list[str]:
    """What differs between one branch's rebuilt features and its cached ones."""
    from featurecache.cache import store, views

    spec = branch.spec
    bspec = branch.backbone_spec
    recipe = _recipe(spec)
    causes = []
    registry_pre = f"{bspec.module}:{bspec.preprocess}"
    if str(spec["preprocess"]) != registry_pre:
        causes.append(f"the run's preprocessing {spec['preprocess']!r} is not {bspec.name}'s {registry_pre!r}")
    fs = views.find_by_key(store.resolve_cache_dir(cache_dir), branch.key)
    if fs is not None and fs.complete and run_data.val_split in fs.splits:
        index = {str(s): i for i, s in enumerate(fs.ids(run_data.val_split))}
        if all(str(i) in index for i in ids):
            cached = fs.features(run_data.val_split)[[index[str(i)] for i in ids]].astype(np.float64)
            got = ImagePredictor(branch.features, batch_size=batch_size)(images)
            if got.shape == cached.shape:
                delta = float(np.abs(got - cached).max())
                rel = delta / max(float(np.abs(cached).max()), 1e-12)
                if rel > 1e-4:
                    causes.append(
                        f"the rebuilt backbone's features differ from the cached ones (max |dx| {delta:.3g}, relative {rel:.2g}), so {recipe} do not reproduce the extraction"
                    )
                else:
                    causes.append(
                        "the features match the cache, so the head's Keras conversion differs from its scikit-learn predictions"
                    )
            else:
                causes.append(
                    f"the rebuilt backbone gives features of shape {got.shape[1:]} but the cache holds {cached.shape[1:]} ({recipe})"
                )
    return causes
