"""Reports of runs and sweeps: plots, top losses, HTML pages, TensorBoard logs.

``featurecache.report`` re-exports the public functions of its modules, so notebooks use one
import: :mod:`~featurecache.report.plots` (PNG plots), :mod:`~featurecache.report.losses` (the
images a model gets most wrong, the classes it confuses), :mod:`~featurecache.report.html`
(one self-contained page per run or sweep) and :mod:`~featurecache.report.tensorboard` (event
files for ``tensorboard --logdir``). Importing it imports neither TensorFlow nor matplotlib.
"""

from featurecache.report.plots import plot_confusion_matrix, plot_leaderboard, plot_training_curves

__all__ = ["plot_confusion_matrix", "plot_leaderboard", "plot_training_curves"]
