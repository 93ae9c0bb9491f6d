"""Head hyperparameter types: a ``ParamSpec`` per parameter (type, bounds, default, search range) and its coercion.

Every head describes its hyperparameters with these frozen specs under user-facing names; a
string from the CLI (``C=0.1``, ``hidden=256-128``) or a Python value is coerced by
:meth:`ParamSpec.coerce`, and :class:`SearchSpace` gives the random-search range. This module
imports neither scikit-learn nor Keras, so the registry and the heads both build on it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from featurecache.errors import HeadParamError, choices

if TYPE_CHECKING:
    import numpy as np

__all__ = ["CLASS_WEIGHT", "SEED", "ParamSpec", "ParamType", "SearchSpace", "coerce_params", "plain_value"]

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
            ok = (
                self.low is not None
                and self.high is not None
                and self.low <= self.high
                and (self.kind != "loguniform" or self.low > 0)
            )
        if not ok:
            raise ValueError(
                f"SearchSpace({self.kind!r}, low={self.low!r}, high={self.high!r}, "
                f"choices={self.choices!r}) is inconsistent; 'choice' needs choices, the "
                "numeric kinds need low <= high (and low > 0 for loguniform)"
            )

    def distribution(self) -> Any:
        """This range as :class:`sklearn.model_selection.ParameterSampler` takes it.

        Returns
        -------
        list or scipy.stats frozen distribution
            The list of ``choices`` for ``"choice"``; ``scipy.stats.loguniform(low, high)``,
            ``uniform(low, high - low)`` or ``randint(low, high + 1)`` for the numeric kinds.
        """
        if self.kind == "choice":
            return list(self.choices)
        from scipy import stats

        low, high = float(self.low or 0.0), float(self.high or 0.0)  # set, see __post_init__
        if self.kind == "loguniform":
            return stats.loguniform(low, high)
        if self.kind == "uniform":
            return stats.uniform(low, high - low)
        return stats.randint(int(low), int(high) + 1)

    def sample(self, rng: np.random.Generator | np.random.RandomState) -> Any:
        """Draw one value (a plain Python int/float/str/bool/tuple/None) from :meth:`distribution`.

        Parameters
        ----------
        rng
            NumPy generator; the caller owns seeding so sweeps are reproducible.

        Returns
        -------
        Any
            The sampled value, JSON-friendly (tuples become lists in JSON).
        """
        dist = self.distribution()
        if isinstance(dist, list):
            return dist[int(rng.integers(len(dist)) if hasattr(rng, "integers") else rng.randint(len(dist)))]
        return plain_value(dist.rvs(random_state=rng))

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
            # "none", not "": `hidden=` read as a cut-off label; coerce() reads "none" back as ().
            return "-".join(str(int(v)) for v in value) if value else "none"
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


def plain_value(value: Any) -> Any:
    """A NumPy scalar as the Python value it holds (what ``scipy.stats`` draws are); anything else as is."""
    item = getattr(value, "item", None)
    return item() if item is not None and getattr(value, "ndim", None) == 0 else value


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


# --------------------------------------------------------------------------- shared parameters

#: ``class_weight`` as scikit-learn takes it (several heads share it).
CLASS_WEIGHT = ParamSpec(
    "class_weight",
    "class_weight",
    None,
    "none, 'balanced' to weight classes inversely to their frequency, or {label: weight}",
    search=SearchSpace("choice", choices=(None, "balanced")),
)
CALIBRATION = ParamSpec(
    "calibration",
    "choice",
    "sigmoid",
    "how decision scores become probabilities (Platt 'sigmoid' or 'isotonic')",
    choices=("sigmoid", "isotonic"),
)
CV = ParamSpec("cv", "int", 3, "cross-validation folds used to fit the probability calibration", ge=2)
#: ``seed`` of the heads that draw random numbers.
SEED = ParamSpec("seed", "int", 0, "random seed", ge=0)


def coerce_params(head: str, specs: tuple[ParamSpec, ...], params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate and type a head's parameters against its specs, filling defaults for the missing ones.

    Parameters
    ----------
    head
        Head name, for messages.
    specs
        The head's parameter specs, in display order.
    params
        User-facing names to raw values (strings from the CLI or Python values).

    Returns
    -------
    dict[str, Any]
        Every parameter of the head, typed, in ``specs`` order.

    Raises
    ------
    HeadParamError
        When a name is not a parameter of the head or a value has the wrong type.
    """
    schema = {p.name: p for p in specs}
    given = dict(params or {})
    unknown = sorted(set(given) - set(schema))
    if unknown:
        listing = "; ".join(f"{p.name}: {p.type_name}" for p in specs)
        raise HeadParamError(
            f"head {head!r} has no parameter {unknown[0]!r}; valid parameters: {choices(schema)} ({listing})"
        )
    return {p.name: p.coerce(given[p.name], head=head) if p.name in given else p.default for p in specs}
