"""``featurecache cache ...``: list, inspect and remove cache entries."""

from __future__ import annotations

from typing import Annotated

import typer

from featurecache.cli._common import CacheOpt, JsonOpt, handle_errors, human_bytes, print_json

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

    table = Table("name", "key", "backbone", "splits", "size", "complete", title=str(root))
    for r in rows:
        splits = " ".join(f"{s}:{d['n']}" + (f"x{d['views']}" if d["views"] > 1 else "") for s, d in r["splits"].items())
        table.add_row(r["name"], r["key"][:12], r["backbone"], splits, human_bytes(r["size_bytes"]), "yes" if r["complete"] else "[red]no[/red]")
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
