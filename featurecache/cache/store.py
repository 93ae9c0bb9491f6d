"""Feature stores: one Zarr v3 group per feature spec, rows addressed by image content.

Layout of a store ``<cache>/features/<label>--<key12>/`` (``key`` = the feature spec's key)::

    zarr.json                      group attributes ``featurecache``: spec, key, feature shape,
                                   chunk rows (written last: a directory without them is no store)
    v<V>/features  (rows, *shape)  view V (0 = clean, 1..K = augmented); chunks of chunk_rows rows
    v<V>/digests   (rows,) str     the image content digest of each row
    v0/valid       (rows,) bool    False where the image failed to decode (its features are zeros)
    units/v<V>/u<S>/zarr.json      the completion marker of unit S of view V: a Zarr group whose
                                   attributes list its digests, failures, and the sha256 of the
                                   exact feature bytes it vouches for

A *write unit* fills one chunk slot ``S`` of one view: rows ``[S*chunk_rows, S*chunk_rows+m)``
for ``m`` images that the store did not have. Its data is exactly one chunk per array (Zarr's
local store writes a chunk through a temporary file and a rename, so it is whole or absent; on
object storage a chunk is one PUT), fsynced, and only then is its marker written. A crash between the two leaves data without a
marker, and the unit is simply planned again. Slots are allocated by the holder of the store's
lease (:mod:`featurecache.cache.lease`), which also grows the arrays; units themselves are
idempotent and independent, so any executor can run them.

Reading verifies: every chunk read through :meth:`FeatureStore.read_unit` is hashed and compared
with its marker, so a deleted chunk (Zarr would return zeros), two swapped chunks (each with a
valid CRC32C) or an altered value fail on read, in every consumer, not only in ``verify``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from featurecache.cache import storage
from featurecache.cache.faults import checkpoint
from featurecache.cache.fsio import raise_if_disk_full
from featurecache.cache.keys import FORMAT_VERSION, FeatureSpec, recorded_spec_key
from featurecache.cache.storage import Location
from featurecache.errors import CacheCorruptError, DamagedUnitError, FeatureCacheError, UsageError

if TYPE_CHECKING:
    import zarr

CACHE_ENV = "FEATURECACHE_DIR"
STORES_DIR = "features"
VIEWS_DIR = "views"
UNITS_GROUP = "units"
TMP_DIR = ".tmp"
MEMO_DIR = ".memo"
#: Aim for chunks of about this many bytes (Zarr performs best with chunks of >= 1 MB).
TARGET_CHUNK_BYTES = 1 << 20


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | Location | None = None) -> Location:
    """The cache root: ``cache_dir``, else ``$FEATURECACHE_DIR``, else ``./cache``.

    A path (``file://`` URLs included) gives an absolute ``Path``; an fsspec URL such as
    ``s3://bucket/prefix`` gives an object-store location: from here on every read and write
    goes through :mod:`featurecache.cache.storage`, which serves both.

    Raises
    ------
    UsageError
        A URL whose storage options (``$FEATURECACHE_STORAGE_OPTIONS``) are malformed.
    """
    chosen = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or "cache"
    return storage.as_location(chosen)


def memo_dir(cache_dir: Location) -> Path:
    """Where memoised file and weights digests live (never part of a store or view; always local)."""
    return storage.local_dir_for(cache_dir, MEMO_DIR)


def chunk_rows_for(feature_shape: Sequence[int], dtype: str, *, batch_size: int = 1) -> int:
    """Rows per chunk so that one chunk (one write unit) holds about 1 MiB, a multiple of ``batch_size``."""
    row_bytes = int(np.prod(feature_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    rows = max(1, -(-TARGET_CHUNK_BYTES // max(row_bytes, 1)))
    b = max(1, int(batch_size))
    return int(-(-rows // b) * b) if rows >= b else rows


def augment_index(digest: str) -> int:
    """The integer that seeds an image's augmentation: from its content digest, not its position."""
    return int(hashlib.sha256(digest.encode("utf-8")).hexdigest()[:15], 16)


def _verify_all(st: FeatureStore, view: int, parts: Sequence[tuple[int, np.ndarray, Mapping[str, Any]]]) -> None:
    """Check units against their markers, hashing on two threads (hashlib releases the GIL)."""
    if len(parts) < 4:
        for slot, block, marker in parts:
            st._verified(view, slot, block, marker)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda p: st._verified(view, *p), parts))


def array_codecs() -> dict[str, Any]:
    """Compression and checksum codecs of every cached array (``create_array`` keyword arguments)."""
    import zarr.codecs

    # CRC32C makes a corrupted chunk fail loudly on read instead of decompressing to plausible
    # numbers; the marker's sha256 then catches what a CRC cannot (a missing or moved chunk).
    return {"compressors": (zarr.codecs.ZstdCodec(level=1), zarr.codecs.Crc32cCodec())}


def group_document(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """A Zarr v3 group's ``zarr.json`` with ``attrs`` under the ``featurecache`` namespace."""
    return {"zarr_format": 3, "node_type": "group", "attributes": {"featurecache": dict(attrs)}}


def read_group_attrs(path: Location) -> dict[str, Any] | None:
    """The ``featurecache`` attributes of the Zarr group at ``path``, or None if it has none.

    Raises
    ------
    CacheCorruptError
        ``zarr.json`` exists but is not readable JSON.
    """
    meta = path / "zarr.json"
    try:
        doc = json.loads(storage.read_bytes(meta).decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CacheCorruptError(f"{meta} is unreadable ({' '.join(str(exc).split())[:80]})") from None
    return group_attrs(doc)


def group_attrs(doc: Any) -> dict[str, Any] | None:
    """The ``featurecache`` attributes of a parsed group ``zarr.json``, or None."""
    attrs = doc.get("attributes", {}) if isinstance(doc, dict) else {}
    fc = attrs.get("featurecache") if isinstance(attrs, dict) else None
    return fc if isinstance(fc, dict) else None


def feature_dims(feature_shape: Sequence[int]) -> tuple[str, ...]:
    """Dimension names of one row's features (for xarray and other Zarr v3 readers)."""
    return {0: (), 1: ("feature",), 3: ("y", "x", "channel")}.get(
        len(feature_shape), tuple(f"f{i}" for i in range(len(feature_shape)))
    )


@dataclass(frozen=True)
class Unit:
    """One write unit: chunk slot ``slot`` of view ``view``, holding ``digests`` in order."""

    view: int
    slot: int
    digests: tuple[str, ...]

    @property
    def marker(self) -> str:
        """Marker directory relative to the store."""
        return f"{UNITS_GROUP}/v{self.view}/u{self.slot}"


class CacheNode:
    """Identity shared by feature stores and feature sets: a directory whose Zarr attributes
    (``featurecache`` namespace) hold its ``key`` and ``spec``."""

    path: Location
    attrs: dict[str, Any]

    @property
    def key(self) -> str:
        """The 64-hex key (a feature spec's, or a feature set's: spec + dataset digest)."""
        return self.attrs["key"]

    @property
    def name(self) -> str:
        """Directory name."""
        return self.path.name

    @property
    def spec(self) -> dict[str, Any]:
        """The keyed spec fields (a feature set adds ``dataset_digest`` and ``dataset_name``)."""
        return self.attrs["spec"]

    def identity_problems(self) -> list[str]:
        """What in ``zarr.json`` contradicts the key that names this entry, one line each (no array is read)."""
        raise NotImplementedError

    def check_identity(self) -> None:
        """Refuse an entry whose recorded spec, key or name disagree (a digest over metadata only).

        Raises
        ------
        CacheCorruptError
            The first of :meth:`identity_problems`.
        """
        problems = self.identity_problems()
        if problems:
            raise CacheCorruptError(problems[0])

    def spec_key_problem(self, what: str, key: str, fix: str) -> str | None:
        """Why the recorded spec does not hash to ``key`` (the feature spec key), or None."""
        try:
            got = recorded_spec_key(self.attrs["spec"])
        except (KeyError, TypeError, AttributeError, FeatureCacheError) as exc:
            return (
                f"the spec recorded in {what} {self.name} cannot be hashed ({' '.join(str(exc).split())[:80]}); {fix}"
            )
        if got != key:
            return f"the spec recorded in {what} {self.name} hashes to {got[:12]}, not to its key {str(key)[:12]}: its zarr.json was edited; {fix}"
        return None

    def name_problem(self, what: str) -> str | None:
        """Why the directory name (``...--<key12>``) does not name the recorded key, or None."""
        key = str(self.attrs.get("key"))
        if self.name.endswith(f"--{key[:12]}"):
            return None
        return (
            f"the name of {what} {self.name} does not end with the first 12 digits of the key its zarr.json records ({key[:12]}): "
            f"it was renamed or its zarr.json edited; remove it with `featurecache cache rm {self.name} --yes`"
        )


class FeatureStore(CacheNode):
    """One feature spec's rows, addressed by image content digest.

    Parameters
    ----------
    path
        The store's directory.

    Raises
    ------
    EntryNotFoundError
        ``path`` holds no store.
    CacheCorruptError
        Its ``zarr.json`` is unreadable.
    """

    def __init__(self, path: str | os.PathLike[str] | Location) -> None:
        from featurecache.errors import EntryNotFoundError

        self.path = as_node_path(path)
        attrs = read_group_attrs(self.path)
        if attrs is None or attrs.get("kind") != "feature-store":
            raise EntryNotFoundError(
                f"{self.path} is not a featurecache feature store; list them with `featurecache cache ls`"
            )
        self.attrs: dict[str, Any] = attrs
        self._markers: dict[int, dict[int, dict[str, Any]]] = {}
        self._arrays: dict[int, Any] = {}
        self._group: zarr.Group | None = None

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one image's features."""
        return tuple(self.attrs["feature_shape"])

    def identity_problems(self) -> list[str]:
        """Whether the recorded spec hashes to the key, and the key to the directory name."""
        return [p for p in (self.spec_problem(), self.name_problem("feature store")) if p]

    def spec_problem(self) -> str | None:
        """Why the recorded spec does not hash to the store's key (with how to restore it), or None."""
        fix = (
            f"run `featurecache cache verify {self.name} --repair` to restore it from a feature set over the store, "
            "or the extract command that made it, which rewrites it and keeps the rows"
        )
        return self.spec_key_problem("feature store", str(self.attrs.get("key")), fix)

    @property
    def dtype(self) -> str:
        """Stored dtype."""
        return str(self.attrs["spec"]["dtype"])

    @property
    def chunk_rows(self) -> int:
        """Rows per chunk (= per write unit)."""
        return int(self.attrs["chunk_rows"])

    @property
    def views(self) -> int:
        """Number of stored views: 1 clean + the spec's augmented views."""
        return 1 + int(self.spec.get("views", 0))

    # -- markers -------------------------------------------------------------------------
    def markers(self, view: int, *, refresh: bool = False) -> dict[int, dict[str, Any]]:
        """``{slot: marker}`` of every finished unit of ``view`` (read once, then cached)."""
        if refresh or view not in self._markers:
            self._markers.update(self._listed_markers())
        return self._markers.setdefault(view, {})

    def _listed_markers(self) -> dict[int, dict[int, dict[str, Any]]]:
        """Every view's markers from one listing of ``units/`` (on object storage one LIST request
        per thousand objects, then the new markers fetched concurrently; never one HEAD per unit).

        A marker is one PUT, written once per slot, so one already read is kept, not fetched again:
        a refresh costs the listing and the markers written since.
        """
        base = self.path / UNITS_GROUP
        found: dict[Location, tuple[int, int]] = {}
        out: dict[int, dict[int, dict[str, Any]]] = {v: {} for v in range(self.views)}
        for rel in storage.find(base):
            parts = rel.split("/")
            if (
                len(parts) == 3
                and parts[2] == "zarr.json"
                and parts[0][:1] == "v"
                and parts[0][1:].isdigit()
                and parts[1][:1] == "u"
                and parts[1][1:].isdigit()
            ):
                view, slot = int(parts[0][1:]), int(parts[1][1:])
                known = self._markers.get(view, {}).get(slot)
                if known is not None:
                    out.setdefault(view, {})[slot] = known
                else:
                    found[base / rel] = (view, slot)
        for loc, data in storage.read_many(found).items():
            view, slot = found[loc]
            try:
                attrs = (
                    group_attrs(json.loads(bytes(data).decode("utf-8")))
                    if not isinstance(data, BaseException)
                    else None
                )
            except ValueError:
                attrs = None  # a torn marker vouches for nothing: the unit is redone
            if attrs is not None and attrs.get("slot") == slot:
                out.setdefault(view, {})[slot] = attrs
        return out

    def index(self, view: int) -> dict[str, int]:
        """``{digest: row}`` of ``view``'s finished rows (the first row, if a digest appears twice)."""
        out: dict[str, int] = {}
        cr = self.chunk_rows
        for slot, marker in sorted(self.markers(view).items()):
            for j, digest in enumerate(marker.get("digests", [])):
                out.setdefault(digest, slot * cr + j)
        return out

    def failures(self) -> dict[str, str]:
        """``{digest: reason}`` of the images that failed to decode (from view-0 markers)."""
        return {d: r for m in self.markers(0).values() for d, r in m.get("failures", [])}

    def rows(self, view: int) -> int:
        """Rows finished in ``view``."""
        return sum(len(m.get("digests", [])) for m in self.markers(view).values())

    def next_slot(self, view: int) -> int:
        """The first slot past every finished unit and every array row of ``view``."""
        used = max(self.markers(view, refresh=True), default=-1) + 1
        rows = int(self.group[f"v{view}/features"].shape[0])  # fresh: another allocation may have grown it
        return max(used, -(-rows // self.chunk_rows))

    # -- data ----------------------------------------------------------------------------
    @property
    def group(self):  # -> zarr.Group
        """The Zarr group (opened read-write; callers that only read never write)."""
        if self._group is None:
            import zarr

            self._group = zarr.open_group(storage.zarr_store(self.path), mode="r+", zarr_format=3)
        return self._group

    def array(self, view: int):  # -> zarr.Array
        """The ``(rows, *feature_shape)`` features array of ``view`` (opened once)."""
        if view not in self._arrays:
            self._arrays[view] = self.group[f"v{view}/features"]
        return self._arrays[view]

    def read_unit(self, view: int, slot: int, *, marker: Mapping[str, Any] | None = None) -> np.ndarray:
        """The features of one finished unit, checked against its marker's sha256.

        Raises
        ------
        CacheCorruptError
            The unit has no marker, its chunk is unreadable, or its bytes are not those the
            marker vouches for (a missing, moved or altered chunk).
        """
        marker = marker if marker is not None else self.markers(view).get(slot)
        if marker is None:
            raise self._damaged(view, slot, "has no completion marker")
        m = len(marker.get("digests", []))
        start = slot * self.chunk_rows
        try:
            block = np.asarray(self.array(view)[start : start + m])
        except Exception as exc:  # noqa: BLE001 - zarr raises its own checksum error types
            raise self._damaged(view, slot, f"is unreadable ({' '.join(str(exc).split())[:100]})") from None
        return self._verified(view, slot, block, marker)

    def read_units(self, view: int, slots: Iterable[int]) -> dict[int, np.ndarray]:
        """Several finished units of ``view``, each checked against its marker's sha256.

        Runs of consecutive slots are read in one Zarr call (which decodes their chunks
        concurrently), so reading a whole feature set costs what one contiguous array read does.

        Raises
        ------
        CacheCorruptError
            As :meth:`read_unit`.
        """
        slots = sorted(set(int(s) for s in slots))
        markers = self.markers(view)
        cr = self.chunk_rows
        out: dict[int, np.ndarray] = {}
        runs: list[list[int]] = []
        for slot in slots:
            if slot not in markers:
                self.read_unit(view, slot)  # raises the "no completion marker" error
            if runs and runs[-1][-1] == slot - 1:
                runs[-1].append(slot)
            else:
                runs.append([slot])
        arr = self.array(view)
        for run in runs:
            first, last = run[0], run[-1]
            stop = last * cr + len(markers[last].get("digests", []))
            try:
                block = np.asarray(arr[first * cr : stop])
            except Exception:  # noqa: BLE001 - find the damaged unit, with its message
                for slot in run:
                    out[slot] = self.read_unit(view, slot)
                continue
            parts = [
                (
                    slot,
                    block[(slot - first) * cr : (slot - first) * cr + len(markers[slot].get("digests", []))],
                    markers[slot],
                )
                for slot in run
            ]
            _verify_all(self, view, parts)
            out.update((slot, part) for slot, part, _ in parts)
        return out

    def _verified(self, view: int, slot: int, block: np.ndarray, marker: Mapping[str, Any]) -> np.ndarray:  # noqa: D401
        """``block`` after checking it is exactly the bytes ``marker`` vouches for."""
        if block.shape[0] != len(marker.get("digests", [])) or hashlib.sha256(
            np.ascontiguousarray(block).data
        ).hexdigest() != marker.get("sha256"):
            raise self._damaged(
                view, slot, "does not hold the bytes its marker vouches for (a chunk is missing, moved or altered)"
            )
        return block

    def _damaged(self, view: int, slot: int, reason: str) -> DamagedUnitError:
        return DamagedUnitError(
            f"unit v{view}/u{slot} of feature store {self.name} {reason}; run `featurecache cache verify {self.name} --repair`, "
            "then the same extract command recomputes it",
            store=self.name,
            view=view,
            slot=slot,
            reason=reason,
        )

    def _contiguous_units(self, view: int, rows: np.ndarray) -> np.ndarray | None:
        """``rows`` read in one call when they are consecutive store rows in order (a cold
        extraction's split), the units they touch read whole and verified; else None."""
        cr = self.chunk_rows
        r0, n = int(rows[0]), len(rows)
        if int(rows[-1]) != r0 + n - 1 or not np.array_equal(rows, np.arange(r0, r0 + n)):
            return None
        markers = self.markers(view)
        slots = range(r0 // cr, (r0 + n - 1) // cr + 1)
        sizes = [len(markers.get(s, {}).get("digests", ())) for s in slots]
        start, stop = slots[0] * cr, slots[-1] * cr + sizes[-1]
        if any(m == 0 for m in sizes) or any(m != cr for m in sizes[:-1]) or r0 + n > stop:
            return None
        try:
            block = np.asarray(self.array(view)[start:stop])
        except Exception:  # noqa: BLE001 - the per-unit path names the damaged unit
            return None
        _verify_all(
            self, view, [(slot, block[k * cr : k * cr + sizes[k]], markers[slot]) for k, slot in enumerate(slots)]
        )
        return block[r0 - start : r0 - start + n]

    def gather(self, view: int, rows: np.ndarray) -> np.ndarray:
        """Features at store ``rows`` of ``view``, in the given order, every unit verified.

        Parameters
        ----------
        view
            The view.
        rows
            Store row numbers (from a dataset view's ``rows`` array).

        Returns
        -------
        numpy.ndarray
            ``(len(rows), *feature_shape)`` in the stored dtype.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if not len(rows):
            return np.empty((0, *self.feature_shape), dtype=self.dtype)
        cr = self.chunk_rows
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        if len(breaks) <= 8:  # a few runs of consecutive rows (a grown dataset): one read per run
            runs = [self._contiguous_units(view, part) for part in np.split(rows, breaks)]
            found = [r for r in runs if r is not None]
            if len(found) == len(runs):
                return found[0] if len(found) == 1 else np.concatenate(found)
        out = np.empty((len(rows), *self.feature_shape), dtype=self.dtype)
        slots = rows // cr
        blocks = self.read_units(view, np.unique(slots).tolist())
        order = np.argsort(slots, kind="stable")
        bounds = np.flatnonzero(np.diff(slots[order])) + 1
        for part in np.split(order, bounds):
            slot = int(slots[part[0]])
            block = blocks[slot]
            local = rows[part] - slot * cr
            if local.max() >= len(block):
                raise CacheCorruptError(
                    f"a view refers to row {int(rows[part].max())} of {self.name}, past unit v{view}/u{slot}; rewrite the view with the same extract command"
                )
            if (
                len(part) == len(block)
                and np.array_equal(local, np.arange(len(block)))
                and np.array_equal(part, np.arange(part[0], part[0] + len(part)))
            ):
                out[part[0] : part[0] + len(part)] = block  # the common case: a whole unit, in order
            else:
                out[part] = block[local]
        return out

    def size_bytes(self) -> int:
        """Bytes on disk (never following links)."""
        return storage.tree_size(self.path)

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description, as printed by ``cache ls --json``."""
        spec = self.spec
        return {
            "kind": "feature-store",
            "name": self.name,
            "key": self.key,
            "backbone": spec["backbone"],
            "weights": spec.get("weights_label") or spec["weights"],
            "input_size": spec["input_size"],
            "pooling": spec["pooling"],
            "rows": {f"v{v}": self.rows(v) for v in range(self.views)},
            "feature_shape": list(self.feature_shape),
            "created": self.attrs.get("created"),
        }

    def __repr__(self) -> str:
        return f"FeatureStore({self.name!r})"


def as_node_path(path: str | os.PathLike[str] | Location) -> Location:
    """A store's or view's location from a path, a URL (as Dask workers receive it) or a location."""
    return storage.as_location(path, resolve=False)


# -- writing (the caller holds the store's lease unless said otherwise) --------------------
def store_path(cache_dir: Location, spec: FeatureSpec) -> Location:
    """Where ``spec``'s feature store lives."""
    return cache_dir / STORES_DIR / spec.store_name()


def open_store(cache_dir: Location, spec_key: str) -> FeatureStore | None:
    """The feature store of ``spec_key``, or None when there is none (a damaged one raises)."""
    root = cache_dir / STORES_DIR
    for child in storage.glob(root, f"*--{spec_key[:12]}"):
        try:
            st = FeatureStore(child)
        except CacheCorruptError:
            raise
        except Exception:  # noqa: BLE001 - not a store (EntryNotFoundError)
            continue
        if st.key == spec_key:
            st.check_identity()  # an edited spec is never copied into a new view
            return st
    return None


def create_store(
    cache_dir: Location,
    spec: FeatureSpec,
    *,
    feature_shape: Sequence[int],
    chunk_rows: int,
    extra: Mapping[str, Any] | None = None,
) -> FeatureStore:
    """Create ``spec``'s empty store in place (holding its lease) and return it.

    The group's attributes are written last: until then the directory is not a store, so a
    crash half-way leaves a directory the next creator simply completes (``mode="a"``, arrays
    overwritten), never one that blocks the key.
    """
    import zarr

    path = store_path(cache_dir, spec)
    try:
        existing = FeatureStore(path)
    except Exception:  # noqa: BLE001 - absent, or damaged zarr.json: (re)create below
        existing = None
    if existing is not None and not existing.identity_problems():
        return existing
    try:
        storage.make_dirs(path)
        storage.remove_file(path / "zarr.json")  # a torn one from a crash or a bad disk
        root = zarr.open_group(storage.zarr_store(path), mode="a", zarr_format=3)
        dims = feature_dims(feature_shape)
        for view in range(1 + spec.views):
            g = root.require_group(f"v{view}")
            arrays = {
                "features": dict(
                    shape=(0, *feature_shape),
                    chunks=(chunk_rows, *feature_shape),
                    dtype=spec.dtype,
                    fill_value=0,
                    dimension_names=("row", *dims),
                    **array_codecs(),
                ),
                "digests": dict(shape=(0,), chunks=(chunk_rows,), dtype=str, dimension_names=("row",)),
            }
            if view == 0:
                arrays["valid"] = dict(
                    shape=(0,), chunks=(chunk_rows,), dtype=bool, fill_value=False, dimension_names=("row",)
                )
            for name, kw in arrays.items():
                if not _array_fits(path / f"v{view}" / name, kw["chunks"]):
                    # A torn or mismatched array vouches for nothing: its units' markers go with it.
                    storage.remove_tree(path / UNITS_GROUP / f"v{view}")
                    g.create_array(name, overwrite=True, **kw)
            root.require_group(f"{UNITS_GROUP}/v{view}")
        checkpoint("entry_tmp_created")
        attrs = {
            "kind": "feature-store",
            "format_version": FORMAT_VERSION,
            "key": spec.key,
            "spec": {**spec.key_fields(), "weights_label": spec.weights_label},
            "feature_shape": [int(d) for d in feature_shape],
            "chunk_rows": int(chunk_rows),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
        }
        storage.publish_json(path / "zarr.json", group_document(attrs))  # last: now it is a store
        checkpoint("entry_created")
    except OSError as exc:
        raise_if_disk_full(exc, cache_dir)
        raise
    return FeatureStore(path)


def _array_fits(path: Location, chunks: tuple[int, ...]) -> bool:
    """Whether an existing array at ``path`` (kept when a store's ``zarr.json`` is rebuilt) has ``chunks``."""
    import zarr

    try:
        return tuple(
            zarr.open_array(storage.zarr_store(path, read_only=True), mode="r", zarr_format=3).chunks
        ) == tuple(chunks)
    except Exception:  # noqa: BLE001 - absent or unreadable: recreate
        return False


def allocate_units(st: FeatureStore, view: int, digests: Sequence[str]) -> list[Unit]:
    """Cut ``digests`` (new to ``view``) into units on fresh slots and grow the arrays to fit."""
    if not digests:
        return []
    cr = st.chunk_rows
    first = st.next_slot(view)
    units = [Unit(view, first + k, tuple(digests[i : i + cr])) for k, i in enumerate(range(0, len(digests), cr))]
    rows = (first + len(units)) * cr
    group = st.group
    try:
        for name in ("features", "digests", "valid"):
            if name == "valid" and view != 0:
                continue
            arr = group[f"v{view}/{name}"]
            if arr.shape[0] < rows:
                arr.resize((rows, *arr.shape[1:]))
        st._arrays.pop(view, None)  # reopen with the new shape
    except OSError as exc:
        raise_if_disk_full(exc, st.path)
        raise
    return units


def write_unit(
    st: FeatureStore,
    unit: Unit,
    features: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    failures: Sequence[tuple[str, str]] = (),
    record: Mapping[str, Any] | None = None,
) -> None:
    """Write one unit's data, then (only then) its completion marker.

    ``valid`` is written with view-0 units. On ENOSPC no marker is written, the error becomes
    :class:`DiskFullError`, and a later run redoes the unit.
    """
    import zarr

    features = np.ascontiguousarray(features, dtype=st.dtype)
    m = len(unit.digests)
    if features.shape != (m, *st.feature_shape):
        raise UsageError(f"unit {unit.marker} needs features of shape {(m, *st.feature_shape)}, got {features.shape}")
    start = unit.slot * st.chunk_rows
    group = zarr.open_group(storage.zarr_store(st.path), mode="r+", zarr_format=3)
    try:
        arr = cast(
            "zarr.Array", group[f"v{unit.view}/features"]
        )  # the store's layout: arrays, never groups, at these paths
        arr[start : start + m] = features
        cast("zarr.Array", group[f"v{unit.view}/digests"])[start : start + m] = np.asarray(unit.digests, dtype=str)
        checkpoint("unit_data_written")
        chunk_files = [
            st.path
            / f"v{unit.view}"
            / "features"
            / arr.metadata.encode_chunk_key((unit.slot, *([0] * len(st.feature_shape)))),
            st.path / f"v{unit.view}" / "digests" / arr.metadata.encode_chunk_key((unit.slot,)),
        ]
        if valid is not None:
            cast("zarr.Array", group["v0/valid"])[start : start + m] = np.asarray(valid, dtype=bool)
            chunk_files.append(st.path / "v0" / "valid" / arr.metadata.encode_chunk_key((unit.slot,)))
        checkpoint("unit_valid_written")
        # SIGKILL cannot tear a chunk (each is renamed into place, or one PUT on object storage),
        # but a power cut could persist the marker and not the data it vouches for; syncing the
        # data first orders them (an object store acknowledges a PUT only once it is durable).
        storage.make_durable(chunk_files)
        marker = {
            "view": unit.view,
            "slot": unit.slot,
            "digests": list(unit.digests),
            "failures": [list(f) for f in failures],
            "sha256": hashlib.sha256(features.tobytes()).hexdigest(),
            "written": time.time(),
            **(record or {}),
        }
        storage.publish_json(
            st.path / unit.marker / "zarr.json",
            group_document(marker),
            before_rename=lambda: checkpoint("marker_tmp_written"),
        )
        listed = st._markers.get(unit.view)
        if listed is not None:  # keep a listing already read current; never read every marker to add one
            listed[unit.slot] = marker
        checkpoint("unit_marker_written")
    except OSError as exc:
        raise_if_disk_full(exc, st.path)
        raise


def remove_units(st: FeatureStore, view: int, slots: Iterable[int]) -> int:
    """Delete units: the marker first (so nothing vouches for the data), then its chunks."""
    n = 0
    for slot in slots:
        marker_dir = st.path / UNITS_GROUP / f"v{view}" / f"u{slot}"
        # A torn marker is listed as no unit, yet it is there: it goes too.
        if storage.remove_group(marker_dir, listed=slot in st.markers(view)):
            n += 1
        st.markers(view).pop(slot, None)
        for name in ("features", "digests", "valid"):
            try:
                arr = st.group[f"v{view}/{name}"]
            except KeyError:
                continue
            key = arr.metadata.encode_chunk_key((slot, *([0] * (arr.ndim - 1))))
            storage.remove_file(st.path / f"v{view}" / name / key)
    return n


def iter_stores(cache_dir: Location) -> Iterator[FeatureStore | Location]:
    """Every feature store under ``cache_dir``, sorted by name; a damaged one as its Path."""
    root = cache_dir / STORES_DIR
    for child in storage.children(root):
        if child.name.startswith(".") or storage.is_link(child) or not storage.is_dir(child):
            continue
        try:
            yield FeatureStore(child)
        except CacheCorruptError:
            yield child
        except Exception:  # noqa: BLE001 - a directory that never became a store
            yield child


def remove_leftovers(cache_dir: Location, spec_key: str) -> list[Path]:
    """Delete the temporary files that killed writers of ``spec_key`` left behind.

    Call it only while holding the store's lease: then nobody else writes these files, so each
    is debris (Zarr's ``*.partial`` chunk files and marker temp files in the store, views built
    aside in ``.tmp/`` but never renamed into place, a lease moved aside by a breaker that
    died). None of them is ever read as data; this only reclaims the space. Links are never
    followed.

    Returns
    -------
    list of Path
        What was removed.
    """
    from featurecache.cache.lease import LOCKS_DIR

    if not storage.supports_rename(cache_dir):
        return []  # object stores get whole PUTs: no temp files, no views built aside, no moved leases
    removed: list[Path] = []
    debris: list[Path] = []
    tmp = cache_dir / TMP_DIR
    if tmp.is_dir() and not tmp.is_symlink():
        debris.extend(tmp.glob(f"{spec_key[:12]}-*"))
    locks = cache_dir / LOCKS_DIR
    if locks.is_dir() and not locks.is_symlink():
        debris.extend(locks.glob(f"{spec_key}.lease.stale-*"))
    root = cache_dir / STORES_DIR
    for st_dir in root.glob(f"*--{spec_key[:12]}") if root.is_dir() else ():
        debris.extend(storage.temp_files(st_dir))
    for path in debris:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def find_store(ref: str, *, cache_dir: Location) -> FeatureStore | None:
    """A feature store by directory name, full key or key prefix (>= 6 hex digits), or None."""
    root = cache_dir / STORES_DIR
    if not ref or not storage.is_dir(root):
        return None
    named = root / ref
    if "/" not in ref and not ref.startswith(".") and storage.is_dir(named):
        return FeatureStore(named)
    prefix = ref.lower()
    if len(prefix) < 6 or any(c not in "0123456789abcdef" for c in prefix):
        return None
    hits = []
    for child in storage.glob(root, f"*--{prefix[:12]}*"):
        try:
            st = FeatureStore(child)
        except Exception:  # noqa: BLE001 - damaged stores are listed by `cache ls`
            continue
        if st.key.startswith(prefix):
            hits.append(st)
    return hits[0] if len(hits) == 1 else None
