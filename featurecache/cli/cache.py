"""``featurecache cache ...``: list, inspect and remove cache entries."""

from __future__ import annotations

from typing import Annotated

import typer

from featurecache.cli._common import CacheOpt, JsonOpt, csv_items, fail, handle_errors, human_bytes, print_json
from featurecache.cli.extract import (
    AugmentOpt,
    BackboneOpt,
    DataOpt,
    DtypeOpt,
    LayerOpt,
    LimitOpt,
    PoolingOpt,
    PrecisionOpt,
    ResizeOpt,
    SeedOpt,
    SizeOpt,
    ViewsOpt,
    WeightsOpt,
)

app = typer.Typer(help="List, inspect, verify and remove cached feature sets.", no_args_is_help=True)

RefArg = Annotated[str, typer.Argument(help="Full key, its first 12 characters, or the entry name.")]


@app.command("ls")
@handle_errors
def ls_cmd(cache: CacheOpt = None, json_out: JsonOpt = False) -> None:
    """List cache entries: name, key, backbone, splits, size, complete or not."""
    from featurecache.cache import store

    root = store.resolve_cache_dir(cache)
    entries = list(store.iter_entries(root))
    rows = [{**e.summary(), "size_bytes": e.size_bytes()} for e in entries]
    if json_out:
        print_json(rows)
        return
    if not rows:
        typer.echo(f"no feature sets in {root}")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("key", "backbone", "splits", "size", "complete", title=str(root))
    table.add_column("name", overflow="fold")  # the name is what users copy: never truncate it
    for r in rows:
        splits = " ".join(f"{s}:{d['n']}" + (f"x{d['views']}" if d["views"] > 1 else "") for s, d in r["splits"].items())
        table.add_row(r["key"][:12], r["backbone"], splits, human_bytes(r["size_bytes"]), "yes" if r["complete"] else "[red]no[/red]", r["name"])
    Console().print(table)


@app.command("info")
@handle_errors
def info_cmd(ref: RefArg, cache: CacheOpt = None, json_out: JsonOpt = False) -> None:
    """Show the full spec of one entry."""
    from featurecache.cache import store

    fs = store.find_entry(ref, cache_dir=cache)
    doc = {
        **fs.summary(),
        "path": str(fs.path),
        "spec": fs.spec,
        "classes": fs.classes,
        "versions": fs.attrs.get("versions", {}),
        "dataset_source": fs.attrs.get("dataset_source"),
        "missing_units": len(fs.missing_units()),
        "invalid_images": len(fs.failures()),
        "size_bytes": fs.size_bytes(),
    }
    if json_out:
        print_json(doc)
        return
    for k, v in doc.items():
        if isinstance(v, dict):
            typer.echo(f"{k}:")
            for kk, vv in v.items():
                typer.echo(f"  {kk}: {vv}")
        else:
            typer.echo(f"{k}: {v}")


@app.command("failures")
@handle_errors
def failures_cmd(ref: RefArg, cache: CacheOpt = None, json_out: JsonOpt = False) -> None:
    """List the images of an entry that could not be decoded, with the reason."""
    from featurecache.cache import store

    fs = store.find_entry(ref, cache_dir=cache)
    rows = fs.failures()
    if json_out:
        print_json(rows)
        return
    for r in rows:
        typer.echo(f"{r['split']}\t{r['id']}\t{r['reason']}")
    typer.echo(f"{len(rows)} invalid images", err=True)


@app.command("rm")
@handle_errors
def rm_cmd(
    ref: RefArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be removed.")] = False,
    cache: CacheOpt = None,
) -> None:
    """Remove one entry."""
    from featurecache.cache import store

    fs = store.find_entry(ref, cache_dir=cache)
    size = human_bytes(fs.size_bytes())
    if dry_run:
        typer.echo(f"would remove {fs.name} ({size})")
        return
    if not yes and not typer.confirm(f"remove {fs.name} ({size})?", default=False):
        raise typer.Exit(1)
    store.remove_entry(fs)
    typer.echo(f"removed {fs.name} ({size})")


@app.command("verify")
@handle_errors
def verify_cmd(
    ref: RefArg,
    sample: Annotated[int, typer.Option("--sample", help="Feature vectors to recompute from the images (0: checksums and structure only).")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample draw.")] = 0,
    data: Annotated[str | None, typer.Option("--data", "-d", help="The images, if they moved since extraction.", show_default=False)] = None,
    weights: Annotated[str | None, typer.Option("--weights", "-w", help="The weights, if the file moved since extraction.", show_default=False)] = None,
    rtol: Annotated[float | None, typer.Option("--rtol", help="Allowed difference relative to a vector's largest value (default: 1e-4, float16: 2e-3).", show_default=False)] = None,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Check an entry: every unit complete, spec hashes to the key, every chunk's checksum, a recomputed sample."""
    from featurecache.cache.maintenance import verify

    report = verify(ref, sample=sample, seed=seed, data=data, weights=weights, rtol=rtol, cache_dir=cache)
    if json_out:
        print_json(report.to_json())
    else:
        diff = "" if report.max_abs_diff is None else f", max abs diff {report.max_abs_diff:.3g}"
        typer.echo(f"{report.name}: {report.units_checked} units read back, {report.sampled} vectors recomputed{diff}")
        for problem in report.problems:
            typer.echo(f"  problem: {problem}", err=True)
    if not report.ok:
        n = len(report.problems)
        raise fail(f"{report.name} failed verification with {n} problem{'' if n == 1 else 's'} (listed above)")
    if not json_out:
        typer.echo(f"ok {report.name}")


@app.command("gc")
@handle_errors
def gc_cmd(
    older_than: Annotated[str, typer.Option("--older-than", help="Only incomplete entries and temp files untouched this long: 90s, 30m, 24h, 7d.")] = "24h",
    dry_run: Annotated[bool, typer.Option("--dry-run/--yes", help="Only list what would be removed (default), or remove it.")] = True,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove incomplete entries nobody works on, stale leases and temporary files (dry run unless --yes)."""
    from featurecache.cache.maintenance import gc

    report = gc(older_than=older_than, dry_run=dry_run, cache_dir=cache)
    if json_out:
        print_json(report.to_json())
        return
    verb = "would remove" if dry_run else "removed"
    for item in report.items:
        typer.echo(f"{verb} {item.kind} {item.path} ({human_bytes(item.size_bytes)}): {item.reason}")
    tail = "; pass --yes to remove" if dry_run and report.items else ""
    typer.echo(f"{verb} {len(report.items)} items, {human_bytes(report.size_bytes)} in {report.cache_dir}{tail}", err=True)


@app.command("explain")
@handle_errors
def explain_cmd(
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
    limit: LimitOpt = None,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Given extract options, say whether they hit the cache, else which key fields differ from the nearest entry."""
    from featurecache.cache.maintenance import explain

    report = explain(
        data, backbone=backbone, weights=weights, size=size, layer=layer, pooling=pooling, resize=resize, augment=augment,
        views=views, augment_splits=csv_items(augment_splits), seed=seed,
        dtype=dtype, precision=precision, limit=limit, cache_dir=cache,
    )
    if json_out:
        print_json(report.to_json())
    else:
        typer.echo(report.message)
