"""Use a model on images: ``evaluate`` on a labelled split, ``predict`` on image files.

A model is named by one path, which may be

* a ``.keras`` file -- typically a fine-tune export; it is loaded with plain
  ``keras.saving.load_model`` (safe mode on, no custom objects). Class names come from the file
  itself (fine-tune exports store them), else the ``config.json`` beside it; without either
  classes are ``"0"``, ``"1"``, ...
* a fine-tune output directory (it holds ``model.keras`` and ``config.json``);
* a ``train-head`` run directory, which is rebuilt into backbone + head first
  (:func:`featurecache.finetune.rebuild_model`), so a head can be used on raw images without
  fine-tuning it; an ensemble, or a head on several feature sets, is rebuilt with every
  backbone it reads (:func:`featurecache.finetune.assemble.assemble_run`).

Every such model takes raw RGB images of any size and resizes and preprocesses them itself, so
nothing here resizes or normalises.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from featurecache.errors import ImageDecodeError, RunError, UsageError, choices
from featurecache.finetuning.export import MODEL_FILE, model_class_names

__all__ = ["EvaluateResult", "LoadedModel", "Prediction", "evaluate", "load_model", "predict", "write_predictions_csv"]

ModelKind = Literal["model", "finetune", "run"]


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for images, with its class names.

    Attributes
    ----------
    model
        Keras model: raw RGB ``(b, H, W, 3)`` in [0, 255] -> probabilities.
    classes
        Class names in output column order.
    path
        What was loaded (file or directory).
    kind
        ``model`` (a bare ``.keras`` file), ``finetune`` (a fine-tune output) or ``run`` (a
        rebuilt ``train-head`` run).
    config
        The ``config.json`` that came with it, if any.
    """

    model: Any = field(repr=False)
    classes: tuple[str, ...]
    path: Path
    kind: ModelKind
    config: Mapping[str, Any] | None = field(default=None, repr=False)


def load_model(
    ref: str | os.PathLike[str] | LoadedModel,
    *,
    weights: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load a ``.keras`` file, a fine-tune output directory, or rebuild a run directory.

    Parameters
    ----------
    ref
        The path (or an already loaded model, returned as is).
    weights
        Backbone weights for rebuilding a run (default what the run records).
    cache_dir
        Cache root (weights memo) for rebuilding a run.

    Returns
    -------
    LoadedModel

    Raises
    ------
    RunError
        The path does not exist, is not a model, or is a run whose head is missing.
    """
    if isinstance(ref, LoadedModel):
        return ref
    path = Path(ref)
    what = "pass a model.keras file, a fine-tune output directory or a train-head run directory"
    if not path.exists():
        raise RunError(f"{path} does not exist; {what}")
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            config = _read_config(path / "config.json")
            return _load_keras(path / MODEL_FILE, config, kind="finetune", shown=path)
        config = _read_config(path / "config.json")
        if config is None:
            raise RunError(f"{path} has neither model.keras nor config.json; {what}")
        if "head" not in config:
            raise RunError(f"{path}/config.json is not a train-head run and there is no model.keras; {what}")
        from featurecache.finetuning.assemble import assemble_run, is_assembled

        if is_assembled(config):  # an ensemble, or a head on several feature sets
            built = assemble_run(path, weights=weights, cache_dir=cache_dir)
            return LoadedModel(model=built.model, classes=built.classes, path=path, kind="run", config=built.config)
        from featurecache.finetuning.rebuild import rebuild_model

        rebuilt = rebuild_model(path, weights=weights, cache_dir=cache_dir)
        return LoadedModel(model=rebuilt.model, classes=rebuilt.classes, path=path, kind="run", config=rebuilt.config)
    if path.suffix != ".keras":
        raise RunError(f"{path} is not a .keras file; {what}")
    return _load_keras(path, _read_config(path.parent / "config.json"), kind="model", shown=path)


def _read_config(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {path} ({exc}); restore it or remove it") from None
    return config if isinstance(config, dict) else None


def _load_keras(file: Path, config: Mapping[str, Any] | None, *, kind: ModelKind, shown: Path) -> LoadedModel:
    import keras

    try:
        model = keras.saving.load_model(str(file), compile=False)
    except Exception as exc:  # a corrupt zip, an unknown layer, a newer Keras: all mean "cannot load"
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise RunError(f"cannot load {file}: {reason}; export it again with `featurecache finetune`") from None
    n_out = int(model.output_shape[-1])
    # The config beside a model names its classes only if it describes that very file.
    described = config is not None and (config.get("kind") == "finetune" or file.name == MODEL_FILE)
    # Names stored inside the file win: they travel with a copied or renamed model.
    classes = model_class_names(file) or ()
    if len(classes) != n_out:
        classes = tuple(str(c) for c in config["classes"]) if described and config and "classes" in config else ()
    if len(classes) != n_out:
        classes = tuple(str(i) for i in range(n_out))
    return LoadedModel(model=model, classes=classes, path=shown, kind=kind, config=config if described else None)


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """Top classes for one image."""

    image: str
    top: tuple[tuple[str, float], ...]

    def to_json(self) -> dict[str, Any]:
        """``{"image": ..., "top": [{"class": ..., "probability": ...}, ...]}``."""
        return {"image": self.image, "top": [{"class": c, "probability": p} for c, p in self.top]}


def predict(
    model: str | os.PathLike[str] | LoadedModel,
    images: Sequence[str | os.PathLike[str]],
    *,
    top_k: int = 3,
    batch_size: int = 32,
    weights: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[Prediction]:
    """Classify image files.

    Parameters
    ----------
    model
        A ``.keras`` file, fine-tune output directory, run directory, or :class:`LoadedModel`.
    images
        Image files (any size; decoded like the datasets: EXIF orientation, alpha on white) or
        folders, whose images are found recursively (in name order, as a dataset folder).
    top_k
        Classes reported per image (at most the number of classes).
    batch_size
        Images per forward pass.
    weights, cache_dir
        For rebuilding a run directory (see :func:`load_model`).

    Returns
    -------
    list of Prediction
        One per image, in order, most probable class first.

    Raises
    ------
    ImageDecodeError
        An image cannot be read or decoded; the message names the file and the reason.
    RunError
        The model cannot be loaded.
    UsageError
        No images (a folder without any), or ``top_k < 1``.
    """
    from featurecache.data import IMAGE_EXTENSIONS, decode_image
    from featurecache.finetuning.inference import ImagePredictor, image_pool

    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UsageError(f"--top-k must be an integer >= 1, got {top_k!r}")
    paths = _expand_folders([Path(p) for p in images], IMAGE_EXTENSIONS)
    if not paths:
        raise UsageError("no images given; pass one or more image files or folders")
    # Decode everything first: a bad file fails in a second, not after the model has loaded.
    # Decoded in parallel; map raises the first failure in input order, as a loop would.
    try:
        with image_pool("fc-predict") as pool:
            decoded = list(pool.map(decode_image, paths))
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{exc}; pass image files ({', '.join(sorted(IMAGE_EXTENSIONS))})") from None
    loaded = load_model(model, weights=weights, cache_dir=cache_dir)
    proba = ImagePredictor(loaded.model, batch_size=batch_size)(decoded)
    k = min(top_k, len(loaded.classes))
    out = []
    for p, row in zip(paths, proba, strict=True):
        order = np.argsort(-row, kind="stable")[:k]
        out.append(Prediction(image=str(p), top=tuple((loaded.classes[int(j)], float(row[j])) for j in order)))
    return out


def _held_out_rows(loaded: LoadedModel, dataset: Any) -> np.ndarray | None:
    """Rows of ``train`` the model's run held out for validation (its ``predictions.npz`` ``val_ids``), or ``None``."""
    folder = loaded.path if loaded.path.is_dir() else loaded.path.parent
    try:
        with np.load(folder / "predictions.npz", allow_pickle=False) as npz:
            val_ids = [str(v) for v in npz["val_ids"]]
    except (OSError, KeyError, ValueError):
        return None
    index = {sid: i for i, sid in enumerate(dataset.splits["train"].ids)}
    if not val_ids or any(v not in index for v in val_ids):
        return None
    return np.array([index[v] for v in val_ids], dtype=np.int64)


def _expand_folders(paths: Sequence[Path], extensions: frozenset[str]) -> list[Path]:
    """``paths`` with each folder replaced by the image files under it (recursively)."""
    from featurecache.data.sources import image_files

    out: list[Path] = []
    for path in paths:
        if not path.is_dir():
            out.append(path)
            continue
        found = image_files(path)
        if not found:
            raise UsageError(
                f"folder {path} has no images ({', '.join(sorted(extensions))}, searched recursively); pass a folder that has some"
            )
        out.extend(found)
    return out


def write_predictions_csv(predictions: Sequence[Prediction], path: str | os.PathLike[str]) -> Path:
    """Write ``image,class_1,probability_1,...,class_k,probability_k``, one row per image.

    Parameters
    ----------
    predictions
        From :func:`predict`.
    path
        The CSV file (its folder is created).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    import csv

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    k = max((len(p.top) for p in predictions), default=0)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", *(f"{c}_{i}" for i in range(1, k + 1) for c in ("class", "probability"))])
        for p in predictions:
            writer.writerow([p.image, *(v for c, prob in p.top for v in (c, f"{prob:.6g}"))])
    return out


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluateResult:
    """What :func:`evaluate` measured and wrote."""

    model: str
    data: str
    split: str
    metrics: dict[str, Any] = field(repr=False)
    invalid: int
    out: Path | None

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "model": self.model,
            "data": self.data,
            "split": self.split,
            "invalid": self.invalid,
            "out": str(self.out) if self.out else None,
            "metrics": self.metrics,
        }


def evaluate(
    model: str | os.PathLike[str] | LoadedModel,
    *,
    data: str | None = None,
    split: str = "test",
    limit: int | None = None,
    seed: int | None = None,
    out: str | os.PathLike[str] | None = None,
    plots: bool = True,
    top_k: Sequence[int] = (1, 3, 5),
    batch_size: int = 32,
    weights: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> EvaluateResult:
    """Metrics of a model on one split of a labelled dataset, as for heads.

    Parameters
    ----------
    model
        A ``.keras`` file, fine-tune output directory, run directory, or :class:`LoadedModel`.
    data
        Dataset source; default the one the model's run was extracted from.
    split
        ``train``, ``val`` or ``test``. ``val`` of a model whose run held part of ``train`` out
        for validation (the dataset has no ``val`` split) is that same hold-out.
    limit, seed
        Images per split and its seed; default what the run recorded when ``data`` is the
        run's own dataset, else all images.
    out
        Directory for ``metrics.json``, ``predictions.npz`` and the confusion plot; default
        ``<model dir>/eval-<dataset>-<split>``.
    plots
        Write the confusion-matrix PNG.
    top_k
        Top-k accuracies to report.
    batch_size
        Images per forward pass.
    weights, cache_dir
        For rebuilding a run directory (see :func:`load_model`); ``cache_dir`` also holds the
        file-digest memo.

    Returns
    -------
    EvaluateResult

    Raises
    ------
    UsageError
        No dataset known, a split the dataset lacks, or dataset classes the model does not know.
    RunError, DatasetError
        The model or the dataset cannot be loaded.
    """
    from featurecache.cache import store
    from featurecache.cache.fsio import write_json
    from featurecache.data import load_dataset
    from featurecache.finetuning.inference import ImagePredictor, image_pool, predict_rows
    from featurecache.finetuning.run_data import label_map
    from featurecache.training.metrics import classification_metrics
    from featurecache.training.runconfig import recorded_dataset

    loaded = load_model(model, weights=weights, cache_dir=cache_dir)
    recorded = recorded_dataset(loaded.config or {})
    source = data or recorded.get("source")
    if not source:
        raise UsageError(f"{loaded.path} does not record its dataset; pass --data SOURCE")
    same = recorded.get("source") is not None and str(source) == str(recorded.get("source"))
    if limit is None and same:
        limit = recorded.get("limit")
    if seed is None:
        seed = int(recorded.get("seed", 0)) if same else 0
    dataset = load_dataset(
        str(source), memo_dir=store.memo_dir(store.resolve_cache_dir(cache_dir)), limit=limit, seed=seed
    )
    held_out = (
        _held_out_rows(loaded, dataset)
        if split == "val" and "val" not in dataset.splits and same and recorded.get("validation") == "train"
        else None
    )
    if split not in dataset.splits and held_out is None:
        raise UsageError(f"dataset {source!r} has no {split!r} split; pass --split one of {choices(dataset.splits)}")
    labels = label_map(dataset.classes, loaded.classes, where=str(source))
    # A run without a val split validated on a fraction of train: evaluate that same fraction.
    sp = dataset.splits[split] if held_out is None else dataset.splits["train"]
    rows = np.arange(len(sp)) if held_out is None else held_out
    with image_pool("fc-eval") as pool:
        proba, ok = predict_rows(ImagePredictor(loaded.model, batch_size=batch_size), sp, rows, pool=pool)
    if not ok.any():
        raise UsageError(f"no image of the {split} split of {source!r} could be decoded; check the dataset")
    y = labels[sp.labels[rows]][ok]
    metrics = classification_metrics(y, proba[ok], classes=loaded.classes, top_k=top_k)
    base = loaded.path if loaded.path.is_dir() else loaded.path.parent
    out_dir = Path(out) if out is not None else base / f"eval-{dataset.name}-{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", {split: metrics})
    np.savez(out_dir / f"predictions_{split}.npz", ids=np.asarray(sp.ids, dtype=str)[rows][ok], y=y, proba=proba[ok])
    if plots:
        from featurecache.report import plot_confusion_matrix

        plot_confusion_matrix(
            metrics["confusion_matrix"],
            loaded.classes,
            out_dir / f"confusion_{split}.png",
            title=f"{loaded.path.name} on {dataset.name} {split}",
        )
        from featurecache.report import SplitImages, write_report

        write_report(out_dir, images={split: SplitImages(sp, dataset.classes, where=str(source))})
    return EvaluateResult(
        model=str(loaded.path), data=str(source), split=split, metrics=metrics, invalid=int((~ok).sum()), out=out_dir
    )
