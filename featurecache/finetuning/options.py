"""The options of stage 3, declared once: :class:`FinetuneOptions` (``featurecache finetune``).

A frozen dataclass whose fields carry their default, command-line flag and help
(:func:`featurecache._runtime.options.option`), as :class:`~featurecache.extraction.options.ExtractOptions`
does for stage 1: :func:`featurecache.finetune` takes one as ``options=`` (keyword arguments
still work and win), and the command builds its options from the dataclass, so flags, defaults
and help cannot drift apart. A bad value fails at construction with one line naming the flag.

Checks here need no run and no model: bounds, the optimizer, the augmentation spec. Whether
the ``--unfreeze`` blocks exist is checked against the rebuilt backbone by the verb.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from featurecache._runtime.options import Options, bounded, option, real
from featurecache.errors import UsageError, choices
from featurecache.extraction.options import MAX_SEED
from featurecache.training.options import TENSORBOARD_HELP

__all__ = ["FinetuneOptions"]

# Help of the options evaluate and predict share (cli/finetuning.py reads them from here).
BATCH_HELP = "Images per step."
LIMIT_HELP = "At most N images per split (default: the run's --limit)."
WEIGHTS_HELP = "Backbone weights when rebuilding a run (default: what the run records)."
NO_PLOTS_HELP = "Do not write PNG plots."


@dataclass(frozen=True, kw_only=True)
class FinetuneOptions(Options):
    """How to fine-tune a run: every option of ``featurecache finetune`` but the run and the cache.

    Build it with keywords (``FinetuneOptions(unfreeze="top:2", epochs=3, augment="flip")``) and
    pass it to :func:`featurecache.finetune` as ``options=``. Each field is documented there.
    ``check_samples=0`` means all validation images, as on the command line (stored as ``None``).

    Raises
    ------
    UsageError
        A value is out of range or not one of its choices; the message names the flag.
    AugmentSpecError
        ``augment`` is not a valid augmentation spec.
    """

    unfreeze: str = option(
        "top:1",
        "--unfreeze",
        "Backbone blocks to train: names (see `featurecache backbones --blocks NAME`), top:N, all or none; "
        "comma-separated.",
        short="-u",
    )
    epochs: int = option(10, "--epochs", "Maximum epochs (0: only rebuild, check and export).")
    out: str | os.PathLike[str] | None = option(None, "--out", "Output directory (default: <run>-ft).", short="-o")
    lr: float = option(1e-5, "--lr", "Initial learning rate (reduced on plateau).")
    optimizer: str = option("adam", "--optimizer", "adam, rmsprop or sgd (momentum 0.9).")
    batch_size: int = option(32, "--batch-size", BATCH_HELP)
    augment: str | None = option(
        None,
        "--augment",
        "On-the-fly augmentation of training images, e.g. flip,rotation=10,zoom=0.1 (new draw each epoch).",
    )
    patience: int = option(3, "--patience", "Early-stopping patience on val_loss (0: off).")
    tolerance: float = option(1e-4, "--tolerance", "Equivalence check: largest allowed probability difference.")
    check_samples: int | None = option(
        512, "--check-samples", "Validation images used by the equivalence check (0: all).", none_as=0
    )
    data: str | None = option(
        None, "--data", "The run's dataset at another location (default: the recorded source).", short="-d"
    )
    limit: int | None = option(None, "--limit", LIMIT_HELP)
    weights: str | None = option(None, "--weights", WEIGHTS_HELP, short="-w")
    seed: int = option(0, "--seed", "Seed of batch order, augmentation and dropout.")
    savedmodel: bool = option(False, "--savedmodel", "Also export a TensorFlow SavedModel to <out>/savedmodel.")
    plots: bool = option(True, "--no-plots", NO_PLOTS_HELP)
    tensorboard: str | os.PathLike[str] | None = option(None, "--tensorboard", TENSORBOARD_HELP)

    VERB = "finetune"

    def __post_init__(self) -> None:
        from featurecache.data import AugmentSpec
        from featurecache.finetuning.training import OPTIMIZERS

        self.normalise()
        if self.check_samples == 0 and not isinstance(self.check_samples, bool):
            object.__setattr__(self, "check_samples", None)  # 0: all, as on the command line
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer {self.optimizer!r} is not one of {choices(OPTIMIZERS)}")
        for flag, value, low in (
            ("--epochs", self.epochs, 0),
            ("--batch-size", self.batch_size, 1),
            ("--patience", self.patience, 0),
        ):
            bounded(flag, value, low, None)
        real("--lr", self.lr, above=0)
        real("--tolerance", self.tolerance, at_least=0)
        bounded("--seed", self.seed, 0, MAX_SEED)
        for flag, count in (("--check-samples", self.check_samples), ("--limit", self.limit)):
            if count is not None:
                bounded(flag, count, 1, None, "; omit it for all images" if flag == "--limit" else " (0: all)")
        if not isinstance(self.unfreeze, str) or not self.unfreeze.strip():
            raise UsageError(
                f"--unfreeze must name blocks, got {self.unfreeze!r}; pass e.g. --unfreeze top:1, all or none"
            )
        AugmentSpec.parse(self.augment)  # a bad spec fails here, before the run is rebuilt
