"""Durable local file writes: atomic JSON (cache documents and run files), fsync, and disk-full errors."""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.errors import DiskFullError


def raise_if_disk_full(exc: OSError, where: object) -> None:
    """Turn ENOSPC/EDQUOT into :class:`DiskFullError` with the fix; other errors pass through."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(
            f"no space left on the device holding {where} ({exc.strerror}); free space and run the same command again "
            "to resume: finished units are kept"
        ) from exc


def fsync_file(path: Path) -> None:
    """Flush ``path`` and its directory entry to disk; an absent file is fine."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        pass
    else:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (best effort: some platforms and filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: Any, *, before_rename: Callable[[], None] | None = None) -> None:
    """Write ``payload`` as JSON to ``path`` through a synced temporary file and a rename.

    Readers see the old file or the whole new one, never a torn one. The temporary name starts
    with a dot and ends in ``.partial``, which no reader treats as data.

    Parameters
    ----------
    path
        Destination.
    payload
        JSON-serialisable document.
    before_rename
        Called between the synced temporary file and the rename (crash tests hook it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise_if_disk_full(exc, path.parent)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def jsonable(obj: Any) -> Any:
    """``obj`` with NumPy scalars and arrays, tuples and mapping keys made JSON-friendly.

    Anything else that JSON cannot hold becomes its ``str``.
    """
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def write_atomic(path: Path, write: Callable[[Path], object], *, suffix: str = "") -> Path:
    """Write ``path`` whole or not at all: ``write(tmp)`` fills a temporary sibling that a rename puts in place.

    The temporary name ``.<name>.<pid>-<hex>.partial<suffix>`` is unique to the writer, so
    concurrent writers into one folder (sweep workers) never share one, and no reader takes a
    ``.partial`` for data; ``suffix`` keeps an extension the writer insists on (Keras wants
    ``.keras``). The temporary file is removed when ``write`` fails. No fsync: run files, reports
    and exports are rewritten by running the command again (the cache's own documents use
    :func:`write_json_atomic`).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:6]}.partial{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (through :func:`jsonable`) with :func:`write_atomic`; used for run directories' files."""
    text = json.dumps(jsonable(obj), indent=2)
    write_atomic(path, lambda tmp: tmp.write_text(text))


def tree_size(path: Path) -> int:
    """Bytes of the regular files under ``path``, never following symbolic links."""
    try:
        st = path.lstat()
    except OSError:
        return 0
    if not path.is_dir() or path.is_symlink():
        return st.st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path, followlinks=False):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total
