"""Write a fine-tune output directory: the model and what it was measured to do.

The model is saved uncompiled as ``model.keras`` (its input is raw RGB of any size, resized and
preprocessed inside by built-in layers), so plain ``keras.saving.load_model`` opens it with
``safe_mode`` on and without featurecache; its class names travel inside it (the archive's
``metadata.json``), so a copied file still predicts names. A TensorFlow SavedModel that takes
uint8 images is added on request. The file
is written under a temporary name and renamed, so a crash never leaves a half-written
``model.keras`` that ``featurecache predict`` would try to load. Beside it go ``config.json``
(how it was made), ``metrics.json``, ``predictions.npz`` and the plots.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MODEL_FILE", "export_model", "model_class_names", "write_outputs"]

MODEL_FILE = "model.keras"
_METADATA = "metadata.json"
_NAMESPACE = "featurecache"


def export_model(model: Any, out_dir: Path, *, savedmodel: bool = False, classes: Sequence[str] = ()) -> Path:
    """Save ``model`` as ``<out_dir>/model.keras`` (uncompiled) and optionally a SavedModel.

    Parameters
    ----------
    model
        The rebuilt (and fine-tuned) model.
    out_dir
        Output directory.
    savedmodel
        Also write ``<out_dir>/savedmodel`` for TF Serving / TFLite: its ``serve`` signature
        takes RGB ``uint8`` images of any size (as decoded), ``serve_float32`` float32 in [0, 255],
        and ``class_names`` returns the names.
    classes
        Class names in output column order, kept inside ``model.keras`` (``metadata.json`` of
        the archive: :func:`model_class_names` reads them) so a copied file still names its classes.

    Returns
    -------
    pathlib.Path
        The ``.keras`` file.
    """
    import keras

    from featurecache.cache.fsio import write_atomic

    def save(tmp: Path) -> None:
        keras.saving.save_model(model, str(tmp))
        if classes:
            _add_metadata(tmp, {"class_names": [str(c) for c in classes]})

    path = write_atomic(out_dir / MODEL_FILE, save, suffix=".keras")
    if savedmodel:
        _export_savedmodel(model, out_dir / "savedmodel", classes)
    return path


def _add_metadata(archive: Path, fields: Mapping[str, Any]) -> None:
    """Add ``fields`` under ``featurecache`` in the ``metadata.json`` of a ``.keras`` zip (Keras ignores unknown keys)."""
    import zipfile

    rewritten = archive.with_name(archive.name + ".meta")
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(rewritten, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == _METADATA:
                meta = json.loads(data)
                meta[_NAMESPACE] = {**meta.get(_NAMESPACE, {}), **fields}
                data = json.dumps(meta).encode()
            dst.writestr(info, data, compress_type=info.compress_type)
    os.replace(rewritten, archive)


def model_class_names(path: str | os.PathLike[str]) -> tuple[str, ...] | None:
    """The class names :func:`export_model` stored inside a ``.keras`` file, or ``None``.

    Plain Python reads them too: ``json.loads(zipfile.ZipFile(path).read("metadata.json"))
    ["featurecache"]["class_names"]``.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            meta = json.loads(archive.read(_METADATA))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    names = (meta.get(_NAMESPACE) or {}).get("class_names") if isinstance(meta, dict) else None
    return tuple(str(c) for c in names) if isinstance(names, list) else None


def _export_savedmodel(model: Any, path: Path, classes: Sequence[str]) -> None:
    """A SavedModel whose default signature takes uint8 images (``model.export`` would take float32 only)."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    images = (None, None, None, 3)

    def serve(x: Any) -> Any:
        return model(tf.cast(x, tf.float32), training=False)

    archive.add_endpoint(name="serve", fn=serve, input_signature=[tf.TensorSpec(images, tf.uint8, name="image")])
    archive.add_endpoint(
        name="serve_float32", fn=serve, input_signature=[tf.TensorSpec(images, tf.float32, name="image")]
    )
    names = tf.constant([str(c) for c in classes], dtype=tf.string)
    archive.add_endpoint(name="class_names", fn=lambda: names, input_signature=[])
    archive.write_out(str(path), verbose=False)


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
    before: Mapping[str, float] | None = None,
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
    before
        The head's validation metrics, drawn as epoch 0 of the curves.
    """
    from featurecache.cache.fsio import jsonable, write_json

    write_json(out_dir / "metrics.json", metrics)
    np.savez(out_dir / "predictions.npz", **predictions)  # type: ignore[arg-type]  # numpy 2.1+ stubs let **arrays fill allow_pickle: these are array names
    write_json(out_dir / "config.json", jsonable(config))
    if plots:
        from featurecache.report import plot_confusion_matrix, plot_training_curves

        if history.get("loss"):
            plot_training_curves(history, out_dir / "training_curves.png", title=title, before=before)
        for split, m in metrics.items():
            plot_confusion_matrix(
                m["confusion_matrix"], classes, out_dir / f"confusion_{split}.png", title=f"fine-tuned on {split}"
            )
        from featurecache.report.html import write_report

        write_report(out_dir)  # top losses of the fine-tuned model and report.html
