"""The command-line options of a stage, built from its options dataclass (:mod:`featurecache._runtime.options`).

A command declares one keyword-only parameter per options object it takes (``options:
ExtractOptions``, ``train: TrainOptions``, ...) and is decorated with :func:`stage_options`: the
decorator shows Typer one option per field (flag, help and default read from the field's
metadata) and hands the command the object they build. So a flag, its default and its help are
written once, in the dataclass, and a bad value fails in the dataclass's checks: the CLI and
the Python API reject it with the same one line.

Each Typer parameter is named after the field's long flag (``--val-seed`` -> ``val_seed``,
``--no-plots`` -> ``no_plots``), so two objects of one command (the extract options and the
training options both have a ``seed``) never collide.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from featurecache._runtime.options import Options, OptionsT, is_path, is_switch
from featurecache.cli._common import csv_items

F = TypeVar("F", bound=Callable[..., Any])


def cli_name(f: dataclasses.Field[Any]) -> str:
    """The Typer parameter name of a field: its long flag as an identifier (``--val-seed`` -> ``val_seed``)."""
    return str(f.metadata["flag"]).split("/")[0].lstrip("-").replace("-", "_")


def _fields(cls: type[Options], names: Sequence[str] | None) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if names is None or f.name in names]  # type: ignore[arg-type]


def option_parameters(cls: type[Options], names: Sequence[str] | None = None) -> list[inspect.Parameter]:
    """One keyword-only Typer parameter per field of ``cls`` in ``names``, in declaration order.

    Parameters
    ----------
    cls
        The options dataclass.
    names
        Field names (default: every field).

    Returns
    -------
    list of inspect.Parameter
        Annotated with ``typer.Option`` (flag, help) and defaulting to the field's default as
        the command line writes it (a tuple is a comma-separated string, a switch is off).
    """
    hints = typing.get_type_hints(cls)
    out = []
    for f in _fields(cls, names):
        meta, default, kind = f.metadata, f.default, hints[f.name]
        if is_switch(f):
            kind, default = bool, False
        elif meta["repeat"]:
            kind, default = list[str] | None, None
        elif isinstance(default, tuple):
            kind, default = str, ",".join(default)
        elif is_path(kind):
            kind = Path if default is not None else Path | None
        elif meta["none_as"] is not None:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        elif typing.get_origin(kind) is typing.Literal:
            kind = str  # the dataclass names the allowed values in its error
        flags = [meta["flag"], *([meta["short"]] if meta["short"] else [])]
        info = typer.Option(*flags, help=meta["help"], show_default=default is not None)
        out.append(
            inspect.Parameter(
                cli_name(f), inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info]
            )
        )
    return out


def to_options(cls: type[OptionsT], values: Mapping[str, Any]) -> OptionsT:
    """The options of parsed command-line values (Typer parameter name -> value as Typer parsed it)."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = cli_name(f)
        if name not in values:
            continue
        value, meta = values[name], f.metadata
        if is_switch(f):
            value = f.default != bool(value)
        elif meta["repeat"]:
            value = meta["from_cli"](value or []) if "from_cli" in meta else tuple(value or ())
        elif isinstance(f.default, tuple) and isinstance(value, str):
            value = csv_items(value)
        elif meta["none_as"] is not None and value == meta["none_as"]:
            value = None
        kwargs[f.name] = value
    return cls(**kwargs)


def stage_options(
    cls: type[Options], names: Sequence[str] | None = None, *, param: str = "options"
) -> Callable[[F], F]:
    """Give a command the options of ``cls``: its parameter ``param`` becomes one option per field.

    Parameters
    ----------
    cls
        The options dataclass.
    names
        The fields offered (default: all).
    param
        The command's keyword-only parameter that receives the built object.

    Returns
    -------
    Callable
        The decorator. Put :func:`~featurecache.cli._common.handle_errors` above it, so a
        bad value prints one line. Decorators for several objects stack.
    """
    shown = [cli_name(f) for f in _fields(cls, names)]

    def decorate(fn: F) -> F:
        hints = typing.get_type_hints(fn, include_extras=True)
        params: list[inspect.Parameter] = []
        for p in inspect.signature(fn).parameters.values():
            if p.name == param:
                params += option_parameters(cls, names)
            else:
                params.append(
                    p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
                )

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            built = to_options(cls, {n: kwargs.pop(n) for n in shown if n in kwargs})
            return fn(**{param: built}, **kwargs)

        signature = inspect.Signature(params, return_annotation=hints.get("return", inspect.Signature.empty))
        command.__signature__ = signature  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command  # type: ignore[return-value]

    return decorate
