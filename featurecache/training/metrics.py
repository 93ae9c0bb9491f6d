"""Classification metrics of a head, as plain JSON-serialisable Python values.

Every metric is computed from integer labels and the full probability matrix, with the
label set fixed to ``range(len(classes))``: a split in which some class never occurs (a
small validation set) still yields a confusion matrix, log loss and per-class table with
one entry per class, so runs stay comparable.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from featurecache.errors import UsageError

__all__ = ["classification_metrics", "wilson_interval"]

# Row sums further than this from 1 mean the caller passed scores, not probabilities.
_PROBA_SUM_TOL = 1e-3


def classification_metrics(
    y_true: np.ndarray,
    proba: np.ndarray,
    *,
    classes: Sequence[str],
    top_k: Sequence[int] = (1, 3, 5),
) -> dict[str, Any]:
    """Compute the metrics stored in a run's ``metrics.json``.

    Parameters
    ----------
    y_true
        ``(n,)`` integer indices into ``classes``.
    proba
        ``(n, n_classes)`` class probabilities (rows sum to 1; float32 rounding is
        tolerated and removed by renormalising).
    classes
        Class names, in column order of ``proba``.
    top_k
        ``k`` values for top-k accuracy; only ``k < n_classes`` are reported (top-k with
        ``k >= n_classes`` is always 1).

    Returns
    -------
    dict
        ``n``, ``accuracy``, ``top_k_accuracy`` (``{"3": 0.97, ...}`` -- string keys, so
        the dict is identical after a JSON round trip), ``log_loss``, ``cohen_kappa``
        (``None`` when undefined, e.g. a single class in ``y_true`` and predictions),
        ``macro_f1``, ``confusion_matrix`` (rows = true class, columns = predicted, list of
        lists), ``per_class`` (``{name: {precision, recall, f1, support}}``).

    Raises
    ------
    UsageError
        When shapes disagree, labels fall outside ``range(len(classes))`` or rows of
        ``proba`` do not sum to 1.
    """
    from sklearn import metrics as skm

    y = np.asarray(y_true)
    p = np.asarray(proba, dtype=np.float64)
    names = [str(c) for c in classes]
    k = len(names)
    if k < 2 or len(set(names)) != k:
        raise UsageError(
            f"classes must list at least 2 distinct class names, got {names[:20]!r}; "
            "pass the feature set's class names in label order"
        )
    if p.ndim != 2 or p.shape[1] != k:
        raise UsageError(
            f"proba must have shape (n, {k}) for {k} classes, got {p.shape}; "
            "pass predict_proba output with columns in the order of classes"
        )
    if y.ndim != 1 or y.shape[0] != p.shape[0] or y.shape[0] == 0:
        raise UsageError(f"y_true must have shape ({p.shape[0]},) matching proba, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= k:
        raise UsageError(
            f"y_true must hold integer class indices in [0, {k}), got dtype {y.dtype} "
            f"range [{y.min()!r}, {y.max()!r}]; map labels with classes.index(label)"
        )
    sums = p.sum(axis=1)
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.max(np.abs(sums - 1)) > _PROBA_SUM_TOL:
        raise UsageError(
            f"proba rows must be probabilities summing to 1, got sums in "
            f"[{sums.min():.4g}, {sums.max():.4g}]; pass predict_proba, not decision_function"
        )
    p = p / sums[:, None]
    labels = np.arange(k)
    pred = p.argmax(axis=1)

    precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    with warnings.catch_warnings():
        # Kappa is 0/0 when truth and predictions are one and the same class; we report
        # None for that instead of letting a warning escape into every sweep's log.
        warnings.simplefilter("ignore")
        kappa = skm.cohen_kappa_score(y, pred, labels=labels)
    return {
        "n": int(y.shape[0]),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "top_k_accuracy": {
            str(int(kk)): _top_k_accuracy(y, p, int(kk)) for kk in sorted({int(v) for v in top_k}) if 1 <= kk < k
        },
        "log_loss": float(skm.log_loss(y, p, labels=labels)),
        "cohen_kappa": float(kappa) if math.isfinite(kappa) else None,
        "macro_f1": float(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "confusion_matrix": skm.confusion_matrix(y, pred, labels=labels).astype(int).tolist(),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        },
    }


def _top_k_accuracy(y: np.ndarray, proba: np.ndarray, k: int) -> float:
    """Top-k accuracy, ranked exactly as ``sklearn.metrics.top_k_accuracy_score`` does.

    Computed here because sklearn calls a split whose ``y`` holds at most two distinct
    labels "binary" and then rejects the 2-D probability matrix.
    """
    ranked = np.argsort(proba, axis=1, kind="mergesort")[:, ::-1][:, :k]
    return float((ranked == y[:, None]).any(axis=1).mean())


def wilson_interval(accuracy: float, n: int, *, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of an accuracy measured on ``n`` items (95% by default).

    On a small validation set one item moves the accuracy by ``1/n`` (0.02 at 48 images), so a
    score alone cannot rank trials; this interval says how far the true accuracy may be. Unlike
    the normal approximation it stays inside [0, 1] and is not empty at 0 or 1 (100% on 48
    images gives 0.926-1).

    Parameters
    ----------
    accuracy
        Fraction of the ``n`` items that are right (``correct / n``; rounded to a count).
    n
        Number of items scored.
    z
        Normal quantile of the confidence level (1.96 for 95%).

    Returns
    -------
    tuple of float
        ``(low, high)``.

    Raises
    ------
    UsageError
        When ``n < 1`` or ``accuracy`` is outside [0, 1].
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UsageError(f"n must be a positive number of scored items, got {n!r}")
    if not 0.0 <= accuracy <= 1.0:
        raise UsageError(f"accuracy must be in [0, 1], got {accuracy!r}")
    p = round(accuracy * n) / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 and 1 the bound is exact; floating point would leave 0.9999999999999999.
    return (0.0 if p == 0 else max(0.0, centre - half)), (1.0 if p == 1 else min(1.0, centre + half))


def interval(r: Mapping[str, Any], metric: str = "val_accuracy") -> tuple[float, float] | None:
    """The 95% Wilson interval of an accuracy column of a row (``None``: not an accuracy, or no ``<split>_n``).

    Every leaderboard (sweep table, plot, HTML page, ensemble) takes its intervals from here.
    """
    n, value = r.get(f"{metric.split('_', 1)[0]}_n"), r.get(metric)
    if (
        not metric.endswith("accuracy")
        or not isinstance(n, int)
        or n < 1
        or not isinstance(value, (int, float))
        or not 0 <= value <= 1
    ):
        return None
    return wilson_interval(float(value), n)


def tied_with_best(rows: Sequence[Mapping[str, Any]], metric: str = "val_accuracy") -> list[bool]:
    """Per row: is it statistically indistinguishable from the best row on ``metric``?

    The test is overlapping 95% Wilson intervals (a conservative one: trials whose intervals
    overlap are never called different). The best is the first row with an interval, as rows are
    ranked; the best itself is marked. All ``False`` when ``metric`` has no interval (a loss).
    """
    spans = [interval(r, metric) if r.get("status", "ok") == "ok" else None for r in rows]
    best = next((s for s in spans if s is not None), None)
    if best is None:
        return [False] * len(rows)
    return [s is not None and s[1] >= best[0] and s[0] <= best[1] for s in spans]


def format_interval(span: tuple[float, float] | None, digits: int = 3) -> str:
    """``0.926-1.000`` (``-`` when there is no interval)."""
    return "-" if span is None else f"{span[0]:.{digits}f}-{span[1]:.{digits}f}"
