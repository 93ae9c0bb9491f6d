"""Run directories on disk: written whole or not at all (built aside, swapped in by a rename), and read back.

:func:`write_run` writes a trained head's run directory (layout in :mod:`featurecache.train`)
and :func:`load_run` reads it back with its head; what the config records is read by
:mod:`featurecache.runconfig`, which sits below everything that reads runs.

How a directory is replaced. :func:`replace_dir` hands the caller a fresh sibling ``.<name>.tmp-<pid>-<hex>``
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
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.cache.fsio import jsonable, write_json
from featurecache.errors import RunError, UsageError
from featurecache.training.runconfig import RUN_FORMAT

__all__ = ["clean_leftovers", "load_run", "replace_dir", "swap_dirs", "write_run"]

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
    removed: list[Path] = []
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


def write_run(
    run_dir: Path,
    *,
    estimator: Any,
    head: str,
    params: Mapping[str, Any],
    data: Any,
    metrics: Mapping[str, Any],
    predictions: Mapping[str, np.ndarray],
    seconds: float,
    plots: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a run directory (see the module docstring), whole or not at all.

    The directory is built aside (``.<name>.tmp-<pid>-<hex>``) and swapped in with a rename
    (:func:`replace_dir`): a run killed at any point leaves either the previous run
    directory, complete, or the new one, never a mix (such as one head's config beside
    another's weights). Files an earlier run left there (plots, evaluations) go with it.
    ``data`` is the :class:`featurecache.train.TrainingData` the head was trained on (its key,
    spec, classes and validation are recorded). ``extra`` adds top-level fields to
    ``config.json`` (a sweep records its trial there).

    Raises
    ------
    UsageError
        ``run_dir`` exists and is not a directory.
    UntrustedHeadError
        The fitted head could not be loaded back safely (see ``heads.saving``).
    """
    from featurecache._runtime.versions import library_versions
    from featurecache.training.heads import save_head

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"run directory {run_dir} exists and is a file; pass another --out")
    config = {
        "format": RUN_FORMAT,
        "head": head,
        "params": jsonable(params),
        "features": {
            "key": data.key,
            "name": data.name,
            "spec": dict(data.spec),
            "dataset_source": data.source,
            **dict(data.source_options),
        },
        "classes": list(data.classes),
        "validation": data.validation,
        "invalid_skipped": dict(data.n_invalid),
        "untrained_classes": list(data.untrained_classes),
        "train_seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": library_versions(),
        **dict(extra or {}),
    }
    with replace_dir(run_dir) as tmp:
        save_head(estimator, tmp)
        write_json(tmp / "config.json", config)
        write_json(tmp / "metrics.json", dict(metrics))
        np.savez(tmp / "predictions.npz", **predictions)  # type: ignore[arg-type]  # numpy 2.1+ stubs let **arrays fill allow_pickle: these are array names
        if plots:
            from featurecache.report import plot_confusion_matrix, plot_training_curves

            for split, m in metrics.items():
                plot_confusion_matrix(
                    m["confusion_matrix"], data.classes, tmp / f"confusion_{split}.png", title=f"{head} on {split}"
                )
            history = getattr(estimator, "history_", None)
            if history:
                plot_training_curves(history, tmp / "training_curves.png", title=head)
            from featurecache.report.html import write_report

            write_report(tmp)  # top losses (images read back from the dataset) and report.html
    return run_dir


def load_run(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], Any]:
    """Read a run directory: its config and its fitted head.

    Raises
    ------
    RunError
        The directory, its config or its head is missing or unreadable.
    UntrustedHeadError
        The head could run code when loaded (a pickled ``head.joblib`` of an earlier version,
        or types outside the allow-list); the message gives the conversion command.
    """
    from featurecache.training.heads import load_head
    from featurecache.training.heads.saving import retrain_hint

    path = Path(run_dir)
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise RunError(f"run directory {path} does not exist; {retrain_hint(path)}")
    if not cfg_path.is_file():
        raise RunError(
            f"{path} has no config.json, so it is not a featurecache run; point to a directory written by `featurecache train-head`"
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {cfg_path} ({exc}); {retrain_hint(path)}") from None
    try:
        estimator = load_head(path)
    except FileNotFoundError as exc:
        raise RunError(f"run {path} has no saved head ({exc.filename or exc}); {retrain_hint(path)}") from None
    return config, estimator
