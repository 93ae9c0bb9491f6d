"""Heads: classifiers trained on cached features, all with the scikit-learn estimator API.

``make_head(name, params)`` builds one from the registry (``registry.py``); sklearn heads
are pipelines (``sklearn_heads.py``), ``dense`` is the Keras ``DenseHead`` (``dense.py``).
``save_head`` / ``load_head`` persist a fitted head in a directory:

``head.json`` (written last, the completion marker), and ``head.skops`` (scikit-learn heads)
or ``head.keras`` (the dense head); neither executes code from the files when loaded (see
``saving.py``).

``DenseHead`` is imported on first access, so ``import featurecache.heads`` needs neither
scikit-learn nor Keras.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from featurecache.training.heads.registry import (
    HEAD_NAMES,
    IMPORT_PATH_PACKAGES,
    HeadSpec,
    ParamSpec,
    SearchSpace,
    coerce_head_params,
    get_head_spec,
    head_param_schema,
    make_head,
    parse_param,
)
from featurecache.training.heads.saving import HEAD_FILES, convert_legacy_head, load_head, save_head

if TYPE_CHECKING:
    from featurecache.training.heads.dense import DenseHead

__all__ = [
    "HEAD_FILES",
    "HEAD_NAMES",
    "IMPORT_PATH_PACKAGES",
    "DenseHead",
    "HeadSpec",
    "ParamSpec",
    "SearchSpace",
    "coerce_head_params",
    "convert_legacy_head",
    "get_head_spec",
    "head_param_schema",
    "load_head",
    "make_head",
    "parse_param",
    "save_head",
]


def __getattr__(name: str) -> Any:
    # PEP 562: defer the scikit-learn import that dense.py needs until DenseHead is used.
    if name == "DenseHead":
        from featurecache.training.heads.dense import DenseHead

        return DenseHead
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
