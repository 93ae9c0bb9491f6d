"""Write a fine-tune output directory: the model and what it was measured to do.

The model is saved uncompiled as ``model.keras`` (its input is raw RGB of any size, resized and
preprocessed inside by built-in layers), so plain ``keras.saving.load_model`` opens it with
``safe_mode`` on and without featurecache; a TensorFlow SavedModel is added on request. The file
is written under a temporary name and renamed, so a crash never leaves a half-written
``model.keras`` that ``featurecache predict`` would try to load. Beside it go ``config.json``
(how it was made), ``metrics.json``, ``predictions.npz`` and the plots.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MODEL_FILE", "export_model", "write_outputs"]

MODEL_FILE = "model.keras"


def export_model(model: Any, out_dir: Path, *, savedmodel: bool = False) -> Path:
    """Save ``model`` as ``<out_dir>/model.keras`` (uncompiled) and optionally a SavedModel.

    Parameters
    ----------
    model
        The rebuilt (and fine-tuned) model.
    out_dir
        Output directory.
    savedmodel
        Also ``model.export(<out_dir>/savedmodel)`` for TF Serving / TFLite.

    Returns
    -------
    pathlib.Path
        The ``.keras`` file.
    """
    import keras

    path = out_dir / MODEL_FILE
    tmp = out_dir / f".{MODEL_FILE}.{os.getpid()}.tmp.keras"
    try:
        keras.saving.save_model(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if savedmodel:
        model.export(str(out_dir / "savedmodel"), verbose=False)
    return path


def write_outputs(
    out_dir: Path,
    *,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    predictions: Mapping[str, np.ndarray],
    history: Mapping[str, Sequence[float]],
    classes: Sequence[str],
    title: str,
    plots: bool,
) -> None:
    """Write ``metrics.json``, ``predictions.npz``, ``config.json`` and the plots beside the model.

    Parameters
    ----------
    out_dir
        The output directory.
    config
        The ``config.json`` document.
    metrics
        Per split (``val``, ``test``): ``featurecache.metrics.classification_metrics``.
    predictions
        Arrays for ``predictions.npz`` (``<split>_ids``, ``<split>_y``, ``<split>_proba``).
    history
        Training history (empty when nothing was trained: no curves then).
    classes
        Class names, for the confusion matrices.
    title
        Title of the training-curve plot.
    plots
        Write training-curve and confusion-matrix PNGs.
    """
    from featurecache.train import _jsonable, _write_json

    _write_json(out_dir / "metrics.json", metrics)
    np.savez(out_dir / "predictions.npz", **predictions)
    _write_json(out_dir / "config.json", _jsonable(config))
    if plots:
        from featurecache.report import plot_confusion_matrix, plot_training_curves

        if history.get("loss"):
            plot_training_curves(history, out_dir / "training_curves.png", title=title)
        for split, m in metrics.items():
            plot_confusion_matrix(m["confusion_matrix"], classes, out_dir / f"confusion_{split}.png", title=f"fine-tuned on {split}")
        from featurecache.report.html import write_report

        write_report(out_dir)  # top losses of the fine-tuned model and report.html
