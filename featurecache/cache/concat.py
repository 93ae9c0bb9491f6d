"""Several cached feature sets of one dataset, read side by side as one feature set.

How it works
------------
Feature sets extracted from the same images by different backbones (or layers, sizes) hold
the same rows: row ``i`` of a split is the same image in each. :class:`ConcatFeatures` reads
them as one set whose feature vector is the concatenation of the parts' vectors, in the order
given. It offers the read API of :class:`~featurecache.cache.views.FeatureSet` that training
uses (``key``, ``name``, ``spec``, ``classes``, ``splits``, ``layout``, ``features``,
``labels``, ``ids``, ``valid``, ``feature_array``, ``attrs``), so ``train_head``, ``sweep`` and
``load_training_data`` take it unchanged, and a run records every part.

Opening checks that the parts describe the same images -- same classes, same splits, and per
split the same ids in the same order with the same labels -- and otherwise raises one line
naming the first difference. An image counts as valid only where every part decoded it.
Augmented views are concatenated view by view only when every part made them the same way
(views, augmentation, seed, augmented splits): then view ``v`` is the same augmented image in
every part. Otherwise only the clean view is used.

Identity: the key is a digest of the parts' keys in order (``KEY1,KEY2`` and ``KEY2,KEY1`` are
different feature sets: the head's columns differ); the spec is ``{"parts": [...], "seed",
"dtype"}`` where each part records its key, name, full spec and ``--weights`` value, which is
what :mod:`featurecache.finetune.assemble` needs to rebuild every backbone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from featurecache.cache import views
from featurecache.cache.keys import digest_of
from featurecache.cache.views import SplitLayout
from featurecache.errors import UsageError

__all__ = ["ConcatFeatures", "feature_parts", "open_concat", "open_recorded_features", "split_feature_refs"]

# Spec fields that decide which augmented image view v is (same values: same images).
_VIEW_FIELDS = ("augment", "views", "augment_splits", "seed")


def split_feature_refs(features: str | Sequence[str]) -> list[str]:
    """``"KEY1,KEY2"`` (or a list) as its non-empty, stripped feature references."""
    items = features.split(",") if isinstance(features, str) else [str(f) for f in features]
    return [f.strip() for f in items if f.strip()]


class _ConcatArray:
    """The parts' ``(views, n, d_i)`` Zarr arrays read as one ``(views, n, sum d_i)`` array.

    Supports the two reads :class:`featurecache.train.LazyFeatures` makes, ``a[view, row]`` and
    ``a.oindex[view, rows]``, so concatenated features over the memory budget still stream.
    """

    def __init__(self, arrays: Sequence[Any], views: int) -> None:
        self.arrays = list(arrays)
        n = int(arrays[0].shape[1])
        self.shape = (int(views), n, sum(int(a.shape[2]) for a in arrays))
        self.dtype = np.result_type(*(a.dtype for a in arrays))
        self.oindex = _OIndex(self)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.concatenate([np.asarray(a[key], dtype=self.dtype) for a in self.arrays], axis=-1)


class _OIndex:
    def __init__(self, parent: _ConcatArray) -> None:
        self.parent = parent

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.concatenate([np.asarray(a.oindex[key], dtype=self.parent.dtype) for a in self.parent.arrays], axis=-1)


class ConcatFeatures:
    """Complete feature sets of one dataset read as one, their vectors concatenated.

    Build it with :func:`open_concat`, which checks the parts.

    Parameters
    ----------
    parts
        Two or more complete feature sets of the same images with 1-D (pooled) features.
    """

    def __init__(self, parts: Sequence[views.FeatureSet]) -> None:
        self.parts = tuple(parts)
        first = self.parts[0]
        self.aligned_views = all(
            [p.spec.get(f) for f in _VIEW_FIELDS] == [first.spec.get(f) for f in _VIEW_FIELDS]
            and all(p.layout(s).views == first.layout(s).views for s in first.splits)
            for p in self.parts
        )
        self._valid: dict[str, np.ndarray] = {}

    # -- identity -----------------------------------------------------------------------
    @property
    def key(self) -> str:
        """64 hex digits: a digest of the parts' keys, in order."""
        return digest_of({"concat": [p.key for p in self.parts]})

    @property
    def name(self) -> str:
        """The parts' entry names joined by ``+``."""
        return "+".join(p.name for p in self.parts)

    @property
    def path(self) -> str:
        """The parts' entry paths, comma-separated (for messages)."""
        return ",".join(str(p.path) for p in self.parts)

    @property
    def complete(self) -> bool:
        """Whether every part is complete."""
        return all(p.complete for p in self.parts)

    @property
    def spec(self) -> dict[str, Any]:
        """``{"parts": [{key, name, spec, weights_source}, ...], "seed", "dtype", "views"}``."""
        return {
            "parts": [
                {"key": p.key, "name": p.name, "spec": dict(p.spec), "weights_source": p.attrs.get("weights_source")}
                for p in self.parts
            ],
            # The dataset subset (--limit) and the run's rebuild read these top-level fields.
            "seed": self.parts[0].spec.get("seed", 0),
            "dtype": str(np.result_type(*(np.dtype(str(p.spec.get("dtype", "float32"))) for p in self.parts))),
            "views": "aligned" if self.aligned_views else "clean view only (the parts' augmentations differ)",
        }

    @property
    def attrs(self) -> dict[str, Any]:
        """The dataset's source and ``--limit`` (shared by the parts); weights are per part, in :attr:`spec`."""
        return {k: self.parts[0].attrs[k] for k in ("dataset_source", "dataset_limit") if k in self.parts[0].attrs}

    @property
    def classes(self) -> list[str]:
        """Class names (the same in every part)."""
        return self.parts[0].classes

    @property
    def splits(self) -> list[str]:
        """Split names (the same in every part)."""
        return self.parts[0].splits

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """``(sum of the parts' feature sizes,)``."""
        return (sum(int(p.feature_shape[0]) for p in self.parts),)

    def layout(self, split: str) -> SplitLayout:
        """The concatenated split's shape; one view unless the parts' views are aligned."""
        lay = self.parts[0].layout(split)
        return SplitLayout(split, lay.n, lay.views if self.aligned_views else 1, self.feature_shape)

    # -- data ---------------------------------------------------------------------------
    def feature_array(self, split: str) -> _ConcatArray:
        """A lazy ``(views, n, d)`` array over the parts' Zarr arrays, for streaming reads."""
        return _ConcatArray([p.feature_array(split) for p in self.parts], self.layout(split).views)

    def features(self, split: str, view: int | None = 0) -> np.ndarray:
        """``(n, d)`` for one view, ``(views, n, d)`` for ``view=None``: the parts side by side."""
        if view is None and not self.aligned_views:
            return self.features(split, view=0)[None]
        arrays = [p.features(split, view=view) for p in self.parts]
        return np.concatenate([np.asarray(a, dtype=np.result_type(*arrays)) for a in arrays], axis=-1)

    def labels(self, split: str) -> np.ndarray:
        """Integer labels (checked equal in every part)."""
        return self.parts[0].labels(split)

    def ids(self, split: str) -> np.ndarray:
        """Sample ids (checked equal in every part)."""
        return self.parts[0].ids(split)

    def valid(self, split: str) -> np.ndarray:
        """True where every part decoded the image."""
        if split not in self._valid:
            ok = self.parts[0].valid(split).copy()
            for p in self.parts[1:]:
                ok &= p.valid(split)
            self._valid[split] = ok
        return self._valid[split].copy()

    def failures(self) -> list[dict[str, str]]:
        """Images that failed to decode in any part."""
        seen: dict[tuple[str, str], dict[str, str]] = {}
        for p in self.parts:
            for f in p.failures():
                seen.setdefault((f["split"], f["id"]), f)
        return list(seen.values())

    def __repr__(self) -> str:
        return f"ConcatFeatures({self.name!r})"


def _check_same_images(parts: Sequence[views.FeatureSet]) -> None:
    """One line naming the first difference between the parts' images, or nothing."""
    first = parts[0]
    fix = "concatenate feature sets extracted from the same dataset with the same --limit and --seed"
    for p in parts:
        if len(p.feature_shape) != 1:
            raise UsageError(
                f"feature set {p.name} holds {tuple(p.feature_shape)} feature maps; concatenation needs pooled vectors: "
                "extract it with --pooling avg, max or flatten"
            )
    for p in parts[1:]:
        where = f"feature sets {first.name} and {p.name}"
        if p.classes != first.classes:
            raise UsageError(f"{where} have different classes ({first.classes[:5]}... vs {p.classes[:5]}...); {fix}")
        if p.splits != first.splits:
            raise UsageError(
                f"{where} have different splits ({', '.join(first.splits)} vs {', '.join(p.splits)}); {fix}"
            )
        for split in first.splits:
            a, b = first.ids(split), p.ids(split)
            if len(a) != len(b):
                raise UsageError(f"{where} differ in their {split} split: {len(a)} vs {len(b)} images; {fix}")
            diff = np.flatnonzero(np.asarray(a, dtype=str) != np.asarray(b, dtype=str))
            if len(diff):
                i = int(diff[0])
                raise UsageError(
                    f"{where} differ in their {split} split: {len(diff)} of {len(a)} ids differ or are in another order "
                    f"(row {i}: {a[i]!r} vs {b[i]!r}); {fix}"
                )
            la, lb = first.labels(split), p.labels(split)
            if not np.array_equal(la, lb):
                i = int(np.flatnonzero(la != lb)[0])
                raise UsageError(
                    f"{where} label {split} image {a[i]!r} differently ({first.classes[la[i]]} vs {p.classes[lb[i]]}); {fix}"
                )


def open_concat(
    refs: Sequence[str | views.FeatureSet], *, cache_dir: str | os.PathLike[str] | None = None
) -> ConcatFeatures | views.FeatureSet:
    """Open several feature sets of one dataset as one, their vectors concatenated.

    Parameters
    ----------
    refs
        Keys, key prefixes, entry names or open feature sets, in column order. One reference
        gives that feature set itself.
    cache_dir
        Cache root.

    Returns
    -------
    ConcatFeatures or FeatureSet

    Raises
    ------
    UsageError
        No reference, the same feature set twice, feature maps instead of vectors, or parts
        that are not the same images (classes, splits, ids, their order or labels differ).
        The parts are not the same images (classes, splits, ids, order or labels differ).
    EntryNotFoundError, IncompleteEntryError
        A part is not (completely) in the cache.
    """
    parts = [r if isinstance(r, views.FeatureSet) else views.open_features(str(r), cache_dir=cache_dir) for r in refs]
    if not parts:
        raise UsageError("no feature sets given; pass --features KEY or KEY1,KEY2 to concatenate several")
    parts = [p if p.complete else views.open_features(str(p.path), require_complete=True) for p in parts]
    if len(parts) == 1:
        return parts[0]
    keys = [p.key for p in parts]
    dup = next((p for i, p in enumerate(parts) if p.key in keys[:i]), None)
    if dup is not None:
        raise UsageError(f"feature set {dup.name} is given twice in --features; list each feature set once")
    _check_same_images(parts)
    return ConcatFeatures(parts)


def feature_parts(features: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The feature sets a run's head reads, from its ``config.json`` ``features`` record.

    Parameters
    ----------
    features
        ``config["features"]`` of a run.

    Returns
    -------
    list of dict
        One ``{key, name, spec, weights_source}`` per part, in column order (one for an
        ordinary run).
    """
    spec = features.get("spec") or {}
    if "parts" in spec:
        return [dict(p) for p in spec["parts"]]
    return [
        {
            "key": features.get("key"),
            "name": features.get("name"),
            "spec": dict(spec),
            "weights_source": features.get("weights_source"),
        }
    ]


def open_recorded_features(
    features: Mapping[str, Any], *, cache_dir: str | os.PathLike[str] | None = None
) -> ConcatFeatures | views.FeatureSet:
    """Reopen the feature set(s) a run recorded in ``config["features"]``.

    Raises
    ------
    EntryNotFoundError, IncompleteEntryError, UsageError
        As :func:`open_concat`.
    """
    return open_concat([str(p["key"]) for p in feature_parts(features)], cache_dir=cache_dir)
