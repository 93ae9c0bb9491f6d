"""A run's images by id: the dataset it records, loaded again, and one split's images looked up by id.

A run records its dataset source, ``--limit`` and seed (a fine-tune output records what it
loaded), so loading that source again gives the same subset; the ids in ``predictions.npz``
then name the images. The validation images of a run that held out part of ``train`` are in
the ``train`` split. Used by :mod:`featurecache.report.losses` to draw the top-loss grids.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from featurecache.errors import RunError
from featurecache.training.runconfig import recorded_dataset  # re-exported: it lives with the other config readers

__all__ = ["SplitImages", "load_run_dataset", "recorded_dataset", "run_image_loader"]


def load_run_dataset(
    config: Mapping[str, Any],
    *,
    data: str | None = None,
    limit: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Any, str]:
    """The dataset a run was made from (same source, ``--limit`` and seed), and its source.

    Raises
    ------
    RunError
        The run records no dataset source.
    DatasetError
        The dataset cannot be loaded.
    """
    from featurecache.cache import store
    from featurecache.data import load_dataset

    rec = recorded_dataset(config)
    source = data or rec["source"]
    if not source:
        raise RunError(
            "the run does not record its dataset source; pass --data SOURCE with the images the features were extracted from"
        )
    if limit is None and data is None:
        limit = rec["limit"]
    dataset = load_dataset(
        str(source), memo_dir=store.memo_dir(store.resolve_cache_dir(cache_dir)), limit=limit, seed=rec["seed"]
    )
    return dataset, str(source)


def run_image_loader(
    config: Mapping[str, Any],
    split: str,
    *,
    data: str | None = None,
    limit: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    dataset: tuple[Any, str] | None = None,
) -> SplitImages:
    """The images of a run's ``split`` by id, from the dataset the run records.

    ``dataset`` is :func:`load_run_dataset`'s result when already loaded (then ``data``,
    ``limit`` and ``cache_dir`` are not used).

    Raises
    ------
    RunError
        The run records no dataset source, or the dataset lacks the split.
    DatasetError
        The dataset cannot be loaded.
    """
    ds, source = dataset or load_run_dataset(config, data=data, limit=limit, cache_dir=cache_dir)
    where = recorded_dataset(config)["validation"] if split == "val" else split
    if where not in ds.splits and split == "val":
        where = "val" if "val" in ds.splits else "train"
    if where not in ds.splits:
        raise RunError(
            f"dataset {source!r} has no {where!r} split for the run's {split} images; pass --data with the run's images"
        )
    return SplitImages(ds.splits[where], ds.classes, where=source)


class SplitImages:
    """Images of one dataset split by id: ``images(ids)`` decodes them, :meth:`class_of` names their label.

    Ids that are missing raise (a different dataset or ``--limit``); images that no longer
    decode come back as ``None`` (a blank cell).

    Parameters
    ----------
    split
        A ``featurecache.data.Split``.
    classes
        The dataset's class names (its label order).
    where
        The dataset source, for messages.
    """

    def __init__(self, split: Any, classes: Sequence[str], *, where: str) -> None:
        self.split = split
        self.classes = [str(c) for c in classes]
        self.where = where
        self._index = {sid: i for i, sid in enumerate(split.ids)}

    def _rows(self, ids: Sequence[str]) -> list[int]:
        missing = [i for i in ids if i not in self._index]
        if missing:
            raise RunError(
                f"{len(missing)} of the run's images (e.g. {missing[0]!r}) are not in the {self.split.name} split of {self.where!r}; "
                "pass --data (and --limit) for the dataset the features were extracted from"
            )
        return [self._index[i] for i in ids]

    def class_of(self, sid: str) -> str:
        """The dataset's class name for image ``sid``."""
        return self.classes[int(self.split.labels[self._rows([sid])[0]])]

    def __call__(self, ids: Sequence[str]) -> list[np.ndarray | None]:
        from featurecache.errors import ImageDecodeError

        out: list[np.ndarray | None] = []
        for row in self._rows(ids):
            try:
                out.append(self.split.load(row))
            except ImageDecodeError:
                out.append(None)
        return out
