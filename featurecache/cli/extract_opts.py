"""The command-line options that name features, built once from :class:`~featurecache.options.ExtractOptions`.

``extract``, ``cache explain``, ``train-head`` and ``sweep`` all name features by the options
``extract`` takes. Rather than repeat ``--backbone``, ``--size``, ``--precision`` ... with
their defaults and help in each command, a command declares one keyword-only parameter
``options: ExtractOptions`` and is decorated with :func:`extract_options`: the decorator
shows Typer one option per field (flag, help and default read from the dataclass) and hands
the command the ExtractOptions they build. A bad value fails in the dataclass's checks, so the
CLI and the Python API reject it with the same one line.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from featurecache.extraction.options import FIELDS, KEYED_FIELDS, ExtractOptions

DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        "-d",
        help="Images: a folder of class sub-folders (optionally in train/ val/ test/), a CSV (path,label[,split]), "
        "an .npz (x, y), keras:cifar10|cifar100|mnist|fashion_mnist, or builtin:digits.",
    ),
]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="At most N images per split (stratified).", show_default=False)]

F = TypeVar("F", bound=Callable[..., Any])


def option_parameters(names: tuple[str, ...] = FIELDS) -> list[inspect.Parameter]:
    """One keyword-only Typer parameter per ExtractOptions field in ``names``, in declaration order.

    Parameters
    ----------
    names
        Field names (default: every field).

    Returns
    -------
    list of inspect.Parameter
        Annotated with ``typer.Option`` (flag, help) and defaulting to the field's default;
        a tuple field (``augment_splits``) is a comma-separated string on the command line.
    """
    hints = typing.get_type_hints(ExtractOptions)
    out = []
    for f in dataclasses.fields(ExtractOptions):
        if f.name not in names:
            continue
        meta, default, kind = f.metadata, f.default, hints[f.name]
        if isinstance(default, tuple):
            kind, default = str, ",".join(default)
        elif typing.get_origin(kind) is typing.Literal:
            kind = str  # the dataclass names the allowed values in its error
        flags = [meta["flag"], *([meta["short"]] if meta["short"] else [])]
        info = typer.Option(*flags, help=meta["help"], show_default=default is not None)
        out.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info]))
    return out


def to_options(values: dict[str, Any]) -> ExtractOptions:
    """The ExtractOptions of parsed command-line values (field name -> value as Typer parsed it)."""
    if isinstance(values.get("augment_splits"), str):
        values = {**values, "augment_splits": tuple(s.strip() for s in values["augment_splits"].split(",") if s.strip())}
    return ExtractOptions(**values)


def extract_options(*, run: bool = False) -> Callable[[F], F]:
    """Give a command the extract options: its ``options: ExtractOptions`` parameter becomes one option per field.

    Parameters
    ----------
    run
        Also the run fields (``--batch-size``, ``--workers``, ``--xla/--no-xla``,
        ``--on-error``): only ``extract`` computes features; commands that only look them
        up take the keyed fields.

    Returns
    -------
    Callable
        The decorator. Put :func:`~featurecache.cli._common.handle_errors` above it, so a
        bad value prints one line.
    """
    names = FIELDS if run else KEYED_FIELDS

    def decorate(fn: F) -> F:
        hints = typing.get_type_hints(fn, include_extras=True)
        params: list[inspect.Parameter] = []
        for p in inspect.signature(fn).parameters.values():
            if p.name == "options":
                params += option_parameters(names)
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation)))

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            options = to_options({n: kwargs.pop(n) for n in names if n in kwargs})
            return fn(options=options, **kwargs)

        setattr(command, "__signature__", inspect.Signature(params, return_annotation=hints.get("return", inspect.Signature.empty)))  # noqa: B010 - typeshed gives functions no __signature__
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command  # type: ignore[return-value]

    return decorate
