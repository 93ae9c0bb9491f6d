"""PNG plots for run directories and sweeps (figures made as :mod:`featurecache.report.figures` says)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.errors import UsageError
from featurecache.report.figures import new_figure, save_figure

__all__ = ["plot_confusion_matrix", "plot_leaderboard", "plot_training_curves"]

# One way to make and save figures for every report module (see figures.py).
_figure = new_figure
_save = save_figure


def plot_confusion_matrix(
    cm: Any,
    classes: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    normalize: bool = True,
) -> Path:
    """Plot a confusion matrix as a heat map.

    Parameters
    ----------
    cm
        ``(k, k)`` counts, rows = true class, columns = predicted (as in ``metrics.json``).
    classes
        ``k`` class names.
    path
        Output PNG path (parent directories are created).
    title
        Figure title.
    normalize
        Colour and annotate each row as a fraction of its true-class support (recall on
        the diagonal); rows without samples stay 0.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    UsageError
        When ``cm`` is not square or does not match ``classes``.
    """
    return _save(confusion_figure(cm, classes, title=title, normalize=normalize), path)


def confusion_figure(cm: Any, classes: Sequence[str], *, title: str = "", normalize: bool = True) -> Any:
    """The figure behind :func:`plot_confusion_matrix` (so tests can check its content)."""
    mat = np.asarray(cm, dtype=np.float64)
    k = len(classes)
    if mat.ndim != 2 or mat.shape != (k, k):
        raise UsageError(
            f"cm must have shape ({k}, {k}) for {k} classes, got {mat.shape}; "
            "pass metrics['confusion_matrix'] with the matching class names"
        )
    if normalize:
        support = mat.sum(axis=1, keepdims=True)
        mat = np.divide(mat, support, out=np.zeros_like(mat), where=support > 0)
    side = min(max(4.0, 0.45 * k + 2.5), 30.0)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    image = ax.imshow(mat, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, shrink=0.8)
    if k <= 60:
        # Beyond ~60 classes names overlap into noise; the heat map alone is readable.
        fontsize = 9 if k <= 15 else max(4, int(9 - (k - 15) / 9))
        ax.set_xticks(range(k), [str(c) for c in classes], rotation=90, fontsize=fontsize)
        ax.set_yticks(range(k), [str(c) for c in classes], fontsize=fontsize)
    if k <= 25:
        threshold = 0.5 * (mat.max() if mat.size else 1.0)
        for i in range(k):
            for j in range(k):
                value = mat[i, j]
                text = f"{value:.2f}" if normalize else f"{int(value)}"
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=7 if k > 10 else 9,
                    color="white" if value > threshold else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or ("confusion matrix (row-normalised)" if normalize else "confusion matrix"))
    return fig


def plot_training_curves(
    history: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    before: Mapping[str, float] | None = None,
) -> Path:
    """Plot loss and accuracy per epoch (training and validation).

    Parameters
    ----------
    history
        Keras-style history, e.g. ``DenseHead.history_``: ``loss``, ``val_loss``,
        ``accuracy``, ``val_accuracy`` (missing series are skipped).
    path
        Output PNG path.
    title
        Figure title.
    before
        Values before the first epoch, drawn at epoch 0 (a fine-tune's head: ``val_loss``,
        ``val_accuracy``).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    UsageError
        When the history has neither a loss nor an accuracy series.
    """
    return _save(training_curves_figure(history, title=title, before=before), path)


def training_curves_figure(
    history: Mapping[str, Sequence[float]], *, title: str = "", before: Mapping[str, float] | None = None
) -> Any:
    """The figure behind :func:`plot_training_curves` (so tests can check its content)."""
    panels = [
        (metric, [s for s in (metric, f"val_{metric}") if len(history.get(s, ())) > 0])
        for metric in ("loss", "accuracy")
    ]
    panels = [(metric, series) for metric, series in panels if series]
    if not panels:
        raise UsageError(
            f"history has no loss/accuracy series, got keys {sorted(history)!r}; "
            "pass DenseHead.history_ or keras History.history"
        )
    from matplotlib.ticker import MaxNLocator

    fig = _figure(5.0 * len(panels), 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    val_loss = list(history.get("val_loss", ()))
    best = int(np.nanargmin(val_loss)) + 1 if val_loss and np.isfinite(val_loss).any() else None
    for ax, (metric, series) in zip(axes, panels, strict=True):
        for name in series:
            values = list(history[name])
            start = 1
            if before is not None and name in before:
                values, start = [float(before[name]), *values], 0
            ax.plot(
                range(start, start + len(values)),
                values,
                marker="o" if len(values) <= 30 else None,
                markersize=3,
                label="validation" if name.startswith("val_") else "training",
            )
        if best is not None:
            ax.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"best epoch {best}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def _row_label(row: Mapping[str, Any], index: int) -> str:
    for key in ("name", "trial", "run", "id"):
        if row.get(key) not in (None, ""):
            return str(row[key])
    params = row.get("params")
    if isinstance(params, Mapping) and params:
        text = " ".join(f"{k}={v}" for k, v in params.items())
        return f"{row.get('head', 'head')} {text}"[:60]
    return f"#{index}"


def plot_leaderboard(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    metric: str = "val_accuracy",
    top: int = 30,
) -> Path:
    """Horizontal bar chart of sweep trials, best on top, coloured by head type.

    Parameters
    ----------
    rows
        One mapping per trial with ``metric``, ``head`` (the colour group) and a label from
        the first of ``name``/``trial``/``run``/``id`` (else ``head`` + ``params``).  Rows
        whose metric is missing or not finite (failed trials) are left out.
    path
        Output PNG path.
    metric
        Column to rank by; metrics whose name contains ``loss`` rank lowest first.
    top
        Number of trials shown.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    UsageError
        When no row has a finite ``metric`` or ``top < 1``.
    """
    return _save(leaderboard_figure(rows, metric=metric, top=top), path)


#: Characters per line of a trial label; longer labels (random-search trials) wrap.
_LABEL_WIDTH = 44


def leaderboard_figure(rows: Sequence[Mapping[str, Any]], *, metric: str, top: int) -> Any:
    """The figure behind :func:`plot_leaderboard` (so tests can check its layout).

    Accuracies carry their 95% Wilson interval as an error bar (rows need ``<split>_n``), and
    the trials whose interval overlaps the best one's are drawn solid, the others faded: on a
    small validation set those are not distinguishable from the best. The value axis is zoomed
    to the data, and its label says where it starts.
    """
    import textwrap

    from featurecache.training.metrics import interval, tied_with_best

    if top < 1:
        raise UsageError(f"top must be >= 1, got {top!r}")
    scored = []
    for i, row in enumerate(rows):
        value = row.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            scored.append((float(value), _row_label(row, i), str(row.get("head", "?")), row))
    if not scored:
        present = sorted({k for row in rows for k in row})
        raise UsageError(
            f"no row has a finite {metric!r}; numeric columns available: {present!r}; pass metric= one of them"
        )
    lower_is_better = "loss" in metric
    scored.sort(key=lambda t: t[0], reverse=not lower_is_better)
    tied = tied_with_best([r for *_, r in scored], metric)
    shown = scored[:top]
    spans = [interval(r, metric) for *_, r in shown]
    heads = sorted({h for _, _, h, _ in shown})
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(heads) <= 10 else "tab20"]
    colour = {h: cmap(i % cmap.N) for i, h in enumerate(heads)}
    # Long labels (random-search trials list every drawn parameter) wrap between tokens instead
    # of overlapping; each row gets the height its lines need, every bar the same thickness.
    labels = [
        textwrap.fill(label, _LABEL_WIDTH, break_long_words=False, break_on_hyphens=False) for _, label, _, _ in shown
    ]
    lines = [label.count("\n") + 1 for label in labels]
    fig = _figure(
        10.0, 1.6 + 0.2 * sum(lines) + 0.1 * len(shown) + (0.2 if any(spans) else 0.0)
    )  # a line to explain the intervals
    ax = fig.add_subplot()
    centres = np.cumsum(lines) - np.asarray(lines) / 2  # one unit of height per text line
    values = [v for v, _, _, _ in shown]
    alpha = [1.0 if tie or not any(tied) else 0.35 for tie in tied[: len(shown)]]
    ax.barh(
        centres, values, height=0.7, color=[(*colour[h][:3], a) for (_, _, h, _), a in zip(shown, alpha, strict=True)]
    )
    if any(spans):
        lo = [v - s[0] if s else 0.0 for v, s in zip(values, spans, strict=True)]
        hi = [s[1] - v if s else 0.0 for v, s in zip(values, spans, strict=True)]
        ax.errorbar(values, centres, xerr=[lo, hi], fmt="none", ecolor="black", elinewidth=1, capsize=3)
    ax.set_yticks(centres, labels, fontsize=7)
    ax.set_ylim(float(sum(lines)), 0.0)  # best trial on top
    # Zoomed to the data (intervals included): from 0, 0.958 and 1.0 looked the same. The axis
    # label says where it starts, so the bars' lengths are not read as ratios.
    ends = [*values, *(x for s in spans if s for x in s)]
    low, high = min(ends), max(ends)
    pad = max(0.05 * (high - low), 0.005 if high <= 1 else 0.0)
    left = max(0.0, low - 2 * pad) if low >= 0 else low - 2 * pad
    ax.set_xlim(left, high + pad)
    for y, v, a in zip(centres, values, alpha, strict=True):
        # Inside the bar, at its start: past its end the value would leave the axes at 1.0.
        ax.text(
            left, y, f" {v:.4f}", va="center", fontsize=7, color="white" if a == 1.0 else "black", fontweight="bold"
        )
    from matplotlib.patches import Patch

    # Outside the axes, below them: a legend inside covered a bar.
    fig.legend(
        handles=[Patch(color=colour[h], label=h) for h in heads],
        fontsize=8,
        loc="outside lower center",
        ncols=min(len(heads), 6),
        frameon=False,
    )
    zoom = f" (axis starts at {left:.3g}, not 0)" if left > 0 else ""
    xlabel = metric + (" (lower is better)" if lower_is_better else "") + zoom
    if any(spans):
        n = next(r.get(f"{metric.split('_', 1)[0]}_n") for (*_, r), s in zip(shown, spans, strict=True) if s)
        xlabel += f"\nbars: 95% Wilson interval on {n} images; faded: interval does not reach the best's"
    ax.set_xlabel(xlabel)
    fig.suptitle(f"top {len(shown)} of {len(scored)} trials by {metric}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig
