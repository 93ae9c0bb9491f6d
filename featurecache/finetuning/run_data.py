"""The images and predictions behind a run.

A run records its dataset source, ``--limit`` and seed, so loading that source again gives the
same subset; its ``predictions.npz`` lists the validation ids, which fixes the validation rows
(the cached ``val`` split, or a hold-out carved from ``train``) and so also the training rows.
Dataset label indices are mapped onto the run's class order by name (:func:`label_map`), so a
dataset whose classes are a subset of the model's still scores correctly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.errors import RunError, UsageError, choices

__all__ = ["RunData", "label_map", "load_run_data", "read_predictions"]


@dataclass(frozen=True)
class RunData:
    """The images behind a run: the dataset and the rows of each role.

    Attributes
    ----------
    dataset
        The loaded ``featurecache.data.Dataset``.
    val_split
        Split holding the run's validation images (``val``, or ``train`` for a hold-out).
    val_rows
        Rows of ``val_split``, in the order of ``predictions.npz`` ``val_ids``.
    train_rows
        Rows of ``train`` used for training (the hold-out removed).
    labels
        Maps dataset label indices to model class indices.
    source, limit, seed
        How the dataset was loaded (``--data`` or the run's source, the ``--limit``, the seed).
    """

    dataset: Any = field(repr=False)
    val_split: str
    val_rows: np.ndarray
    train_rows: np.ndarray
    labels: np.ndarray
    source: str = ""
    limit: int | None = None
    seed: int = 0


def load_run_data(
    config: Mapping[str, Any],
    predictions: Mapping[str, np.ndarray],
    *,
    data: str | None = None,
    limit: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> RunData:
    """Load the images of a run: the same dataset, subset and validation hold-out.

    Parameters
    ----------
    config
        The run's ``config.json``.
    predictions
        Its ``predictions.npz`` (``val_ids``).
    data
        Another location of the same dataset (default the run's ``dataset_source``).
    limit
        Images per split (default the ``--limit`` extraction used).
    cache_dir
        Cache root, for the file-digest memo.

    Returns
    -------
    RunData

    Raises
    ------
    RunError
        The run records no dataset source, or the dataset lacks the run's validation images.
    DatasetError
        The dataset cannot be loaded.
    """
    from featurecache.cache import store
    from featurecache.data import load_dataset
    from featurecache.training.runconfig import recorded_dataset

    recorded = recorded_dataset(config)
    source = data or recorded["source"]
    if not source:
        raise RunError(
            "the run does not record its dataset source; pass --data SOURCE with the images the features were extracted from"
        )
    if limit is None:
        limit = recorded["limit"]
    seed = recorded["seed"]
    dataset = load_dataset(
        str(source), memo_dir=store.memo_dir(store.resolve_cache_dir(cache_dir)), limit=limit, seed=seed
    )
    labels = label_map(dataset.classes, tuple(str(c) for c in config["classes"]), where=str(source))
    if "train" not in dataset.splits:
        raise RunError(f"dataset {source!r} has no train split; pass --data with the run's images")
    held_out = recorded["validation"] != "val"
    val_split = "train" if held_out or "val" not in dataset.splits else "val"
    split = dataset.splits[val_split]
    index = {sid: i for i, sid in enumerate(split.ids)}
    val_ids = [str(v) for v in predictions["val_ids"]]
    missing = [v for v in val_ids if v not in index]
    if missing:
        raise RunError(
            f"{len(missing)} of the run's {len(val_ids)} validation images (e.g. {missing[0]!r}) are not in the {val_split} split of {source!r}; "
            "pass --data (and --limit) for the dataset the features were extracted from"
        )
    val_rows = np.array([index[v] for v in val_ids], dtype=np.int64)
    n_train = len(dataset.splits["train"])
    train_rows = np.setdiff1d(np.arange(n_train), val_rows) if val_split == "train" else np.arange(n_train)
    return RunData(
        dataset=dataset,
        val_split=val_split,
        val_rows=val_rows,
        train_rows=train_rows.astype(np.int64),
        labels=labels,
        source=str(source),
        limit=limit,
        seed=seed,
    )


def label_map(dataset_classes: Sequence[str], model_classes: Sequence[str], *, where: str) -> np.ndarray:
    """Model class index of each dataset class, matched by name.

    Parameters
    ----------
    dataset_classes
        The dataset's class names, in its label order.
    model_classes
        The model's class names, in output column order.
    where
        The dataset source, for the error message.

    Returns
    -------
    numpy.ndarray
        ``int64 (len(dataset_classes),)``: index it with dataset labels to get model labels.

    Raises
    ------
    UsageError
        The dataset has classes the model does not know.
    """
    index = {c: i for i, c in enumerate(model_classes)}
    unknown = [c for c in dataset_classes if c not in index]
    if unknown:
        raise UsageError(
            f"dataset {where!r} has classes the model does not know ({choices(unknown[:10])}); the model predicts {choices(model_classes)}"
        )
    return np.array([index[c] for c in dataset_classes], dtype=np.int64)


def read_predictions(run_dir: Path) -> dict[str, np.ndarray]:
    """A run's ``predictions.npz``, checked to hold what the equivalence check needs.

    Parameters
    ----------
    run_dir
        The run directory.

    Returns
    -------
    dict of str to numpy.ndarray
        At least ``val_ids`` and ``val_proba``.

    Raises
    ------
    RunError
        The file is missing, unreadable (truncated, altered) or lacks ``val_ids`` / ``val_proba``.
    """
    from featurecache.training.heads.saving import retrain_hint

    path = run_dir / "predictions.npz"
    if not path.is_file():
        raise RunError(
            f"run {run_dir} has no predictions.npz, which the equivalence check needs; {retrain_hint(run_dir)}"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            preds = {k: npz[k] for k in npz.files}
    except Exception as exc:  # a truncated or altered file: BadZipFile, EOFError, ValueError, zlib.error, ...
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise RunError(f"cannot read {path} ({type(exc).__name__}: {reason}); {retrain_hint(run_dir)}") from None
    if "val_ids" not in preds or "val_proba" not in preds:
        raise RunError(f"{path} lacks val_ids / val_proba; {retrain_hint(run_dir)}")
    return preds
