"""The ``featurecache`` command: wires the command modules together, nothing else."""

from __future__ import annotations

import warnings

import typer

from featurecache._runtime import quiet_tf
from featurecache.cli import backbones as backbones_cli
from featurecache.cli import cache as cache_cli
from featurecache.cli import ensemble as ensemble_cli
from featurecache.cli import extraction as extract_cli
from featurecache.cli import finetuning as finetune_cli
from featurecache.cli import pipelines as run_cli
from featurecache.cli import report as report_cli
from featurecache.cli import training as heads_cli
from featurecache.cli._common import OneLineErrorsGroup, show_warning

app = typer.Typer(
    name="featurecache",
    help="Run a frozen Keras backbone once, cache its features in Zarr, train and sweep heads in seconds, fine-tune end to end.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=OneLineErrorsGroup,
    rich_markup_mode=None,
)
app.command("extract", no_args_is_help=False)(extract_cli.extract_cmd)
app.command("backbones")(backbones_cli.backbones_cmd)
app.command("train-head")(heads_cli.train_head_cmd)
app.command("sweep")(heads_cli.sweep_cmd)
app.command("heads")(heads_cli.heads_cmd)
app.command("ensemble")(ensemble_cli.ensemble_cmd)
app.command("convert-run")(heads_cli.convert_run_cmd)
app.command("finetune")(finetune_cli.finetune_cmd)
app.command("evaluate")(finetune_cli.evaluate_cmd)
app.command("predict")(finetune_cli.predict_cmd)
app.command("run")(run_cli.run_cmd)
app.command("report")(report_cli.report_cmd)
app.command("demo")(run_cli.demo_cmd)
app.add_typer(cache_cli.app, name="cache")


def main() -> None:
    """Console-script entry point."""
    # TensorFlow's native start-up lines would bury the one-line messages users need to read.
    quiet_tf.install()
    # Pillow warns about (and then decodes) images between its pixel limit and twice it; we
    # refuse those with a one-line reason in the failures report, so the warning is only noise.
    # Filters are process-global, hence set here, once, before any decode thread starts.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    warnings.showwarning = show_warning
    app()


if __name__ == "__main__":
    main()
