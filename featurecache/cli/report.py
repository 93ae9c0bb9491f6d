"""``featurecache report``: re-render a run's or a sweep's ``report.html`` (top losses recomputed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featurecache.cli._common import CacheOpt, JsonOpt, csv_items, handle_errors, print_json


@handle_errors
def report_cmd(
    path: Annotated[
        Path, typer.Argument(help="A train-head run, sweep, finetune or evaluate directory.", show_default=False)
    ],
    top: Annotated[int, typer.Option("--top", "-n", min=1, max=100, help="Images in each top-loss grid.")] = 16,
    split: Annotated[
        str | None,
        typer.Option(
            "--split",
            help="Comma-separated splits for the top-loss grids (default: every split with predictions).",
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="The run's dataset at another location (default: the source the run records).",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            min=1,
            help="Images per split when loading --data (default: the run's --limit).",
            show_default=False,
        ),
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="Fail when the images cannot be loaded (default: the page says why they are missing)."
        ),
    ] = False,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write report.html (metrics, confusion matrix, curves, top-loss grid, features; for a sweep the leaderboard)."""
    from featurecache.report import write_report

    splits = csv_items(split) if split else None
    out = write_report(path, top=top, splits=splits, data=data, limit=limit, cache_dir=cache, strict=strict)
    if json_out:
        print_json({"report": str(out)})
        return
    typer.echo(f"report {out}")
    typer.echo(f"open it in a browser: file://{out.resolve()}")
