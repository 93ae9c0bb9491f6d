"""``featurecache train-head``, ``featurecache sweep`` and ``featurecache heads``.

Both training commands find their features either by ``--features KEY`` (full key, key
prefix or entry name) or by the very options ``extract`` was given (``--data --backbone
--weights --size ...``, built by :func:`featurecache.cli.extract_opts.extract_options`),
which :func:`featurecache.extract.features_for` turns into a key without building a model.
Features that are not in the cache yet give one line with the exact ``featurecache extract``
command to run (:meth:`~featurecache.options.ExtractOptions.to_command`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from featurecache.cli._common import (
    CacheOpt,
    JsonOpt,
    QuietOpt,
    handle_errors,
    print_json,
)
from featurecache.cli.cluster_opts import ClusterOpt, SchedulerFileOpt, SchedulerOpt, VerboseOpt, dask_client
from featurecache.cli.extract_opts import LimitOpt, extract_options
from featurecache.cli.options import stage_options
from featurecache.errors import UsageError
from featurecache.extraction.options import ExtractOptions
from featurecache.training.options import SweepOptions, TrainOptions

FeaturesOpt = Annotated[
    str | None,
    typer.Option(
        "--features",
        "-f",
        help="Feature set: full key, 12-character key prefix or entry name (see `featurecache cache ls`); KEY1,KEY2 trains on several feature sets of the same images side by side.",
        show_default=False,
    ),
]
# Unlike `extract`, no default dataset: a training command must not silently pick digits.
DataRefOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        "-d",
        help="Instead of --features: the --data given to `featurecache extract` (with the same --backbone, --weights, ... options).",
        show_default=False,
    ),
]


def _feature_set(
    features: str | None, *, data: str | None, options: ExtractOptions, limit: int | None, cache: str | None
) -> Any:
    """The complete feature set named by ``--features`` or by the extract options."""
    if features and data:
        raise UsageError("pass either --features KEY or the extract options (--data ...), not both")
    if features:
        from featurecache.training.train import resolve_features

        return resolve_features(features, cache_dir=cache)
    if not data:
        raise UsageError(
            "no features chosen; pass --features KEY (list them with `featurecache cache ls`) or the options "
            "featurecache extract was given, e.g. --data builtin:digits --backbone mobilenetv2 --weights random --size 32"
        )
    from featurecache.extraction.extract import features_for

    return features_for(data, options, limit=limit, cache_dir=cache)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


@handle_errors
@extract_options()
@stage_options(TrainOptions, param="train")
def train_head_cmd(
    *,
    features: FeaturesOpt = None,
    train: TrainOptions,
    data: DataRefOpt = None,
    options: ExtractOptions,
    limit: LimitOpt = None,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Train one head on cached features and write its run directory (head, config, metrics, plots)."""
    from featurecache.training.heads import coerce_head_params
    from featurecache.training.train import train_head

    coerce_head_params(train.head, train.params)  # a bad head or parameter fails before features are looked up
    fs = _feature_set(features, data=data, options=options, limit=limit, cache=cache)
    result = train_head(fs, train, cache_dir=cache)
    if json_out:
        print_json(result.to_json())
        return
    untrained = result.untrained_classes
    if untrained:
        typer.echo(
            f"warning: {len(untrained)} classes have no valid training image, so the head never predicts them: {', '.join(untrained[:10])}",
            err=True,
        )
    typer.echo(f"trained {train.head} on {fs.name} in {result.seconds:.1f} s")
    for split, m in result.metrics.items():
        typer.echo(
            f"{split:>4}: accuracy {_fmt(m['accuracy'])}  log loss {_fmt(m['log_loss'])}  "
            f"kappa {_fmt(m['cohen_kappa'])}  macro F1 {_fmt(m['macro_f1'])}  (n={m['n']})"
        )
    typer.echo(f"run {result.run_dir}")


@handle_errors
@extract_options()
@stage_options(SweepOptions, param="sweep_options")
def sweep_cmd(
    *,
    features: FeaturesOpt = None,
    sweep_options: SweepOptions,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="local (joblib process workers) or dask (trials on a Dask cluster; needs --cluster/--scheduler).",
        ),
    ] = "local",
    cluster: ClusterOpt = None,
    scheduler: SchedulerOpt = None,
    scheduler_file: SchedulerFileOpt = None,
    top: Annotated[int, typer.Option("--top", help="Rows of the leaderboard printed.")] = 20,
    data: DataRefOpt = None,
    options: ExtractOptions,
    limit: LimitOpt = None,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Grid or random search over heads on cached features; ranks them and saves the best as a run (resumable)."""
    from featurecache.training.sweeps.sweep import leaderboard_table, plan_trials, sweep

    if backend not in ("local", "dask"):
        raise UsageError(f"--backend must be local or dask, got {backend!r}")
    if (backend == "dask") != bool(cluster or scheduler or scheduler_file):
        raise UsageError(
            "--backend dask goes with one of --cluster local:N, --scheduler tcp://host:8786 or --scheduler-file FILE, and they with it"
        )
    so = sweep_options
    plan_trials(grid=so.grid, trials=so.trials, heads=list(so.heads), seed=so.seed)  # bad grids fail before the lookup
    fs = _feature_set(features, data=data, options=options, limit=limit, cache=cache)
    import contextlib

    import joblib

    with dask_client(cluster, scheduler, scheduler_file, verbose=verbose) as client:
        # Trials go through joblib; its dask backend takes them to the client's cluster.
        with joblib.parallel_config(backend="dask") if client is not None else contextlib.nullcontext():
            result = sweep(fs, so, cache_dir=cache, progress=not (quiet or json_out))
    if json_out:
        print_json(result.to_json())
        return
    from rich.console import Console

    metric = so.metric
    Console().print(leaderboard_table(result.leaderboard, metric=metric, top=top, title=f"sweep on {fs.name}"))
    reused = f", {result.skipped} reused from an earlier run" if result.skipped else ""
    typer.echo(f"{len(result.leaderboard)} trials in {result.seconds:.1f} s{reused}; leaderboard in {result.out_dir}")
    typer.echo(f"best: {result.best['name']} ({metric} {_fmt(result.best.get(metric))}) -> run {result.best_run}")


@handle_errors
def heads_cmd(
    name: Annotated[str | None, typer.Argument(help="Show only this head.", show_default=False)] = None,
    json_out: JsonOpt = False,
) -> None:
    """List the heads and their parameters: type, default, search range."""
    from featurecache.training.heads import HEAD_NAMES, get_head_spec

    names = [name] if name else list(HEAD_NAMES)
    specs = [get_head_spec(n) for n in names]
    if json_out:
        print_json(
            {
                s.name: {
                    "summary": s.summary,
                    "params": {
                        p.name: {
                            "type": p.type_name,
                            "default": p.format(p.default),
                            "help": p.help,
                            "search": p.search.describe() if p.search else None,
                        }
                        for p in s.params
                    },
                }
                for s in specs
            }
        )
        return
    from rich import box
    from rich.table import Table

    from featurecache._runtime.tables import console as make_console
    from featurecache._runtime.tables import token_width

    console = make_console()
    for s in specs:
        rows = [
            (p.name, p.type_name, p.format(p.default), p.search.describe() if p.search else "", p.help)
            for p in s.params
        ]
        table = Table(title=f"{s.name}: {s.summary}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        # Names and values are typed back: never cut; the text columns wrap between words only
        # (a column is never narrower than its longest word).
        table.add_column("parameter", style="bold", no_wrap=True)
        table.add_column("type", min_width=token_width(r[1] for r in rows))
        table.add_column("default", no_wrap=True)
        table.add_column("search (--trials)", min_width=token_width(r[3] for r in rows))
        table.add_column("meaning", min_width=token_width(r[4] for r in rows))
        for r in rows:
            table.add_row(*r)
        console.print(table)
        console.print()
    if not name:
        console.print(
            "Set parameters with `train-head --head NAME -p KEY=VALUE`; any scikit-learn classifier works as --head module:Class."
        )


@handle_errors
def convert_run_cmd(
    run: Annotated[
        Path,
        typer.Argument(
            help="Run directory of an earlier version (its head is a pickled head.joblib).", show_default=False
        ),
    ],
    trust: Annotated[
        bool,
        typer.Option("--trust", help="Unpickle head.joblib (it can run any code: only for runs you made or trust)."),
    ] = False,
) -> None:
    """Rewrite an old run directory's pickled head in the safe format (head.skops / head.keras)."""
    from featurecache.training.heads import convert_legacy_head

    out = convert_legacy_head(run, trust=trust)
    typer.echo(f"converted {out}: its head now loads without running code")
