"""Keeping TensorFlow's native start-up lines off the command line's stderr.

TensorFlow 2.21 writes absl lines from C++ straight to file descriptor 2 while it imports and
while it first looks for devices (the oneDNN notice, "Could not find cuda drivers", "failed call
to cuInit", ...). They are written before absl logging is initialised, so
``TF_CPP_MIN_LOG_LEVEL`` does not filter them, and they bury the one-line messages a user needs.
The only thing that reaches them is the descriptor itself: :func:`native_stderr_silenced` points
fd 2 at ``/dev/null`` for the duration and then restores it.

The ``featurecache`` command calls :func:`install` once at start-up. It adds an import hook, so
the first ``import tensorflow`` anywhere (featurecache imports it lazily in many places, and
``import keras`` imports it too) runs silenced and initialises the device platforms while still
silenced; later imports are dictionary look-ups. ``install`` also sets :data:`QUIET_ENV`, which
process workers (sweeps, local Dask workers) inherit and act on before their first TensorFlow
import (:func:`install_inherited`). With ``FEATURECACHE_DEBUG=1`` nothing is silenced.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType

from featurecache.errors import debug_enabled

__all__ = ["QUIET_ENV", "install", "native_stderr_silenced"]

#: Set to ``1`` by :func:`install`; child processes install the hook too (:func:`install_inherited`).
QUIET_ENV = "FEATURECACHE_QUIET_TF"


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send everything written to file descriptor 2 to ``/dev/null`` inside the block.

    Python-level writes to ``sys.stderr`` are flushed first, so nothing written before the block
    is lost; whatever is written inside it, by C++ or Python, is discarded. The descriptor is
    restored even if the block raises.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as the other finders do, but executes it with fd 2 silenced."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None  # let the import system report the missing module as usual
        exec_module = spec.loader.exec_module

        def quiet_exec(module: ModuleType) -> None:
            with native_stderr_silenced():
                exec_module(module)
                # cuInit and the CUDA driver probe happen on the first device query, not at
                # import: do it now, while silenced. It does not create the runtime context, so
                # thread-pool sizes set later (sweep workers) still apply.
                module.config.list_physical_devices()
            # tf.function's "triggered tf.function retracing" warnings go through this logger;
            # a sweep traces each head's step on purpose and they only alarm users.
            module.get_logger().setLevel(logging.ERROR)

        # The loader object belongs to this one spec, so patching it affects nothing else.
        spec.loader.exec_module = quiet_exec  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Silence TensorFlow's native start-up lines for the rest of this process and its children.

    Sets ``TF_CPP_MIN_LOG_LEVEL=3`` unless the user set it, and adds the import hook described in
    the module docstring. Does nothing with ``FEATURECACHE_DEBUG=1`` (everything is shown), or
    when TensorFlow is already imported. Calling it twice is harmless.
    """
    if debug_enabled():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ[QUIET_ENV] = "1"
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietTensorFlowFinder())


def install_inherited() -> None:
    """:func:`install` in a worker (sweep, local Dask) whose parent, the ``featurecache`` command, did."""
    if os.environ.get(QUIET_ENV) == "1":
        install()
