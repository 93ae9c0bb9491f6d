"""The options of one extraction, declared once: names, defaults, bounds, command-line flags and help.

:class:`ExtractOptions` is the frozen object every entry point that names features shares: the
Python API (``extract``, ``plan``, ``explain``, ``features_for``), the command line (one Typer
option builder, :mod:`featurecache.cli.extract_opts`, reads each field's flag and help from its
metadata) and pipeline files (their ``[extract]`` keys are the same names). So an option, its
default and its bounds are written here and nowhere else, and :meth:`ExtractOptions.to_command`
prints a ``featurecache extract`` line that, pasted, parses back to an equal object: the same key.

Fields are of two kinds. *Keyed* fields (backbone ... antialias) decide the feature spec, so
changing one gives other features. *Run* fields (batch size, workers, XLA, on_error) only
change how the features are computed: every batch is padded to the same size and XLA is
round-off only (recorded per unit), so they never change a key.

Checks here need no backbone registry and no dataset: bounds, choices, the augmentation spec.
What needs the registry (the backbone name, its input-size limits, the weights) is checked by
:func:`featurecache.extract.plan`.
"""

from __future__ import annotations

import dataclasses
import shlex
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from featurecache._runtime.options import Options, expands, option
from featurecache._runtime.options import bounded as _bounded
from featurecache.cache.keys import DTYPES, POOLINGS, PRECISIONS
from featurecache.errors import UsageError

__all__ = [
    "FIELDS",
    "KEYED_FIELDS",
    "MAX_INPUT_SIZE",
    "MAX_SEED",
    "MAX_VIEWS",
    "MAX_WORKERS",
    "RUN_FIELDS",
    "ExtractOptions",
    "OnError",
    "expands_options",
]

OnError = Literal["skip", "fail"]
ON_ERROR: tuple[str, ...] = typing.get_args(OnError)

# Bounds of the size-like options, checked before anything is read or allocated: unbounded, a
# typo such as --views 1000000000 grew memory without limit and left an entry of a billion units.
#: Each view is one more backbone pass over its splits (64 views cost 65 extractions); more
#: variety than that is cheaper as on-the-fly augmentation (``finetune --augment``).
MAX_VIEWS = 64
#: No keras.applications model defaults above 600 px, and one float32 image at 1024 px is 12 MiB.
MAX_INPUT_SIZE = 1024
#: More decode threads than this only contend for the same cores and files.
MAX_WORKERS = 256
#: ``keras.utils.set_random_seed`` (NumPy's legacy seeding) takes 32-bit seeds.
MAX_SEED = 2**32 - 1


def _option(default: Any, flag: str, help: str, *, short: str | None = None, keyed: bool = True) -> Any:
    """A field with its command-line flag (``--x`` or ``--x/--no-x``) and help in its metadata."""
    return option(default, flag, help, short=short, keyed=keyed)


@dataclass(frozen=True, kw_only=True)
class ExtractOptions(Options):
    """How to extract features: every option of ``featurecache extract`` but the dataset and the cache.

    Build it with keywords (``ExtractOptions(backbone="mobilenetv2", weights="random",
    size=32)``); a bad value raises :class:`~featurecache.errors.UsageError` at once, with
    the option's flag, the allowed values and the fix. ``augment_splits`` may be given as a
    list; it is stored as a tuple. Each field is documented in :func:`featurecache.extract`.

    Raises
    ------
    UsageError
        A value is out of range, not one of its choices, or inconsistent with another
        (``views`` without an augmentation or without a split to augment).
    AugmentSpecError
        ``augment`` is not a valid augmentation spec.
    """

    backbone: str = _option("vgg19", "--backbone", "Backbone name (see `featurecache backbones`).", short="-b")
    weights: str = _option(
        "imagenet", "--weights", "imagenet, random (seeded), or a local .h5/.weights.h5 file.", short="-w"
    )
    size: int | None = _option(None, "--size", "Square input size in pixels, at most 1024 (default: the backbone's).")
    layer: str | None = _option(None, "--layer", "Layer to take features from (default: the bottleneck).")
    pooling: str = _option("avg", "--pooling", "avg, max, flatten or none (keep the spatial map).")
    resize: str = _option("bilinear", "--resize", "Resize method: bilinear, nearest, bicubic, area, lanczos3, ...")
    augment: str | None = _option(
        None,
        "--augment",
        (
            # Each example token fits the help column of an 80-column terminal (click breaks it otherwise).
            "Augmentation of views 1..K, comma-separated: flip, rotation=DEG, zoom=F, shift=F, shear=DEG, "
            "brightness=F, contrast=F; e.g. flip,rotation=15,zoom=0.1."
        ),
    )
    views: int = _option(
        0, "--views", "Augmented views per image of --augment-splits, at most 64 (view 0 is always the clean image)."
    )
    augment_splits: tuple[str, ...] = _option(
        ("train",), "--augment-splits", "Comma-separated splits that get augmented views."
    )
    seed: int = _option(0, "--seed", "Seed of augmentation and random weights (0 to 2**32-1).")
    dtype: str = _option("float32", "--dtype", "Stored dtype: float32 or float16.")
    precision: str = _option(
        "float32",
        "--precision",
        "Backbone compute precision: float32, or mixed (float16 maths, for GPUs with tensor cores; keyed).",
    )
    decode: str = _option(
        "exact",
        "--decode",
        "exact: decode every pixel (as plain Keras); fast: decode large JPEGs at reduced DCT scale, several times faster on photos (keyed).",
    )
    antialias: bool = _option(
        False,
        "--antialias/--no-antialias",
        "Filter the whole footprint when shrinking instead of bilinear point sampling (keyed).",
    )
    batch_size: int = _option(
        32, "--batch-size", "Backbone batch size (halved and retried on out-of-memory).", keyed=False
    )
    workers: int | None = _option(
        None, "--workers", "Decode threads (default: one per CPU core, at most 256).", keyed=False
    )
    xla: bool | None = _option(
        None,
        "--xla/--no-xla",
        "Compile the backbone with XLA. Default: on with a GPU, off on CPU. Not keyed (round-off only).",
        keyed=False,
    )
    on_error: OnError = _option(
        "skip", "--on-error", "skip: mark undecodable images invalid and go on; fail: stop.", keyed=False
    )

    VERB = "extract"
    ALWAYS_SHOWN = ("backbone", "weights")  # to_args prints them always, for the reader

    def __post_init__(self) -> None:
        if not isinstance(self.augment_splits, str) and isinstance(self.augment_splits, Sequence):
            object.__setattr__(self, "augment_splits", tuple(self.augment_splits))
        self._check_bounds()
        self._check_choices()
        self._check_augment()

    def _check_bounds(self) -> None:
        if self.size is not None:
            _bounded("--size", self.size, 1, MAX_INPUT_SIZE, "; omit it for the backbone's default size")
        _bounded(
            "--views",
            self.views,
            0,
            MAX_VIEWS,
            "; each view is another backbone pass, so for more variety augment on the fly with `finetune --augment`",
        )
        _bounded("--seed", self.seed, 0, MAX_SEED)
        _bounded("--batch-size", self.batch_size, 1, None, "; it is halved automatically when memory runs out")
        if self.workers is not None:
            _bounded("--workers", self.workers, 1, MAX_WORKERS)

    def _check_choices(self) -> None:
        from featurecache.data import DECODE_MODES, RESIZE_METHODS
        from featurecache.data.dataset import SPLIT_NAMES

        splits = self.augment_splits
        if isinstance(splits, str) or not isinstance(splits, tuple) or any(s not in SPLIT_NAMES for s in splits):
            raise UsageError(
                f"--augment-splits {splits!r} must name splits among {', '.join(SPLIT_NAMES)}, e.g. --augment-splits train,val "
                "(in Python, a list such as ['train', 'val'])"
            )
        for name, flag, value, allowed in (
            ("pooling", "--pooling", self.pooling, POOLINGS),
            ("dtype", "--dtype", self.dtype, DTYPES),
            ("precision", "--precision", self.precision, PRECISIONS),
            ("resize method", "--resize", self.resize, RESIZE_METHODS),
            ("decode mode", "--decode", self.decode, DECODE_MODES),
            ("on_error", "--on-error", self.on_error, ON_ERROR),
        ):
            if value not in allowed:
                fix = " or ".join(f"{flag} {a}" for a in allowed) if len(allowed) == 2 else f"e.g. {flag} {allowed[0]}"
                raise UsageError(f"{name} {value!r} is not one of {', '.join(allowed)}; pass {fix}")
        for flag, value in (("--backbone", self.backbone), ("--weights", self.weights)):
            if not isinstance(value, str) or not value:
                raise UsageError(f"{flag} must be a non-empty string, got {value!r}; pass e.g. {flag} {_default(flag)}")

    def _check_augment(self) -> None:
        from featurecache.data import AugmentSpec

        aug = AugmentSpec.parse(self.augment)  # a bad spec fails here, even without views
        if self.views and not self.augment_splits:
            raise UsageError(f"--views {self.views} needs at least one split to augment; pass --augment-splits train")
        if self.views > 0 and aug.is_identity():
            raise UsageError(
                f"--views {self.views} needs an augmentation to make the views differ; pass e.g. --augment flip,rotation=10"
            )

    def to_command(self, data: str, *, limit: int | None = None, cache: str | Any | None = None) -> str:
        """The ``featurecache extract`` command line that extracts these features, shell-quoted.

        Parameters
        ----------
        data
            The dataset source, as given to ``--data``.
        limit
            ``--limit``, if the dataset was limited.
        cache
            The cache root the user named (``None``: the default, which pasting in the same
            shell finds again).

        Returns
        -------
        str
            E.g. ``featurecache extract --data builtin:digits --backbone mobilenetv2 --weights random --size 32``.
        """
        words = ["featurecache", "extract", "--data", str(data), *self.to_args()]
        words += ["--limit", str(limit)] if limit is not None else []
        words += ["--cache", str(cache)] if cache is not None else []
        return shlex.join(words)


def _default(flag: str) -> Any:
    return next(f.default for f in dataclasses.fields(ExtractOptions) if f.metadata["flag"] == flag)


#: Every field of ExtractOptions, in declaration order.
FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ExtractOptions))
#: The fields that decide the feature spec (the key).
KEYED_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ExtractOptions) if f.metadata["keyed"])
#: The fields that change how features are computed, never which.
RUN_FIELDS: tuple[str, ...] = tuple(n for n in FIELDS if n not in KEYED_FIELDS)

F = TypeVar("F", bound=Callable[..., Any])


def expands_options(*names: str) -> Callable[[F], F]:
    """Show ExtractOptions fields as keyword-only parameters of a function that takes ``**overrides``.

    :func:`featurecache._runtime.options.expands` for :class:`ExtractOptions`: ``help(fc.extract)``,
    ``inspect.signature`` and the pipeline file's key check see every option without a second
    copy of the list.

    Parameters
    ----------
    names
        The fields to show, in order (default: all).

    Returns
    -------
    Callable
        A decorator returning the same function.
    """
    return expands(ExtractOptions, *names)
