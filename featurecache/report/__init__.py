"""Reports of runs and sweeps: plots, top losses, HTML pages, TensorBoard logs.

``featurecache.report`` re-exports the public functions of its modules, so notebooks use one
import: :mod:`~featurecache.report.plots` (PNG plots), :mod:`~featurecache.report.losses` (the
images a model gets most wrong, the classes it confuses; :mod:`~featurecache.report.images`
reads a run's images back by id), :mod:`~featurecache.report.html`
(one self-contained page per run or sweep) and :mod:`~featurecache.report.tensorboard` (event
files for ``tensorboard --logdir``). Importing it imports neither TensorFlow nor matplotlib.

In a notebook::

    from featurecache import report
    worst = report.top_losses("runs/digits-dense", split="val", n=16)
    worst.rows[0], worst.figure()                 # rows, and a matplotlib Figure
    report.most_confused(metrics["val"]["confusion_matrix"], classes)[:5]
    report.write_report("runs/sweep-1a2b3c4d")    # (re)writes report.html
"""

from featurecache.report.html import REPORT_FILE, render_run, render_sweep, write_report
from featurecache.report.images import SplitImages
from featurecache.report.losses import (
    ErrorAnalysis,
    TopLosses,
    analyse_run,
    most_confused,
    per_sample_loss,
    top_losses,
    top_losses_from_arrays,
)
from featurecache.report.plots import plot_confusion_matrix, plot_leaderboard, plot_training_curves

__all__ = [
    "REPORT_FILE",
    "ErrorAnalysis",
    "SplitImages",
    "TopLosses",
    "analyse_run",
    "most_confused",
    "per_sample_loss",
    "plot_confusion_matrix",
    "plot_leaderboard",
    "plot_training_curves",
    "render_run",
    "render_sweep",
    "top_losses",
    "top_losses_from_arrays",
    "write_report",
]
