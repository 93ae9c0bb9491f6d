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
    TensorBoardOpt,
    csv_items,
    handle_errors,
    print_json,
)
from featurecache.cli.cluster_opts import ClusterOpt, SchedulerFileOpt, SchedulerOpt, VerboseOpt, dask_client
from featurecache.cli.extract_opts import LimitOpt, extract_options
from featurecache.errors import UsageError
from featurecache.extraction.options import ExtractOptions

FeaturesOpt = Annotated[
    str | None,
    typer.Option(
        "--features", "-f",
        help="Feature set: full key, 12-character key prefix or entry name (see `featurecache cache ls`); KEY1,KEY2 trains on several feature sets of the same images side by side.",
        show_default=False,
    ),
]
# Unlike `extract`, no default dataset: a training command must not silently pick digits.
DataRefOpt = Annotated[
    str | None,
    typer.Option("--data", "-d", help="Instead of --features: the --data given to `featurecache extract` (with the same --backbone, --weights, ... options).", show_default=False),
]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output directory.", show_default=False)]
RunsDirOpt = Annotated[Path, typer.Option("--runs-dir", help="Parent of the default output directory.")]
ValFractionOpt = Annotated[float, typer.Option("--val-fraction", help="Fraction of train held out for validation when the features have no val split.")]


def _feature_set(features: str | None, *, data: str | None, options: ExtractOptions, limit: int | None, cache: str | None) -> Any:
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


def _params(items: list[str] | None) -> dict[str, str]:
    from featurecache.training.heads import parse_param

    out: dict[str, str] = {}
    for item in items or []:
        name, value = parse_param(item)
        if name in out:
            raise UsageError(f"--param {name} is given twice ({out[name]!r} and {value!r}); pass it once")
        out[name] = value
    return out


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


@handle_errors
@extract_options()
def train_head_cmd(
    *,
    features: FeaturesOpt = None,
    head: Annotated[str, typer.Option("--head", help="Head: logreg, linear-svm, ridge, sgd, knn, dense, or module:Class (see `featurecache heads`).")] = "logreg",
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="Head parameter NAME=VALUE, repeatable, e.g. -p hidden=256-128 -p dropout=0.5.", show_default=False)] = None,
    out: OutOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    val_fraction: ValFractionOpt = 0.15,
    val_seed: Annotated[int, typer.Option("--val-seed", help="Seed of the validation hold-out.")] = 0,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the PNG plots.")] = False,
    tensorboard: TensorBoardOpt = None,
    data: DataRefOpt = None,
    options: ExtractOptions,
    limit: LimitOpt = None,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Train one head on cached features and write its run directory (head, config, metrics, plots)."""
    from featurecache.training.heads import coerce_head_params
    from featurecache.training.train import train_head

    params = _params(param)
    coerce_head_params(head, params)  # a bad head or parameter fails before features are looked up
    fs = _feature_set(features, data=data, options=options, limit=limit, cache=cache)
    result = train_head(
        fs, head=head, params=params, out=out, runs_dir=runs_dir, val_fraction=val_fraction, seed=val_seed,
        cache_dir=cache, plots=not no_plots, tensorboard=tensorboard,
    )
    if json_out:
        print_json(result.to_json())
        return
    untrained = result.untrained_classes
    if untrained:
        typer.echo(f"warning: {len(untrained)} classes have no valid training image, so the head never predicts them: {', '.join(untrained[:10])}", err=True)
    typer.echo(f"trained {head} on {fs.name} in {result.seconds:.1f} s")
    for split, m in result.metrics.items():
        typer.echo(
            f"{split:>4}: accuracy {_fmt(m['accuracy'])}  log loss {_fmt(m['log_loss'])}  "
            f"kappa {_fmt(m['cohen_kappa'])}  macro F1 {_fmt(m['macro_f1'])}  (n={m['n']})"
        )
    typer.echo(f"run {result.run_dir}")


@handle_errors
@extract_options()
def sweep_cmd(
    *,
    features: FeaturesOpt = None,
    grid: Annotated[list[str] | None, typer.Option("--grid", "-g", help="HEAD:NAME=V1,V2;NAME=V1,V2 (cartesian product), repeatable, e.g. \"logreg:C=0.01,0.1,1\".", show_default=False)] = None,
    trials: Annotated[int, typer.Option("--trials", "-n", help="Random configurations per head of --heads, from each head's search space.")] = 0,
    heads: Annotated[str, typer.Option("--heads", help="Comma-separated heads for --trials (or one default trial each without --grid/--trials).")] = "logreg,dense",
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Trials in parallel (process workers; -1 = all cores).")] = 1,
    backend: Annotated[
        str, typer.Option("--backend", help="local (joblib process workers) or dask (trials on a Dask cluster; needs --cluster/--scheduler).")
    ] = "local",
    cluster: ClusterOpt = None,
    scheduler: SchedulerOpt = None,
    scheduler_file: SchedulerFileOpt = None,
    together: Annotated[bool, typer.Option("--together/--one-by-one", help="Train dense trials with the same batch_size/seed/class_weight/pool in one shared pass over the features (same results, less time).")] = True,
    metric: Annotated[str, typer.Option("--metric", help="Ranking metric: val_accuracy, val_log_loss, val_macro_f1, val_kappa, val_top3_accuracy, ...")] = "val_accuracy",
    out: OutOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    val_fraction: ValFractionOpt = 0.15,
    sweep_seed: Annotated[int, typer.Option("--sweep-seed", help="Seed of the random --trials draws and of the validation hold-out.")] = 0,
    top: Annotated[int, typer.Option("--top", help="Rows of the leaderboard printed.")] = 20,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the PNG plots and report.html.")] = False,
    tensorboard: TensorBoardOpt = None,
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
        raise UsageError("--backend dask goes with one of --cluster local:N, --scheduler tcp://host:8786 or --scheduler-file FILE, and they with it")
    head_list = csv_items(heads)
    plan_trials(grid=grid or (), trials=trials, heads=head_list, seed=sweep_seed)  # bad grids fail before the lookup
    fs = _feature_set(features, data=data, options=options, limit=limit, cache=cache)
    import contextlib

    import joblib

    with dask_client(cluster, scheduler, scheduler_file, verbose=verbose) as client:
        # Trials go through joblib; its dask backend takes them to the client's cluster.
        with joblib.parallel_config(backend="dask") if client is not None else contextlib.nullcontext():
            result = sweep(
                fs, grid=grid or (), trials=trials, heads=head_list, n_jobs=jobs, out=out, runs_dir=runs_dir,
                val_fraction=val_fraction, seed=sweep_seed, metric=metric, cache_dir=cache, together=together, progress=not (quiet or json_out),
                tensorboard=tensorboard, plots=not no_plots,
            )
    if json_out:
        print_json(result.to_json())
        return
    from rich.console import Console

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
        rows = [(p.name, p.type_name, p.format(p.default), p.search.describe() if p.search else "", p.help) for p in s.params]
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
        console.print("Set parameters with `train-head --head NAME -p KEY=VALUE`; any scikit-learn classifier works as --head module:Class.")


@handle_errors
def convert_run_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory of an earlier version (its head is a pickled head.joblib).", show_default=False)],
    trust: Annotated[bool, typer.Option("--trust", help="Unpickle head.joblib (it can run any code: only for runs you made or trust).")] = False,
) -> None:
    """Rewrite an old run directory's pickled head in the safe format (head.skops / head.keras)."""
    from featurecache.training.heads import convert_legacy_head

    out = convert_legacy_head(run, trust=trust)
    typer.echo(f"converted {out}: its head now loads without running code")
