"""What every command shares: option aliases, error handling, output."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import re
import shlex
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperGroup

from featurecache.errors import DEBUG_ENV, FeatureCacheError, FeatureCacheWarning, debug_enabled, human_bytes  # noqa: F401 - re-exported for the commands


def _cache_folder(text: str | None) -> Path | str | None:
    """``--cache`` must be a folder, or a path a folder can be created at (checked before any work),
    or an fsspec URL such as ``s3://bucket/prefix`` (kept as the string)."""
    from featurecache.cache.storage import is_url

    if text is None:
        return None
    if is_url(text):
        return text
    value = Path(text[len("file://") :] if text.startswith("file://") else text)
    probe = value.expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == value.expanduser().absolute() else f"is inside {probe}, which is a file"
        raise typer.BadParameter(
            f"{value} {where}, not a folder; pass a folder for the cache (it is created if missing)"
        )
    return value


CacheOpt = Annotated[
    str | None,
    typer.Option(
        "--cache",
        help="Cache directory or URL, e.g. s3://bucket/prefix (default: $FEATURECACHE_DIR or ./cache).",
        show_default=False,
        callback=_cache_folder,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document on stdout instead of text.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]

F = TypeVar("F", bound=Callable[..., Any])

# Click's UsageError, from the click Typer actually uses (Typer >= 0.2x vendors its own copy, so
# `import click` may name a different class); every usage error of a command line subclasses it.
_ClickUsageError: type[Any] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def debug() -> bool:
    """Whether tracebacks are wanted (``FEATURECACHE_DEBUG=1``)."""
    return debug_enabled()


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on stderr and return the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn library errors into one line on stderr and a non-zero exit, no traceback.

    Commands the message suggests get the command's ``--cache`` (see :func:`with_cache_option`);
    a path the command cannot write or use (permissions, read-only filesystem, a file where a
    folder belongs) is named with the fix. ``FEATURECACHE_DEBUG=1`` re-raises so the traceback
    shows.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if debug():
                raise
            raise fail(
                _one_line(exc, kwargs.get("cache")), exc.exit_code if isinstance(exc, FeatureCacheError) else 1
            ) from None
        except KeyboardInterrupt:
            if debug():
                raise
            raise fail("interrupted; finished units are kept, run the same command again to resume", 130) from None

    return wrapper  # type: ignore[return-value]


#: OSErrors that name a path the user can fix: permissions, a read-only filesystem, a file
#: where a folder belongs (or the reverse).
_PATH_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR})


#: botocore's errors for a cache root on S3 that cannot be reached as configured -> the fix.
_STORAGE_FIXES = {
    "NoCredentialsError": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or put them in $FEATURECACHE_STORAGE_OPTIONS as JSON",
    "PartialCredentialsError": "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or put them in $FEATURECACHE_STORAGE_OPTIONS as JSON",
    "EndpointConnectionError": "check the network and AWS_ENDPOINT_URL (or endpoint_url in $FEATURECACHE_STORAGE_OPTIONS)",
}


def _one_line(exc: Exception, cache: Path | str | None) -> str:
    """The message for ``exc`` raised by a command that was given ``--cache cache``."""
    if isinstance(exc, FeatureCacheError):
        return with_cache_option(str(exc), cache)
    fix = _STORAGE_FIXES.get(type(exc).__name__)
    if fix is not None:
        where = f"cache {cache}" if cache is not None else "the cache ($FEATURECACHE_DIR)"
        return f"{where} cannot be reached: {exc}; {fix}"
    if isinstance(exc, OSError) and exc.errno in _PATH_ERRNOS and exc.filename:
        target = Path(str(exc.filename))
        reason = (exc.strerror or "cannot be used").lower()
        if cache is not None and target.absolute().is_relative_to(Path(cache).expanduser().absolute()):
            return f"cache folder {cache} cannot be written ({reason}: {target}); pass --cache a folder you can write to, or fix its permissions"
        return f"{target}: {reason}; check that path and its permissions"
    return f"unexpected {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the traceback and report it)"


# A command suggested in a message: backticked, starting with the program name.
_SUGGESTED = re.compile(r"`(featurecache [^`]+)`")
#: Commands that take no --cache (tests check this against the app).
COMMANDS_WITHOUT_CACHE = frozenset({"backbones", "heads", "convert-run"})


def with_cache_option(message: str, cache: str | Path | None) -> str:
    """``message`` with ``--cache cache`` added to every featurecache command it suggests.

    A hint such as `` `featurecache cache failures KEY` `` names the default cache; printed after
    a command that was given ``--cache X`` it would look in the wrong place when pasted.

    Parameters
    ----------
    message
        A one-line message; suggested commands are in backticks.
    cache
        The ``--cache`` the user passed, or ``None`` (the message is returned unchanged).

    Returns
    -------
    str
    """
    if cache is None:
        return message

    def add(match: re.Match[str]) -> str:
        try:
            words = shlex.split(match.group(1))
        except ValueError:
            return match.group(0)
        if len(words) < 2 or words[1] in COMMANDS_WITHOUT_CACHE:
            return match.group(0)
        return f"`{pasteable(*words, cache=cache)}`"

    return _SUGGESTED.sub(add, message)


class PlainHelpGroup(TyperGroup):
    """A command group whose help lists each command's whole first sentence, wrapped.

    Help is click's plain layout (``rich_markup_mode=None``): rich's option tables give the
    help text a fifth of an 80-column terminal and cut every long token (a CSV layout, an
    augmentation example) to "...". Click's layout wraps instead, but cuts the command list's
    descriptions to one line; here they wrap too.
    """

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=1000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class OneLineErrorsGroup(PlainHelpGroup):
    """The root command group: a usage error (bad option value, unknown option) is one line too.

    Typer would print it in a framed panel of five or more lines, unlike every other error;
    here it gets the same ``error: ...`` line, with where to look for help, and exit code 2.
    """

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        with _usage_errors_in_one_line(ctx):  # the program's own options: `featurecache --bogus`
            return super().parse_args(ctx, args)

    def invoke(self, ctx: Any) -> Any:
        with _usage_errors_in_one_line(ctx):  # a command's options and arguments
            return super().invoke(ctx)


@contextlib.contextmanager
def _usage_errors_in_one_line(ctx: Any) -> Iterator[None]:
    try:
        yield
    except _ClickUsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            raise  # `featurecache cache` alone shows its help, as asked
        where = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else ctx.command_path
        message = " ".join(exc.format_message().split())
        raise fail(f"{message} (see `{where} --help`)", exc.exit_code) from None


def pasteable(*args: str | Path, cache: str | Path | None = None) -> str:
    """A command line to print for the user to paste: quoted, carrying ``--cache`` if they gave one.

    Parameters
    ----------
    args
        The command and its arguments, e.g. ``"featurecache", "cache", "failures", key``.
    cache
        The ``--cache`` the user passed (``None``: they relied on ``$FEATURECACHE_DIR`` or
        ``./cache``, which pasting in the same shell finds again).

    Returns
    -------
    str
        The shell-quoted command.
    """
    words = [str(a) for a in args]
    if cache is not None and "--cache" not in words:
        words += ["--cache", str(cache)]
    return shlex.join(words)


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` for the command: featurecache's warnings as one ``warning: ...`` line.

    Other libraries' warnings keep Python's format, which says where they come from.
    """
    if issubclass(category, FeatureCacheWarning):
        typer.echo(f"warning: {message}", err=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def csv_items(text: str) -> tuple[str, ...]:
    """A comma-separated option value as its non-empty, stripped items: ``"a, b,"`` -> ``("a", "b")``."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def print_json(obj: Any) -> None:
    """Write ``obj`` as JSON to stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def cache_flag(cache: Path | str | None) -> str:
    """`` --cache DIR`` when the user gave one, so a printed command works when pasted."""
    if cache is None:
        return ""
    import shlex

    return f" --cache {shlex.quote(str(cache))}"
