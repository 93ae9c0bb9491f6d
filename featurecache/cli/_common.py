"""What every command shares: option aliases, error handling, output."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from featurecache.errors import FeatureCacheError, human_bytes  # noqa: F401 - re-exported for the commands

DEBUG_ENV = "FEATURECACHE_DEBUG"

CacheOpt = Annotated[
    Path | None,
    typer.Option("--cache", help="Cache directory (default: $FEATURECACHE_DIR or ./cache).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document on stdout instead of text.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
TensorBoardOpt = Annotated[
    Path | None,
    typer.Option("--tensorboard", help="Also write TensorBoard logs to this directory (view: tensorboard --logdir DIR).", show_default=False),
]

F = TypeVar("F", bound=Callable[..., Any])


def debug() -> bool:
    """Whether tracebacks are wanted (``FEATURECACHE_DEBUG=1``)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on stderr and return the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn library errors into one line on stderr and a non-zero exit, no traceback.

    ``FEATURECACHE_DEBUG=1`` re-raises so the traceback shows.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except FeatureCacheError as exc:
            if debug():
                raise
            raise fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            if debug():
                raise
            raise fail("interrupted; finished units are kept, run the same command again to resume", 130) from None
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if debug():
                raise
            raise fail(
                f"unexpected {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the traceback and report it)", 1
            ) from None

    return wrapper  # type: ignore[return-value]


def csv_items(text: str) -> tuple[str, ...]:
    """A comma-separated option value as its non-empty, stripped items: ``"a, b,"`` -> ``("a", "b")``."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def print_json(obj: Any) -> None:
    """Write ``obj`` as JSON to stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


