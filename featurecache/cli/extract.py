"""``featurecache extract``."""

from __future__ import annotations

from typing import Annotated

import typer

from featurecache.cli.cluster_opts import ClusterOpt, SchedulerFileOpt, SchedulerOpt, dask_client
from featurecache.cli._common import CacheOpt, JsonOpt, QuietOpt, csv_items, handle_errors, pasteable, print_json

DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        "-d",
        help="Images: a folder of class sub-folders (optionally in train/ val/ test/), a CSV (path,label[,split]), "
        "an .npz (x, y), keras:cifar10|cifar100|mnist|fashion_mnist, or builtin:digits.",
    ),
]
BackboneOpt = Annotated[str, typer.Option("--backbone", "-b", help="Backbone name (see `featurecache backbones`).")]
WeightsOpt = Annotated[str, typer.Option("--weights", "-w", help="imagenet, random (seeded), or a local .h5/.weights.h5 file.")]
SizeOpt = Annotated[
    int | None, typer.Option("--size", min=1, help="Square input size in pixels, at most 1024 (default: the backbone's).", show_default=False)
]
LayerOpt = Annotated[str | None, typer.Option("--layer", help="Layer to take features from (default: the bottleneck).", show_default=False)]
PoolingOpt = Annotated[str, typer.Option("--pooling", help="avg, max, flatten or none (keep the spatial map).")]
ResizeOpt = Annotated[str, typer.Option("--resize", help="Resize method: bilinear, nearest, bicubic, area, lanczos3, ...")]
AugmentOpt = Annotated[
    str | None,
    typer.Option("--augment", help="Augmentation of views 1..K, e.g. flip,rotation=15,zoom=0.1,shift=0.1,shear=5,brightness=0.2,contrast=0.2.", show_default=False),
]
ViewsOpt = Annotated[
    int, typer.Option("--views", min=0, help="Augmented views per training image, at most 64 (view 0 is always the clean image).")
]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, help="Seed of augmentation and random weights (0 to 2**32-1).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Stored dtype: float32 or float16.")]
PrecisionOpt = Annotated[
    str,
    typer.Option("--precision", help="Backbone compute precision: float32, or mixed (float16 maths, for GPUs with tensor cores; keyed)."),
]
DecodeOpt = Annotated[
    str,
    typer.Option("--decode", help="exact: decode every pixel (as plain Keras); fast: decode large JPEGs at reduced DCT scale, several times faster on photos (keyed)."),
]
AntialiasOpt = Annotated[
    bool,
    typer.Option("--antialias/--no-antialias", help="Filter the whole footprint when shrinking instead of bilinear point sampling (keyed)."),
]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="At most N images per split (stratified).", show_default=False)]


@handle_errors
def extract_cmd(
    data: DataOpt = "builtin:digits",
    backbone: BackboneOpt = "vgg19",
    weights: WeightsOpt = "imagenet",
    size: SizeOpt = None,
    layer: LayerOpt = None,
    pooling: PoolingOpt = "avg",
    resize: ResizeOpt = "bilinear",
    augment: AugmentOpt = None,
    views: ViewsOpt = 0,
    augment_splits: Annotated[str, typer.Option("--augment-splits", help="Comma-separated splits that get augmented views.")] = "train",
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "float32",
    precision: PrecisionOpt = "float32",
    decode: DecodeOpt = "exact",
    antialias: AntialiasOpt = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Backbone batch size (halved and retried on out-of-memory).")] = 32,
    xla: Annotated[
        bool | None,
        typer.Option("--xla/--no-xla", help="Compile the backbone with XLA. Default: on with a GPU, off on CPU. Not keyed (round-off only).", show_default=False),
    ] = None,
    limit: LimitOpt = None,
    on_error: Annotated[str, typer.Option("--on-error", help="skip: mark undecodable images invalid and go on; fail: stop.")] = "skip",
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Decode threads (default: one per CPU core, at most 256).", show_default=False)] = None,
    cluster: ClusterOpt = None,
    scheduler: SchedulerOpt = None,
    scheduler_file: SchedulerFileOpt = None,
    units_per_task: Annotated[int, typer.Option("--units-per-task", min=1, help="Consecutive write units per Dask task.")] = 4,
    shard: Annotated[
        str | None,
        typer.Option("--shard", help="i/N: run this process's share of the units (start N of them); auto inside a Slurm job array.", show_default=False),
    ] = None,
    no_lease: Annotated[
        bool,
        typer.Option("--no-lease", help="Take no lease on the feature store: only for a cache no other process writes meanwhile (object stores without conditional writes)."),
    ] = False,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run a frozen backbone once over a dataset and cache its features (a repeat is a cache hit)."""
    from featurecache.extract import extract
    from featurecache.shards import parse_shard

    shard_ = parse_shard(shard)
    with dask_client(cluster, scheduler, scheduler_file) as client:
        result = extract(
            data, backbone=backbone, weights=weights, size=size, layer=layer, pooling=pooling, resize=resize, augment=augment,
            views=views, augment_splits=csv_items(augment_splits), seed=seed, dtype=dtype, precision=precision,
            decode=decode, antialias=antialias, batch_size=batch_size, xla=xla, cache_dir=cache, limit=limit, on_error=on_error,  # type: ignore[arg-type]
            workers=workers, client=client, units_per_task=units_per_task, shard=shard_, progress=not (quiet or json_out),
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
        typer.echo(f"note: skipped {result.skipped_files} files (hidden, not an image type, outside a class folder or a broken link)", err=True)
