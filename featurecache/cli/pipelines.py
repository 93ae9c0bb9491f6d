"""``featurecache run`` and ``featurecache demo``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from featurecache.cli._common import CacheOpt, JsonOpt, QuietOpt, handle_errors, print_json

SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a pipeline value: STAGE.KEY=VALUE (repeatable), e.g. extract.weights=random.",
        show_default=False,
    ),
]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="At most N images per split.", show_default=False)]
RunsOpt = Annotated[
    Path | None,
    typer.Option("--runs", help="Directory for run outputs (default: the file's, or ./runs).", show_default=False),
]


@handle_errors
def run_cmd(
    file: Annotated[Path, typer.Argument(help="Pipeline TOML file, e.g. pipelines/digits_demo.toml.")],
    set_: SetOpt = None,
    limit: LimitOpt = None,
    runs: RunsOpt = None,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run extract → sweep → finetune as declared in a pipeline file."""
    from featurecache.pipelines.run import run_pipeline

    res = run_pipeline(
        file, overrides=tuple(set_ or ()), limit=limit, cache_dir=cache, runs_dir=runs, progress=not (quiet or json_out)
    )
    if json_out:
        print_json(res.to_json())
        return
    for stage, doc in res.stages.items():
        typer.echo(f"{stage:<9} {doc['seconds']:>7.1f} s  {_stage_line(stage, doc)}")


def _stage_line(stage: str, doc: dict) -> str:
    if stage == "extract":
        return f"{doc['name']} ({'cache hit' if doc['cached'] else 'extracted'})"
    if stage == "sweep":
        best = doc["best"]
        return f"{doc['trials']} trials, best {best['head']} val_accuracy={best.get('val_accuracy', float('nan')):.4f} -> {doc['best_run']}"
    val = doc["metrics"].get("val", {}).get("accuracy")
    return f"val_accuracy={val:.4f} -> {doc['model']}" if val is not None else str(doc["model"])


@handle_errors
def demo_cmd(
    set_: SetOpt = None,
    limit: LimitOpt = None,
    runs: Annotated[Path, typer.Option("--runs", help="Directory for run outputs.")] = Path("runs"),
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """All three stages on scikit-learn's bundled digits, offline, in a few minutes."""
    from featurecache.pipelines.demo import run_demo

    res = run_demo(
        cache_dir=cache, runs_dir=runs, overrides=tuple(set_ or ()), limit=limit, progress=not (quiet or json_out)
    )
    if json_out:
        print_json(res.to_json())
        return
    from rich.table import Table

    from featurecache._runtime.tables import console, fit_last_column

    def pct(v: float | None) -> str:
        return "" if v is None else f"{100 * v:.1f}%"

    def build(texts: Sequence[str], dropped: frozenset[str]) -> Table:
        table = Table(title="featurecache demo: builtin:digits")
        for name in ("stage", "val acc", "test acc", "time"):
            table.add_column(name, no_wrap=True)
        table.add_column("what", no_wrap=True)
        for r, what in zip(res.rows, texts, strict=True):
            table.add_row(r["stage"], pct(r["val_accuracy"]), pct(r["test_accuracy"]), f"{r['seconds']:.1f} s", what)
        return table

    # A feature set's name is what users copy: it gets a line of its own below the table, whole.
    whats = [r["what"].replace(r["features"], "features below") if r.get("features") else r["what"] for r in res.rows]
    out = console()
    out.print(fit_last_column(build, whats))
    for r in res.rows:
        if r.get("features"):
            out.print(f"features: {r['features']}", soft_wrap=True)
    for p in res.plots:
        out.print(f"plot: {p}", soft_wrap=True)
