"""Stage 2: train one head on cached features and write its run directory.

A run directory holds everything stage 3 needs besides the images; it is written aside and
swapped in whole (:func:`featurecache.rundir.write_run`)::

    runs/<name>/config.json       head, params, feature-set key and full spec, classes, validation
    runs/<name>/head.json         how the head is stored (written last: a complete save)
    runs/<name>/head.skops        a scikit-learn head (skops: loads without running code), or
    runs/<name>/head.keras        the dense head, a plain Keras model (loaded in safe mode)
    runs/<name>/metrics.json      validation (and test) metrics
    runs/<name>/predictions.npz   ids, labels and probabilities behind those metrics
    runs/<name>/*.png             confusion matrices, training curves, top-loss grids
    runs/<name>/report.html       everything above on one page (featurecache.report)

Validation is the cached ``val`` split when there is one, else a deterministic stratified
fraction of ``train``. Training on augmented views: a Keras head draws one view per sample
per epoch, a scikit-learn head trains on all views stacked; validation and test always use
the clean view 0. Images that failed to decode are skipped and counted.

Features are read into memory while the training features (all views, as float32) fit a
memory budget (``max_memory``, default ``$FEATURECACHE_MAX_MEMORY`` or 4 GiB). Beyond it
the training features stay in the Zarr store as :class:`LazyFeatures`, which the Keras
dense head reads batch by batch; validation and test features are still read into memory.
Scikit-learn heads need their whole training matrix at once and are refused with a
:class:`~featurecache.errors.MemoryBudgetError` that says what to do instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurecache._runtime.options import expands
from featurecache.cache import views
from featurecache.cache.concat import ConcatFeatures  # at run time: get_type_hints(train_head) resolves it
from featurecache.cache.fsio import jsonable
from featurecache.cache.keys import digest_of
from featurecache.errors import (
    CacheCorruptError,
    FeatureCacheError,
    HeadParamError,
    MemoryBudgetError,
    UsageError,
    human_bytes,
)
from featurecache.training.options import TrainOptions
from featurecache.training.runconfig import CACHED_VAL_LABEL
from featurecache.training.runconfig import RUN_FORMAT as RUN_FORMAT  # re-exported, as load_run
from featurecache.training.rundir import load_run as load_run  # re-exported: the run-directory I/O lives there
from featurecache.training.rundir import write_run

MEMORY_ENV = "FEATURECACHE_MAX_MEMORY"
BLAS_THREADS_ENV = "FEATURECACHE_BLAS_THREADS"
#: Memory budget for training features when neither ``max_memory`` nor the variable is set.
DEFAULT_MAX_MEMORY = 4 << 30
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class TrainingData:
    """Arrays for fitting and scoring a head, from one feature set."""

    key: str
    name: str
    classes: tuple[str, ...]
    spec: Mapping[str, Any]
    X_train: np.ndarray | LazyFeatures
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    ids_val: np.ndarray
    validation: str
    X_train_views: np.ndarray | LazyFeatures | None = None
    X_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    ids_test: np.ndarray | None = None
    n_invalid: Mapping[str, int] = field(default_factory=dict)
    source: str | None = None
    # What extract was given (weights_source, dataset_limit): finetune rebuilds from these.
    source_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def untrained_classes(self) -> tuple[str, ...]:
        """Classes with no valid training sample: the head can never predict them."""
        present = set(np.unique(np.asarray(self.y_train)).tolist())
        return tuple(c for i, c in enumerate(self.classes) if i not in present)

    @property
    def streamed(self) -> bool:
        """True when the training features stay in the cache (:class:`LazyFeatures`, over the memory budget)."""
        return isinstance(self.X_train, LazyFeatures)

    @property
    def dense_views(self) -> Any:
        """What the dense head trains from: the views, or streamed features as one view (read batch by batch)."""
        if self.X_train_views is None and isinstance(self.X_train, LazyFeatures):
            return self.X_train.as_views()  # (1, n, *feat)
        return self.X_train_views


def resolve_features(
    features: str | Sequence[str] | views.FeatureSet | ConcatFeatures,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> views.FeatureSet | ConcatFeatures:
    """A complete feature set from a key, key prefix, entry name or an open :class:`FeatureSet`.

    Several references (``"KEY1,KEY2"`` or a list) give one :class:`~featurecache.concat.ConcatFeatures`
    whose vectors are the parts' side by side (checked to be the same images).
    """
    from featurecache.cache.concat import open_concat, split_feature_refs

    if isinstance(features, ConcatFeatures):
        return features
    if isinstance(features, views.FeatureSet):
        if not features.complete:
            return views.open_features(str(features.path), require_complete=True)
        return features
    if not isinstance(features, str) or "," in features:
        return open_concat(
            split_feature_refs(features) if isinstance(features, str) else list(features), cache_dir=cache_dir
        )
    return views.open_features(features, cache_dir=cache_dir)


def validation_label(fs: views.FeatureSource, *, val_fraction: float = 0.15, seed: int = 0) -> str:
    """How :func:`load_training_data` validates on ``fs``, without reading any features.

    Sweeps compare this label to refuse resuming with a different validation set.

    Parameters
    ----------
    fs
        The feature set.
    val_fraction, seed
        The hold-out used when ``fs`` has no ``val`` split.

    Returns
    -------
    str
        ``"cached val split"`` or ``"stratified <fraction> of train (seed <seed>)"``.
    """
    if "val" in fs.splits:
        return CACHED_VAL_LABEL
    return f"stratified {val_fraction:g} of train (seed {seed})"


def parse_validation_label(label: str) -> tuple[float, int] | None:
    """``(val_fraction, seed)`` of a :func:`validation_label`, or ``None`` for the cached val split."""
    import re

    m = re.fullmatch(r"stratified (\S+) of train \(seed (-?\d+)\)", str(label))
    return (float(m.group(1)), int(m.group(2))) if m else None


def load_training_data(
    fs: views.FeatureSource, *, val_fraction: float = 0.15, seed: int = 0, max_memory: int | str | None = None
) -> TrainingData:
    """Read a feature set into training, validation and test arrays.

    Parameters
    ----------
    fs
        A complete feature set with a ``train`` split.
    val_fraction
        Fraction of ``train`` held out (stratified, deterministic) when there is no ``val`` split.
    seed
        Seed of that hold-out split.
    max_memory
        Budget in bytes (or ``"512MiB"``-style text) for the training features, all views, as
        float32. Above it ``X_train`` (and ``X_train_views``) are :class:`LazyFeatures` read
        from the cache on demand. Default ``$FEATURECACHE_MAX_MEMORY``, else 4 GiB.

    Returns
    -------
    TrainingData

    Raises
    ------
    UsageError
        No ``train`` split, too few samples, a bad ``val_fraction`` or ``max_memory``.
    CacheCorruptError
        Stored data fails to read back (a checksum mismatch, a damaged chunk); the message
        names the entry and the ``cache verify`` command.
    """
    try:
        return _load_training_data(fs, val_fraction=val_fraction, seed=seed, max_memory=max_memory)
    except FeatureCacheError:
        raise
    except (ValueError, OSError) as exc:  # zarr's checksum mismatch is a bare ValueError
        raise CacheCorruptError(
            f"reading feature set {fs.name} failed ({type(exc).__name__}: {_first_line(exc)[:160]}); {_damaged_fix(fs)}"
        ) from None


def _damaged_fix(fs: views.FeatureSource) -> str:
    """The commands that check and remove ``fs`` (each part of a concatenation: any of them may be the damaged one)."""
    import shlex

    parts = list(fs.parts) if isinstance(fs, ConcatFeatures) else [fs] if isinstance(fs, views.FeatureSet) else []
    if not parts:
        return f"check it with `featurecache cache verify {fs.key[:12]}`"
    # A view lives at ROOT/views/NAME.
    where = [f"{p.key[:12]} --cache {shlex.quote(str(p.path.parent.parent))}" for p in parts]
    if len(where) == 1:
        return f"check it with `featurecache cache verify {where[0]}`, then remove it (`featurecache cache rm {where[0]} --yes`) and extract again"
    verify = " and ".join(f"`featurecache cache verify {w}`" for w in where)
    return (
        f"check its parts with {verify}, then remove the damaged one with `featurecache cache rm` and extract it again"
    )


def _load_training_data(
    fs: views.FeatureSource, *, val_fraction: float, seed: int, max_memory: int | str | None
) -> TrainingData:
    if "train" not in fs.splits:
        raise UsageError(
            f"feature set {fs.name} has no 'train' split (it has {', '.join(fs.splits)}); extract a dataset with training images"
        )
    budget = resolve_max_memory(max_memory)
    n_invalid: dict[str, int] = {}

    def split_arrays(
        split: str, *, all_views: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        ok = fs.valid(split)
        n_invalid[split] = int((~ok).sum())
        views = None
        if all_views and fs.layout(split).views > 1:
            views = fs.features(split, view=None)[:, ok]
            X = views[0]  # view 0 is read once, with the others (a no-copy slice)
        else:
            X = fs.features(split, view=0)[ok]
        return X, fs.labels(split)[ok], fs.ids(split)[ok], views

    X: np.ndarray | LazyFeatures
    views: np.ndarray | LazyFeatures | None
    streamed = train_feature_bytes(fs) > budget
    if streamed:
        ok = fs.valid("train")
        n_invalid["train"] = int((~ok).sum())
        lazy = LazyFeatures(fs.feature_array("train"), np.flatnonzero(ok), budget=budget)
        X, y, ids = lazy.view(0), fs.labels("train")[ok], fs.ids("train")[ok]
        views = lazy if lazy.shape[0] > 1 else None
    else:
        X, y, ids, views = split_arrays("train", all_views=True)
    if "val" in fs.splits:
        X_val, y_val, ids_val, _ = split_arrays("val")
        X_train, y_train, X_views = X, y, views
    else:
        if not 0 < val_fraction < 1:
            raise UsageError(
                f"--val-fraction must be between 0 and 1, got {val_fraction}; the feature set has no val split to use instead"
            )
        if len(y) < 2:
            raise UsageError(
                f"feature set {fs.name} has {len(y)} valid training sample(s) and no val split, too few to hold out a validation set; use more images"
            )
        tr, va = _stratified_holdout(y, val_fraction, seed)
        if streamed:
            # Only the held-out rows are read; the training rows stay in the store.
            X_train, X_val = lazy.subset(tr).view(0), lazy.view(0).read(va)
            X_views = lazy.subset(tr) if views is not None else None
            y_train, y_val, ids_val = y[tr], y[va], ids[va]
        else:
            X_train, y_train, X_val, y_val, ids_val = X[tr], y[tr], X[va], y[va], ids[va]
            X_views = views[:, tr] if views is not None else None
    validation = validation_label(fs, val_fraction=val_fraction, seed=seed)
    test = split_arrays("test") if "test" in fs.splits else None
    if len(X_train) == 0 or len(X_val) == 0:
        raise UsageError(
            f"feature set {fs.name} leaves {len(X_train)} training and {len(X_val)} validation samples; use more images"
        )
    return TrainingData(
        key=fs.key,
        name=fs.name,
        classes=tuple(fs.classes),
        spec=fs.spec,
        X_train=X_train,
        y_train=y_train,
        X_val=X_val,
        y_val=y_val,
        ids_val=ids_val,
        validation=validation,
        X_train_views=X_views,
        X_test=test[0] if test else None,
        y_test=test[1] if test else None,
        ids_test=test[2] if test else None,
        n_invalid=n_invalid,
        source=fs.attrs.get("dataset_source"),
        source_options={k: fs.attrs[k] for k in ("weights_source", "dataset_limit") if k in fs.attrs},
    )


def _stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation positions: stratified; a class with one sample always trains.

    A single sample cannot be in both parts; held out, its class would silently vanish from
    training (the head could never predict it), so it stays in training, unvalidated.
    """
    from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit

    values, counts = np.unique(y, return_counts=True)
    single = np.isin(y, values[counts == 1])
    rest = np.flatnonzero(~single)
    if len(rest) < 2:
        return np.arange(len(y)), np.zeros(0, dtype=np.int64)
    try:
        tr, va = next(StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed).split(rest, y[rest]))
    except ValueError:  # fewer held-out rows than classes: cannot stratify
        tr, va = next(ShuffleSplit(n_splits=1, test_size=fraction, random_state=seed).split(rest))
    return np.sort(np.concatenate([rest[tr], np.flatnonzero(single)])), np.sort(rest[va])


def resolve_max_memory(value: int | str | None = None) -> int:
    """The training-feature memory budget in bytes.

    Parameters
    ----------
    value
        Bytes, or text such as ``"4GiB"``, ``"512M"`` (binary units K, M, G, T, with or
        without ``iB`` / ``B``). ``None``: ``$FEATURECACHE_MAX_MEMORY``, else 4 GiB.

    Returns
    -------
    int

    Raises
    ------
    UsageError
        A negative number or text that is not a size.
    """
    import re

    raw = value if value is not None else os.environ.get(MEMORY_ENV)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return DEFAULT_MAX_MEMORY
    number: float | None = None
    if isinstance(raw, (int, np.integer)) and not isinstance(raw, bool):
        number = float(raw)
    elif isinstance(raw, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?\s*", raw, flags=re.IGNORECASE)
        if m:
            number = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if number is None or number < 0:
        raise UsageError(
            f"memory budget {raw!r} (max_memory or ${MEMORY_ENV}) is not a size; "
            "pass a number of bytes or one with a binary unit K, M, G or T, e.g. 4GiB or 512M"
        )
    return int(number)


def train_feature_bytes(fs: views.FeatureSource) -> int:
    """Bytes of ``fs``'s training features, every view, as float32 (what the budget is compared with)."""
    lay = fs.layout("train")
    return int(lay.views) * int(lay.n) * int(np.prod(lay.feature_shape, dtype=np.int64)) * 4


class LazyFeatures:
    """Selected rows of a cached ``(views, n, *feat)`` Zarr array, read only when indexed.

    It stands in for the training arrays when they exceed the memory budget. With several
    views it looks like ``(views, len(rows), *feat)`` and ``x[v, idx]`` reads view ``v`` of
    the selected rows ``idx`` -- the one access the dense head's batch reader makes; a single
    view (:meth:`view`) looks like ``(len(rows), *feat)``. Only the chunks that hold the asked
    rows are read. Turning it into one NumPy array (``np.asarray``, scikit-learn's input
    checks) raises :class:`MemoryBudgetError` instead of silently loading more than the
    budget; :meth:`read` loads chosen rows on purpose.

    Parameters
    ----------
    array
        The Zarr features array of a split, ``(views, n, *feat)``.
    rows
        Sorted row numbers kept (valid images, the training part of a hold-out).
    budget
        The budget that was exceeded, for error messages.
    views
        Views exposed, default all.
    single
        Expose the one view in ``views`` as ``(len(rows), *feat)``.
    """

    def __init__(
        self, array: Any, rows: np.ndarray, *, budget: int, views: Sequence[int] | None = None, single: bool = False
    ) -> None:
        self.array = array
        self.rows = np.asarray(rows, dtype=np.int64)
        self.budget = int(budget)
        self.views = tuple(range(int(array.shape[0]))) if views is None else tuple(int(v) for v in views)
        self.single = bool(single)
        self.dtype = np.dtype(array.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(len(rows), *feat)`` for a single view, else ``(views, len(rows), *feat)``."""
        feat = tuple(int(d) for d in self.array.shape[2:])
        return (len(self.rows), *feat) if self.single else (len(self.views), len(self.rows), *feat)

    @property
    def ndim(self) -> int:
        """Number of axes."""
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyFeatures(shape={self.shape}, dtype={self.dtype}, budget={human_bytes(self.budget)})"

    def view(self, v: int) -> LazyFeatures:
        """View ``v`` (an index into :attr:`views`) as ``(len(rows), *feat)``."""
        return LazyFeatures(self.array, self.rows, budget=self.budget, views=(self.views[v],), single=True)

    def as_views(self) -> LazyFeatures:
        """The same rows as ``(views, len(rows), *feat)``, also for a single view."""
        return LazyFeatures(self.array, self.rows, budget=self.budget, views=self.views, single=False)

    def subset(self, idx: np.ndarray) -> LazyFeatures:
        """The rows at positions ``idx`` (sorted) of this selection."""
        return LazyFeatures(
            self.array,
            self.rows[np.asarray(idx, dtype=np.int64)],
            budget=self.budget,
            views=self.views,
            single=self.single,
        )

    def _read(self, view: int, idx: Any) -> np.ndarray:
        sel = self.rows[idx]
        if np.ndim(sel) == 0:
            return np.asarray(self.array[view, int(sel)])
        return np.asarray(self.array.oindex[view, np.asarray(sel, dtype=np.int64)])

    def __getitem__(self, key: Any) -> np.ndarray:
        if self.single:
            return self._read(self.views[0], key)
        if not (isinstance(key, tuple) and len(key) == 2):
            raise UsageError(f"streamed features are indexed as x[view, rows], got {key!r}")
        return self._read(self.views[int(key[0])], key[1])

    def read(self, idx: Any = slice(None)) -> np.ndarray:
        """Load rows ``idx`` (default all) of a single view into memory."""
        if not self.single:
            raise UsageError("read() loads one view; call .view(v).read(...)")
        return self._read(self.views[0], idx)

    def too_big(self, why: str) -> MemoryBudgetError:
        """The error for an operation that would load everything."""
        need = len(self.rows) * int(self.array.shape[0]) * int(np.prod(self.array.shape[2:], dtype=np.int64)) * 4
        return MemoryBudgetError(
            f"the training features ({len(self.rows)} rows x {int(self.array.shape[0])} views, {human_bytes(need)} as float32) "
            f"exceed the memory budget of {human_bytes(self.budget)} (max_memory or ${MEMORY_ENV}) and are streamed from the cache, "
            f"but {why}; train the dense head (it streams: --head dense), or raise the budget, e.g. {MEMORY_ENV}={-(-need * 5 // (4 << 20))}M"
        )

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise self.too_big("this step needs them as one in-memory array")


def _head_label(estimator: Any) -> str:
    steps = getattr(estimator, "steps", None)
    final = steps[-1][1] if steps else estimator
    return type(final).__name__


def blas_threads() -> int:
    """BLAS threads for scikit-learn fits: ``$FEATURECACHE_BLAS_THREADS``, else 1.

    Heads on cached features are small matrices, where a BLAS thread per core mostly spins:
    measured on a loaded 2-core machine, one logreg fit took 17.6 s with OpenBLAS's default
    threads and 0.6 s with one. The same number in every process also makes a sweep's results
    independent of ``--jobs``: lbfgs sums in another order with another thread count (a logreg
    trial's validation log loss moved by 4e-4 between ``--jobs 1`` and ``--jobs 2``).

    Raises
    ------
    UsageError
        The variable is not a positive integer.
    """
    raw = os.environ.get(BLAS_THREADS_ENV, "").strip()
    if not raw:
        return 1
    if not raw.isdigit() or int(raw) < 1:
        raise UsageError(
            f"${BLAS_THREADS_ENV}={raw!r} is not a positive number of threads; set it to e.g. 1 or 4, or unset it"
        )
    return int(raw)


def fit_head(estimator: Any, data: TrainingData, *, callbacks: Sequence[Any] = ()) -> Any:
    """Fit ``estimator`` on ``data`` the way its kind wants it; returns the estimator.

    scikit-learn heads fit with :func:`blas_threads` BLAS threads; ``callbacks`` are extra Keras
    callbacks for the dense head (others have no epochs).

    Raises
    ------
    MemoryBudgetError
        The training features are streamed (over the memory budget) and ``estimator`` is not
        the Keras dense head, the one head that trains from batches read on demand.
    """
    from threadpoolctl import threadpool_limits

    from featurecache.training.heads import DenseHead

    if isinstance(estimator, DenseHead):
        return estimator.fit(
            data.X_train,
            data.y_train,
            X_val=data.X_val,
            y_val=data.y_val,
            X_views=data.dense_views,
            callbacks=callbacks,
        )
    if isinstance(data.X_train, LazyFeatures):
        raise data.X_train.too_big(f"the {_head_label(estimator)} head fits on the whole matrix at once")
    steps = getattr(estimator, "steps", None)
    k = getattr(steps[-1][1] if steps else estimator, "n_neighbors", None)
    n_rows = len(data.y_train) * (data.X_train_views.shape[0] if data.X_train_views is not None else 1)
    if isinstance(k, int) and k > n_rows:
        raise HeadParamError(
            f"n_neighbors={k} exceeds the {n_rows} training samples; pass -p n_neighbors=N with N <= {n_rows}"
        )
    with threadpool_limits(limits=blas_threads(), user_api="blas"):
        if data.X_train_views is not None:
            v = data.X_train_views
            assert isinstance(v, np.ndarray)  # streamed views come with a streamed X_train, refused above
            return estimator.fit(v.reshape(v.shape[0] * v.shape[1], *v.shape[2:]), np.tile(data.y_train, v.shape[0]))
        return estimator.fit(data.X_train, data.y_train)


def fit_dense_together(estimators: Sequence[Any], data: TrainingData) -> list[Any]:
    """Fit several ``DenseHead`` estimators on ``data`` in one shared pass (see ``heads.dense_group``).

    Each gets what :func:`fit_head` would give it alone (tested to be identical); the batches
    are gathered once for all of them, and one traced step trains them all.
    """
    from featurecache.training.heads.dense_group import fit_dense_heads

    return fit_dense_heads(
        estimators, data.X_train, data.y_train, X_val=data.X_val, y_val=data.y_val, X_views=data.dense_views
    )


def predict_full_proba(estimator: Any, X: np.ndarray, n_classes: int) -> np.ndarray:
    """``predict_proba`` with one column per class of the feature set, even for classes unseen in training.

    Rows are renormalised in float64: a float32 model's rows sum to 1 only within ~1e-7,
    which scikit-learn's ``log_loss`` warns about when it is run on ``predictions.npz``.
    """
    proba = np.asarray(estimator.predict_proba(X), dtype=np.float64)
    sums = proba.sum(axis=1, keepdims=True)
    proba = np.divide(proba, sums, out=proba, where=sums > 0)
    classes = np.asarray(getattr(estimator, "classes_", np.arange(proba.shape[1]))).astype(int)
    if proba.shape[1] == n_classes and np.array_equal(classes, np.arange(n_classes)):
        return proba
    full = np.zeros((len(X), n_classes))
    full[:, classes] = proba
    return full


def evaluate_arrays(
    estimator: Any, data: TrainingData, *, top_k: Sequence[int] = (1, 3, 5)
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metrics and predictions on validation and (if cached) test (with :func:`blas_threads` BLAS threads)."""
    from threadpoolctl import threadpool_limits

    from featurecache.training.metrics import classification_metrics

    metrics: dict[str, Any] = {}
    preds: dict[str, np.ndarray] = {}
    splits = [("val", data.X_val, data.y_val, data.ids_val)]
    if data.X_test is not None and data.y_test is not None and data.ids_test is not None and len(data.X_test):
        splits.append(("test", data.X_test, data.y_test, data.ids_test))
    for split, X, y, ids in splits:
        with threadpool_limits(limits=blas_threads(), user_api="blas"):
            proba = predict_full_proba(estimator, X, data.n_classes)
        metrics[split] = classification_metrics(y, proba, classes=data.classes, top_k=top_k)
        preds[f"{split}_proba"], preds[f"{split}_y"], preds[f"{split}_ids"] = proba, y, np.asarray(ids, dtype=str)
    return metrics, preds


@dataclass(frozen=True)
class TrainResult:
    """What ``train_head`` produced."""

    run_dir: Path
    head: str
    params: dict[str, Any]
    metrics: dict[str, Any] = field(repr=False)  # per-class tables and confusion matrices: kilobytes
    seconds: float
    estimator: Any = field(repr=False, compare=False)
    #: Classes with no valid training sample (the head never predicts them).
    untrained_classes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "run_dir": str(self.run_dir),
            "head": self.head,
            "params": jsonable(self.params),
            "metrics": self.metrics,
            "seconds": round(self.seconds, 3),
            "untrained_classes": list(self.untrained_classes),
        }


def default_run_name(head: str, key: str, params: Mapping[str, Any]) -> str:
    """``<head>-<key8>[-<params6>]``: stable for the same head, features and parameters."""
    name = f"{head.replace(':', '-').replace('.', '-')}-{key[:8]}"
    return f"{name}-{digest_of({'p': jsonable(params)})[:6]}" if params else name


@expands(TrainOptions)
def train_head(
    features: str | Sequence[str] | views.FeatureSet | ConcatFeatures,
    options: TrainOptions | None = None,
    *,
    top_k: Sequence[int] = (1, 3, 5),
    cache_dir: str | os.PathLike[str] | None = None,
    data: TrainingData | None = None,
    max_memory: int | str | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train one head on a cached feature set and write its run directory.

    Parameters
    ----------
    features
        Key, key prefix, entry name, or an open :class:`FeatureSet`; several (``"KEY1,KEY2"``
        or a list) train on their features concatenated (see :mod:`featurecache.concat`).
    options
        A :class:`~featurecache.training.options.TrainOptions` holding the options below from
        ``head`` to ``tensorboard`` (default: all defaults). Each of them may also be passed as
        a keyword, which wins over ``options``.
    head
        Head name (``logreg``, ``linear-svm``, ``ridge``, ``sgd``, ``knn``, ``dense``) or an
        import path ``module:Class``.
    params
        Head hyperparameters; strings are coerced by the head's schema.
    out
        Run directory; default ``<runs_dir>/<head>-<key8>[-<params>]``.
    runs_dir
        Parent of the default run directory.
    val_fraction, seed
        Hold-out used when the feature set has no ``val`` split.
    top_k
        Top-k accuracies to report.
    cache_dir
        Cache root.
    plots
        Write PNG plots.
    data
        Already loaded arrays (sweeps load them once); ``features`` is then only used for the key.
    max_memory
        Budget for the training features (see :func:`load_training_data`); above it the dense
        head streams them from the cache and the other heads are refused.
    tensorboard
        TensorBoard log directory: the run becomes ``<tensorboard>/<run name>`` with its
        parameters and final metrics (HParams), and for the dense head Keras's curves.

    Returns
    -------
    TrainResult

    Raises
    ------
    UnknownHeadError, HeadParamError, EntryNotFoundError, IncompleteEntryError
    MemoryBudgetError
        A scikit-learn head on training features over the memory budget.
    """
    from featurecache.training.heads import coerce_head_params, make_head

    o = TrainOptions.merge(options, overrides)  # every value checked before any work
    head, params, out, runs_dir, tensorboard = o.head, o.params, o.out, o.runs_dir, o.tensorboard
    started = time.perf_counter()
    coerced = coerce_head_params(head, params or {})
    estimator = make_head(head, coerced)
    if data is None:
        fs = resolve_features(features, cache_dir=cache_dir)
        data = load_training_data(fs, val_fraction=o.val_fraction, seed=o.seed, max_memory=max_memory)
    run_dir = Path(out) if out is not None else Path(runs_dir) / default_run_name(head, data.key, coerced)
    tb_dir = None
    callbacks: list[Any] = []
    if tensorboard is not None:
        from featurecache.report.tensorboard import fresh_run_log_dir, keras_callback
        from featurecache.training.heads import DenseHead

        tb_dir = fresh_run_log_dir(tensorboard, run_dir.name)
        callbacks = [keras_callback(tb_dir)] if isinstance(estimator, DenseHead) else []
    try:
        fit_head(estimator, data, callbacks=callbacks)
        metrics, preds = evaluate_arrays(estimator, data, top_k=top_k)
    except FeatureCacheError:
        raise
    except ValueError as exc:  # scikit-learn's parameter validation, found only with the data in hand
        raise HeadParamError(
            f"head {head!r} cannot be trained on {data.name} with these parameters: {_first_line(exc)}; change its parameters (see `featurecache heads`)"
        ) from None
    seconds = time.perf_counter() - started
    write_run(
        run_dir,
        estimator=estimator,
        head=head,
        params=coerced,
        data=data,
        metrics=metrics,
        predictions=preds,
        seconds=seconds,
        plots=o.plots,
    )
    if tb_dir is not None:
        from featurecache.report.tensorboard import write_hparams_run

        write_hparams_run(tb_dir, hparams={"head": head, **coerced}, metrics=metrics)
    return TrainResult(
        run_dir=run_dir,
        head=head,
        params=coerced,
        metrics=metrics,
        seconds=seconds,
        estimator=estimator,
        untrained_classes=data.untrained_classes,
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return " ".join(lines[0].split()) if lines else type(exc).__name__
