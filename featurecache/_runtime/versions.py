"""Library versions recorded (never keyed) with every unit of work and every view."""

from __future__ import annotations

import platform
from functools import lru_cache


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the numbers: recorded, not keyed.

    Returns
    -------
    dict
        ``{"python": ..., "tensorflow": ..., "keras": ..., ...}`` for the installed ones.
    """
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("featurecache", "tensorflow", "keras", "numpy", "zarr", "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return dict(out)
