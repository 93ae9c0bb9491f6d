"""One error hierarchy for the whole library.

Every message is a single line that says what went wrong, where, and how to fix it.
The CLI prints ``str(error)`` and exits with ``error.exit_code``; a traceback is shown
only when ``FEATURECACHE_DEBUG=1``. Each class also subclasses the closest builtin
(as zarr-python does) so callers can catch ``ValueError`` / ``FileNotFoundError``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

#: Set to 1 for tracebacks instead of one-line errors, and TensorFlow's start-up lines unfiltered.
DEBUG_ENV = "FEATURECACHE_DEBUG"


def debug_enabled() -> bool:
    """Whether ``FEATURECACHE_DEBUG`` asks for tracebacks and unfiltered output."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")


def choices(values: Iterable[str], limit: int = 60) -> str:
    """Render allowed values for an error message: ``'a', 'b', 'c'``."""
    vals = sorted(set(values))
    shown = ", ".join(repr(v) for v in vals[:limit])
    return shown + (f", ... ({len(vals) - limit} more)" if len(vals) > limit else "")


def one_line(exc: BaseException, *, type_name: bool = True, limit: int | None = 300) -> str:
    """An exception as one line for a record or a message: ``"ValueError: bad value"``.

    Parameters
    ----------
    exc
        The exception.
    type_name
        Prefix the exception's class name (``False``: the message alone, or the class name
        when the message is empty).
    limit
        Most characters kept (``None``: all); a long message is cut, never wrapped.

    Returns
    -------
    str
        The message with every run of whitespace (newlines included) collapsed to one space.
    """
    text = " ".join(str(exc).split())
    if type_name:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    else:
        text = text or type(exc).__name__
    return text if limit is None else text[:limit]


def human_bytes(n: float) -> str:
    """A size for messages and tables: ``1536`` -> ``1.5 KiB`` (binary units, up to GiB)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


class FeatureCacheError(Exception):
    """Base class of every error featurecache raises on purpose."""

    exit_code: int = 1


class UsageError(FeatureCacheError, ValueError):
    """An option or argument has a bad value; the message lists the valid ones."""

    exit_code = 2


class UnknownBackboneError(UsageError):
    """The backbone name is not in the registry."""


class AugmentSpecError(UsageError):
    """An ``--augment`` spec cannot be parsed."""


class UnknownHeadError(UsageError):
    """The head name is not known."""


class HeadParamError(UsageError):
    """A head parameter is unknown or has the wrong type."""


class BackboneError(FeatureCacheError, ValueError):
    """A backbone cannot be built as asked (bad layer, size below the minimum, ...)."""


class WeightsUnavailableError(FeatureCacheError, OSError):
    """Pretrained weights cannot be loaded (offline, missing or corrupt file)."""


class DatasetError(FeatureCacheError, ValueError):
    """A dataset cannot be read or is malformed."""

    exit_code = 2  # a bad --data is a bad argument (README "Errors": 2 for a bad option or argument)


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset path or name does not exist."""


class ImageDecodeError(FeatureCacheError, ValueError):
    """One image cannot be decoded; extraction marks it invalid and goes on."""


class CacheError(FeatureCacheError):
    """Something is wrong with the feature cache."""


class EntryNotFoundError(CacheError, LookupError):
    """No cache entry matches the given key, key prefix or name."""


class BucketNotFoundError(CacheError, LookupError):
    """The bucket of an object-store cache root does not exist (at the endpoint that was asked)."""


class AmbiguousEntryError(CacheError, LookupError):
    """A key prefix or name matches several cache entries."""


class IncompleteEntryError(CacheError):
    """The cache entry exists but not all of its write units are complete."""


class CacheCorruptError(CacheError):
    """Stored data does not match its key or its spec."""


class DamagedUnitError(CacheCorruptError):
    """One write unit of a feature store is missing, unreadable or not the bytes its marker vouches for.

    ``store``, ``view`` and ``slot`` name the unit, ``reason`` says what is wrong with it.
    """

    def __init__(self, message: str, *, store: str = "", view: int = 0, slot: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.store, self.view, self.slot, self.reason = store, view, slot, reason


class LeaseError(CacheError, TimeoutError):
    """Another process holds the entry's lease and did not finish in time."""


class DiskFullError(CacheError, OSError):
    """The cache's filesystem ran out of space; the run can be resumed after freeing space."""


class RunError(FeatureCacheError, ValueError):
    """A run directory is missing or incomplete."""


class UntrustedHeadError(RunError):
    """A saved head could run code when loaded (a pickle, or types outside the allow-list); it is refused."""


class EquivalenceError(FeatureCacheError, AssertionError):
    """The rebuilt model does not reproduce the head's cached-feature predictions."""


class PipelineError(UsageError):
    """A pipeline file is malformed."""


class SweepError(FeatureCacheError, RuntimeError):
    """A sweep produced no usable head (every trial failed) or lost a worker process."""


class OutOfMemoryError(FeatureCacheError, MemoryError):
    """The backbone ran out of device memory even on a batch of one image."""


class MemoryBudgetError(UsageError):
    """Features do not fit the memory budget and the chosen head cannot stream them."""


class FeatureCacheWarning(UserWarning):
    """Base class of the warnings featurecache gives; the CLI prints them as ``warning: ...`` lines."""


class DatasetWarning(FeatureCacheWarning):
    """A dataset is usable but probably not what was meant (e.g. one image under two labels)."""
