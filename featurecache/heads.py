"""Deprecated alias of :mod:`featurecache.training.heads`, kept for one release.

``from featurecache.heads import DenseHead`` and ``from featurecache.heads.dense_group import
fit_dense_heads`` (the README's examples before the heads moved into the training stage) keep
working with a ``DeprecationWarning``; so do heads saved before the move, whose ``head.skops``
names ``featurecache.heads.sklearn_heads.flatten_features``. Each old submodule name is the
same module object as the new one (no second copy of a class), registered in ``sys.modules``.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

warnings.warn(
    "featurecache.heads moved to featurecache.training.heads; import from there "
    "(the old path goes in the next release)",
    DeprecationWarning,
    stacklevel=2,
)

_NEW = "featurecache.training.heads"
_SUBMODULES = (
    "dense",
    "dense_batches",
    "dense_group",
    "dense_params",
    "params",
    "registry",
    "saving",
    "sklearn_heads",
    "sklearn_params",
)

for _name in _SUBMODULES:
    sys.modules[f"{__name__}.{_name}"] = globals()[_name] = importlib.import_module(f"{_NEW}.{_name}")


def __getattr__(name: str) -> Any:
    return getattr(importlib.import_module(_NEW), name)
