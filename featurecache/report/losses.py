"""What a model gets most wrong: its highest-loss images and its most confused class pairs.

A run's ``predictions.npz`` holds, per split, the image ids, true labels (model class indices)
and probabilities behind its metrics, so the losses need no model: the loss of an image is its
cross-entropy ``-log p[true]`` (clipped as scikit-learn's ``log_loss`` clips). The images come
back from the dataset the run records (``config.json``: source, ``--limit``, seed -- loading it
again gives the same subset, as fine-tuning does), looked up by id, so this works for folders,
CSV manifests and array sources alike (:mod:`featurecache.report.images`). Each looked-up
image's label is checked against the run's: a dataset that changed since is an error, never a
wrong picture.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.errors import RunError, UsageError, choices
from featurecache.report.images import SplitImages, load_run_dataset, run_image_loader

__all__ = [
    "ErrorAnalysis",
    "TopLosses",
    "analyse_run",
    "check_labels",
    "labelled_splits",
    "most_confused",
    "per_sample_loss",
    "read_predictions",
    "top_losses",
    "top_losses_from_arrays",
    "write_error_analysis",
]

#: Images shown per grid unless asked otherwise.
DEFAULT_TOP = 16
_MAX_TOP = 100  # a 10 x 10 grid is ~2500 x 3000 px; more would not be looked at


def per_sample_loss(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Cross-entropy of each sample, ``-log p[i, y[i]]``.

    Parameters
    ----------
    y
        ``(n,)`` class indices.
    proba
        ``(n, k)`` probabilities.

    Returns
    -------
    numpy.ndarray
        ``float64 (n,)``; probabilities are clipped to ``[eps, 1]`` (float64 machine epsilon,
        as scikit-learn's ``log_loss``), so a confident miss is large but finite.
    """
    p = np.asarray(proba, dtype=np.float64)
    yy = np.asarray(y, dtype=np.int64)
    picked = p[np.arange(len(yy)), yy]
    return -np.log(np.clip(picked, np.finfo(np.float64).eps, 1.0))


def most_confused(
    cm: Any, classes: Sequence[str], *, top: int | None = None, min_count: int = 1
) -> list[dict[str, Any]]:
    """Off-diagonal cells of a confusion matrix, most frequent first (fastai's ``most_confused``).

    Parameters
    ----------
    cm
        ``(k, k)`` counts, rows = true class, columns = predicted (``metrics.json``).
    classes
        ``k`` class names.
    top
        Keep at most this many pairs (``None``: all).
    min_count
        Leave out pairs seen fewer times.

    Returns
    -------
    list of dict
        ``true``, ``predicted``, ``count`` and ``rate`` (the count over the true class's
        support); ties keep the matrix order.

    Raises
    ------
    UsageError
        ``cm`` is not ``(k, k)`` for the ``k`` classes.
    """
    mat = np.asarray(cm, dtype=np.int64)
    k = len(classes)
    if mat.shape != (k, k):
        raise UsageError(
            f"cm must have shape ({k}, {k}) for {k} classes, got {mat.shape}; pass metrics[split]['confusion_matrix'] and its class names"
        )
    support = mat.sum(axis=1)
    pairs: list[dict[str, Any]] = [
        {
            "true": str(classes[i]),
            "predicted": str(classes[j]),
            "count": int(mat[i, j]),
            "rate": float(mat[i, j] / support[i]),
        }
        for i in range(k)
        for j in range(k)
        if i != j and mat[i, j] >= max(1, min_count)
    ]
    pairs.sort(key=lambda r: -r["count"])  # stable: ties stay in matrix order
    return pairs if top is None else pairs[:top]


@dataclass(frozen=True)
class TopLosses:
    """The ``n`` highest-loss images of one split.

    Attributes
    ----------
    split
        ``val`` or ``test`` (the run's name for it).
    rows
        Highest loss first: ``rank``, ``id``, ``true``, ``predicted``, ``p_predicted``,
        ``p_true``, ``loss``.
    n_total
        Samples the split had.
    images
        ``uint8 (H, W, 3)`` per row, ``None`` where no image was loaded.
    """

    split: str
    rows: list[dict[str, Any]]
    n_total: int
    images: list[np.ndarray | None] = field(default_factory=list, repr=False)

    @property
    def ids(self) -> list[str]:
        """The ids shown, highest loss first."""
        return [r["id"] for r in self.rows]

    def figure(self, *, columns: int | None = None) -> Any:
        """The grid as a ``matplotlib.figure.Figure`` (thumbnail, true and predicted label, probability, loss).

        ``columns`` defaults to 4, more for large grids (about square).
        """
        return _grid_figure(self, columns=columns or max(4, math.ceil(math.sqrt(len(self.rows)))))

    def save(self, path: str | os.PathLike[str], *, columns: int | None = None) -> Path:
        """Write the grid as a PNG; returns ``path``."""
        from featurecache.report.figures import save_figure

        return save_figure(self.figure(columns=columns), path)

    def to_json(self) -> dict[str, Any]:
        """``split``, ``n_total`` and ``rows``."""
        return {"split": self.split, "n_total": self.n_total, "rows": self.rows}


def top_losses_from_arrays(
    ids: Sequence[str] | np.ndarray,
    y: np.ndarray,
    proba: np.ndarray,
    classes: Sequence[str],
    *,
    split: str = "val",
    n: int = DEFAULT_TOP,
    load: Callable[[Sequence[str]], Sequence[np.ndarray | None]] | None = None,
) -> TopLosses:
    """Rank samples by loss and load the images of the ``n`` worst.

    Parameters
    ----------
    ids, y, proba
        Image ids, class indices and ``(n, k)`` probabilities (a split of ``predictions.npz``).
    classes
        Class names in column order.
    split
        The split's name, for titles.
    n
        Images kept (ties in loss are broken by id, so the choice is deterministic).
    load
        Maps the chosen ids to images (``None`` entries allowed); ``None``: no images.

    Returns
    -------
    TopLosses

    Raises
    ------
    UsageError
        ``n`` out of range or arrays of different lengths.
    """
    _check_n(n)
    ids = [str(i) for i in ids]
    p = np.asarray(proba, dtype=np.float64)
    yy = np.asarray(y, dtype=np.int64)
    if not (len(ids) == len(yy) == len(p)) or p.ndim != 2 or p.shape[1] != len(classes):
        raise UsageError(
            f"ids ({len(ids)}), y ({len(yy)}) and proba {p.shape} must describe the same samples over {len(classes)} classes"
        )
    loss = per_sample_loss(yy, p)
    # lexsort: last key first -- loss descending, then id ascending.
    order = np.lexsort((np.asarray(ids, dtype=str), -loss))[:n]
    pred = p.argmax(axis=1)
    rows = [
        {
            "rank": r + 1,
            "id": ids[i],
            "true": str(classes[yy[i]]),
            "predicted": str(classes[pred[i]]),
            "p_predicted": float(p[i, pred[i]]),
            "p_true": float(p[i, yy[i]]),
            "loss": float(loss[i]),
        }
        for r, i in enumerate(order)
    ]
    images: list[np.ndarray | None] = (
        list(load([r["id"] for r in rows])) if load is not None and rows else [None] * len(rows)
    )
    return TopLosses(split=split, rows=rows, n_total=len(ids), images=images)


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= _MAX_TOP:
        raise UsageError(f"the number of top-loss images must be an integer in [1, {_MAX_TOP}], got {n!r}")


def read_predictions(run_dir: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ids, class indices and probabilities of ``split`` in a run, fine-tune or evaluate directory.

    Parameters
    ----------
    run_dir
        A directory with ``predictions.npz`` (``<split>_ids`` ...) or, from ``evaluate``,
        ``predictions_<split>.npz`` (``ids``, ``y``, ``proba``).
    split
        ``val``, ``test`` ...

    Returns
    -------
    tuple of numpy.ndarray
        ``ids``, ``y``, ``proba``.

    Raises
    ------
    RunError
        No predictions file, or none for ``split``.
    """
    path = Path(run_dir)
    single = path / f"predictions_{split}.npz"
    if single.is_file():
        with np.load(single, allow_pickle=False) as npz:
            return npz["ids"], npz["y"], npz["proba"]
    combined = path / "predictions.npz"
    if not combined.is_file():
        raise RunError(
            f"{path} has no predictions.npz; point to a directory written by train-head, sweep, finetune or evaluate"
        )
    with np.load(combined, allow_pickle=False) as npz:
        have = sorted({k.rsplit("_", 1)[0] for k in npz.files if k.endswith("_proba")})
        if f"{split}_proba" not in npz.files:
            raise RunError(f"{combined} has no predictions for split {split!r}; pass --split one of {choices(have)}")
        return npz[f"{split}_ids"], npz[f"{split}_y"], npz[f"{split}_proba"]


def labelled_splits(run_dir: str | os.PathLike[str]) -> list[str]:
    """Splits of a run directory that have predictions (``val`` first, then ``test`` ...)."""
    path = Path(run_dir)
    found = [p.stem.removeprefix("predictions_") for p in path.glob("predictions_*.npz")]
    combined = path / "predictions.npz"
    if combined.is_file():
        with np.load(combined, allow_pickle=False) as npz:
            found += [k.removesuffix("_proba") for k in npz.files if k.endswith("_proba")]
    rank = {"val": 0, "test": 1}
    return sorted(set(found), key=lambda s: (rank.get(s, 2), s))


def top_losses(
    run: str | os.PathLike[str],
    *,
    split: str = "val",
    n: int = DEFAULT_TOP,
    data: str | None = None,
    limit: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TopLosses:
    """The ``n`` images of a run's ``split`` with the highest loss, read back from its dataset.

    Parameters
    ----------
    run
        A ``train-head`` run, a sweep's ``best`` run or a ``finetune`` output directory.
    split
        A split with predictions: ``val`` (the run's validation images) or ``test``.
    n
        Images to show.
    data
        The dataset at another location (default the source the run records).
    limit
        Images per split when loading ``data`` (default the run's ``--limit``).
    cache_dir
        Cache root (file-digest memo).

    Returns
    -------
    TopLosses
        Rows and images; ``.figure()`` draws the grid, ``.save(path)`` writes it.

    Raises
    ------
    RunError
        No config or predictions, no dataset source, or the dataset lacks or relabelled an image.
    DatasetError
        The dataset cannot be loaded.
    UsageError
        Bad ``n`` or ``split``.
    """
    path = Path(run)
    config = _read_config(path)
    ids, y, proba = read_predictions(path, split)
    classes = [str(c) for c in config["classes"]]
    images = run_image_loader(config, split, data=data, limit=limit, cache_dir=cache_dir)
    result = top_losses_from_arrays(ids, y, proba, classes, split=split, n=n, load=images)
    check_labels(result, images)
    return result


def _read_config(path: Path) -> dict[str, Any]:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise RunError(
            f"{path} has no config.json, so it is not a featurecache run; point to a train-head, sweep best or finetune directory"
        )
    return json.loads(cfg.read_text())


def _short(text: str, width: int = 18) -> str:
    """``text`` in ``width`` characters, cut in the middle: a file name's end (``..._0042.jpg``) tells images apart."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def check_labels(result: TopLosses, images: SplitImages) -> None:
    """Refuse a dataset whose labels for the shown images differ from the run's (it changed since).

    Raises
    ------
    RunError
        An image's class in the dataset is not the run's true class.
    """
    for row in result.rows:
        now = images.class_of(row["id"])
        if now != row["true"]:
            raise RunError(
                f"image {row['id']!r} is {now!r} in {images.where!r} but {row['true']!r} in the run; the dataset changed "
                "since the run was made: pass --data with the images the features were extracted from"
            )


def _grid_figure(result: TopLosses, *, columns: int) -> Any:
    from featurecache.report.figures import new_figure

    n = max(1, len(result.rows))
    cols = max(1, min(columns, n))
    nrows = math.ceil(n / cols)
    # Fixed geometry in inches (constrained layout is slow with many axes): 2.1" cells,
    # 0.6" between rows for the two-line title and the id, 0.75" on top for the suptitle.
    cell, row_gap, col_gap, top, bottom = 2.1, 0.6, 0.2, 0.75, 0.3
    width = cols * cell + (cols - 1) * col_gap + 0.2
    height = nrows * cell + (nrows - 1) * row_gap + top + bottom
    fig = new_figure(width, height, layout=None)
    fig.subplots_adjust(
        left=0.1 / width,
        right=1 - 0.1 / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=col_gap / cell,
        hspace=row_gap / cell,
    )
    fig.suptitle(
        f"top {len(result.rows)} losses of {result.n_total} ({result.split}): true / predicted",
        fontsize=10,
        y=1 - 0.1 / height,
    )
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for k, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= len(result.rows):
            ax.set_axis_off()
            continue
        row = result.rows[k]
        image = result.images[k] if k < len(result.images) else None
        if image is None:
            ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=8, transform=ax.transAxes)
        else:
            # Nearest neighbour keeps tiny images (8x8 digits) legible instead of blurred.
            ax.imshow(image, interpolation="nearest" if max(image.shape[:2]) < 96 else "antialiased")
        ax.set_title(
            f"{_short(row['true'])} / {_short(row['predicted'])}\np={row['p_predicted']:.2f}  loss={row['loss']:.2f}",
            fontsize=8,
            color="firebrick" if row["true"] != row["predicted"] else "black",
        )
        ax.set_xlabel(_short(row["id"], 26), fontsize=7)
    return fig


def write_error_analysis(
    out_dir: str | os.PathLike[str],
    results: Sequence[TopLosses],
    confusions: Mapping[str, list[dict[str, Any]]],
    *,
    plots: bool = True,
) -> dict[str, Any]:
    """Write ``top_losses_<split>.png``, ``most_confused.csv`` and ``top_losses.json`` into ``out_dir``.

    Parameters
    ----------
    out_dir
        The run directory.
    results
        One :class:`TopLosses` per split.
    confusions
        Per split, :func:`most_confused` rows.
    plots
        Write the PNG grids.

    Returns
    -------
    dict
        The ``top_losses.json`` document: per split ``top_losses`` rows and ``most_confused``.
    """
    from featurecache.cache.fsio import write_atomic, write_json

    out = Path(out_dir)
    doc: dict[str, Any] = {}
    for res in results:
        doc.setdefault(res.split, {})["top_losses"] = res.rows
        doc[res.split]["n"] = res.n_total
        grid = out / f"top_losses_{res.split}.png"
        if plots and any(img is not None for img in res.images):
            res.save(grid)
        else:
            grid.unlink(missing_ok=True)  # an older grid would no longer match the rows
    for split, pairs in confusions.items():
        doc.setdefault(split, {})["most_confused"] = pairs

    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["split", "true", "predicted", "count", "rate"])
            writer.writeheader()
            for split, pairs in confusions.items():
                for pair in pairs:
                    writer.writerow({"split": split, **pair})

    write_atomic(out / "most_confused.csv", write_csv)
    write_json(out / "top_losses.json", doc)
    return doc


@dataclass(frozen=True)
class ErrorAnalysis:
    """Top losses and most confused pairs of every labelled split of a run.

    Attributes
    ----------
    results
        One :class:`TopLosses` per split with predictions.
    confusions
        Per split, :func:`most_confused` rows.
    note
        Why the images are missing (the dataset could not be loaded), else ``""``.
    """

    results: list[TopLosses]
    confusions: dict[str, list[dict[str, Any]]]
    note: str = ""


def analyse_run(
    run_dir: str | os.PathLike[str],
    *,
    n: int = DEFAULT_TOP,
    splits: Sequence[str] | None = None,
    data: str | None = None,
    limit: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    strict: bool = False,
    plots: bool = True,
    images: Mapping[str, SplitImages] | None = None,
) -> ErrorAnalysis:
    """Compute and write (:func:`write_error_analysis`) the top losses and confused pairs of a run.

    Parameters
    ----------
    run_dir
        A run, sweep ``best``, fine-tune or evaluate directory.
    n
        Images per grid.
    splits
        Splits to analyse (default every split with predictions).
    data, limit, cache_dir
        Where the images are, as for :func:`top_losses`.
    strict
        Raise when the images cannot be loaded; otherwise the rows are kept without images
        and :attr:`ErrorAnalysis.note` says why (a run is still written when its dataset has
        moved; ``featurecache report DIR --data NEW`` draws the grid later).
    plots
        Write the PNG grids.
    images
        Images per split already at hand (``evaluate`` loaded them); skips the lookup.

    Returns
    -------
    ErrorAnalysis

    Raises
    ------
    RunError, DatasetError
        With ``strict``, when the images cannot be loaded; a split without predictions.
    """
    from featurecache.errors import FeatureCacheError

    path = Path(run_dir)
    _check_n(n)
    chosen = list(splits) if splits else labelled_splits(path)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
    metrics = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").is_file() else {}
    classes = [str(c) for c in (config or {}).get("classes", [])] or _classes_from_metrics(metrics)
    results, confusions, notes = [], {}, []
    dataset = None
    if config is not None and any(sp not in (images or {}) for sp in chosen):
        try:
            dataset = load_run_dataset(config, data=data, limit=limit, cache_dir=cache_dir)
        except FeatureCacheError as exc:
            if strict:
                raise
            notes.append(f"{exc} (then run `featurecache report {path} --data SOURCE`)")
    for split in chosen:
        ids, y, proba = read_predictions(path, split)
        loader = (images or {}).get(split)
        if loader is None and dataset is not None and config is not None:
            try:
                loader = run_image_loader(config, split, dataset=dataset)
            except RunError as exc:
                if strict:
                    raise
                notes.append(f"{split}: {exc}")
        try:
            res = top_losses_from_arrays(ids, y, proba, classes, split=split, n=n, load=loader)
            if loader is not None:
                check_labels(res, loader)
        except RunError as exc:
            if strict:
                raise
            notes.append(f"{split}: {exc}")
            res = top_losses_from_arrays(ids, y, proba, classes, split=split, n=n)
        results.append(res)
        if split in metrics:
            confusions[split] = most_confused(metrics[split]["confusion_matrix"], classes)
    write_error_analysis(path, results, confusions, plots=plots)
    return ErrorAnalysis(results=results, confusions=confusions, note="; ".join(notes))


def _classes_from_metrics(metrics: Mapping[str, Any]) -> list[str]:
    for m in metrics.values():
        if isinstance(m, Mapping) and isinstance(m.get("per_class"), Mapping):
            return [str(c) for c in m["per_class"]]
    raise RunError("the directory has neither config.json nor metrics.json with class names; point to a run directory")
