"""Write an output directory whole or not at all: build it aside, then swap it in with a rename.

How it works. :func:`replace_dir` hands the caller a fresh sibling ``.<name>.tmp-<pid>-<hex>``
to fill, then puts it in place of ``<name>``. On Linux the two directories are exchanged with
one ``renameat2(RENAME_EXCHANGE)`` call, so at every instant ``<name>`` is either the complete
old directory or the complete new one; elsewhere (or on a filesystem without the flag) the old
one is renamed to ``.<name>.old-<pid>-<hex>`` first, leaving a moment in which ``<name>`` is
absent but nothing is mixed. Whatever a killed writer leaves behind is a dot-directory that no
reader looks at; :func:`clean_leftovers` removes those of dead processes at the next write.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["clean_leftovers", "replace_dir", "swap_dirs"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
#: A leftover whose process may live on another host is removed once it is this old.
_STALE_SECONDS = 24 * 3600


def _renameat2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def swap_dirs(new: Path, dest: Path) -> Path | None:
    """Put directory ``new`` at ``dest``; return where the old ``dest`` went (``None`` if there was none).

    The caller removes the returned directory. ``new`` and ``dest`` must be on one filesystem
    (siblings are).
    """
    if not dest.exists() and not dest.is_symlink():
        os.rename(new, dest)
        return None
    fn = _renameat2()
    if fn is not None and fn(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(dest), _RENAME_EXCHANGE) == 0:
        return new  # new now holds the old directory
    err = ctypes.get_errno() if fn is not None else errno.ENOSYS
    if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM, errno.EXDEV):
        raise OSError(err, os.strerror(err), str(dest))
    aside = dest.with_name(f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    os.rename(dest, aside)
    os.rename(new, dest)
    return aside


def _pid_of(name: str) -> int | None:
    # ".<name>.tmp-<pid>-<hex>" / ".<name>.old-<pid>-<hex>"
    try:
        return int(name.rsplit("-", 2)[-2])
    except (IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(dest: Path, *, also: Sequence[str] = ()) -> list[Path]:
    """Remove the temp and old copies of ``dest`` that killed writers left behind.

    A leftover is removed when its process (the pid in its name) no longer runs on this host,
    or when it is older than a day (its writer may run elsewhere on shared storage).

    Parameters
    ----------
    dest
        The directory whose leftovers (``.<name>.tmp-*``, ``.<name>.old-*``) are removed.
    also
        More name prefixes in ``dest``'s parent to treat the same way (names an earlier
        version used, e.g. ``.best-``).

    Returns
    -------
    list of pathlib.Path
        What was removed.
    """
    removed = []
    parent = dest.parent
    if not parent.is_dir():
        return removed
    now = time.time()
    for prefix in (f".{dest.name}.tmp-", f".{dest.name}.old-", *also):
        for path in parent.glob(f"{prefix}*"):
            pid = _pid_of(path.name)
            try:
                old = now - path.lstat().st_mtime > _STALE_SECONDS
            except OSError:
                continue
            if pid == os.getpid() and not old:
                continue
            if old or pid is None or not _alive(pid):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


@contextlib.contextmanager
def replace_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty sibling of ``dest`` to fill; on success it replaces ``dest`` whole.

    On an exception the sibling is removed and ``dest`` is untouched; on a kill it stays as a
    dot-directory for :func:`clean_leftovers`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.mkdir()
    try:
        yield tmp
        old = swap_dirs(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
