"""The ``featurecache`` command: wires the command modules together, nothing else."""

from __future__ import annotations

import os

import typer

from featurecache.cli import backbones as backbones_cli
from featurecache.cli import cache as cache_cli
from featurecache.cli import extract as extract_cli

app = typer.Typer(
    name="featurecache",
    help="Run a frozen Keras backbone once, cache its features in Zarr, train and sweep heads in seconds, fine-tune end to end.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("extract", no_args_is_help=False)(extract_cli.extract_cmd)
app.command("backbones")(backbones_cli.backbones_cmd)
app.add_typer(cache_cli.app, name="cache")


def main() -> None:
    """Console-script entry point."""
    # TensorFlow's C++ start-up chatter drowns the one-line messages users need to read.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app()


if __name__ == "__main__":
    main()
