"""The dataset model: splits of items with labels, and the manifest digest that names them.

Identity is content, never location. Each item has a *content digest* (sha256 of the file's
bytes, or of an array slice's dtype, shape and bytes) and the dataset's :meth:`Dataset.digest`
is the sha256 of the canonical JSON of the class names and, for each split in order, each
item's ``(id, content digest, label)``. Ids are relative paths (or array indices), so moving
the folder keeps the digest, while changing one pixel, one label, a file name or the split an
image is in changes it. ``DIGEST_FORMAT`` is part of the hashed document; bump it if that
document changes.

Hashing every file on every run would make a cache hit cost a full read of the dataset, so file
digests are memoised in a JSON file keyed by ``(absolute path, size, mtime_ns)``. As in git's
"racily clean" rule, a file modified less than ``_RACY_NS`` before it was hashed is not
memoised: a second edit within the filesystem's timestamp granularity could otherwise keep the
same size and mtime and be served a stale digest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
import warnings
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from featurecache.cache.keys import DIGEST_FORMAT, manifest_digest
from featurecache.cache.memo import read_memo, write_memo
from featurecache.data.decode import decode_image, read_image_bytes
from featurecache.errors import DatasetError, DatasetWarning

__all__ = [
    "DIGEST_FORMAT",
    "SPLIT_NAMES",
    "ArrayItems",
    "Dataset",
    "FileHasher",
    "FileItems",
    "JoinedPaths",
    "Split",
    "iter_file_hashes",
]

#: Split names in their canonical order.
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")

MEMO_FILENAME = "file-digests.json"
_MEMO_FORMAT = 1
_RACY_NS = 2_000_000_000  # files modified this recently are hashed but not memoised
_CHUNK = 1 << 16
_HASH_BATCH = 1024  # files handed to the hashing threads at a time

#: A file's sha256 (or ``unreadable:...`` identity), its ``(size, mtime_ns)`` as read (None if
#: unreadable) and the time it was read (``time.time_ns()``, for the racily-clean rule).
FileHash = tuple[str, tuple[int, int] | None, int]
#: Hashes files somewhere (threads here, tasks on a cluster): paths in, one FileHash per path, in order.
FileHasher = Callable[[Sequence[str]], Iterable[FileHash]]


class Items(Protocol):
    """Where a split's images come from: files or an in-memory array."""

    def __len__(self) -> int: ...

    def load(self, i: int, *, draft: int | None = None) -> np.ndarray: ...

    def load_range(self, start: int, stop: int) -> np.ndarray | None:
        """Rows ``[start, stop)`` as one ``uint8 (n, H, W, 3)`` array (do not modify it) when the
        images are held decoded, so they can be processed as a batch; ``None`` when each must be
        decoded on its own."""
        ...

    def content_digests(self) -> list[str]: ...

    def subset(self, indices: np.ndarray) -> Items: ...


class JoinedPaths(Sequence[str]):
    """``prefix + name`` for each of ``names``: a folder's file paths, made when asked for.

    A dataset folder's ids already are its files' paths relative to the folder, so keeping an
    absolute path string per file as well cost ~0.1 KiB per image for the whole extraction.
    """

    __slots__ = ("names", "prefix")

    def __init__(self, prefix: str, names: Sequence[str]) -> None:
        self.prefix = prefix
        self.names = names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.prefix + n for n in self.names[i]]
        return self.prefix + self.names[i]

    def __iter__(self):
        prefix = self.prefix
        return (prefix + n for n in self.names)

    @classmethod
    def of(cls, paths: Sequence[str], prefix: str, names: Sequence[str]) -> Sequence[str]:
        """``JoinedPaths(prefix, names)`` if it gives exactly ``paths``, else ``paths`` as a tuple."""
        if len(paths) == len(names) and all(p == prefix + n for p, n in zip(paths, names, strict=True)):
            return cls(prefix, names)
        return tuple(paths)


@dataclass(frozen=True, eq=False)
class FileItems:
    """Image files; ``paths`` are absolute. Digests are memoised in ``memo_path`` if given.

    Paths are kept as ``str`` (or a :class:`JoinedPaths`): a ``pathlib.Path`` holds its parts
    and cached strings besides (~0.35 KiB each), which at 100k files was the largest record
    the dataset kept per image.
    """

    paths: Sequence[str]
    memo_path: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.paths, JoinedPaths):
            object.__setattr__(self, "paths", tuple(os.fspath(p) for p in self.paths))

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int, *, draft: int | None = None) -> np.ndarray:
        # decode_image(bytes) gives the bare reason; callers prefix the item id.
        return decode_image(read_image_bytes(Path(self.paths[i])), draft=draft)

    def load_range(self, start: int, stop: int) -> None:
        return None  # files are decoded one by one (each may fail on its own)

    def content_digests(self) -> list[str]:
        return file_digests(self.paths, memo_path=self.memo_path)

    def subset(self, indices: np.ndarray) -> FileItems:
        if isinstance(self.paths, JoinedPaths):
            names = self.paths.names
            return FileItems(JoinedPaths(self.paths.prefix, tuple(names[int(i)] for i in indices)), self.memo_path)
        return FileItems(tuple(self.paths[int(i)] for i in indices), self.memo_path)


@dataclass(frozen=True, eq=False)
class ArrayItems:
    """Images in a read-only ``uint8`` array, ``(n, H, W)`` (grey) or ``(n, H, W, 3)``."""

    images: np.ndarray

    def __post_init__(self) -> None:
        arr = np.asarray(self.images)
        if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] != 3):
            raise DatasetError(f"image array must be uint8 (n, H, W) or (n, H, W, 3), got {arr.dtype} {arr.shape}")
        arr = np.ascontiguousarray(arr)
        arr.setflags(write=False)  # shared by worker threads; nobody may change it under them
        object.__setattr__(self, "images", arr)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def load(self, i: int, *, draft: int | None = None) -> np.ndarray:
        # draft is a decoding hint; arrays are already decoded, so it changes nothing here.
        img = self._rgb(self.images[i])
        return img if self.images.ndim == 3 else img.copy()  # always a writable array of its own

    def load_range(self, start: int, stop: int) -> np.ndarray:
        return self._rgb(self.images[start:stop])  # read-only when no conversion was needed

    def _rgb(self, block: np.ndarray) -> np.ndarray:
        """``block`` of ``images`` with grey (the array is ``(n, H, W)``) repeated to RGB."""
        return np.repeat(block[..., None], 3, axis=-1) if self.images.ndim == 3 else block

    def content_digests(self) -> list[str]:
        if len(self.images) == 0:
            return []
        # Every image of the array has the same dtype and shape: hash that header once and
        # continue from a copy of the hasher per image (the same digests, half the time).
        first = self.images[0]
        header = hashlib.sha256(
            json.dumps({"dtype": first.dtype.str, "shape": list(first.shape)}, sort_keys=True).encode()
        )
        out = []
        for img in self.images:
            h = header.copy()
            h.update(img.tobytes())
            out.append(h.hexdigest())
        return out

    def subset(self, indices: np.ndarray) -> ArrayItems:
        return ArrayItems(self.images[np.asarray(indices, dtype=np.int64)])


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset: ids, labels, and a thread-safe way to load each image.

    Attributes
    ----------
    name
        ``"train"``, ``"val"`` or ``"test"``.
    ids
        Relative posix path of each file, or ``str(index)`` for array datasets.
    labels
        ``int64 (n,)`` indices into :attr:`Dataset.classes` (read-only).
    items
        The image source (:class:`FileItems` or :class:`ArrayItems`).
    """

    name: str
    ids: tuple[str, ...]
    labels: np.ndarray
    items: Items = field(repr=False)

    def __post_init__(self) -> None:
        if self.name not in SPLIT_NAMES:
            raise DatasetError(f"split name {self.name!r} is not one of {', '.join(SPLIT_NAMES)}")
        labels = np.array(self.labels, dtype=np.int64).reshape(-1)
        labels.setflags(write=False)
        object.__setattr__(self, "labels", labels)
        if not (type(self.ids) is tuple and all(type(i) is str for i in self.ids)):  # else shared, not copied
            object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        if not (len(self.ids) == len(labels) == len(self.items)):
            raise DatasetError(
                f"split {self.name!r} has {len(self.ids)} ids, {len(labels)} labels and {len(self.items)} images; they must match"
            )
        if len(set(self.ids)) != len(self.ids):
            raise DatasetError(f"split {self.name!r} has duplicate ids; every item needs a unique id")

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Split(name={self.name!r}, n={len(self)})"

    def load(self, i: int, *, draft: int | None = None) -> np.ndarray:
        """Decode image ``i``.

        Parameters
        ----------
        i
            Row in this split.
        draft
            Size the image will be resized to: JPEG files at least twice as large are decoded
            at reduced DCT scale (see :func:`~featurecache.data.decode_image`). ``None``
            decodes every pixel.

        Returns
        -------
        numpy.ndarray
            ``uint8 (H, W, 3)`` RGB.

        Raises
        ------
        ImageDecodeError
            The image cannot be read or decoded (one-line reason, without the id).
        IndexError
            ``i`` is out of range.
        """
        if not -len(self) <= i < len(self):
            raise IndexError(f"split {self.name!r} has {len(self)} items; index {i} is out of range")
        return self.items.load(i, draft=draft)

    def content_digests(self) -> list[str]:
        """Per-item content hash (sha256 hex), computed once per ``Split`` object.

        Returns
        -------
        list of str
            One digest per item, in order.

        Raises
        ------
        DatasetError
            A file cannot be read.
        """
        return list(self._digests)

    @cached_property
    def _digests(self) -> tuple[str, ...]:
        return tuple(self.items.content_digests())

    def subset(self, indices: Sequence[int] | np.ndarray) -> Split:
        """A new split with the items at ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return Split(self.name, tuple(self.ids[i] for i in idx), self.labels[idx], self.items.subset(idx))

    def renamed(self, name: str) -> Split:
        """The same items under another split name."""
        return Split(name, self.ids, self.labels, self.items)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image dataset: class names, ordered splits, and files that were skipped.

    Attributes
    ----------
    name
        Short slug used in cache entry names (folder basename, csv / npz stem, ``cifar10``, ...).
    source
        The source string as given to :func:`~featurecache.data.load_dataset`.
    classes
        Class names; labels index into this tuple.
    splits
        ``{"train": Split, "val": Split, "test": Split}`` in that order, only those present.
    skipped
        ``(relative path, reason)`` for each file that was not used (not an image type, hidden,
        outside a class folder, ...). Reported to the user, never dropped silently.
    """

    name: str
    source: str
    classes: tuple[str, ...]
    splits: dict[str, Split]
    skipped: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        unknown = [s for s in self.splits if s not in SPLIT_NAMES]
        if unknown:
            raise DatasetError(f"unknown split names {unknown}; splits must be among {', '.join(SPLIT_NAMES)}")
        ordered = {s: self.splits[s] for s in SPLIT_NAMES if s in self.splits}
        for name, split in ordered.items():
            if split.name != name:
                raise DatasetError(f"split stored under {name!r} is named {split.name!r}")
            if len(split) and (split.labels.min() < 0 or split.labels.max() >= len(self.classes)):
                raise DatasetError(
                    f"split {name!r} has labels outside 0..{len(self.classes) - 1} (there are {len(self.classes)} classes)"
                )
        object.__setattr__(self, "splits", ordered)
        object.__setattr__(self, "skipped", tuple((str(p), str(r)) for p, r in self.skipped))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"Dataset(name={self.name!r}, classes={len(self.classes)}, {sizes}, skipped={len(self.skipped)})"

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def manifest(self) -> dict[str, Any]:
        """The canonical document :meth:`digest` hashes (reads every item's content digest)."""
        self.prefetch_digests()
        return {
            "format": DIGEST_FORMAT,
            "classes": list(self.classes),
            "splits": [
                [
                    name,
                    [
                        [i, d, int(lab)]
                        for i, d, lab in zip(split.ids, split.content_digests(), split.labels, strict=True)
                    ],
                ]
                for name, split in self.splits.items()
            ],
        }

    def digests_by_split(self) -> dict[str, list[str]]:
        """Each split's per-item content digests, in order (files of all splits hashed in one pass)."""
        self.prefetch_digests()
        return {name: split.content_digests() for name, split in self.splits.items()}

    def prefetch_digests(self, hasher: FileHasher | None = None) -> None:
        """Digest the files of all splits sharing a memo in one :func:`file_digests` call.

        Split by split, a dataset with train/val/test would read and rewrite the memo three
        times; the digests are the same either way and land in each split's own cache.

        Parameters
        ----------
        hasher
            Hashes the files the memo lacks (default: threads in this process); e.g.
            :func:`featurecache.cluster.file_hasher` hashes them as tasks on a Dask cluster.

        Raises
        ------
        DatasetError
            A file cannot be stat'ed or read.
        """
        groups: dict[Path | None, list[tuple[Split, FileItems]]] = {}
        for split in self.splits.values():
            if isinstance(split.items, FileItems) and "_digests" not in split.__dict__:
                groups.setdefault(split.items.memo_path, []).append((split, split.items))
        for memo_path, splits in groups.items():
            if len(splits) < 2 and hasher is None:
                continue  # the split digests itself, the same way
            paths = [p for _, items in splits for p in items.paths]
            digests = (
                file_digests(paths, memo_path=memo_path, hasher=hasher)
                if hasher
                else file_digests(paths, memo_path=memo_path)
            )
            at = 0
            for sp, items in splits:
                n = len(items.paths)
                sp.__dict__["_digests"] = tuple(digests[at : at + n])  # fills the cached_property
                at += n

    def digest(self) -> str:
        """Manifest digest: sha256 of the canonical JSON of classes and each split's items.

        Returns
        -------
        str
            64 hex characters. Independent of absolute paths and mtimes.

        Raises
        ------
        DatasetError
            A file cannot be read.
        """
        return self._digest

    @cached_property
    def _digest(self) -> str:
        digests = self.digests_by_split()
        _warn_label_conflicts(
            self,
            {"splits": [[n, zip(s.ids, digests[n], s.labels.tolist(), strict=True)] for n, s in self.splits.items()]},
        )
        return manifest_digest(self.classes, [(n, s.ids, digests[n], s.labels) for n, s in self.splits.items()])


def _warn_label_conflicts(dataset: Dataset, manifest: dict[str, Any], shown: int = 3) -> None:
    """Warn when the same image bytes appear under two labels (a copy, or a link to another class).

    Runs where the content digests are computed anyway, so it costs one pass over the ids.
    """
    first: dict[str, tuple[str, int]] = {}  # content digest -> (split/id, label) of its first item
    conflicts: list[tuple[str, int, str, int]] = []
    for split, items in manifest["splits"]:
        for item_id, digest, label in items:
            if digest.startswith("unreadable:"):
                continue  # a stand-in identity shared by all unreadable files, not their bytes
            # Ids of split folders already start with the split's folder ("train/cat/1.png").
            where = item_id if item_id.startswith(f"{split}/") else f"{split}/{item_id}"
            seen = first.setdefault(digest, (where, label))
            if seen[1] != label:
                conflicts.append((*seen, where, label))
    if not conflicts:
        return
    examples = "; ".join(
        f"{a} ({dataset.classes[la]!r}) = {b} ({dataset.classes[lb]!r})" for a, la, b, lb in conflicts[:shown]
    )
    more = f" and {len(conflicts) - shown} more" if len(conflicts) > shown else ""
    warnings.warn(
        f"dataset {dataset.name!r}: {len(conflicts)} image(s) appear under two labels with the same bytes: {examples}{more}; "
        "remove the duplicates or fix their labels",
        DatasetWarning,
        stacklevel=2,
    )


def file_digests(
    paths: Sequence[str | os.PathLike[str]],
    *,
    memo_path: Path | None = None,
    workers: int = 4,
    hasher: FileHasher | None = None,
) -> list[str]:
    """sha256 of each file's bytes, reusing ``memo_path`` entries whose size and mtime match.

    Parameters
    ----------
    paths
        Absolute file paths.
    memo_path
        JSON memo file, created or refreshed (atomically) when anything was hashed; ``None``
        hashes every file.
    workers
        Threads hashing files that miss the memo (hashlib releases the GIL).
    hasher
        Hashes the files that miss the memo elsewhere (a Dask cluster) instead of ``workers``
        threads here. What it read counts only for a file it saw with the size and mtime this
        process stat'ed; any other file (unreadable there, changed, another file at the same
        path) is hashed here, so the digests equal those of hashing here.

    Returns
    -------
    list of str
        Hex digests in the order of ``paths``.

    Raises
    ------
    DatasetError
        A file cannot be stat'ed or read.
    """
    memo = _read_memo(memo_path) if memo_path is not None else {}
    # Per file, this pass keeps only what it must, compactly: at 100k files its transient
    # Python objects (a fresh absolute path, a (size, mtime) tuple, a memo entry per file)
    # were ~0.55 KiB per file, the largest per-image peak of an extraction (issue 12).
    keys = [_absolute(p) for p in paths]
    sizes, mtimes = array("q", bytes(8 * len(keys))), array("q", bytes(8 * len(keys)))
    for j, key in enumerate(keys):
        try:
            st = os.stat(key)
            sizes[j], mtimes[j] = st.st_size, st.st_mtime_ns
        except OSError:
            sizes[j] = -1  # e.g. a dangling link: hashed below as unreadable, decoded as invalid
    out: list[str | None] = [None] * len(keys)
    missing = array("q")
    for j, key in enumerate(keys):
        entry = memo.get(key)
        if sizes[j] >= 0 and entry is not None and entry[0] == sizes[j] and entry[1] == mtimes[j]:
            out[j] = entry[2]
        else:
            missing.append(j)
    del memo
    if missing:
        todo = [keys[j] for j in missing]
        hashed = hasher(todo) if hasher is not None else iter_file_hashes(todo, workers=workers)
        del todo
        memoise = bytearray(len(keys))  # 1: hashed, unchanged meanwhile, and not racily recent
        for j, (digest, sm_after, read_ns) in zip(missing, hashed, strict=True):
            seen = (int(sizes[j]), int(mtimes[j]))
            if hasher is not None and (sm_after is None or sm_after != seen):  # not the file stat'ed here
                digest, sm_after, read_ns = next(iter_file_hashes([keys[j]], workers=1))
            out[j] = digest
            if sm_after is not None and sm_after == seen and read_ns - sm_after[1] > _RACY_NS:
                memoise[j] = 1
        if memo_path is not None and any(memoise):
            fresh = [j for j in missing if memoise[j]]
            _update_memo(memo_path, keys, fresh, lambda j: (sizes[j], mtimes[j], str(out[j])))
    return [str(d) for d in out]


def iter_file_hashes(paths: Sequence[str], *, workers: int = 4) -> Iterator[FileHash]:
    """Hash ``paths`` on ``workers`` threads, yielding one :data:`FileHash` per path, in order.

    Parameters
    ----------
    paths
        Absolute file paths.
    workers
        Threads (hashlib releases the GIL).

    Yields
    ------
    FileHash
        ``(sha256 hex or "unreadable:<errno>", (size, mtime_ns) as read or None, time read in ns)``.
    """
    if not paths:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
        # In batches: pool.map submits every item at once, and a Future per file (~1 KiB
        # with its condition variable) was the largest per-image cost of the digest.
        for b in range(0, len(paths), _HASH_BATCH):
            hashed = list(pool.map(_hash_file, paths[b : b + _HASH_BATCH]))
            now = time.time_ns()
            for digest, sm_after in hashed:
                yield digest, sm_after, now


def _absolute(p: str | os.PathLike[str]) -> str:
    """``os.path.abspath(p)``, without a new string when ``p`` already is one (dataset paths are)."""
    if isinstance(p, str) and os.path.isabs(p) and os.path.normpath(p) == p:
        return p
    return os.path.abspath(p)


def _hash_file(path: str) -> tuple[str, tuple[int, int] | None]:
    """sha256 hex of the file and its ``(size, mtime_ns)`` as read, or an ``unreadable:`` identity."""
    try:
        with open(path, "rb", buffering=0) as f:
            # Into one small reused buffer: f.read(1 MiB) allocated (and touched) 1 MiB per file.
            h = hashlib.sha256()
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            while n := f.readinto(buf):
                h.update(view[:n])
            st = os.fstat(f.fileno())
    except OSError as exc:
        # A file that exists but cannot be read (permissions, a directory named like an image)
        # gets a deterministic identity, so extraction marks it invalid with its reason instead
        # of stopping the whole run; once it becomes readable its digest, and the key, change.
        return f"unreadable:{errno.errorcode.get(exc.errno or 0, 'EIO')}", None
    return h.hexdigest(), (st.st_size, st.st_mtime_ns)


def _merge_sorted(old: dict[str, tuple[int, int, str]], keys: Sequence[str], new: Sequence[int], entry: Any) -> Any:
    """``(key, (size, mtime, sha))`` of ``old`` updated with the new entries, in key order, each key once."""
    old_keys = sorted(old)
    i = 0
    last = None
    for j in new:
        key = keys[j]
        if key == last:
            continue  # the same file listed twice: one entry, as a dict would keep
        while i < len(old_keys) and old_keys[i] < key:
            yield old_keys[i], old[old_keys[i]]
            i += 1
        if i < len(old_keys) and old_keys[i] == key:
            i += 1  # replaced by the fresh entry
        yield key, entry(j)
        last = key
    for k in old_keys[i:]:
        yield k, old[k]


def _memo_entry(obj: dict[str, Any]) -> Any:
    """``json.loads`` object hook: a file's ``{"mtime_ns", "sha256", "size"}`` becomes a
    ``(size, mtime_ns, sha256)`` tuple as soon as it is parsed, so a memo of 100k files is never
    held as 100k dicts (~0.4 KiB each) at once."""
    if obj.keys() == {"size", "mtime_ns", "sha256"}:
        size, mtime, sha = obj["size"], obj["mtime_ns"], obj["sha256"]
        if type(size) is int and type(mtime) is int and isinstance(sha, str):
            return (size, mtime, sha)
    return obj


def _read_memo(memo_path: Path) -> dict[str, tuple[int, int, str]]:
    """The memo as ``{absolute path: (size, mtime_ns, sha256)}``; malformed entries are dropped."""
    doc = read_memo(memo_path, object_hook=_memo_entry)  # None when missing or damaged: start over
    if not isinstance(doc, dict) or doc.get("format") != _MEMO_FORMAT or not isinstance(doc.get("files"), dict):
        return {}
    files: dict[str, Any] = doc["files"]
    for bad in [k for k, v in files.items() if not isinstance(v, tuple)]:
        del files[bad]
    return files


def _update_memo(memo_path: Path, keys: Sequence[str], fresh: Sequence[int], entry: Any) -> None:
    """Add ``keys[j]: entry(j)`` for each ``j`` in ``fresh`` to the memo (they replace older entries)."""
    # Re-read just before writing so entries another process added meanwhile survive.
    old = _read_memo(memo_path)
    new = sorted(fresh, key=keys.__getitem__)

    def write(f: IO[str]) -> None:
        # The bytes json.dump(sort_keys=True, separators=(",", ":")) wrote for the merged
        # entries, written entry by entry from two sorted runs instead of a merged dict.
        f.write('{"files":{')
        for n, (key, (size, mtime, sha)) in enumerate(_merge_sorted(old, keys, new, entry)):
            f.write(
                f'{"," if n else ""}{json.dumps(key)}:{{"mtime_ns":{mtime},"sha256":{json.dumps(sha)},"size":{size}}}'
            )
        f.write(f'}},"format":{_MEMO_FORMAT}}}')

    write_memo(memo_path, write)
