"""Head registry: a map of head name -> builder, paired with the schema each head declares.

How it works: every head exposes its hyperparameters under user-facing names (``C``,
``hidden``, ``lr``) described by a ``ParamSpec`` (:mod:`featurecache.heads.params`); the
dense head declares its own (:mod:`featurecache.heads.dense_params`), the scikit-learn heads
theirs (:mod:`featurecache.heads.sklearn_params`), and the registry only pairs names with them.  The schema is the single source of truth
for three consumers: the CLI (``C=0.1`` strings are coerced by ``ParamSpec.coerce``), docs /
``--help`` (``ParamSpec.describe``) and sweeps (``ParamSpec.search`` gives a sensible
random-search range, sampled by ``SearchSpace.sample``).  ``make_head`` looks the name up,
coerces the values and calls the head's builder, which returns a plain scikit-learn estimator.

Besides the registered names, any scikit-learn-compatible classifier can be named by import
path (``"sklearn.ensemble:RandomForestClassifier"``).  Only modules of the packages in
``IMPORT_PATH_PACKAGES`` may be imported that way, so a head name from a config file can
never run arbitrary code; its schema is derived from the estimator's own ``get_params()``
defaults.

Nothing here imports scikit-learn or Keras at module import time: the CLI lists heads and
their parameters without paying for either.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from featurecache.errors import HeadParamError, UnknownHeadError, choices
from featurecache.training.heads.dense_params import DENSE_PARAMS
from featurecache.training.heads.params import ParamSpec, SearchSpace, coerce_params
from featurecache.training.heads.sklearn_params import SKLEARN_HEADS

if TYPE_CHECKING:
    from sklearn.base import BaseEstimator

__all__ = [
    "HEAD_NAMES",
    "IMPORT_PATH_PACKAGES",
    "HeadSpec",
    "ParamSpec",
    "SearchSpace",
    "coerce_head_params",
    "get_head_spec",
    "head_param_schema",
    "make_head",
    "parse_param",
]

#: Top-level packages whose estimators may be named by import path ("pkg.module:Class").
IMPORT_PATH_PACKAGES: tuple[str, ...] = ("sklearn", "xgboost", "lightgbm")


@dataclass(frozen=True)
class HeadSpec:
    """A registered head.

    Parameters
    ----------
    name
        Registry name (``"logreg"``).
    summary
        One line for listings.
    params
        The head's parameter schema, in display order.
    build
        ``build(**typed_params) -> estimator``; imports its libraries lazily.
    """

    name: str
    summary: str
    params: tuple[ParamSpec, ...]
    build: Callable[..., BaseEstimator] = field(repr=False)

    @property
    def schema(self) -> dict[str, ParamSpec]:
        """Parameters by name (a fresh dict; the spec itself stays immutable)."""
        return {p.name: p for p in self.params}


# --------------------------------------------------------------------------- name -> builder


def _lazy(target: str) -> Callable[..., BaseEstimator]:
    """A builder that imports ``module:function`` (scikit-learn, Keras) only when a head is built."""
    module, name = target.split(":")

    def build(**kw: Any) -> BaseEstimator:
        return getattr(importlib.import_module(module), name)(**kw)

    build.__qualname__ = f"build[{target}]"
    return build


#: Head name -> builder; each head's summary and schema come from the head's own module.
_BUILDERS: Mapping[str, str] = MappingProxyType(
    {
        "logreg": "featurecache.training.heads.sklearn_heads:build_logreg",
        "linear-svm": "featurecache.training.heads.sklearn_heads:build_linear_svm",
        "ridge": "featurecache.training.heads.sklearn_heads:build_ridge",
        "sgd": "featurecache.training.heads.sklearn_heads:build_sgd",
        "knn": "featurecache.training.heads.sklearn_heads:build_knn",
        "dense": "featurecache.training.heads.dense:DenseHead",
    }
)
_DENSE_SUMMARY = "Keras dense top model (pool -> [Dense -> BN? -> act -> dropout]* -> softmax)"
_SCHEMAS: Mapping[str, tuple[str, tuple[ParamSpec, ...]]] = {**SKLEARN_HEADS, "dense": (_DENSE_SUMMARY, DENSE_PARAMS)}
_SPECS: Mapping[str, HeadSpec] = MappingProxyType(
    {name: HeadSpec(name, _SCHEMAS[name][0], _SCHEMAS[name][1], _lazy(target)) for name, target in _BUILDERS.items()}
)

#: Registered head names (import-path heads such as "sklearn.ensemble:RandomForestClassifier"
#: are accepted in addition).
HEAD_NAMES: tuple[str, ...] = tuple(_SPECS)


# --------------------------------------------------------------------------- public API


def parse_param(text: str) -> tuple[str, str]:
    """Split one CLI ``NAME=VALUE`` item.

    Parameters
    ----------
    text
        For example ``"hidden=256-128"`` or ``"C=1e-2"``; the value may be empty
        (``"hidden="`` means no hidden layers).

    Returns
    -------
    tuple[str, str]
        ``(name, value)`` with surrounding whitespace removed.

    Raises
    ------
    HeadParamError
        When there is no ``=`` or the name is empty / not an identifier.
    """
    if not isinstance(text, str) or "=" not in text:
        raise HeadParamError(f"head parameter {text!r} is not NAME=VALUE; write it like C=0.1 or hidden=256-128")
    name, value = text.split("=", 1)
    name = name.strip()
    if not name.isidentifier():
        raise HeadParamError(f"head parameter {text!r} has an invalid name {name!r}; write it like C=0.1")
    return name, value.strip()


def get_head_spec(name: str) -> HeadSpec:
    """Return the ``HeadSpec`` of a registered name or of an allowed import path.

    Parameters
    ----------
    name
        A name from ``HEAD_NAMES`` or ``"package.module:ClassName"`` with the package in
        ``IMPORT_PATH_PACKAGES``.

    Returns
    -------
    HeadSpec
        The spec; for import paths its schema is derived from the estimator's defaults.

    Raises
    ------
    UnknownHeadError
        Unknown name, disallowed package, missing module/class, or not a classifier.
    """
    if not isinstance(name, str):
        raise UnknownHeadError(f"head name must be a string, got {name!r}; use one of {choices(HEAD_NAMES)}")
    spec = _SPECS.get(name)
    if spec is not None:
        return spec
    if ":" in name:
        return _import_path_spec(name)
    raise UnknownHeadError(
        f"unknown head {name!r}; use one of {choices(HEAD_NAMES)} or an import path like "
        f"'sklearn.ensemble:RandomForestClassifier' (packages: {choices(IMPORT_PATH_PACKAGES)})"
    )


def head_param_schema(name: str) -> dict[str, ParamSpec]:
    """Typed parameter schema of a head, for docs, ``--help`` and sweeps.

    Parameters
    ----------
    name
        Head name or allowed import path.

    Returns
    -------
    dict[str, ParamSpec]
        Parameters by user-facing name, in display order.

    Raises
    ------
    UnknownHeadError
        When the head is unknown.
    """
    return get_head_spec(name).schema


def coerce_head_params(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate and type a head's parameters, filling defaults for the missing ones.

    Parameters
    ----------
    name
        Head name or allowed import path.
    params
        User-facing names to raw values (strings from the CLI or Python values).

    Returns
    -------
    dict[str, Any]
        Every parameter of the head, typed; suitable for a run's config JSON.

    Raises
    ------
    UnknownHeadError
        When the head is unknown.
    HeadParamError
        When a name is not a parameter of the head or a value has the wrong type.
    """
    return coerce_params(name, get_head_spec(name).params, params)


def make_head(name: str, params: Mapping[str, Any] | None = None) -> BaseEstimator:
    """Build an unfitted head estimator.

    Parameters
    ----------
    name
        One of ``HEAD_NAMES`` (``logreg``, ``linear-svm``, ``ridge``, ``sgd``, ``knn``,
        ``dense``) or an import path ``"sklearn.ensemble:RandomForestClassifier"``.
    params
        Hyperparameters by user-facing name; string values are coerced with the head's
        schema (``{"C": "0.1"}``, ``{"hidden": "256-128"}``).

    Returns
    -------
    sklearn.base.BaseEstimator
        A classifier with ``fit``/``predict``/``predict_proba``.  sklearn heads are
        ``Pipeline(flatten, [scale,] clf)`` so spatial ``(n, h, w, c)`` features are
        flattened inside the saved head; ``dense`` is a ``DenseHead``.

    Raises
    ------
    UnknownHeadError
        When the head is unknown.
    HeadParamError
        When a parameter is unknown or ill-typed.
    """
    spec = get_head_spec(name)
    typed = coerce_head_params(name, params)
    return spec.build(**typed)


# --------------------------------------------------------------------------- import paths


@functools.lru_cache(maxsize=64)
def _import_path_spec(path: str) -> HeadSpec:
    # Cached: every lookup (coercion, make_head, each grid trial and label) asks for the spec,
    # and building it constructs the estimator. HeadSpec and ParamSpec are frozen; a failing
    # path raises each time (lru_cache does not keep exceptions).
    module_name, _, attr = path.partition(":")
    package = module_name.split(".", 1)[0]
    if package not in IMPORT_PATH_PACKAGES or not attr.isidentifier():
        raise UnknownHeadError(
            f"head import path {path!r} is not allowed; use 'package.module:Class' with the "
            f"package one of {choices(IMPORT_PATH_PACKAGES)}, or a head from {choices(HEAD_NAMES)}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownHeadError(
            f"head import path {path!r}: cannot import {module_name!r} ({exc}); "
            f"install it or use one of {choices(HEAD_NAMES)}"
        ) from None
    cls = getattr(module, attr, None)
    if not inspect.isclass(cls):
        public = [n for n in dir(module) if n.endswith(("Classifier", "Regression", "SVC"))]
        raise UnknownHeadError(
            f"head import path {path!r}: {module_name!r} has no class {attr!r}; classifiers there: {choices(public)}"
        )
    from sklearn.base import is_classifier

    try:
        instance: Any = cls()
        defaults = instance.get_params(deep=False)
    except Exception as exc:  # any constructor/get_params failure means: not a usable head
        raise UnknownHeadError(
            f"head import path {path!r} cannot be built with default arguments ({exc}); "
            f"use a scikit-learn classifier such as 'sklearn.ensemble:RandomForestClassifier'"
        ) from None
    if not is_classifier(instance):
        raise UnknownHeadError(
            f"head import path {path!r} is not a classifier; use a classifier such as "
            f"'sklearn.ensemble:RandomForestClassifier' or one of {choices(HEAD_NAMES)}"
        )
    params = tuple(_spec_from_default(k, v) for k, v in defaults.items())

    def build(**kw: Any) -> BaseEstimator:
        from featurecache.training.heads.sklearn_heads import build_import_path

        return build_import_path(cls, path=path, params=kw)

    return HeadSpec(path, f"{cls.__name__} from {module_name}", params, build)


def _spec_from_default(name: str, default: Any) -> ParamSpec:
    # The estimator's own default is the only type information there is, and it is often
    # narrower than what the estimator accepts (min_samples_split=2 also takes 0.5,
    # max_features="sqrt" also takes 0.3), so only bools and floats are typed; everything
    # else is parsed as int/float/bool/none/str and left to the estimator's own validation.
    if name == "random_state" and default is None:
        # Seeded by default, like the registered heads: the same command gives the same head.
        return ParamSpec(name, "any", 0, "seed (none = unseeded)")
    if isinstance(default, bool):
        return ParamSpec(name, "bool", default)
    if isinstance(default, float):
        return ParamSpec(name, "float", default, nullable=True)
    return ParamSpec(name, "any", default)
