"""Head registry: one frozen ``HeadSpec`` per head name, each with a typed parameter schema.

How it works: every head exposes its hyperparameters under user-facing names (``C``,
``hidden``, ``lr``) described by a ``ParamSpec``.  The schema is the single source of truth
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
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from featurecache.errors import HeadParamError, UnknownHeadError, choices

if TYPE_CHECKING:
    import numpy as np
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

ParamType = Literal["int", "float", "bool", "str", "choice", "int_tuple", "any", "class_weight"]

_TRUE = frozenset({"true", "1", "yes", "y", "on"})
_FALSE = frozenset({"false", "0", "no", "n", "off"})
_NONE = frozenset({"none", "null", ""})


@dataclass(frozen=True)
class SearchSpace:
    """Random-search distribution of one parameter.

    Parameters
    ----------
    kind
        ``"loguniform"`` (``low``..``high``, both > 0), ``"uniform"`` (``low``..``high``),
        ``"int"`` (integers ``low``..``high`` inclusive) or ``"choice"`` (one of ``choices``).
    low, high
        Range bounds for the numeric kinds.
    choices
        Candidate values for ``"choice"``; also the natural grid for grid search.
    """

    kind: Literal["loguniform", "uniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "choice":
            ok = len(self.choices) > 0
        else:
            ok = self.low is not None and self.high is not None and self.low <= self.high
            ok = ok and (self.kind != "loguniform" or self.low > 0)
        if not ok:
            raise ValueError(
                f"SearchSpace({self.kind!r}, low={self.low!r}, high={self.high!r}, "
                f"choices={self.choices!r}) is inconsistent; 'choice' needs choices, the "
                "numeric kinds need low <= high (and low > 0 for loguniform)"
            )

    def sample(self, rng: np.random.Generator) -> Any:
        """Draw one value (a plain Python int/float/str/bool/tuple/None).

        Parameters
        ----------
        rng
            NumPy generator; the caller owns seeding so sweeps are reproducible.

        Returns
        -------
        Any
            The sampled value, JSON-friendly (tuples become lists in JSON).
        """
        if self.kind == "choice":
            return self.choices[int(rng.integers(len(self.choices)))]
        low, high = float(self.low or 0.0), float(self.high or 0.0)  # set, see __post_init__
        if self.kind == "loguniform":
            return float(math.exp(rng.uniform(math.log(low), math.log(high))))
        if self.kind == "uniform":
            return float(rng.uniform(low, high))
        return int(rng.integers(int(low), int(high) + 1))

    def describe(self) -> str:
        """Short human form, e.g. ``log-uniform [0.0001, 100]``."""
        if self.kind == "choice":
            return "one of " + ", ".join(_format_value(c) for c in self.choices)
        label = {"loguniform": "log-uniform", "uniform": "uniform", "int": "integers"}[self.kind]
        return f"{label} [{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class ParamSpec:
    """Type, default, bounds and search range of one head hyperparameter.

    Parameters
    ----------
    name
        User-facing name (``C``, ``hidden``, ...).
    type
        ``int``, ``float``, ``bool``, ``str``, ``choice`` (one of ``choices``), ``int_tuple``
        (layer widths written ``256-128-64``; ``""`` or ``none`` for no layers) or ``any``
        (import-path heads whose default gives no type).
    default
        Value used when the parameter is not given.
    help
        One-line description.
    choices
        Allowed values for ``type == "choice"`` (may include ``None``).
    gt, ge, lt, le
        Optional numeric bounds (strictly greater / greater-or-equal / ...).
    nullable
        ``None`` is accepted in addition to values of ``type``.
    search
        Random-search range, or ``None`` when the parameter is not worth sweeping.
    """

    name: str
    type: ParamType
    default: Any
    help: str = ""
    choices: tuple[Any, ...] = ()
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    nullable: bool = False
    search: SearchSpace | None = None

    @property
    def type_name(self) -> str:
        """Expected type as shown in error messages and ``--help``."""
        if self.type == "choice":
            return "one of " + ", ".join(_format_value(c) for c in self.choices)
        if self.type == "int_tuple":
            base = "layer widths like 256-128-64 ('' for none)"
        elif self.type == "class_weight":
            base = "none, balanced or a {label: weight} dict (Python API)"
        elif self.type == "any":
            base = "int, float, bool, none or string"
        else:
            base = self.type
        bounds = [
            f"{op} {_format_value(v)}"
            for op, v in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
            if v is not None
        ]
        if bounds:
            base += " " + " and ".join(bounds)
        return base + (" or none" if self.nullable else "")

    def describe(self) -> str:
        """One line for ``--help``: ``C: float > 0 (default 1.0) -- inverse regularisation``."""
        text = f"{self.name}: {self.type_name} (default {self.format(self.default)})"
        if self.help:
            text += f" -- {self.help}"
        if self.search is not None:
            text += f"; search {self.search.describe()}"
        return text

    def format(self, value: Any) -> str:
        """Render ``value`` in the CLI's ``NAME=VALUE`` syntax (inverse of ``coerce``)."""
        if self.type == "int_tuple" and isinstance(value, (tuple, list)):
            return "-".join(str(int(v)) for v in value)
        return _format_value(value)

    def coerce(self, value: Any, *, head: str) -> Any:
        """Convert ``value`` (a CLI string or a Python value) to this parameter's type.

        Parameters
        ----------
        value
            Raw value; strings are parsed (``"1e-2"``, ``"true"``, ``"256-128"``, ``"none"``).
        head
            Head name, only for the error message.

        Returns
        -------
        Any
            The typed value (``int_tuple`` values become a tuple of ints).

        Raises
        ------
        HeadParamError
            When the value cannot be converted or is out of bounds.
        """
        try:
            if self.nullable and _is_none(value):
                return None
            out = _COERCERS[self.type](self, value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise HeadParamError(
                f"head {head!r}: parameter {self.name}={value!r} is not a valid "
                f"{self.type_name} ({exc}); pass e.g. {self.name}={self.format(self.default)}"
            ) from None
        return out

    def _check_bounds(self, value: float) -> None:
        if not math.isfinite(value) and self.type == "float":
            raise ValueError("must be finite")
        if self.gt is not None and not value > self.gt:
            raise ValueError(f"must be > {self.gt:g}")
        if self.ge is not None and not value >= self.ge:
            raise ValueError(f"must be >= {self.ge:g}")
        if self.lt is not None and not value < self.lt:
            raise ValueError(f"must be < {self.lt:g}")
        if self.le is not None and not value <= self.le:
            raise ValueError(f"must be <= {self.le:g}")


def _format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "-".join(str(v) for v in value)
    return str(value)


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NONE)


def _to_int(spec: ParamSpec, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("booleans are not integers")
    if isinstance(value, str):
        text = value.strip()
        try:
            out = int(text)
        except ValueError:
            as_float = float(text)  # accept "1e3"; reject "1.5" below
            if not as_float.is_integer():
                raise ValueError("not an integer") from None
            out = int(as_float)
    elif isinstance(value, float):
        if not value.is_integer():
            raise ValueError("not an integer")
        out = int(value)
    else:
        out = operator.index(value)  # ints and numpy integers only; TypeError otherwise
    spec._check_bounds(out)
    return out


def _to_float(spec: ParamSpec, value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("booleans are not numbers")
    if not isinstance(value, (str, int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"got {type(value).__name__}")
    out = float(value.strip() if isinstance(value, str) else value)
    spec._check_bounds(out)
    return out


def _to_bool(spec: ParamSpec, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError("use true or false")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise TypeError(f"got {type(value).__name__}")


def _to_str(spec: ParamSpec, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"got {type(value).__name__}")
    return value.strip()


def _to_choice(spec: ParamSpec, value: Any) -> Any:
    if _is_none(value) and None in spec.choices:
        return None
    for option in spec.choices:
        if option is None:
            continue
        if value == option and type(value) is type(option):
            return option
        if isinstance(value, str) and value.strip().lower() == _format_value(option).lower():
            return option
    raise ValueError("not an allowed value")


def _to_int_tuple(spec: ParamSpec, value: Any) -> tuple[int, ...]:
    if _is_none(value):
        return ()
    if isinstance(value, str):
        parts = [p for p in value.replace(",", "-").replace("x", "-").split("-")]
        if any(not p.strip() for p in parts):
            raise ValueError("write widths like 256-128-64")
        items: list[Any] = [p.strip() for p in parts]
    elif isinstance(value, (tuple, list)):
        items = list(value)
    else:
        items = [value]
    widths = tuple(_to_int(ParamSpec(spec.name, "int", 1, ge=1), v) for v in items)
    return widths


def _to_any(spec: ParamSpec, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in _NONE:
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _to_class_weight(spec: ParamSpec, value: Any) -> Any:
    # scikit-learn's class_weight: None, "balanced" or {label: weight}; labels not in the
    # dict weigh 1. Dict keys are checked against the training labels in fit.
    if isinstance(value, Mapping):
        out = {}
        for label, weight in value.items():
            w = _to_float(ParamSpec(f"{spec.name}[{label!r}]", "float", 1.0, gt=0), weight)
            out[label.item() if hasattr(label, "item") else label] = w
        return out
    if _is_none(value):
        return None
    if isinstance(value, str) and value.strip().lower() == "balanced":
        return "balanced"
    raise ValueError("use none, balanced or a {label: weight} dict")


_COERCERS: Mapping[str, Callable[[ParamSpec, Any], Any]] = MappingProxyType(
    {
        "int": _to_int,
        "float": _to_float,
        "bool": _to_bool,
        "str": _to_str,
        "choice": _to_choice,
        "int_tuple": _to_int_tuple,
        "any": _to_any,
        "class_weight": _to_class_weight,
    }
)


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


# --------------------------------------------------------------------------- builders
# Thin lazy wrappers: importing sklearn (and Keras for "dense") only when a head is built.


def _build_logreg(**kw: Any) -> BaseEstimator:
    from featurecache.heads.sklearn_heads import build_logreg

    return build_logreg(**kw)


def _build_linear_svm(**kw: Any) -> BaseEstimator:
    from featurecache.heads.sklearn_heads import build_linear_svm

    return build_linear_svm(**kw)


def _build_ridge(**kw: Any) -> BaseEstimator:
    from featurecache.heads.sklearn_heads import build_ridge

    return build_ridge(**kw)


def _build_sgd(**kw: Any) -> BaseEstimator:
    from featurecache.heads.sklearn_heads import build_sgd

    return build_sgd(**kw)


def _build_knn(**kw: Any) -> BaseEstimator:
    from featurecache.heads.sklearn_heads import build_knn

    return build_knn(**kw)


def _build_dense(**kw: Any) -> BaseEstimator:
    from featurecache.heads.dense import DenseHead

    return DenseHead(**kw)


# --------------------------------------------------------------------------- schemas

_CLASS_WEIGHT = ParamSpec(
    "class_weight",
    "class_weight",
    None,
    "none, 'balanced' to weight classes inversely to their frequency, or {label: weight}",
    search=SearchSpace("choice", choices=(None, "balanced")),
)
_CALIBRATION = ParamSpec(
    "calibration",
    "choice",
    "sigmoid",
    "how decision scores become probabilities (Platt 'sigmoid' or 'isotonic')",
    choices=("sigmoid", "isotonic"),
)
_CV = ParamSpec(
    "cv", "int", 3, "cross-validation folds used to fit the probability calibration", ge=2
)
_SEED = ParamSpec("seed", "int", 0, "random seed", ge=0)

_SPECS: Mapping[str, HeadSpec] = MappingProxyType(
    {
        "logreg": HeadSpec(
            "logreg",
            "multinomial logistic regression (lbfgs) behind a StandardScaler",
            (
                ParamSpec(
                    "C",
                    "float",
                    1.0,
                    "inverse L2 regularisation strength",
                    gt=0,
                    search=SearchSpace("loguniform", 1e-4, 1e2),
                ),
                ParamSpec("max_iter", "int", 1000, "lbfgs iterations", ge=1),
                ParamSpec("tol", "float", 1e-4, "stopping tolerance", gt=0),
                _CLASS_WEIGHT,
            ),
            _build_logreg,
        ),
        "linear-svm": HeadSpec(
            "linear-svm",
            "linear SVM (LinearSVC) behind a StandardScaler, probabilities by "
            "cross-validated calibration",
            (
                ParamSpec(
                    "C",
                    "float",
                    1.0,
                    "inverse regularisation strength",
                    gt=0,
                    search=SearchSpace("loguniform", 1e-4, 1e1),
                ),
                ParamSpec("max_iter", "int", 2000, "liblinear iterations", ge=1),
                _CLASS_WEIGHT,
                _CALIBRATION,
                _CV,
                _SEED,
            ),
            _build_linear_svm,
        ),
        "ridge": HeadSpec(
            "ridge",
            "ridge classifier behind a StandardScaler, probabilities by "
            "cross-validated calibration",
            (
                ParamSpec(
                    "alpha",
                    "float",
                    1.0,
                    "L2 regularisation strength",
                    gt=0,
                    search=SearchSpace("loguniform", 1e-2, 1e4),
                ),
                _CLASS_WEIGHT,
                _CALIBRATION,
                _CV,
            ),
            _build_ridge,
        ),
        "sgd": HeadSpec(
            "sgd",
            "logistic regression trained by SGD (SGDClassifier, loss=log_loss) behind "
            "a StandardScaler",
            (
                ParamSpec(
                    "alpha",
                    "float",
                    1e-4,
                    "regularisation strength",
                    gt=0,
                    search=SearchSpace("loguniform", 1e-6, 1e-1),
                ),
                ParamSpec(
                    "penalty",
                    "choice",
                    "l2",
                    "regularisation type",
                    choices=("l2", "l1", "elasticnet"),
                    search=SearchSpace("choice", choices=("l2", "elasticnet")),
                ),
                ParamSpec(
                    "l1_ratio",
                    "float",
                    0.15,
                    "L1 share of the elasticnet penalty",
                    ge=0,
                    le=1,
                    search=SearchSpace("uniform", 0.0, 1.0),
                ),
                ParamSpec("max_iter", "int", 1000, "epochs over the data", ge=1),
                ParamSpec("tol", "float", 1e-3, "stopping tolerance", gt=0),
                _CLASS_WEIGHT,
                _SEED,
            ),
            _build_sgd,
        ),
        "knn": HeadSpec(
            "knn",
            "k-nearest neighbours on the raw (unscaled) features",
            (
                ParamSpec(
                    "n_neighbors",
                    "int",
                    5,
                    "number of neighbours",
                    ge=1,
                    search=SearchSpace("choice", choices=(1, 3, 5, 7, 11, 15, 25)),
                ),
                ParamSpec(
                    "weights",
                    "choice",
                    "uniform",
                    "neighbour vote weighting",
                    choices=("uniform", "distance"),
                    search=SearchSpace("choice", choices=("uniform", "distance")),
                ),
                ParamSpec(
                    "metric",
                    "choice",
                    "euclidean",
                    "distance metric",
                    choices=("euclidean", "cosine", "manhattan", "minkowski"),
                    search=SearchSpace("choice", choices=("euclidean", "cosine")),
                ),
            ),
            _build_knn,
        ),
        "dense": HeadSpec(
            "dense",
            "Keras dense top model (pool -> [Dense -> BN? -> act -> dropout]* -> softmax)",
            (
                ParamSpec(
                    "pool",
                    "choice",
                    "auto",
                    "pooling of spatial (n,h,w,c) features; auto = avg for 4-D, none for 2-D",
                    choices=("auto", "avg", "flatten", "none"),
                ),
                ParamSpec(
                    "hidden",
                    "int_tuple",
                    (256,),
                    "hidden layer widths",
                    search=SearchSpace(
                        "choice",
                        choices=((), (256,), (512,), (256, 128), (512, 256), (1024, 256)),
                    ),
                ),
                ParamSpec(
                    "normalize",
                    "bool",
                    True,
                    "standardise the pooled input features with training-set mean and variance (a frozen layer inside the head)",
                ),
                ParamSpec(
                    "batchnorm",
                    "bool",
                    False,
                    "BatchNormalization after each hidden Dense",
                    search=SearchSpace("choice", choices=(False, True)),
                ),
                ParamSpec(
                    "dropout",
                    "float",
                    0.5,
                    "dropout rate after each hidden layer",
                    ge=0,
                    lt=1,
                    search=SearchSpace("choice", choices=(0.0, 0.2, 0.3, 0.5)),
                ),
                ParamSpec(
                    "activation",
                    "choice",
                    "relu",
                    "hidden activation",
                    choices=("relu", "gelu", "swish", "elu", "tanh", "selu"),
                ),
                ParamSpec(
                    "l2",
                    "float",
                    0.0,
                    "L2 weight penalty on every Dense kernel",
                    ge=0,
                    search=SearchSpace("loguniform", 1e-6, 1e-2),
                ),
                ParamSpec(
                    "optimizer",
                    "choice",
                    "adam",
                    "optimizer (sgd uses Nesterov momentum 0.9)",
                    choices=("adam", "rmsprop", "sgd"),
                ),
                ParamSpec(
                    "lr",
                    "float",
                    1e-3,
                    "learning rate",
                    gt=0,
                    search=SearchSpace("loguniform", 1e-4, 1e-2),
                ),
                ParamSpec(
                    "batch_size",
                    "int",
                    64,
                    "mini-batch size",
                    ge=1,
                    search=SearchSpace("choice", choices=(32, 64, 128, 256)),
                ),
                ParamSpec("epochs", "int", 30, "maximum epochs", ge=1),
                ParamSpec(
                    "patience",
                    "int",
                    5,
                    "early-stopping patience on val_loss (0 = off; needs validation data)",
                    ge=0,
                ),
                _CLASS_WEIGHT,
                _SEED,
                ParamSpec("verbose", "int", 0, "Keras fit verbosity (0, 1 or 2)", ge=0, le=2),
            ),
            _build_dense,
        ),
    }
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
        raise HeadParamError(
            f"head parameter {text!r} is not NAME=VALUE; write it like C=0.1 or hidden=256-128"
        )
    name, value = text.split("=", 1)
    name = name.strip()
    if not name.isidentifier():
        raise HeadParamError(
            f"head parameter {text!r} has an invalid name {name!r}; write it like C=0.1"
        )
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
        raise UnknownHeadError(
            f"head name must be a string, got {name!r}; use one of {choices(HEAD_NAMES)}"
        )
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
    spec = get_head_spec(name)
    schema = spec.schema
    given = dict(params or {})
    unknown = sorted(set(given) - set(schema))
    if unknown:
        listing = "; ".join(f"{p.name}: {p.type_name}" for p in spec.params)
        raise HeadParamError(
            f"head {name!r} has no parameter {unknown[0]!r}; valid parameters: "
            f"{choices(schema)} ({listing})"
        )
    return {
        p.name: p.coerce(given[p.name], head=name) if p.name in given else p.default
        for p in spec.params
    }


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
            f"head import path {path!r}: {module_name!r} has no class {attr!r}; "
            f"classifiers there: {choices(public)}"
        )
    from sklearn.base import is_classifier

    try:
        instance = cls()
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
        from featurecache.heads.sklearn_heads import build_import_path

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
