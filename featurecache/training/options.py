"""The options of stage 2, declared once: :class:`TrainOptions` (``train-head``) and :class:`SweepOptions` (``sweep``).

Each is a frozen dataclass whose fields carry their default, command-line flag and help
(:func:`featurecache._runtime.options.option`), as :class:`~featurecache.extraction.options.ExtractOptions`
does for stage 1: :func:`featurecache.train_head` and :func:`featurecache.sweep` take one as
``options=`` (keyword arguments still work and win), and the commands build theirs from the
dataclass (:func:`featurecache.cli.options.stage_options`), so flags, defaults and help cannot
drift apart. A bad value fails at construction with one line naming the flag.

They hold every option of their command but the features (``--features``, or ``--data`` with
the extract options) and the cache; checks here need no feature set and no head registry:
whether a head and its parameters exist is checked by the verb (a custom ``module:Class`` head
imports user code).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurecache._runtime.options import Options, bounded, option, real
from featurecache.errors import UsageError, choices
from featurecache.extraction.options import MAX_SEED

__all__ = ["SweepOptions", "TrainOptions"]

# Help shared by the options of several commands (the same flag means the same thing).
OUT_HELP = "Output directory."
RUNS_DIR_HELP = "Parent of the default output directory."
VAL_FRACTION_HELP = "Fraction of train held out for validation when the features have no val split."
TENSORBOARD_HELP = "Also write TensorBoard logs to this directory (view: tensorboard --logdir DIR)."


def _params_from_cli(items: Sequence[str]) -> dict[str, str]:
    """``-p NAME=VALUE`` items as a mapping; a name given twice is refused."""
    from featurecache.training.heads import parse_param

    out: dict[str, str] = {}
    for item in items:
        name, value = parse_param(item)
        if name in out:
            raise UsageError(f"--param {name} is given twice ({out[name]!r} and {value!r}); pass it once")
        out[name] = value
    return out


def _check_common(o: TrainOptions | SweepOptions, seed_flag: str) -> None:
    """The checks train-head and sweep share: the hold-out fraction and its seed."""
    real("--val-fraction", o.val_fraction, above=0, below=1)
    bounded(seed_flag, o.seed, 0, MAX_SEED)


@dataclass(frozen=True, kw_only=True)
class TrainOptions(Options):
    """How to train one head: every option of ``featurecache train-head`` but the features and the cache.

    Build it with keywords (``TrainOptions(head="dense", params={"hidden": "256"})``) and pass
    it to :func:`featurecache.train_head` as ``options=``. Each field is documented there.

    Raises
    ------
    UsageError
        A value is out of range or of the wrong kind; the message names the flag.
    """

    head: str = option(
        "logreg",
        "--head",
        "Head: logreg, linear-svm, ridge, sgd, knn, dense, or module:Class (see `featurecache heads`).",
    )
    params: Mapping[str, Any] | None = option(
        None,
        "--param",
        "Head parameter NAME=VALUE, repeatable, e.g. -p hidden=256-128 -p dropout=0.5.",
        short="-p",
        repeat=True,
        from_cli=_params_from_cli,
    )
    out: str | os.PathLike[str] | None = option(None, "--out", OUT_HELP, short="-o")
    runs_dir: str | os.PathLike[str] = option(Path("runs"), "--runs-dir", RUNS_DIR_HELP)
    val_fraction: float = option(0.15, "--val-fraction", VAL_FRACTION_HELP)
    seed: int = option(0, "--val-seed", "Seed of the validation hold-out.")
    plots: bool = option(True, "--no-plots", "Skip the PNG plots.")
    tensorboard: str | os.PathLike[str] | None = option(None, "--tensorboard", TENSORBOARD_HELP)

    VERB = "train_head"

    def __post_init__(self) -> None:
        self.normalise()
        if not isinstance(self.head, str) or not self.head:
            raise UsageError(f"--head must be a non-empty string, got {self.head!r}; pass e.g. --head logreg")
        if self.params is not None and not isinstance(self.params, Mapping):
            raise UsageError(
                f"--param {self.params!r} is not NAME=VALUE pairs; "
                "pass e.g. -p C=0.1 (in Python, a dict such as {'C': 0.1})"
            )
        # A private copy (the caller's dict may change later); no parameters is None, however given.
        object.__setattr__(self, "params", dict(self.params) if self.params else None)
        _check_common(self, "--val-seed")


@dataclass(frozen=True, kw_only=True)
class SweepOptions(Options):
    """How to search heads: every option of ``featurecache sweep`` but the features, the cache and the executor.

    Build it with keywords (``SweepOptions(grid=["logreg:C=0.1,1"], n_jobs=2)``) and pass it to
    :func:`featurecache.sweep` as ``options=``. Each field is documented there. ``heads`` may be
    a comma-separated string and ``grid`` one grid string; both are stored as tuples.

    Raises
    ------
    UsageError
        A value is out of range, not a validation metric, or of the wrong kind; the message
        names the flag.
    """

    grid: tuple[str, ...] = option(
        (),
        "--grid",
        'HEAD:NAME=V1,V2;NAME=V1,V2 (cartesian product), repeatable, e.g. "logreg:C=0.01,0.1,1".',
        short="-g",
        repeat=True,
    )
    trials: int = option(
        0, "--trials", "Random configurations per head of --heads, from each head's search space.", short="-n"
    )
    heads: tuple[str, ...] = option(
        ("logreg", "dense"),
        "--heads",
        "Comma-separated heads for --trials (or one default trial each without --grid/--trials).",
    )
    n_jobs: int = option(1, "--jobs", "Trials in parallel (process workers; -1 = all cores).", short="-j")
    together: bool = option(
        True,
        "--together/--one-by-one",
        "Train dense trials with the same batch_size/seed/class_weight/pool in one shared pass over the features "
        "(same results, less time).",
    )
    metric: str = option(
        "val_accuracy",
        "--metric",
        "Ranking metric: val_accuracy, val_log_loss, val_macro_f1, val_kappa, val_top3_accuracy, ...",
    )
    out: str | os.PathLike[str] | None = option(None, "--out", OUT_HELP, short="-o")
    runs_dir: str | os.PathLike[str] = option(Path("runs"), "--runs-dir", RUNS_DIR_HELP)
    val_fraction: float = option(0.15, "--val-fraction", VAL_FRACTION_HELP)
    seed: int = option(0, "--sweep-seed", "Seed of the random --trials draws and of the validation hold-out.")
    plots: bool = option(True, "--no-plots", "Skip the PNG plots and report.html.")
    tensorboard: str | os.PathLike[str] | None = option(None, "--tensorboard", TENSORBOARD_HELP)

    VERB = "sweep"
    #: The top-k accuracies a sweep reports (and may rank by).
    TOP_K = (1, 3, 5)

    def __post_init__(self) -> None:
        from featurecache.training.sweeps.leaderboard import metric_names

        if isinstance(self.heads, str):
            object.__setattr__(self, "heads", tuple(h.strip() for h in self.heads.split(",") if h.strip()))
        if isinstance(self.grid, str):
            object.__setattr__(self, "grid", (self.grid,))
        self.normalise()
        for flag, values in (("--grid", self.grid), ("--heads", self.heads)):
            if not isinstance(values, tuple) or not all(isinstance(v, str) and v for v in values):
                example = "logreg:C=0.1,1" if flag == "--grid" else "logreg,dense"
                raise UsageError(f"{flag} {values!r} must be strings, e.g. {flag} {example}")
        bounded("--trials", self.trials, 0, None)
        if isinstance(self.n_jobs, bool) or not isinstance(self.n_jobs, int) or self.n_jobs == 0:
            raise UsageError(f"--jobs must be a positive number of workers or -1 for all cores, got {self.n_jobs!r}")
        allowed = metric_names(self.TOP_K)
        if self.metric not in allowed:
            raise UsageError(
                f"--metric {self.metric!r} is not a validation metric; use one of {choices(allowed)} "
                "(test metrics are reported, never used to choose)"
            )
        _check_common(self, "--sweep-seed")
