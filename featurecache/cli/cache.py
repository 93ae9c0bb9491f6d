"""``featurecache cache ...``: list, inspect and remove cache entries."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from featurecache.cli._common import (
    CacheOpt,
    JsonOpt,
    PlainHelpGroup,
    cache_flag,
    fail,
    handle_errors,
    human_bytes,
    print_json,
)
from featurecache.cli.extract_opts import DataOpt, LimitOpt, extract_options
from featurecache.extraction.options import ExtractOptions

app = typer.Typer(
    help="List, inspect, verify and remove cached feature sets.",
    no_args_is_help=True,
    rich_markup_mode=None,
    cls=PlainHelpGroup,
)

RefArg = Annotated[str, typer.Argument(help="Full key, its first 12 characters, or the entry name.")]


@app.command("ls")
@handle_errors
def ls_cmd(cache: CacheOpt = None, json_out: JsonOpt = False) -> None:
    """List feature stores (spec, rows, size) and the feature sets (dataset views) over each."""
    from featurecache.cache import store, views
    from featurecache.cache.migrate import legacy_entries

    root = store.resolve_cache_dir(cache)
    stores, damaged = [], []
    for st in store.iter_stores(root):
        if isinstance(st, store.FeatureStore):
            stores.append({**st.summary(), "size_bytes": st.size_bytes()})
        else:
            damaged.append(str(st))
    entries = [{**e.summary(), "size_bytes": e.size_bytes()} for e in views.iter_entries(root)]
    damaged += [str(p) for p in views.damaged_entries(root)]
    legacy = [str(p) for p in legacy_entries(root)]
    if json_out:
        print_json({"stores": stores, "views": entries, "damaged": damaged, "legacy": legacy})
        return
    if not stores and not entries and not damaged and not legacy:
        typer.echo(f"no feature sets in {root}")
        return
    import functools

    from featurecache._runtime.tables import console, fit_last_column

    out = console()
    for s in stores:
        members = [r for r in entries if r["store"] == s["name"]]
        out.print(
            fit_last_column(
                functools.partial(_store_table, s, members), [r["name"] for r in members], optional=("key",)
            )
        )
    for path in damaged:
        typer.echo(
            f"damaged: {path} (remove it with `featurecache cache rm {Path(path).name} --yes{cache_flag(cache)}`)"
        )
    if legacy:
        typer.echo(
            f"{len(legacy)} entries in the old format 1: convert them with `featurecache cache migrate{cache_flag(cache)}`"
        )


def _store_table(
    s: dict[str, Any], members: list[dict[str, Any]], names: Sequence[str], dropped: frozenset[str]
) -> Any:
    """The table of one feature store's feature sets in `cache ls`.

    The name is what users copy: last and whole (see featurecache._runtime.tables); the key column (a
    name ends with its key's first 12 digits) gives way first on a narrow terminal.
    """
    from rich.table import Table

    rows = " ".join(f"{v}:{n}" for v, n in s["rows"].items())
    table = Table(title=f"{s['name']}  ({rows} rows, {human_bytes(s['size_bytes'])})", title_justify="left")
    if "key" not in dropped:
        table.add_column("key", no_wrap=True)
    table.add_column("splits", no_wrap=True)
    table.add_column("size", no_wrap=True)
    table.add_column("feature set", no_wrap=True)
    for r, name in zip(members, names, strict=True):
        splits = "\n".join(
            f"{k}:{d['n']}" + (f"x{d['views']}" if d["views"] > 1 else "") for k, d in r["splits"].items()
        )
        table.add_row(*([] if "key" in dropped else [r["key"][:12]]), splits, human_bytes(r["size_bytes"]), name)
    return table


@app.command("info")
@handle_errors
def info_cmd(ref: RefArg, cache: CacheOpt = None, json_out: JsonOpt = False) -> None:
    """Show the full spec of one feature set (or feature store)."""
    from featurecache.cache import maintenance, store

    target = maintenance.find_target(ref, cache_dir=store.resolve_cache_dir(cache))
    doc = {**target.summary(), "path": str(target.path), "spec": target.spec, "size_bytes": target.size_bytes()}
    if not isinstance(target, store.FeatureStore):
        doc.update(
            {
                "classes": target.classes,
                "versions": target.attrs.get("versions", {}),
                "dataset_source": target.attrs.get("dataset_source"),
                "invalid_images": len(target.failures()),
            }
        )
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
    """List the images of a feature set that could not be decoded, with the reason."""
    from featurecache.cache import views

    fs = views.find_entry(ref, cache_dir=cache)
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
    """Remove a feature set (its rows stay for other feature sets until `cache gc`), a whole feature store, or a damaged entry."""
    from featurecache.cache import removal

    plan = removal.plan_removal(ref, cache_dir=cache)
    if dry_run:
        typer.echo(f"would remove {plan.what} ({human_bytes(plan.size_bytes)})")
        return
    if not yes and not typer.confirm(f"remove {plan.what} ({human_bytes(plan.size_bytes)})?", default=False):
        raise typer.Exit(1)
    freed = removal.remove(plan)
    typer.echo(f"removed {plan.what} ({human_bytes(freed)} freed){plan.note}")


@app.command("verify")
@handle_errors
def verify_cmd(
    ref: RefArg,
    sample: Annotated[
        int,
        typer.Option(
            "--sample", min=0, help="Feature vectors to recompute from the images (0: checksums and structure only)."
        ),
    ] = 8,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the sample draw.")] = 0,
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="The images, if they moved since extraction.", show_default=False)
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option("--weights", "-w", help="The weights, if the file moved since extraction.", show_default=False),
    ] = None,
    rtol: Annotated[
        float | None,
        typer.Option(
            "--rtol",
            help="Allowed difference relative to a vector's largest value (default: 1e-4, float16: 2e-3).",
            show_default=False,
        ),
    ] = None,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Remove damaged units and the feature sets that read them (or whose metadata were edited) and restore edited store specs, so the next extract recomputes exactly those images.",
        ),
    ] = False,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Check a feature set or store: manifest, every unit's bytes against its marker, a recomputed sample."""
    from featurecache.extraction.audit import verify

    report = verify(
        ref, sample=sample, seed=seed, data=data, weights=weights, rtol=rtol, repair=repair, cache_dir=cache
    )
    if json_out:
        print_json(report.to_json())
    else:
        diff = "" if report.max_abs_diff is None else f", max abs diff {report.max_abs_diff:.3g}"
        typer.echo(f"{report.name}: {report.units_checked} units read back, {report.sampled} vectors recomputed{diff}")
        for problem in report.problems:
            typer.echo(f"  problem: {problem}", err=True)
        for line in report.repaired:
            typer.echo(f"  repaired: {line}", err=True)
    if not report.ok:
        n = len(report.left)
        hint = (
            ""
            if repair
            else f"; `featurecache cache verify {ref} --repair{cache_flag(cache)}` drops the damaged units so the next extract recomputes them"
        )
        left = " left" if report.repaired else ""
        raise fail(
            f"{report.name} failed verification with {n} problem{'' if n == 1 else 's'}{left} (listed above){hint}"
        )
    if not json_out:
        n = len(report.problems)
        removed = any(line.startswith("removed") for line in report.repaired)
        rebuild = "; run the same extract command to rebuild what was removed (listed above)" if removed else ""
        typer.echo(
            f"ok {report.name}: repaired {n} problem{'' if n == 1 else 's'}{rebuild}" if n else f"ok {report.name}"
        )


@app.command("migrate")
@handle_errors
def migrate_cmd(
    data: Annotated[
        str | None,
        typer.Option(
            "--data", "-d", help="The images, if they moved since the old entries were made.", show_default=False
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be converted.")] = False,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Convert format-1 entries into feature-store rows and feature sets, without running the backbone."""
    from featurecache.cache.migrate import migrate

    results = migrate(cache_dir=cache, data=data, dry_run=dry_run)
    if json_out:
        print_json([{"entry": str(r.entry), "view": r.view, "rows": r.rows, "note": r.note} for r in results])
        return
    for r in results:
        typer.echo(f"{r.entry.name}: {r.note}" + (f" -> {r.view}" if r.view else ""))
    typer.echo(f"{len(results)} format-1 entries", err=True)


@app.command("gc")
@handle_errors
def gc_cmd(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than", help="Only incomplete entries and temp files untouched this long: 90s, 30m, 24h, 7d."
        ),
    ] = "24h",
    dry_run: Annotated[
        bool, typer.Option("--dry-run/--yes", help="Only list what would be removed (default), or remove it.")
    ] = True,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove rows no feature set uses, torn entries, stale leases and temporary files (dry run unless --yes)."""
    from featurecache.cache.maintenance import gc

    report = gc(older_than=older_than, dry_run=dry_run, cache_dir=cache)
    if json_out:
        print_json(report.to_json())
        return
    verb = "would remove" if dry_run else "removed"
    for item in report.items:
        typer.echo(f"{verb} {item.kind} {item.path} ({human_bytes(item.size_bytes)}): {item.reason}")
    tail = "; pass --yes to remove" if dry_run and report.items else ""
    typer.echo(
        f"{verb} {len(report.items)} items, {human_bytes(report.size_bytes)} in {report.cache_dir}{tail}", err=True
    )


@app.command("explain")
@handle_errors
@extract_options()
def explain_cmd(
    *,
    data: DataOpt = "builtin:digits",
    options: ExtractOptions,
    limit: LimitOpt = None,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Given extract options, say whether they hit the cache, how many images are new and reused, or which spec fields differ."""
    from featurecache.extraction.audit import explain

    report = explain(data, options, limit=limit, cache_dir=cache)
    if json_out:
        print_json(report.to_json())
    else:
        typer.echo(report.message)
