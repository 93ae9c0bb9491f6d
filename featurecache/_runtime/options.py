"""Options objects declared once: each field's default, command-line flag and help in its metadata.

A stage's options (:class:`~featurecache.extraction.options.ExtractOptions`,
:class:`~featurecache.training.options.TrainOptions`, ...) are a frozen, keyword-only dataclass
that mixes in :class:`Options` and declares every field with :func:`option`. From that one
declaration come the Python API (a verb takes ``options=`` and keyword arguments, merged by
:meth:`Options.merge`; :func:`expands` lists the fields in its reported signature), the command
line (:mod:`featurecache.cli.options` builds one Typer option per field from the metadata) and
the commands printed back to the user (:meth:`Options.to_args`). Each class checks its values
in ``__post_init__`` with the helpers here, so a bad value fails at construction with one line
naming the flag, in the API and the CLI alike.

How a field appears on the command line follows from its declaration:

* ``--x/--no-x``: a boolean switch pair;
* a boolean field with one flag: passing the flag flips the default (``--no-plots`` sets
  ``plots=False``, ``--savedmodel`` sets ``savedmodel=True``);
* ``repeat=True``: the flag is given once per item (``-p C=1 -p penalty=l2`` for a mapping,
  ``--grid A --grid B`` for a tuple);
* any other tuple: one comma-separated value (``--heads logreg,dense``);
* ``none_as=V``: the command line writes ``None`` as ``V`` (``--check-samples 0``: all);
* a path-like field (its annotation names ``os.PathLike``) is a path, stored as a ``Path``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from featurecache.errors import UsageError

__all__ = ["Options", "bounded", "expands", "is_switch", "option", "real"]


def option(
    default: Any,
    flag: str,
    help: str,
    *,
    short: str | None = None,
    repeat: bool = False,
    none_as: Any = None,
    **extra: Any,
) -> Any:
    """A dataclass field with its command-line flag (``--x`` or ``--x/--no-x``), help and rendering in its metadata.

    Parameters
    ----------
    default
        The field's default (immutable: ``None``, a number, a string, a tuple, a ``Path``).
    flag
        The long flag, or ``--x/--no-x`` for a boolean switch pair.
    help
        The ``--help`` text.
    short
        A short flag (``-b``).
    repeat
        The flag is given once per item of a tuple or mapping.
    none_as
        How the command line writes ``None`` (a field whose default is not ``None``).
    extra
        More metadata for the class's own use (``keyed`` in ExtractOptions).
    """
    meta = {"flag": flag, "short": short, "help": help, "repeat": repeat, "none_as": none_as, **extra}
    return field(default=default, metadata=meta)


def is_switch(f: dataclasses.Field[Any]) -> bool:
    """A boolean field with one flag: passing it flips the default."""
    return isinstance(f.default, bool) and "/" not in f.metadata["flag"]


def is_path(hint: Any) -> bool:
    """Whether a field's annotation names ``os.PathLike`` (a path on the command line)."""
    return any(a is os.PathLike or typing.get_origin(a) is os.PathLike or is_path(a) for a in typing.get_args(hint))


OptionsT = TypeVar("OptionsT", bound="Options")


class Options:
    """What every options dataclass shares: merging keywords, the changed fields, command-line words.

    Mix it into a ``@dataclass(frozen=True, kw_only=True)`` whose fields are declared with
    :func:`option`.
    """

    #: The verb named in errors when :meth:`merge` is given no ``caller``.
    VERB: ClassVar[str] = ""
    #: Fields :meth:`to_args` shows even when they are the default.
    ALWAYS_SHOWN: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every field, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    def normalise(self) -> None:
        """Store path-like fields as ``Path``, sequences in tuple fields as tuples (first in ``__post_init__``)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if is_path(hints[f.name]) and isinstance(value, (str, os.PathLike)) and not isinstance(value, Path):
                object.__setattr__(self, f.name, Path(value))
            elif isinstance(f.default, tuple) and not isinstance(value, (str, tuple)) and isinstance(value, Sequence):
                object.__setattr__(self, f.name, tuple(value))

    @classmethod
    def merge(
        cls: type[OptionsT],
        options: OptionsT | None,
        overrides: Mapping[str, Any],
        *,
        allowed: Sequence[str] | None = None,
        caller: str | None = None,
    ) -> OptionsT:
        """``options`` (default: all defaults) with the fields named in ``overrides`` replaced.

        This is how the API functions take either ``options=`` or keyword arguments, or both.

        Parameters
        ----------
        options
            The base options, or ``None`` for the defaults.
        overrides
            Field name -> value; these win over ``options``.
        allowed
            The field names ``caller`` accepts as keywords (default: all of them).
        caller
            The function's name, for the error message (default: the class's verb).

        Returns
        -------
        The options class.

        Raises
        ------
        TypeError
            A keyword is not a field that ``caller`` takes, or ``options`` is not of this class.
        UsageError
            A value is out of range (see the class).
        """
        caller = caller or cls.VERB
        names = tuple(allowed) if allowed is not None else cls.field_names()
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(
                f"{caller}() got unexpected keyword argument(s) {', '.join(unknown)}; "
                f"its options are {', '.join(names)}"
            )
        if options is None:
            return cls(**overrides)
        if not isinstance(options, cls):
            raise TypeError(
                f"{caller}() takes options={cls.__name__}(...), got {type(options).__name__}; "
                f"pass the options as keywords or build a {cls.__name__}"
            )
        return dataclasses.replace(options, **overrides) if overrides else options  # type: ignore[type-var]

    def changed(self) -> dict[str, Any]:
        """The fields whose value is not the default, in declaration order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}  # type: ignore[arg-type]

    def to_args(self) -> list[str]:
        """The command-line words of these options: the :attr:`ALWAYS_SHOWN` fields, the rest when not default.

        The stage's command followed by them builds an equal object.
        """
        shown = {**{n: getattr(self, n) for n in self.ALWAYS_SHOWN}, **self.changed()}
        words: list[str] = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name not in shown:
                continue
            flag, value = f.metadata["flag"], shown[f.name]
            if "/" in flag:  # a boolean switch: --x or --no-x
                on, off = flag.split("/")
                words.append(on if value else off)
            elif is_switch(f):
                words.append(flag)
            elif value is None:
                words += [flag, str(f.metadata["none_as"])]
            elif f.metadata["repeat"]:
                items = [f"{k}={v}" for k, v in value.items()] if isinstance(value, Mapping) else list(value)
                for item in items:
                    words += [flag, str(item)]
            elif isinstance(value, tuple):
                words += [flag, ",".join(value)]
            else:
                words += [flag, str(value)]
        return words


def bounded(flag: str, value: Any, lo: int, hi: int | None, why: str = "") -> None:
    """Raise a one-line UsageError unless ``value`` is an integer in ``lo..hi``."""
    # numbers.Integral takes NumPy integers too; bool is one, but True is no count.
    ok = (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and lo <= int(value)
        and (hi is None or int(value) <= hi)
    )
    if not ok:
        span = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise UsageError(f"{flag} must be an integer {span}, got {value!r}{why}")


def real(
    flag: str,
    value: Any,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    why: str = "",
) -> None:
    """Raise a one-line UsageError unless ``value`` is a finite number within the given bounds."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = (
        ok
        and (above is None or value > above)
        and (at_least is None or value >= at_least)
        and (below is None or value < below)
    )
    if not ok:
        span = [
            f"> {above:g}" if above is not None else "",
            f">= {at_least:g}" if at_least is not None else "",
            f"< {below:g}" if below is not None else "",
        ]
        raise UsageError(f"{flag} must be a number {' and '.join(s for s in span if s)}, got {value!r}{why}")


F = TypeVar("F", bound=Callable[..., Any])


def expands(cls: type[Options], *names: str) -> Callable[[F], F]:
    """Show fields of ``cls`` as keyword-only parameters of a function that takes ``**overrides``.

    The function is unchanged; only its reported signature and annotations list the fields
    (with their defaults and types), so ``help(fc.extract)``, ``inspect.signature`` and the
    pipeline file's key check see every option without a second copy of the list.

    Parameters
    ----------
    cls
        The options class.
    names
        The fields to show, in order (default: all).

    Returns
    -------
    Callable
        A decorator returning the same function.
    """
    shown = names or cls.field_names()

    def decorate(fn: F) -> F:
        hints = typing.get_type_hints(cls)
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        var_kw = next(p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD)
        extra = [
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=defaults[n], annotation=hints[n])
            for n in shown
        ]
        at = next(
            i for i, p in enumerate(params) if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD)
        )
        kept = [p for p in params if p is not var_kw]
        fn.__signature__ = sig.replace(parameters=[*kept[:at], *extra, *kept[at:]])  # type: ignore[attr-defined]
        fn.__annotations__ = {k: v for k, v in fn.__annotations__.items() if k != var_kw.name} | {
            n: hints[n] for n in shown
        }
        return fn

    return decorate
