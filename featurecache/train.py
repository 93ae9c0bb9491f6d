"""Stage 2: train one head on cached features and write its run directory.

A run directory holds everything stage 3 needs besides the images::

    runs/<name>/config.json       head, params, feature-set key and full spec, classes, validation
    runs/<name>/head.joblib       the fitted head (+ head.keras for Keras heads: a plain Keras model)
    runs/<name>/metrics.json      validation (and test) metrics
    runs/<name>/predictions.npz   ids, labels and probabilities behind those metrics
    runs/<name>/*.png             confusion matrices, training curves

Validation is the cached ``val`` split when there is one, else a deterministic stratified
fraction of ``train``. Training on augmented views: a Keras head draws one view per sample
per epoch, a scikit-learn head trains on all views stacked; validation and test always use
the clean view 0. Images that failed to decode are skipped and counted.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.cache import store
from featurecache.cache.keys import digest_of
from featurecache.errors import RunError, UsageError

RUN_FORMAT = 1


@dataclass(frozen=True)
class TrainingData:
    """Arrays for fitting and scoring a head, from one feature set."""

    key: str
    name: str
    classes: tuple[str, ...]
    spec: Mapping[str, Any]
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    ids_val: np.ndarray
    validation: str
    X_train_views: np.ndarray | None = None
    X_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    ids_test: np.ndarray | None = None
    n_invalid: Mapping[str, int] = field(default_factory=dict)
    source: str | None = None

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)


def resolve_features(features: str | store.FeatureSet, *, cache_dir: str | os.PathLike[str] | None = None) -> store.FeatureSet:
    """A complete feature set from a key, key prefix, entry name or an open :class:`FeatureSet`."""
    if isinstance(features, store.FeatureSet):
        if not features.complete:
            return store.open_features(str(features.path), require_complete=True)
        return features
    return store.open_features(features, cache_dir=cache_dir)


def load_training_data(fs: store.FeatureSet, *, val_fraction: float = 0.15, seed: int = 0) -> TrainingData:
    """Read a feature set into training, validation and test arrays.

    Parameters
    ----------
    fs
        A complete feature set with a ``train`` split.
    val_fraction
        Fraction of ``train`` held out (stratified, deterministic) when there is no ``val`` split.
    seed
        Seed of that hold-out split.

    Returns
    -------
    TrainingData
    """
    if "train" not in fs.splits:
        raise UsageError(f"feature set {fs.name} has no 'train' split (it has {', '.join(fs.splits)}); extract a dataset with training images")
    n_invalid: dict[str, int] = {}

    def split_arrays(split: str, *, all_views: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        ok = fs.valid(split)
        n_invalid[split] = int((~ok).sum())
        X = fs.features(split, view=0)[ok]
        views = None
        if all_views and fs.layout(split).views > 1:
            views = fs.features(split, view=None)[:, ok]
        return X, fs.labels(split)[ok], fs.ids(split)[ok], views

    X, y, ids, views = split_arrays("train", all_views=True)
    if "val" in fs.splits:
        X_val, y_val, ids_val, _ = split_arrays("val")
        validation = "cached val split"
        X_train, y_train, X_views = X, y, views
    else:
        if not 0 < val_fraction < 1:
            raise UsageError(f"--val-fraction must be between 0 and 1, got {val_fraction}; the feature set has no val split to use instead")
        tr, va = _stratified_holdout(y, val_fraction, seed)
        X_train, y_train, X_val, y_val, ids_val = X[tr], y[tr], X[va], y[va], ids[va]
        X_views = views[:, tr] if views is not None else None
        validation = f"stratified {val_fraction:g} of train (seed {seed})"
    test = split_arrays("test") if "test" in fs.splits else None
    if len(X_train) == 0 or len(X_val) == 0:
        raise UsageError(f"feature set {fs.name} leaves {len(X_train)} training and {len(X_val)} validation samples; use more images")
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
    )


def _stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit

    idx = np.arange(len(y))
    try:
        tr, va = next(StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed).split(idx, y))
    except ValueError:  # a class with a single sample cannot be stratified
        tr, va = next(ShuffleSplit(n_splits=1, test_size=fraction, random_state=seed).split(idx))
    return np.sort(tr), np.sort(va)


def fit_head(estimator: Any, data: TrainingData) -> Any:
    """Fit ``estimator`` on ``data`` the way its kind wants it; returns the estimator."""
    from featurecache.heads import DenseHead

    if isinstance(estimator, DenseHead):
        return estimator.fit(data.X_train, data.y_train, X_val=data.X_val, y_val=data.y_val, X_views=data.X_train_views)
    if data.X_train_views is not None:
        v = data.X_train_views
        return estimator.fit(v.reshape(v.shape[0] * v.shape[1], *v.shape[2:]), np.tile(data.y_train, v.shape[0]))
    return estimator.fit(data.X_train, data.y_train)


def predict_full_proba(estimator: Any, X: np.ndarray, n_classes: int) -> np.ndarray:
    """``predict_proba`` with one column per class of the feature set, even for classes unseen in training."""
    proba = np.asarray(estimator.predict_proba(X), dtype=np.float64)
    classes = np.asarray(getattr(estimator, "classes_", np.arange(proba.shape[1]))).astype(int)
    if proba.shape[1] == n_classes and np.array_equal(classes, np.arange(n_classes)):
        return proba
    full = np.zeros((len(X), n_classes))
    full[:, classes] = proba
    return full


def evaluate_arrays(estimator: Any, data: TrainingData, *, top_k: Sequence[int] = (1, 3, 5)) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metrics and predictions on validation and (if cached) test."""
    from featurecache.metrics import classification_metrics

    metrics: dict[str, Any] = {}
    preds: dict[str, np.ndarray] = {}
    splits = [("val", data.X_val, data.y_val, data.ids_val)]
    if data.X_test is not None and len(data.X_test):
        splits.append(("test", data.X_test, data.y_test, data.ids_test))
    for split, X, y, ids in splits:
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
    metrics: dict[str, Any]
    seconds: float
    estimator: Any = field(repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {"run_dir": str(self.run_dir), "head": self.head, "params": _jsonable(self.params), "metrics": self.metrics, "seconds": round(self.seconds, 3)}


def default_run_name(head: str, key: str, params: Mapping[str, Any]) -> str:
    """``<head>-<key8>[-<params6>]``: stable for the same head, features and parameters."""
    name = f"{head.replace(':', '-').replace('.', '-')}-{key[:8]}"
    return f"{name}-{digest_of({'p': _jsonable(params)})[:6]}" if params else name


def train_head(
    features: str | store.FeatureSet,
    *,
    head: str = "logreg",
    params: Mapping[str, Any] | None = None,
    out: str | os.PathLike[str] | None = None,
    runs_dir: str | os.PathLike[str] = "runs",
    val_fraction: float = 0.15,
    seed: int = 0,
    top_k: Sequence[int] = (1, 3, 5),
    cache_dir: str | os.PathLike[str] | None = None,
    plots: bool = True,
    data: TrainingData | None = None,
) -> TrainResult:
    """Train one head on a cached feature set and write its run directory.

    Parameters
    ----------
    features
        Key, key prefix, entry name, or an open :class:`FeatureSet`.
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

    Returns
    -------
    TrainResult

    Raises
    ------
    UnknownHeadError, HeadParamError, EntryNotFoundError, IncompleteEntryError
    """
    from featurecache.heads import coerce_head_params, make_head

    started = time.perf_counter()
    coerced = coerce_head_params(head, params or {})
    estimator = make_head(head, coerced)
    if data is None:
        fs = resolve_features(features, cache_dir=cache_dir)
        data = load_training_data(fs, val_fraction=val_fraction, seed=seed)
    fit_head(estimator, data)
    metrics, preds = evaluate_arrays(estimator, data, top_k=top_k)
    seconds = time.perf_counter() - started
    run_dir = Path(out) if out is not None else Path(runs_dir) / default_run_name(head, data.key, coerced)
    write_run(run_dir, estimator=estimator, head=head, params=coerced, data=data, metrics=metrics, predictions=preds, seconds=seconds, plots=plots)
    return TrainResult(run_dir=run_dir, head=head, params=coerced, metrics=metrics, seconds=seconds, estimator=estimator)


def write_run(
    run_dir: Path,
    *,
    estimator: Any,
    head: str,
    params: Mapping[str, Any],
    data: TrainingData,
    metrics: Mapping[str, Any],
    predictions: Mapping[str, np.ndarray],
    seconds: float,
    plots: bool = True,
) -> Path:
    """Write a run directory (see the module docstring)."""
    from featurecache.extract import library_versions
    from featurecache.heads import save_head

    run_dir.mkdir(parents=True, exist_ok=True)
    save_head(estimator, run_dir)
    config = {
        "format": RUN_FORMAT,
        "head": head,
        "params": _jsonable(params),
        "features": {"key": data.key, "name": data.name, "spec": dict(data.spec), "dataset_source": data.source},
        "classes": list(data.classes),
        "validation": data.validation,
        "invalid_skipped": dict(data.n_invalid),
        "train_seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": library_versions(),
    }
    _write_json(run_dir / "config.json", config)
    _write_json(run_dir / "metrics.json", dict(metrics))
    np.savez(run_dir / "predictions.npz", **predictions)
    if plots:
        from featurecache.report import plot_confusion_matrix, plot_training_curves

        for split, m in metrics.items():
            plot_confusion_matrix(m["confusion_matrix"], data.classes, run_dir / f"confusion_{split}.png", title=f"{head} on {split}")
        history = getattr(estimator, "history_", None)
        if history:
            plot_training_curves(history, run_dir / "training_curves.png", title=head)
    return run_dir


def load_run(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], Any]:
    """Read a run directory: its config and its fitted head.

    Raises
    ------
    RunError
        The directory, its config or its head is missing.
    """
    from featurecache.heads import load_head

    path = Path(run_dir)
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise RunError(f"run directory {path} does not exist; train a head first with `featurecache train-head --out {path}`")
    if not cfg_path.is_file():
        raise RunError(f"{path} has no config.json, so it is not a featurecache run; point to a directory written by `featurecache train-head`")
    config = json.loads(cfg_path.read_text())
    try:
        estimator = load_head(path)
    except FileNotFoundError as exc:
        raise RunError(f"run {path} has no saved head ({exc.filename or exc}); re-run `featurecache train-head --out {path}`") from None
    return config, estimator


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2))
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)
