"""Reading and replacing digest memos, the small JSON files in a cache's ``.memo/`` folder that save recomputing a digest.

A memo is only a cache of digests, so it is read leniently (a missing, torn or foreign file reads
as nothing and costs a recomputation) and written on a best-effort basis (a read-only or full
disk must not fail a run). It is replaced through a synced temporary file ``.<name>.*.tmp`` in the
same folder and a rename, so a concurrent reader sees the old memo or the whole new one; ``cache
gc`` removes temporary files a killed writer left. Two memos use it: the file digests of
:mod:`featurecache.data.dataset` (dataset and weights files) and the ImageNet weights digests of
:mod:`featurecache.backbones.identity`; each owns its document's format.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def read_memo(path: Path, *, object_hook: Callable[[dict[str, Any]], Any] | None = None) -> Any:
    """Parse the memo at ``path``, or None when it is missing or not JSON.

    Parameters
    ----------
    path : Path
        The memo file.
    object_hook : callable or None
        Passed to :func:`json.loads` (to turn entries into compact tuples while parsing).

    Returns
    -------
    object or None
        The parsed document, which the caller still has to check; None when unreadable.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"), object_hook=object_hook)
    except (OSError, ValueError):
        return None


def write_memo(path: Path, write: Callable[[IO[str]], None]) -> None:
    """Replace the memo at ``path`` with what ``write`` writes, atomically; give up on any OS error.

    Parameters
    ----------
    path : Path
        The memo file; its folder is created if needed.
    write : callable
        Writes the whole document to the open text file it is given.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        # A lost update only means one more recomputation later.
        return
