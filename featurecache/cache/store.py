"""The on-disk feature cache: one Zarr v3 group per feature set.

Layout of an entry ``<cache>/<name>/`` (``name`` ends with the first 12 key digits)::

    zarr.json                 group attributes: spec, key, classes, versions, layout (written once)
    <split>/features          (views, n, *feature_shape), chunks (1, chunk_rows, *feature_shape)
    <split>/labels            (n,) int64        written at creation
    <split>/ids               (n,) str          written at creation
    <split>/valid             (n,) bool         written with the view-0 units
    _units/<split>/v<V>/c<C>  one completion marker per write unit (JSON: failures in it)
    _complete                 written once every unit has its marker

A *write unit* is one chunk of rows of one view of one split, so its data is exactly one
chunk per array, and Zarr's local store writes each chunk through a temporary file and a
rename: a unit is either fully there or absent. Its marker is written only after its data,
as a separate file (never a shared array several writers update), so a crash between the
two leaves data without a marker and the unit is simply redone. Resuming is "run the units
without a marker"; units are idempotent and independent, so any executor can run them.

An entry is created in a temporary directory and renamed into place, so a half-created
entry is never visible. Group attributes are written only by the process holding the
entry's :class:`Lease`.

Temporary files (zarr's ``*.partial`` chunk files, marker temp files, entries built aside in
``.tmp/``) are never read as data; the next holder of the key's lease deletes them
(:func:`remove_leftovers`) and ``cache gc`` deletes the rest. A unit's chunks are fsynced
before its marker is written, so even a power cut cannot leave a marker vouching for data
that never reached the disk. ``featurecache.cache.faults.checkpoint`` marks every step whose
interruption leaves a distinct state, for the crash tests.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.cache.faults import checkpoint
from featurecache.cache.keys import FeatureSpec
from featurecache.errors import (
    AmbiguousEntryError,
    CacheCorruptError,
    DiskFullError,
    EntryNotFoundError,
    IncompleteEntryError,
    UsageError,
)

CACHE_ENV = "FEATURECACHE_DIR"
UNITS_DIR = "_units"
COMPLETE_MARKER = "_complete"
TMP_DIR = ".tmp"
LOCKS_DIR = ".locks"
MEMO_DIR = ".memo"
#: Aim for chunks of about this many bytes (Zarr performs best with chunks of >= 1 MB).
TARGET_CHUNK_BYTES = 1 << 20
MIN_PREFIX = 6


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$FEATURECACHE_DIR``, else ``./cache``."""
    chosen = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or "cache"
    return Path(chosen).expanduser().absolute()


def memo_dir(cache_dir: Path) -> Path:
    """Where memoised file and weights digests live (never part of an entry)."""
    return cache_dir / MEMO_DIR


def chunk_rows_for(feature_shape: Sequence[int], dtype: str, *, n: int) -> int:
    """Rows per chunk so that one chunk (one write unit) holds about 1 MiB."""
    row_bytes = int(np.prod(feature_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return int(max(1, min(max(n, 1), -(-TARGET_CHUNK_BYTES // max(row_bytes, 1)))))


@dataclass(frozen=True)
class Unit:
    """One write unit: rows ``[start, stop)`` of view ``view`` of split ``split``."""

    split: str
    view: int
    chunk: int
    start: int
    stop: int

    @property
    def marker(self) -> str:
        """Marker path relative to the entry."""
        return f"{UNITS_DIR}/{self.split}/v{self.view}/c{self.chunk}"


@dataclass(frozen=True)
class SplitLayout:
    """Shape of one split's arrays."""

    name: str
    n: int
    views: int
    feature_shape: tuple[int, ...]
    chunk_rows: int

    def units(self) -> list[Unit]:
        """All write units of this split, view-major."""
        out = []
        for view in range(self.views):
            for chunk, start in enumerate(range(0, self.n, self.chunk_rows)):
                out.append(Unit(self.name, view, chunk, start, min(start + self.chunk_rows, self.n)))
        return out


def _codecs() -> dict[str, Any]:
    import zarr.codecs

    # The CRC32C checksum makes a corrupted chunk fail loudly on read instead of
    # decompressing to plausible-looking wrong numbers.
    return {"compressors": (zarr.codecs.ZstdCodec(level=1), zarr.codecs.Crc32cCodec())}


class FeatureSet:
    """A read view of one cache entry (complete or not).

    Parameters
    ----------
    path
        The entry's directory.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        meta = self.path / "zarr.json"
        try:
            attrs = json.loads(meta.read_text())["attributes"]
        except FileNotFoundError:
            raise EntryNotFoundError(f"{self.path} is not a featurecache entry (no zarr.json); list entries with `featurecache cache ls`") from None
        except (ValueError, KeyError) as exc:
            raise CacheCorruptError(f"{meta} is unreadable ({exc}); remove the entry with `featurecache cache rm`") from None
        if "featurecache" not in attrs:
            raise EntryNotFoundError(f"{self.path} is a Zarr group but not a featurecache entry")
        self.attrs: dict[str, Any] = attrs["featurecache"]
        self._group = None

    # -- identity -------------------------------------------------------------------
    @property
    def key(self) -> str:
        """Full 64-hex content key."""
        return self.attrs["key"]

    @property
    def name(self) -> str:
        """Entry name (directory name)."""
        return self.path.name

    @property
    def spec(self) -> dict[str, Any]:
        """The canonical spec whose digest is the key (plus readable labels)."""
        return self.attrs["spec"]

    @property
    def classes(self) -> list[str]:
        """Class names; labels index into this list."""
        return list(self.attrs["classes"])

    @property
    def splits(self) -> list[str]:
        """Split names in order (train, val, test where present)."""
        return list(self.attrs["layout"])

    def layout(self, split: str) -> SplitLayout:
        """The shape of ``split``'s arrays."""
        self._check_split(split)
        d = self.attrs["layout"][split]
        return SplitLayout(split, d["n"], d["views"], tuple(d["feature_shape"]), d["chunk_rows"])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one sample's features."""
        return tuple(self.attrs["feature_shape"])

    # -- completeness ---------------------------------------------------------------
    def units(self) -> list[Unit]:
        """Every write unit of the entry."""
        return [u for s in self.splits for u in self.layout(s).units()]

    def unit_done(self, unit: Unit) -> bool:
        """Whether ``unit`` has its completion marker."""
        return (self.path / unit.marker).is_file()

    def missing_units(self) -> list[Unit]:
        """Units without a completion marker."""
        return [u for u in self.units() if not self.unit_done(u)]

    @property
    def complete(self) -> bool:
        """True once every unit is done and the entry was sealed."""
        return (self.path / COMPLETE_MARKER).is_file()

    def failures(self) -> list[dict[str, str]]:
        """Images that failed to decode: ``[{split, id, reason}]``, from the view-0 unit markers."""
        out = []
        for split in self.splits:
            for unit in self.layout(split).units():
                if unit.view != 0:
                    break  # units are view-major: every view-0 unit came first
                try:
                    text = (self.path / unit.marker).read_text()
                except FileNotFoundError:
                    continue  # not done yet
                info = json.loads(text or "{}")
                out.extend({"split": split, "id": i, "reason": r} for i, r in info.get("failures", []))
        return out

    # -- data -----------------------------------------------------------------------
    @property
    def group(self):  # -> zarr.Group
        """The underlying Zarr group (read-only)."""
        if self._group is None:
            import zarr

            self._group = zarr.open_group(str(self.path), mode="r")
        return self._group

    def _check_split(self, split: str) -> None:
        if split not in self.attrs["layout"]:
            raise UsageError(f"split {split!r} is not in {self.name}; it has {', '.join(self.attrs['layout'])}")

    def feature_array(self, split: str):  # -> zarr.Array
        """The lazy ``(views, n, *feature_shape)`` Zarr array, for streaming reads."""
        self._check_split(split)
        return self.group[f"{split}/features"]

    def features(self, split: str, view: int | None = 0) -> np.ndarray:
        """Features of ``split``: ``(n, *shape)`` for one view, ``(views, n, *shape)`` for ``view=None``."""
        arr = self.feature_array(split)
        return arr[:] if view is None else arr[view]

    def labels(self, split: str) -> np.ndarray:
        """Integer labels ``(n,)`` indexing :attr:`classes`."""
        self._check_split(split)
        return self.group[f"{split}/labels"][:]

    def ids(self, split: str) -> np.ndarray:
        """Sample ids ``(n,)``: relative paths or array indices."""
        self._check_split(split)
        return np.asarray(self.group[f"{split}/ids"][:], dtype=object)

    def valid(self, split: str) -> np.ndarray:
        """``(n,)`` bool: False where the image failed to decode (its features are zeros)."""
        self._check_split(split)
        return self.group[f"{split}/valid"][:]

    def size_bytes(self) -> int:
        """Bytes on disk."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description, as printed by ``cache ls --json``."""
        spec = self.spec
        return {
            "name": self.name,
            "key": self.key,
            "backbone": spec["backbone"],
            "weights": spec.get("weights_label") or spec["weights"],
            "input_size": spec["input_size"],
            "pooling": spec["pooling"],
            "dataset": spec.get("dataset_name"),
            "splits": {s: {"n": self.layout(s).n, "views": self.layout(s).views} for s in self.splits},
            "feature_shape": list(self.feature_shape),
            "complete": self.complete,
            "created": self.attrs.get("created"),
        }

    def __repr__(self) -> str:
        return f"FeatureSet({self.name!r}, complete={self.complete})"


# -- writing ------------------------------------------------------------------------
def create_entry(
    cache_dir: Path,
    spec: FeatureSpec,
    *,
    classes: Sequence[str],
    splits: Mapping[str, tuple[np.ndarray, Sequence[str]]],
    feature_shape: Sequence[int],
    chunk_rows: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> FeatureSet:
    """Create the empty entry for ``spec`` atomically and return it.

    Parameters
    ----------
    cache_dir
        Cache root.
    spec
        The feature spec; its key names the entry.
    classes
        Class names.
    splits
        ``{split: (labels, ids)}`` in order.
    feature_shape
        Shape of one sample's features.
    chunk_rows
        Rows per chunk (= per write unit); default aims at ~1 MiB chunks.
    extra
        More attributes to record (versions, dataset source, ...).

    Returns
    -------
    FeatureSet
        The new entry; if another process created it meanwhile, that one.
    """
    import zarr

    final = cache_dir / spec.entry_name()
    if (final / "zarr.json").is_file():
        return FeatureSet(final)
    tmp = cache_dir / TMP_DIR / f"{spec.key[:12]}-{uuid.uuid4().hex[:8]}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    layout = {}
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for split, (labels, ids) in splits.items():
            n = len(labels)
            rows = chunk_rows or chunk_rows_for(feature_shape, spec.dtype, n=n)
            views = spec.views_for(split)
            row_chunks = (max(1, min(rows, max(n, 1))),)
            g = root.create_group(split)
            g.create_array(
                "features",
                shape=(views, n, *feature_shape),
                chunks=(1, *row_chunks, *feature_shape),
                dtype=spec.dtype,
                fill_value=0,
                **_codecs(),
            )
            lab = g.create_array("labels", shape=(n,), chunks=row_chunks, dtype="int64", fill_value=-1)
            idx = g.create_array("ids", shape=(n,), chunks=row_chunks, dtype=str)
            g.create_array("valid", shape=(n,), chunks=row_chunks, dtype=bool, fill_value=False)
            if n:
                lab[:] = np.asarray(labels, dtype=np.int64)
                idx[:] = np.asarray(list(ids), dtype=str)
            layout[split] = {"n": n, "views": views, "feature_shape": list(feature_shape), "chunk_rows": row_chunks[0]}
        attrs = {
            "key": spec.key,
            "spec": {**spec.key_fields(), "dataset_name": spec.dataset_name, "weights_label": spec.weights_label},
            "classes": list(classes),
            "layout": layout,
            "feature_shape": list(feature_shape),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
        }
        root.attrs["featurecache"] = attrs
        checkpoint("entry_tmp_created")
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if not (final / "zarr.json").is_file():
                raise
            del exc  # lost a creation race: the other entry is identical by construction
        checkpoint("entry_created")
    except OSError as exc:
        _raise_if_disk_full(exc, cache_dir)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return FeatureSet(final)


def _raise_if_disk_full(exc: OSError, where: Path) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(
            f"no space left on the device holding {where} ({exc.strerror}); free space and run the same command again "
            "to resume: finished units are kept"
        ) from exc


def write_unit(
    fs: FeatureSet,
    unit: Unit,
    features: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    failures: Sequence[tuple[str, str]] = (),
) -> None:
    """Write one unit's data, then (only then) its completion marker.

    ``valid`` is written with view-0 units only. On ENOSPC no marker is written, the
    error becomes :class:`DiskFullError`, and a later run redoes the unit.
    """
    import zarr

    group = zarr.open_group(str(fs.path), mode="r+")
    try:
        feature_array = group[f"{unit.split}/features"]
        feature_array[unit.view, unit.start : unit.stop] = features
        chunks = [(fs.path / unit.split / "features", _chunk_key(feature_array, (unit.view, unit.chunk)))]
        checkpoint("unit_data_written")
        if valid is not None:
            valid_array = group[f"{unit.split}/valid"]
            valid_array[unit.start : unit.stop] = valid
            chunks.append((fs.path / unit.split / "valid", _chunk_key(valid_array, (unit.chunk,))))
        checkpoint("unit_valid_written")
        # SIGKILL cannot tear a chunk (each is renamed into place), but a power cut could
        # persist the marker and not the data it vouches for; syncing the data first orders them.
        for array_dir, key in chunks:
            _fsync_file(array_dir / key)
        _write_marker(fs.path / unit.marker, {"failures": [list(f) for f in failures], "rows": [unit.start, unit.stop]})
        checkpoint("unit_marker_written")
    except OSError as exc:
        _raise_if_disk_full(exc, fs.path)
        raise


def _chunk_key(array: Any, leading: tuple[int, ...]) -> str:
    """Store key of the one chunk that starts with chunk coordinates ``leading``."""
    coords = (*leading, *([0] * (len(array.chunks) - len(leading))))
    return array.metadata.encode_chunk_key(coords)


def _fsync_file(path: Path) -> None:
    """Flush ``path`` and its directory entry to disk; an absent file (all-fill chunk) is fine."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        pass  # zarr stores no chunk that equals the fill value
    else:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # platforms without directory fds; the rename is still atomic, only less durable
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def _write_marker(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f)
            f.flush()
            os.fsync(f.fileno())
        checkpoint("marker_tmp_written")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def seal(fs: FeatureSet) -> None:
    """Mark the entry complete; refuses while any unit lacks its marker."""
    checkpoint("before_seal")
    missing = fs.missing_units()
    if missing:
        raise IncompleteEntryError(f"{fs.name} still has {len(missing)} unfinished units; run the extract command again to finish it")
    try:
        _write_marker(fs.path / COMPLETE_MARKER, {"sealed": time.time()})
    except OSError as exc:
        _raise_if_disk_full(exc, fs.path)
        raise
    checkpoint("sealed")


# -- finding entries ----------------------------------------------------------------
def iter_entries(cache_dir: Path, pattern: str = "*") -> Iterator[FeatureSet]:
    """Every entry under ``cache_dir`` (complete or not) whose name matches ``pattern``, sorted by name."""
    if not cache_dir.is_dir():
        return
    for child in sorted(cache_dir.glob(pattern)):
        if child.name.startswith((".", "_")) or not (child / "zarr.json").is_file():
            continue
        try:
            yield FeatureSet(child)
        except (EntryNotFoundError, CacheCorruptError):
            continue


def find_by_key(cache_dir: Path, key: str) -> FeatureSet | None:
    """The entry whose full key is ``key``, without scanning the cache."""
    for child in cache_dir.glob(f"*--{key[:12]}") if cache_dir.is_dir() else ():
        try:
            fs = FeatureSet(child)
        except (EntryNotFoundError, CacheCorruptError):
            continue
        if fs.key == key:
            return fs
    return None


def find_entry(ref: str, *, cache_dir: str | os.PathLike[str] | None = None) -> FeatureSet:
    """Resolve a full key, a key prefix (>= 6 hex digits, 12 recommended) or an entry name.

    Raises
    ------
    EntryNotFoundError
        Nothing matches.
    AmbiguousEntryError
        A prefix matches several entries.
    """
    root = resolve_cache_dir(cache_dir)
    ref = ref.strip()
    path = Path(ref)
    if path.is_dir() and (path / "zarr.json").is_file():
        return FeatureSet(path)
    named = root / ref
    if ref and named.parent == root and not ref.startswith((".", "_")) and (named / "zarr.json").is_file():
        try:
            return FeatureSet(named)  # an entry name: the directory itself, no scan
        except (EntryNotFoundError, CacheCorruptError):
            pass
    prefix = ref.lower()
    matches: list[FeatureSet] = []
    if len(prefix) >= MIN_PREFIX and all(c in "0123456789abcdef" for c in prefix):
        # Entry names end in "--" + the key's first 12 digits: only those directories can match,
        # so a key or prefix opens a few zarr.json files, not one per entry in the cache.
        matches = [e for e in iter_entries(root, f"*--{prefix[:12]}*") if e.key.startswith(prefix)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise AmbiguousEntryError(f"key prefix {ref!r} matches {len(matches)} entries ({', '.join(e.name for e in matches[:4])}); give more digits of the key")
    hint = f"short keys need at least {MIN_PREFIX} characters; " if len(ref) < MIN_PREFIX else ""
    raise EntryNotFoundError(f"no feature set {ref!r} in cache {root}; {hint}list entries with `featurecache cache ls --cache {root}`")


def open_features(ref: str, *, cache_dir: str | os.PathLike[str] | None = None, require_complete: bool = True) -> FeatureSet:
    """Open a feature set by key, key prefix or name.

    Raises
    ------
    IncompleteEntryError
        ``require_complete`` and the entry has unfinished units.
    """
    fs = find_entry(ref, cache_dir=cache_dir)
    if require_complete and not fs.complete:
        missing = len(fs.missing_units())
        raise IncompleteEntryError(
            f"feature set {fs.name} is incomplete ({missing} of {len(fs.units())} units missing); "
            "run the same `featurecache extract` command again to resume it"
        )
    return fs


def remove_leftovers(cache_dir: Path, key: str) -> list[Path]:
    """Delete the temporary files that killed writers of ``key`` left behind.

    Call it only while holding ``key``'s :class:`Lease`: then nobody else is writing these
    files, so every one of them is debris (zarr's ``*.partial`` chunk files, marker temp files,
    an entry built aside in ``.tmp/`` but never renamed into place, a lease moved aside by a
    breaker that died). None of them is ever read as data; this only reclaims the space.

    Parameters
    ----------
    cache_dir
        Cache root.
    key
        The content key whose debris to remove.

    Returns
    -------
    list of Path
        What was removed.
    """
    removed: list[Path] = []
    debris = [*(cache_dir / TMP_DIR).glob(f"{key[:12]}-*"), *(cache_dir / LOCKS_DIR).glob(f"{key}.lease.stale-*")]
    for entry in cache_dir.glob(f"*--{key[:12]}"):
        debris.extend(entry.rglob("*.partial"))
    for path in debris:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def remove_entry(fs: FeatureSet) -> None:
    """Delete an entry: renamed aside first so readers never see half of it."""
    trash = fs.path.parent / TMP_DIR / f"rm-{fs.path.name}-{uuid.uuid4().hex[:6]}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    os.rename(fs.path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# -- leases -------------------------------------------------------------------------
class Lease:
    """An exclusive, heart-beaten lease on one key, so one process extracts an entry.

    The lease is a file created with ``O_EXCL``; its holder touches it every
    ``heartbeat`` seconds. It is *stale* when the holder's pid is gone (same host) or it
    was not touched for ``stale_after`` seconds (other hosts, frozen holders); a waiter
    breaks a stale lease by renaming it away, which only one breaker can win.
    """

    def __init__(self, cache_dir: Path, key: str, *, stale_after: float = 60.0, heartbeat: float = 5.0) -> None:
        self.path = cache_dir / LOCKS_DIR / f"{key}.lease"
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self._token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def try_acquire(self) -> bool:
        """Take the lease if it is free; never blocks."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            _raise_if_disk_full(exc, self.path.parent)
            raise
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"token": self._token, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, f)
            checkpoint("lease_acquired")
        except OSError as exc:
            # A lease file without a record would look "being written" to waiters for a while.
            self.path.unlink(missing_ok=True)
            _raise_if_disk_full(exc, self.path.parent)
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="featurecache-lease", daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except OSError:
                return

    def holder(self) -> dict[str, Any] | None:
        """The current holder's record, or None when free."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def is_stale(self) -> bool:
        """Whether the current lease belongs to a dead or silent holder."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        info = self.holder()
        if info and info.get("host") == socket.gethostname():
            try:
                os.kill(int(info["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, KeyError):
                pass
        elif info is None and age < 2.0:
            return False  # being written right now
        return age > self.stale_after

    def break_stale(self, judged: Mapping[str, Any] | None = None) -> bool:
        """Remove a stale lease; True if this call removed it.

        ``judged`` is the holder record that :meth:`is_stale` was decided on (default: read it
        now). Between that decision and the rename, another waiter may have broken the stale
        lease and taken a fresh one; renaming that away would let two processes extract at
        once, so a moved lease with another token is put back (``link`` never overwrites).
        """
        judged = self.holder() if judged is None else judged
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if judged and moved and moved.get("token") != judged.get("token"):
            try:
                os.link(aside, self.path)
            except OSError:
                pass  # a third process took the lease meanwhile; the moved holder keeps running
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        """Give the lease back (only if still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        info = self.holder()
        if info and info.get("token") == self._token:
            self.path.unlink(missing_ok=True)
            checkpoint("lease_released")

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
