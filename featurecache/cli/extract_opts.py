"""The command-line options that name features, built once from :class:`~featurecache.options.ExtractOptions`.

``extract``, ``cache explain``, ``train-head`` and ``sweep`` all name features by the options
``extract`` takes. Rather than repeat ``--backbone``, ``--size``, ``--precision`` ... with
their defaults and help in each command, a command declares one keyword-only parameter
``options: ExtractOptions`` and is decorated with :func:`extract_options`: the decorator
(:func:`featurecache.cli.options.stage_options`) shows Typer one option per field (flag, help
and default read from the dataclass) and hands the command the ExtractOptions they build. A bad value fails in the dataclass's checks, so the
CLI and the Python API reject it with the same one line.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from featurecache.cli import options
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
LimitOpt = Annotated[
    int | None, typer.Option("--limit", min=1, help="At most N images per split (stratified).", show_default=False)
]

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
    return options.option_parameters(ExtractOptions, names)


def to_options(values: dict[str, Any]) -> ExtractOptions:
    """The ExtractOptions of parsed command-line values (field name -> value as Typer parsed it)."""
    return options.to_options(ExtractOptions, values)


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
    return options.stage_options(ExtractOptions, FIELDS if run else KEYED_FIELDS, param="options")
