"""``featurecache ensemble``: combine trained heads into one run directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from featurecache.cli._common import CacheOpt, JsonOpt, handle_errors, print_json


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


@handle_errors
def ensemble_cmd(
    runs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="train-head run directories (any backbones; same dataset and validation split).", show_default=False
        ),
    ] = None,
    from_sweep: Annotated[
        Path | None,
        typer.Option(
            "--from-sweep", help="A sweep directory: add its --top best trials (refitted).", show_default=False
        ),
    ] = None,
    top: Annotated[int, typer.Option("--top", help="Trials taken from --from-sweep.")] = 3,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            "-m",
            help="mean (average probabilities), vote (majority of top-1 classes) or weighted (weights fitted on val by log loss).",
        ),
    ] = "mean",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output directory (default: <sweep>/ensemble-<method>-top<N>, or runs/ensemble-<method>-<digest>).",
            show_default=False,
        ),
    ] = None,
    runs_dir: Annotated[
        Path, typer.Option("--runs-dir", help="Parent of the default output directory without --from-sweep.")
    ] = Path("runs"),
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the PNG plots.")] = False,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Combine trained heads (runs, or a sweep's best) by mean, vote or fitted weights; writes a run directory."""
    from featurecache.training.ensemble import ensemble

    result = ensemble(
        runs or (),
        from_sweep=from_sweep,
        top=top,
        method=method,
        out=out,
        runs_dir=runs_dir,
        cache_dir=cache,
        plots=not no_plots,
    )
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    if json_out:
        print_json(result.to_json())
        return
    from rich import box
    from rich.table import Table

    from featurecache._runtime.tables import console, fit_last_column

    weights = list(result.weights) if result.weights is not None else None

    def build(texts: Sequence[str], dropped: frozenset[str]) -> Table:
        # The run's name goes last, wrapped between its tokens: it is what users copy. Columns
        # give way to it on a narrow terminal (leaderboard.csv has them all).
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=f"{method} ensemble", title_justify="left")
        table.add_column("", no_wrap=True)
        cols = [("val acc", "val_accuracy"), ("val loss", "val_log_loss"), ("test acc", "test_accuracy")]
        cols = [(header, key) for header, key in cols if header not in dropped]
        for header, _ in cols:
            table.add_column(header, justify="right", no_wrap=True)
        if weights is not None:
            table.add_column("weight", justify="right", no_wrap=True)
        table.add_column("run", no_wrap=True)
        for i, (row, text) in enumerate(zip(result.leaderboard, texts, strict=True)):
            weight = [] if weights is None else ["" if i == 0 else f"{weights[i - 1]:.3f}"]
            table.add_row("=" if i == 0 else str(i), *(_fmt(row.get(key)) for _, key in cols), *weight, text)
        return table

    console().print(
        fit_last_column(build, [str(row["name"]) for row in result.leaderboard], optional=("val loss", "test acc"))
    )
    if result.method == "weighted":
        typer.echo("(weights were fitted on val: the ensemble's val metrics are optimistic, its test metrics are not)")
    typer.echo(f"run {result.run_dir}")
