"""``featurecache extract``."""

from __future__ import annotations

from typing import Annotated

import typer

from featurecache.cli._common import CacheOpt, JsonOpt, QuietOpt, handle_errors, pasteable, print_json
from featurecache.cli.cluster_opts import ClusterOpt, SchedulerFileOpt, SchedulerOpt, VerboseOpt, dask_client
from featurecache.cli.extract_opts import DataOpt, LimitOpt, extract_options
from featurecache.extraction.options import ExtractOptions


@handle_errors
@extract_options(run=True)
def extract_cmd(
    *,
    data: DataOpt = "builtin:digits",
    options: ExtractOptions,
    limit: LimitOpt = None,
    cluster: ClusterOpt = None,
    scheduler: SchedulerOpt = None,
    scheduler_file: SchedulerFileOpt = None,
    units_per_task: Annotated[
        int, typer.Option("--units-per-task", min=1, help="Consecutive write units per Dask task.")
    ] = 4,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="i/N: run this process's share of the units (start N of them); auto inside a Slurm job array.",
            show_default=False,
        ),
    ] = None,
    no_lease: Annotated[
        bool,
        typer.Option(
            "--no-lease",
            help="Take no lease on the feature store: only for a cache no other process writes meanwhile (object stores without conditional writes).",
        ),
    ] = False,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run a frozen backbone once over a dataset and cache its features (a repeat is a cache hit)."""
    from featurecache.extraction.extract import extract
    from featurecache.extraction.shards import parse_shard

    shard_ = parse_shard(shard)
    with dask_client(cluster, scheduler, scheduler_file, verbose=verbose) as client:
        result = extract(
            data,
            options,
            cache_dir=cache,
            limit=limit,
            client=client,
            units_per_task=units_per_task,
            shard=shard_,
            progress=not (quiet or json_out),
            lease=not no_lease,
        )
    _report(result, json_out=json_out, cache=cache)


def _report(result, *, json_out: bool, cache) -> None:  # noqa: ANN001 - an ExtractResult and the --cache value
    if result.pending:
        typer.echo(
            f"shard done: computed {result.computed} image views of {result.name}; {result.pending} "
            f"{'unit' if result.pending == 1 else 'units'} of other shards still to finish; the last shard to finish writes the feature set",
            err=json_out,  # stdout stays one JSON document
        )
    if json_out:
        print_json(result.to_json())
    elif not result.pending:
        state = "cached" if result.cached else "extracted"
        shapes = ", ".join(f"{s} {tuple(d['shape'])}" for s, d in result.splits.items())
        typer.echo(f"{state} {result.name} in {result.seconds:.1f} s: {shapes}")
        typer.echo(f"key {result.key}")
    if result.failures:
        by_reason: dict[str, int] = {}
        for f in result.failures:
            by_reason[f["reason"].split(":")[0]] = by_reason.get(f["reason"].split(":")[0], 0) + 1
        summary = "; ".join(f"{n}x {r}" for r, n in sorted(by_reason.items(), key=lambda kv: -kv[1]))
        typer.echo(
            f"warning: {len(result.failures)} images could not be decoded and are marked invalid ({summary}); "
            f"list them with `{pasteable('featurecache', 'cache', 'failures', result.key[:12], cache=cache)}`",
            err=True,
        )
    if result.skipped_files:
        # Not only "not images": hidden files, files outside class folders and broken links too.
        typer.echo(
            f"note: skipped {result.skipped_files} files (hidden, not an image type, outside a class folder or a broken link)",
            err=True,
        )
