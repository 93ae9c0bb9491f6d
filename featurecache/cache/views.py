"""Dataset views: a dataset's splits, ids and labels over a feature store's rows.

Layout of a view ``<cache>/views/<label>--<dataset>--<viewkey12>/`` (a Zarr v3 group)::

    zarr.json          attributes ``featurecache``: view key, feature store name and key, spec,
                       class names, dataset digest and source, split sizes, failures, versions
    <split>/ids        (n,) str     relative path or array index of each item, in dataset order
    <split>/labels     (n,) int64   index into the class names
    <split>/digests    (n,) str     each item's image content digest
    <split>/rows       (views, n) int64   where each item's view lives in the store's v<V>/features

A view is written aside, whole, once every row it refers to is in the store, and renamed into
place: it exists only complete. Every consumer reads it as contiguous arrays per split in
dataset order (:class:`FeatureSet`), exactly as before store version 2. On first use the ids,
digests, labels and class names are hashed back into the dataset digest and compared with the
recorded one (and that with the view key), so a flipped label or id is refused, not trained on;
the features are checked unit by unit against their markers (:meth:`FeatureStore.read_unit`).
Opening one (:func:`open_features`) also checks, from metadata alone, that its name ends with
its key, that its recorded spec hashes to its store's key (so an edited ``input_size`` is never
recorded by a run), and the store's spec to the same; and that the failures list is the one the
store's markers give (again before any validity or feature is read, for a view opened directly).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np

from featurecache.cache import storage
from featurecache.cache.faults import checkpoint
from featurecache.cache.fsio import raise_if_disk_full
from featurecache.cache.keys import FORMAT_VERSION, manifest_digest, view_key
from featurecache.cache.storage import Location
from featurecache.cache.store import (
    STORES_DIR,
    TMP_DIR,
    VIEWS_DIR,
    CacheNode,
    FeatureStore,
    array_codecs,
    as_node_path,
    read_group_attrs,
    resolve_cache_dir,
)
from featurecache.errors import (
    AmbiguousEntryError,
    CacheCorruptError,
    DamagedUnitError,
    EntryNotFoundError,
    IncompleteEntryError,
    UsageError,
)

MIN_PREFIX = 6


@dataclass(frozen=True)
class SplitLayout:
    """Shape of one split of a view."""

    name: str
    n: int
    views: int
    feature_shape: tuple[int, ...]


class ViewFeatures:
    """A split's ``(views, n, *feature_shape)`` features, read lazily from the store.

    It supports what streaming readers use: ``shape``, ``dtype``, ``x[view, i]``,
    ``x[view, start:stop]`` and ``x.oindex[view, rows]``; each read gathers only the units that
    hold the asked rows and verifies them.
    """

    def __init__(self, store: FeatureStore, rows: np.ndarray, *, owner: str = "", key: str = "") -> None:
        self.store = store
        self.rows = rows  # (views, n)
        self.owner, self.key = owner, key
        self.dtype = np.dtype(store.dtype)
        self.shape = (int(rows.shape[0]), int(rows.shape[1]), *store.feature_shape)
        self.ndim = len(self.shape)

    def _get(self, view: int, sel: Any) -> np.ndarray:
        picked = self.rows[int(view)][sel]
        try:
            if np.ndim(picked) == 0:
                return self.store.gather(int(view), np.asarray([picked]))[0]
            return self.store.gather(int(view), picked)
        except DamagedUnitError as exc:
            raise DamagedUnitError(
                f"feature set {self.owner} cannot be read: unit v{exc.view}/u{exc.slot} of its feature store {exc.reason}; "
                f"check it with `featurecache cache verify {self.key[:12]}`, drop the damaged units with "
                f"`featurecache cache verify {self.key[:12]} --repair`, then run the same extract command to recompute them",
                store=exc.store,
                view=exc.view,
                slot=exc.slot,
                reason=exc.reason,
            ) from None

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple) and len(key) == 2:
            return self._get(int(key[0]), key[1])
        if isinstance(key, (int, np.integer)):
            return self._get(int(key), slice(None))
        if isinstance(key, slice) and key == slice(None):
            return np.stack([self._get(v, slice(None)) for v in range(self.shape[0])])
        raise UsageError(f"view features are indexed as x[view, rows], got {key!r}")

    @property
    def oindex(self) -> ViewFeatures:
        """Orthogonal indexing (the same as plain indexing here)."""
        return self


class FeatureSource(Protocol):
    """What readers of a feature set use: a :class:`FeatureSet`, or several of one dataset read as
    one (:class:`~featurecache.cache.concat.ConcatFeatures`)."""

    @property
    def key(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def complete(self) -> bool: ...
    @property
    def spec(self) -> Mapping[str, Any]: ...
    @property
    def attrs(self) -> Mapping[str, Any]: ...
    @property
    def classes(self) -> Sequence[str]: ...
    @property
    def splits(self) -> Sequence[str]: ...
    @property
    def feature_shape(self) -> tuple[int, ...]: ...
    def layout(self, split: str) -> SplitLayout: ...
    def feature_array(self, split: str) -> Any: ...
    def features(self, split: str, view: int | None = 0) -> np.ndarray: ...
    def labels(self, split: str) -> np.ndarray: ...
    def ids(self, split: str) -> np.ndarray: ...
    def valid(self, split: str) -> np.ndarray: ...
    def failures(self) -> list[dict[str, str]]: ...


class FeatureSet(CacheNode):
    """A read view of one dataset over one feature store (what ``--features KEY`` names).

    Parameters
    ----------
    path
        The view's directory.

    Raises
    ------
    EntryNotFoundError
        ``path`` is not a view.
    CacheCorruptError
        Its ``zarr.json`` is unreadable, or its feature store is gone.
    """

    def __init__(self, path: str | os.PathLike[str] | Location) -> None:
        self.path = as_node_path(path)
        try:
            attrs = read_group_attrs(self.path)
        except CacheCorruptError as exc:
            raise CacheCorruptError(
                f"{exc}; remove the view with `featurecache cache rm {self.path.name} --yes` and extract again"
            ) from None
        if attrs is None or attrs.get("kind") != "view":
            raise EntryNotFoundError(
                f"{self.path} is not a featurecache feature set; list them with `featurecache cache ls`"
            )
        self.attrs: dict[str, Any] = attrs
        self._checked = False

    # -- identity (key, name, spec: CacheNode) ------------------------------------------
    @property
    def classes(self) -> list[str]:
        """Class names; labels index into this list."""
        return list(self.attrs["classes"])

    @property
    def splits(self) -> list[str]:
        """Split names in order (train, val, test where present)."""
        return list(self.attrs["layout"])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one sample's features."""
        return tuple(self.attrs["feature_shape"])

    @property
    def complete(self) -> bool:
        """Always True: a view is written only once every row it refers to exists."""
        return True

    def identity_problems(self) -> list[str]:
        """What in the view's ``zarr.json`` contradicts its key and name, one line each (no array is read).

        The name ends with the key's first 12 digits; the key is :func:`view_key` of the feature
        spec key and the dataset digest; the recorded spec hashes to that spec key, and it is
        the key of the store this view reads (whose shape and views it must have). So an
        edited spec, key, store or layout is refused before anything is read or recorded.
        """
        fix = f"run `featurecache cache verify {self.name} --repair` and the same extract command, which rewrites it from the store's rows"
        store_key, digest = str(self.attrs.get("store_key")), str(self.attrs.get("dataset_digest"))
        out = [p for p in (self.name_problem("feature set"), self.spec_key_problem("feature set", store_key, fix)) if p]
        if view_key(store_key, digest) != self.key:
            out.append(
                f"feature set {self.name} does not hash to its key {self.key[:12]} (its store key or dataset digest was edited); {fix}"
            )
        if out:
            return out
        spec = self.spec
        if spec.get("dataset_digest") != digest:
            out.append(
                f"the spec of feature set {self.name} names dataset {str(spec.get('dataset_digest'))[:12]}, not its {digest[:12]}; {fix}"
            )
        for split, d in dict(self.attrs.get("layout") or {}).items():
            views = 1 + (int(spec["views"]) if split in spec["augment_splits"] else 0)
            got = d.get("views") if isinstance(d, dict) else None
            if got != views:
                out.append(
                    f"the layout of feature set {self.name} gives {split} {got} view(s), but its spec {views}; {fix}"
                )
        try:
            st = self.store
        except CacheCorruptError as exc:
            return [*out, str(exc)]
        if st.key != store_key:
            out.append(
                f"feature set {self.name} reads feature store {st.name}, whose key is {st.key[:12]}, not the {store_key[:12]} it records; {fix}"
            )
        elif st.feature_shape != self.feature_shape:
            out.append(
                f"feature set {self.name} records features of shape {self.feature_shape}, but its store holds {st.feature_shape}; {fix}"
            )
        return out

    def check_identity(self) -> None:
        """Refuse a view (or the store it reads) whose metadata disagree with its key.

        Raises
        ------
        CacheCorruptError
            The first of :meth:`identity_problems`, or of the store's.
        """
        super().check_identity()
        self.store.check_identity()

    def layout(self, split: str) -> SplitLayout:
        """The shape of ``split``'s arrays."""
        self._check_split(split)
        d = self.attrs["layout"][split]
        return SplitLayout(split, int(d["n"]), int(d["views"]), self.feature_shape)

    @cached_property
    def store(self) -> FeatureStore:
        """The feature store whose rows this view reads."""
        path = self.path.parent.parent / STORES_DIR / str(self.attrs["store"])
        try:
            return FeatureStore(path)
        except (EntryNotFoundError, CacheCorruptError):
            raise CacheCorruptError(
                f"feature set {self.name} reads the feature store {self.attrs['store']}, which is gone or torn; "
                f"remove the view (`featurecache cache rm {self.name} --yes`) and extract again"
            ) from None

    # -- arrays --------------------------------------------------------------------------
    @cached_property
    def group(self):  # -> zarr.Group
        """The view's Zarr group (read-only)."""
        import zarr

        return zarr.open_group(storage.zarr_store(self.path, read_only=True), mode="r", zarr_format=3)

    def _check_split(self, split: str) -> None:
        if split not in self.attrs["layout"]:
            raise UsageError(f"split {split!r} is not in {self.name}; it has {', '.join(self.attrs['layout'])}")

    @cached_property
    def _arrays(self) -> dict[str, dict[str, np.ndarray]]:
        names = ("ids", "labels", "digests", "rows")
        paths = [f"{split}/{name}" for split in self.splits for name in names]
        values = dict(zip(paths, self._read_small(paths), strict=True))
        out = {}
        for split in self.splits:
            out[split] = {
                "ids": np.asarray(values[f"{split}/ids"], dtype=object),
                "labels": np.asarray(values[f"{split}/labels"], dtype=np.int64),
                "digests": np.asarray(values[f"{split}/digests"], dtype=object),
                "rows": np.asarray(values[f"{split}/rows"], dtype=np.int64),
            }
        self.check_manifest(out)
        return out

    def _read_small(self, paths: Sequence[str]) -> list[np.ndarray]:
        """Read several small arrays in one pass of Zarr's event loop (concurrently, not one by one)."""
        import asyncio

        import zarr
        import zarr.api.asynchronous as zarr_async
        from zarr.core.sync import sync

        async def read_all() -> list[Any]:
            group = await zarr_async.open_group(storage.zarr_store(self.path, read_only=True), mode="r", zarr_format=3)

            async def one(path: str) -> Any:
                try:
                    array = await group.getitem(path)
                    if not isinstance(array, zarr.AsyncArray):
                        raise TypeError("a group where an array belongs")
                    return await array.getitem(slice(None))
                except Exception as exc:  # noqa: BLE001 - zarr's checksum errors have their own types
                    return exc

            return await asyncio.gather(*(one(p) for p in paths))

        out = sync(read_all())
        for path, value in zip(paths, out, strict=True):
            if isinstance(value, BaseException):
                split, name = path.split("/", 1)
                self._check_split(split)
                raise CacheCorruptError(
                    f"{path} of feature set {self.name} is unreadable ({' '.join(str(value).split())[:100]}); "
                    f"check it with `featurecache cache verify {self.key[:12]}` and remove it with `featurecache cache rm {self.name} --yes`"
                )
        return out

    def arrays(self) -> dict[str, dict[str, np.ndarray]]:
        """Per split: ``ids``, ``labels``, ``digests`` and ``rows``, checked against the manifest.

        Raises
        ------
        CacheCorruptError
            They do not hash back to the dataset digest and the key.
        """
        return self._arrays

    def check_manifest(self, arrays: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> None:
        """Hash the stored classes, ids, digests and labels back into the dataset digest.

        Raises
        ------
        CacheCorruptError
            They no longer give the recorded dataset digest, or that the view key.
        """
        arrays = arrays if arrays is not None else self._arrays
        digest = manifest_digest(self.classes, [(s, a["ids"], a["digests"], a["labels"]) for s, a in arrays.items()])
        fix = f"run `featurecache cache verify {self.key[:12]}`, remove it with `featurecache cache rm {self.name} --yes` and extract again"
        if digest != self.attrs.get("dataset_digest"):
            raise CacheCorruptError(
                f"the ids, labels or class names of feature set {self.name} were altered (they hash to {digest[:12]}, not {str(self.attrs.get('dataset_digest'))[:12]}); {fix}"
            )
        if view_key(str(self.attrs.get("store_key")), digest) != self.key:
            raise CacheCorruptError(f"feature set {self.name} does not hash to its key {self.key[:12]}; {fix}")
        for split, a in arrays.items():
            if a["rows"].shape != (self.layout(split).views, len(a["ids"])) or self.layout(split).n != len(a["ids"]):
                raise CacheCorruptError(f"{split}/rows of feature set {self.name} has shape {a['rows'].shape}; {fix}")

    def check_rows(self, arrays: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> None:
        """Check that every row this view points at holds the image it expects (per the markers).

        A swapped pair of ``rows`` chunks keeps valid checksums and an intact manifest; this
        catches it before any feature is read.

        Raises
        ------
        CacheCorruptError
            A row is missing from the store or holds another image's features.
        """
        arrays = arrays if arrays is not None else self._arrays
        st, cr = self.store, self.store.chunk_rows
        fix = f"run `featurecache cache verify {self.key[:12]} --repair` and the same extract command again"
        held: dict[int, np.ndarray] = {}
        for split, a in arrays.items():
            for view in range(a["rows"].shape[0]):
                if view not in held:  # each row's image digest, as the markers record it
                    markers = st.markers(view)
                    size = (max(markers, default=-1) + 1) * cr
                    held[view] = np.full(size, None, dtype=object)
                    for slot, marker in markers.items():
                        digests = marker.get("digests", [])
                        held[view][slot * cr : slot * cr + len(digests)] = digests
                rows = a["rows"][view]
                inside = (rows >= 0) & (rows < len(held[view]))
                ok = inside.copy()
                ok[inside] = held[view][rows[inside]] == a["digests"][inside]
                if not ok.all():
                    j = int(np.flatnonzero(~ok)[0])
                    raise CacheCorruptError(
                        f"{split}/{a['ids'][j]} view {view} of feature set {self.name} points at store row {int(rows[j])}, which does not hold "
                        f"its image (a unit is missing or the view's rows were altered); {fix}"
                    )
        self.check_failures(arrays)

    def check_failures(self, arrays: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> None:
        """Check the recorded failures list against the store's view-0 markers (which :meth:`valid` follows).

        Raises
        ------
        CacheCorruptError
            The list names an image the markers do not, misses one they do, or gives another reason.
        """
        arrays = arrays if arrays is not None else self._arrays
        failed = self.store.failures()
        want = {
            (s, str(i), str(d), failed[str(d)])
            for s, a in arrays.items()
            for i, d in zip(a["ids"], a["digests"], strict=True)
            if str(d) in failed
        }
        have = {tuple(str(x) for x in f) for f in self.attrs.get("failures", [])}
        if have != want:
            odd = sorted(have ^ want)[0]
            raise CacheCorruptError(
                f"the failures list of feature set {self.name} disagrees with its store's markers at {odd[0]}/{odd[1]} "
                f"(it lists {len(have)} undecodable images, the markers {len(want)}): its zarr.json was edited; "
                f"run `featurecache cache verify {self.name} --repair` and the same extract command, which rewrites it"
            )

    def labels(self, split: str) -> np.ndarray:
        """Integer labels ``(n,)`` indexing :attr:`classes`."""
        self._check_split(split)
        return self._arrays[split]["labels"].copy()

    def ids(self, split: str) -> np.ndarray:
        """Sample ids ``(n,)``: relative paths or array indices."""
        self._check_split(split)
        return self._arrays[split]["ids"].copy()

    def digests(self, split: str) -> np.ndarray:
        """Image content digests ``(n,)``."""
        self._check_split(split)
        return self._arrays[split]["digests"].copy()

    def valid(self, split: str) -> np.ndarray:
        """``(n,)`` bool: False where the image failed to decode (its features are zeros)."""
        self._check_split(split)
        self._check_rows_once()
        bad = {str(d) for _, _, d, _ in self.failure_rows()}
        return np.asarray([str(d) not in bad for d in self._arrays[split]["digests"]], dtype=bool)

    def feature_array(self, split: str) -> ViewFeatures:
        """The lazy ``(views, n, *feature_shape)`` features, for streaming reads."""
        self._check_split(split)
        self._check_rows_once()
        return ViewFeatures(self.store, self._arrays[split]["rows"], owner=self.name, key=self.key)

    def _check_rows_once(self) -> None:
        if not self._checked:  # once, before any feature or validity is read
            self.check_rows()
            self._checked = True

    def features(self, split: str, view: int | None = 0) -> np.ndarray:
        """Features of ``split``: ``(n, *shape)`` for one view, ``(views, n, *shape)`` for ``view=None``."""
        arr = self.feature_array(split)
        return arr[:] if view is None else arr[int(view)]

    def failure_rows(self) -> list[tuple[str, str, str, str]]:
        """``(split, id, digest, reason)`` of each image that failed to decode."""
        return [tuple(f) for f in self.attrs.get("failures", [])]

    def failures(self) -> list[dict[str, str]]:
        """Images that failed to decode: ``[{split, id, reason}]``."""
        return [{"split": s, "id": i, "reason": r} for s, i, _d, r in self.failure_rows()]

    def size_bytes(self) -> int:
        """Bytes of the view itself (its rows live in the shared store)."""
        return storage.tree_size(self.path)

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description, as printed by ``cache ls --json``."""
        spec = self.spec
        return {
            "kind": "view",
            "name": self.name,
            "key": self.key,
            "store": self.attrs.get("store"),
            "backbone": spec["backbone"],
            "weights": spec.get("weights_label") or spec["weights"],
            "input_size": spec["input_size"],
            "pooling": spec["pooling"],
            "dataset": spec.get("dataset_name"),
            "splits": {s: {"n": self.layout(s).n, "views": self.layout(s).views} for s in self.splits},
            "feature_shape": list(self.feature_shape),
            "complete": True,
            "created": self.attrs.get("created"),
        }

    def __repr__(self) -> str:
        return f"FeatureSet({self.name!r})"


# -- writing ---------------------------------------------------------------------------------
#: Items per chunk of a view's arrays, and per write: converting ids and digests to string
#: arrays and encoding them costs ~1 KiB per item, so writing a 100,000-image split at once
#: set extraction's peak memory (issue 12, flat memory).
VIEW_CHUNK = 1 << 13


def write_view(
    cache_dir: Location,
    st: FeatureStore,
    *,
    name: str,
    key: str,
    dataset_digest: str,
    classes: Sequence[str],
    splits: Mapping[str, tuple[Sequence[str], np.ndarray, Sequence[str], np.ndarray]],
    failures: Sequence[tuple[str, str, str, str]],
    extra: Mapping[str, Any] | None = None,
) -> FeatureSet:
    """Write a complete view aside and rename it into place (the caller holds the store's lease).

    On object storage, where there is no rename, the view is written in place and its group
    attributes (``zarr.json``) last: until that one PUT, the folder is no view to any reader.

    Parameters
    ----------
    cache_dir
        Cache root.
    st
        The feature store the rows are in.
    name, key
        The view's directory name and key.
    dataset_digest
        The manifest digest of ``classes`` and ``splits``.
    classes
        Class names.
    splits
        ``{split: (ids, labels, digests, rows)}`` in order; ``rows`` is ``(views, n)``.
    failures
        ``(split, id, digest, reason)`` of each undecodable item.
    extra
        More attributes (dataset source, limit, weights source, counts, ...).

    Returns
    -------
    FeatureSet
        The view.
    """
    import zarr

    if not storage.supports_rename(cache_dir):
        return _write_view_in_place(
            cache_dir / VIEWS_DIR / name,
            st,
            key=key,
            dataset_digest=dataset_digest,
            classes=classes,
            splits=splits,
            failures=failures,
            extra=extra,
        )
    final = cache_dir / VIEWS_DIR / name
    # Named after the store's key: the store's lease holder owns (and cleans) it.
    tmp = cache_dir / TMP_DIR / f"{st.key[:12]}-{key[:12]}-{uuid.uuid4().hex[:8]}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        layout = _write_view_arrays(root, splits)
        root.attrs["featurecache"] = _view_attrs(
            st, key=key, dataset_digest=dataset_digest, classes=classes, layout=layout, failures=failures, extra=extra
        )
        checkpoint("before_seal")
        if final.exists() or final.is_symlink():
            _discard(final, cache_dir)  # an older copy of the same view, or debris of a killed rm
        os.rename(tmp, final)
        checkpoint("sealed")
    except OSError as exc:
        raise_if_disk_full(exc, cache_dir)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return FeatureSet(final)


def _write_view_arrays(
    root: Any, splits: Mapping[str, tuple[Sequence[str], np.ndarray, Sequence[str], np.ndarray]]
) -> dict[str, Any]:
    """Write every split's arrays into the group ``root``; return the ``layout`` attribute."""
    layout = {}
    for split, (ids, labels, digests, rows) in splits.items():
        n = len(ids)
        chunk = (max(1, min(n, VIEW_CHUNK)),)
        g = root.create_group(split)
        g.create_array("ids", shape=(n,), chunks=chunk, dtype=str, dimension_names=("sample",), **array_codecs())
        g.create_array(
            "labels",
            shape=(n,),
            chunks=chunk,
            dtype="int64",
            fill_value=-1,
            dimension_names=("sample",),
            **array_codecs(),
        )
        g.create_array("digests", shape=(n,), chunks=chunk, dtype=str, dimension_names=("sample",), **array_codecs())
        g.create_array(
            "rows",
            shape=rows.shape,
            chunks=(1, *chunk),
            dtype="int64",
            fill_value=-1,
            dimension_names=("view", "sample"),
            **array_codecs(),
        )
        rows = np.asarray(rows, dtype=np.int64)
        for a in range(0, n, chunk[0]):  # chunk by chunk: string arrays cost ~1 KiB per item in flight
            b = min(n, a + chunk[0])
            g["ids"][a:b] = np.asarray(list(ids[a:b]), dtype=str)
            g["labels"][a:b] = np.asarray(labels[a:b], dtype=np.int64)
            g["digests"][a:b] = np.asarray(list(digests[a:b]), dtype=str)
            g["rows"][:, a:b] = rows[:, a:b]
        layout[split] = {"n": n, "views": int(rows.shape[0])}
    return layout


def _view_attrs(
    st: FeatureStore,
    *,
    key: str,
    dataset_digest: str,
    classes: Sequence[str],
    layout: Mapping[str, Any],
    failures: Sequence[tuple[str, str, str, str]],
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The ``featurecache`` attributes of a view."""
    return {
        "kind": "view",
        "format_version": FORMAT_VERSION,
        "key": key,
        "store": st.name,
        "store_key": st.key,
        "dataset_digest": dataset_digest,
        "spec": {
            **st.spec,
            "dataset_digest": dataset_digest,
            "dataset_name": (extra or {}).get("dataset_name", "data"),
        },
        "classes": [str(c) for c in classes],
        "layout": dict(layout),
        "feature_shape": list(st.feature_shape),
        "failures": [list(f) for f in failures],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }


def _write_view_in_place(
    final: Location,
    st: FeatureStore,
    *,
    key: str,
    dataset_digest: str,
    classes: Sequence[str],
    splits: Mapping[str, tuple[Sequence[str], np.ndarray, Sequence[str], np.ndarray]],
    failures: Sequence[tuple[str, str, str, str]],
    extra: Mapping[str, Any] | None,
) -> FeatureSet:
    """An object-store view: debris cleared, arrays written, then the attributes (one PUT) last."""
    import zarr

    from featurecache.cache.store import group_document

    storage.remove_tree(final)  # a torn copy (no attributes) from a killed writer; we hold the lease
    root = zarr.open_group(storage.zarr_store(final), mode="w", zarr_format=3)
    layout = _write_view_arrays(root, splits)
    attrs = _view_attrs(
        st, key=key, dataset_digest=dataset_digest, classes=classes, layout=layout, failures=failures, extra=extra
    )
    checkpoint("before_seal")
    storage.publish_json(final / "zarr.json", group_document(attrs))  # visible from here on
    checkpoint("sealed")
    return FeatureSet(final)


def _discard(path: Location, cache_dir: Location) -> None:
    """Delete ``path`` (moved aside into ``.tmp`` first where the storage can rename; never following a link)."""
    storage.discard(path, trash_dir=cache_dir / TMP_DIR)


def remove_view(fs: FeatureSet) -> None:
    """Delete a view (never its rows: other views may use them; ``cache gc`` reclaims unused rows)."""
    _discard(fs.path, fs.path.parent.parent)


# -- finding views -------------------------------------------------------------------------------
def iter_entries(cache_dir: Location, pattern: str = "*") -> Iterator[FeatureSet]:
    """Every readable view under ``cache_dir`` whose name matches ``pattern``, sorted by name."""
    root = cache_dir / VIEWS_DIR
    for child in storage.glob(root, pattern):
        if child.name.startswith(".") or storage.is_link(child) or not storage.is_dir(child):
            continue
        try:
            yield FeatureSet(child)
        except (EntryNotFoundError, CacheCorruptError):
            continue


def damaged_entries(cache_dir: Location) -> list[Location]:
    """View directories that cannot be opened (torn ``zarr.json``, leftovers of a killed rm)."""
    root = cache_dir / VIEWS_DIR
    out = []
    for child in storage.children(root):
        if child.name.startswith("."):
            continue
        try:
            FeatureSet(child)
        except (EntryNotFoundError, CacheCorruptError):
            out.append(child)
    return out


def find_by_key(cache_dir: Location, key: str) -> FeatureSet | None:
    """The view whose full key is ``key``, without scanning the cache."""
    root = cache_dir / VIEWS_DIR
    for child in storage.glob(root, f"*--{key[:12]}"):
        try:
            fs = FeatureSet(child)
            if fs.key == key:
                fs.check_identity()  # an edited one is no hit: the extract rewrites it from the store's rows
                return fs
        except (EntryNotFoundError, CacheCorruptError):
            continue
    return None


def find_entry(ref: str, *, cache_dir: str | os.PathLike[str] | Location | None = None) -> FeatureSet:
    """Resolve a full key, a key prefix (>= 6 hex digits, 12 recommended), a name or a path.

    Raises
    ------
    EntryNotFoundError
        Nothing matches.
    AmbiguousEntryError
        A prefix matches several views.
    CacheCorruptError
        The named view is damaged (with the ``cache rm`` command that removes it).
    """
    root = resolve_cache_dir(cache_dir)
    ref = ref.strip()
    path = storage.as_location(ref, resolve=False)
    if ref and storage.is_dir(path) and storage.exists(path / "zarr.json"):
        return FeatureSet(path)
    named = root / VIEWS_DIR / ref
    if ref and "/" not in ref and not ref.startswith(".") and storage.is_dir(named):
        return FeatureSet(named)  # an entry name: the directory itself, no scan
    prefix = ref.lower()
    matches: list[FeatureSet] = []
    if len(prefix) >= MIN_PREFIX and all(c in "0123456789abcdef" for c in prefix):
        # View names end in "--" + the key's first 12 digits: only those directories can match.
        # One whose recorded key disagrees with its name is matched by name, so verify names it.
        matches = [
            e
            for e in iter_entries(root, f"*--{prefix[:12]}*")
            if e.key.startswith(prefix) or e.name_problem("feature set")
        ]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise AmbiguousEntryError(
            f"key prefix {ref!r} matches {len(matches)} feature sets ({', '.join(e.name for e in matches[:4])}); give more digits of the key"
        )
    hint = f"short keys need at least {MIN_PREFIX} characters; " if len(ref) < MIN_PREFIX else ""
    raise EntryNotFoundError(
        f"no feature set {ref!r} in cache {root}; {hint}list them with `featurecache cache ls --cache {root}`"
    )


def open_features(
    ref: str, *, cache_dir: str | os.PathLike[str] | Location | None = None, require_complete: bool = True
) -> FeatureSet:
    """Open a feature set (a dataset view) by key, key prefix, name or path.

    ``require_complete`` is kept for compatibility: views exist only complete.

    Raises
    ------
    EntryNotFoundError, AmbiguousEntryError
        As :func:`find_entry`.
    CacheCorruptError
        The view is damaged, or its name, key, spec, store, classes, ids, labels or failures
        disagree (:meth:`FeatureSet.check_identity`, :meth:`FeatureSet.check_manifest`,
        :meth:`FeatureSet.check_failures`).
    """
    del require_complete
    fs = find_entry(ref, cache_dir=cache_dir)
    fs.check_identity()  # the name, key, spec and store agree (metadata only)
    fs.arrays()  # classes, ids, digests and labels hash back to the key (no feature is read)
    fs.check_failures()  # the undecodable images are the store's (its view-0 markers, read once)
    if not fs.complete:  # pragma: no cover - views are written whole
        raise IncompleteEntryError(
            f"feature set {fs.name} is incomplete; run the same `featurecache extract` command again"
        )
    return fs


def write_arrays(
    cache_dir: str | os.PathLike[str] | None,
    spec: Any,
    *,
    classes: Sequence[str],
    splits: Mapping[str, tuple[Sequence[str], np.ndarray, np.ndarray, np.ndarray | None]],
    dataset_name: str = "arrays",
    digests: Mapping[str, Sequence[str]] | None = None,
    chunk_rows: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> FeatureSet:
    """Store features computed elsewhere as a feature store's rows and a view over them (no backbone).

    For imports, synthetic benchmarks and tests: the same units, markers and view as an
    extraction writes, so every consumer reads them the same way.

    Parameters
    ----------
    cache_dir
        Cache root.
    spec
        The :class:`~featurecache.cache.keys.FeatureSpec` the features belong to.
    classes
        Class names.
    splits
        ``{split: (ids, labels, features (views, n, *shape), valid or None)}``; ``views`` must
        be ``spec.views_for(split)``.
    dataset_name
        Readable name of the dataset in the view's name.
    digests
        Per split, each item's content digest; default a digest of ``split/id``.
    chunk_rows
        Rows per unit of a new store.
    extra
        More view attributes.

    Returns
    -------
    FeatureSet
        The view.
    """
    import hashlib

    from featurecache.cache import store as store_mod
    from featurecache.cache.lease import Lease

    root = resolve_cache_dir(cache_dir)
    digests = digests or {
        s: [hashlib.sha256(f"{s}/{i}".encode()).hexdigest() for i in ids] for s, (ids, *_rest) in splits.items()
    }
    first = next(iter(splits.values()))[2]
    feature_shape = tuple(int(d) for d in np.asarray(first).shape[2:])
    dataset_digest = manifest_digest(
        classes, [(s, ids, digests[s], labels) for s, (ids, labels, _f, _v) in splits.items()]
    )
    key = view_key(spec.key, dataset_digest)
    lease = Lease(root, spec.key)
    lease.wait()
    try:
        st = store_mod.open_store(root, spec.key) or store_mod.create_store(
            root,
            spec,
            feature_shape=feature_shape,
            chunk_rows=chunk_rows or store_mod.chunk_rows_for(feature_shape, spec.dtype),
        )
        failures: list[tuple[str, str, str, str]] = []
        for view in range(st.views):
            have = st.index(view)
            todo: dict[str, tuple[np.ndarray, bool]] = {}
            for s, (ids, _labels, feats, valid) in splits.items():
                if view >= spec.views_for(s):
                    continue
                ok = np.ones(len(ids), bool) if valid is None else np.asarray(valid, bool)
                for j, d in enumerate(digests[s]):
                    if d not in have and d not in todo:
                        todo[d] = (np.asarray(feats[view][j]), bool(ok[j]))
            for unit in store_mod.allocate_units(st, view, list(todo)):
                block = np.stack([todo[d][0] for d in unit.digests])
                ok = np.asarray([todo[d][1] for d in unit.digests])
                block[~ok] = 0
                store_mod.write_unit(
                    st,
                    unit,
                    block,
                    valid=ok if view == 0 else None,
                    failures=[(d, "invalid") for d in unit.digests if not todo[d][1]] if view == 0 else (),
                )
        failed = st.failures()
        out = {}
        for s, (ids, labels, _feats, _valid) in splits.items():
            rows = np.asarray(
                [[st.index(v)[d] for d in digests[s]] for v in range(spec.views_for(s))], dtype=np.int64
            ).reshape(spec.views_for(s), len(ids))
            out[s] = (ids, labels, digests[s], rows)
            failures.extend((s, i, d, failed[d]) for i, d in zip(ids, digests[s], strict=True) if d in failed)
        return write_view(
            root,
            st,
            name=spec.view_name(dataset_name, dataset_digest),
            key=key,
            dataset_digest=dataset_digest,
            classes=classes,
            splits=out,
            failures=failures,
            extra={"dataset_name": dataset_name, **(extra or {})},
        )
    finally:
        lease.release()
