"""One self-contained ``report.html`` per run and per sweep, rendered from the files beside it.

The page is built from what the directory already holds (``config.json``, ``metrics.json``,
the PNG plots, ``top_losses.json``; for a sweep ``sweep.json``, ``leaderboard.json`` and its
``best`` run), so ``featurecache report DIR`` can re-render it at any time. Everything is
inline -- PNGs as ``data:`` URIs, CSS and a few lines of plain JavaScript that sort the
tables -- and a Content-Security-Policy forbids any fetch, so the page works from a mail
attachment, offline, on a phone (viewport meta, tables scroll sideways, images shrink to the
screen). Every piece of text from the run (class names, ids, parameters) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from featurecache.errors import RunError

__all__ = ["REPORT_FILE", "render_run", "render_sweep", "write_report"]

REPORT_FILE = "report.html"

_CSS = """
:root{--fg:#1b1f24;--muted:#57606a;--line:#d0d7de;--bg:#fff;--accent:#0969da;--bad:#b42318}
*{box-sizing:border-box}body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:var(--fg);
background:var(--bg);margin:0 auto;padding:12px;max-width:1100px}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em;margin:1.4em 0 .4em;border-bottom:1px solid var(--line)}
.muted{color:var(--muted)}code,pre{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace}
pre{background:#f6f8fa;padding:8px;overflow:auto;max-height:420px}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;margin:.3em 0;font-size:13px}th,td{border:1px solid var(--line);padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f6f8fa}td.t,th.t{text-align:left}table.sortable th{cursor:pointer;user-select:none}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
img{max-width:100%;height:auto;display:block;margin:.4em 0;border:1px solid var(--line)}
.bad{color:var(--bad)}.note{background:#fff8c5;border:1px solid #d4a72c;padding:6px 10px}
details{margin:.4em 0}summary{cursor:pointer;color:var(--accent)}
@media (max-width:600px){body{padding:6px;font-size:14px}th,td{padding:2px 4px}}
"""

# Sort by clicking a header (or open the page with #sort=COLUMN[-desc]); numbers sort
# numerically (data-v holds the raw value).
# It marks the page ready (data-ready, row and image counts) once it has run, for tests.
_JS = r"""
(function(){
function val(td){var v=td.getAttribute('data-v');if(v===null)v=td.textContent;var n=parseFloat(v);
return (v!==''&&isFinite(n))?n:v.toLowerCase();}
function sortBy(table,col,th){var body=table.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
var asc=th.getAttribute('aria-sort')!=='ascending';
Array.prototype.forEach.call(table.tHead.rows[0].cells,function(c){c.removeAttribute('aria-sort');});
th.setAttribute('aria-sort',asc?'ascending':'descending');
rows.sort(function(a,b){var x=val(a.cells[col]),y=val(b.cells[col]);
if(typeof x!==typeof y){return (typeof x==='number'?-1:1);}
return (x<y?-1:x>y?1:0)*(asc?1:-1);});
rows.forEach(function(r){body.appendChild(r);});}
var tables=document.querySelectorAll('table.sortable');
Array.prototype.forEach.call(tables,function(table){
Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
th.setAttribute('tabindex','0');th.addEventListener('click',function(){sortBy(table,i,th);});
th.addEventListener('keydown',function(e){if(e.key==='Enter'){sortBy(table,i,th);}});});});
var lb=document.getElementById('leaderboard');
// A link ending in #sort=COLUMN[-desc] opens the leaderboard sorted (COLUMN: 0-based index).
var m=/^#sort=(\d+)(-desc)?$/.exec(location.hash);
if(lb&&m){var th=lb.tHead.rows[0].cells[+m[1]];if(th){sortBy(lb,+m[1],th);if(m[2]){sortBy(lb,+m[1],th);}}}
document.body.setAttribute('data-leaderboard-rows',lb?String(lb.tBodies[0].rows.length):'0');
document.body.setAttribute('data-images',String(document.images.length));
document.body.setAttribute('data-ready','1');
})();
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isfinite(value):
        tiny_or_huge = value != 0 and not 1e-3 <= abs(value) < 1e4
        return f"{value:.{digits}g}" if tiny_or_huge else f"{value:.{digits}f}"
    return str(value)


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}" loading="lazy">'


def _table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    sortable: bool = False,
    table_id: str = "",
    text_cols: int = 1,
) -> str:
    """An escaped HTML table; cells are values (formatted) or ``(shown, sort value)`` pairs."""
    attrs = (' class="sortable"' if sortable else "") + (f' id="{_e(table_id)}"' if table_id else "")
    head = "".join(
        f'<th class="t">{_e(h)}</th>' if i < text_cols else f"<th>{_e(h)}</th>" for i, h in enumerate(headers)
    )
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            shown, raw = cell if isinstance(cell, tuple) else (_fmt(cell), cell)
            cls = ' class="t"' if i < text_cols else ""
            v = (
                ""
                if raw is None
                else (repr(float(raw)) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else str(raw))
            )
            cells.append(f'<td{cls} data-v="{_e(v)}">{_e(shown)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<div class="scroll"><table{attrs}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
    )


def _page(title: str, sections: Sequence[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(s for s in sections if s)
        + f"\n<script>{_JS}</script></body></html>\n"
    )


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


_METRIC_COLUMNS = ("n", "accuracy", "log_loss", "macro_f1", "cohen_kappa")


def _metrics_section(metrics: Mapping[str, Any]) -> str:
    if not metrics:
        return ""
    from featurecache.training.metrics import format_interval, wilson_interval

    # Top-1 accuracy is the accuracy column: listed once.
    ks = sorted({k for m in metrics.values() for k in (m.get("top_k_accuracy") or {}) if k != "1"}, key=int)
    headers = ["split", *_METRIC_COLUMNS, *(f"top-{k} accuracy" for k in ks)]
    headers.insert(headers.index("accuracy") + 1, "accuracy 95% CI")
    rows = []
    for split, m in metrics.items():
        span = (
            wilson_interval(m["accuracy"], m["n"])
            if isinstance(m.get("n"), int) and isinstance(m.get("accuracy"), float)
            else None
        )
        cells = [split, *(m.get(c) for c in _METRIC_COLUMNS), *((m.get("top_k_accuracy") or {}).get(k) for k in ks)]
        cells.insert(headers.index("accuracy") + 1, (format_interval(span, 4), span[0] if span else None))
        rows.append(cells)
    note = '<p class="muted">CI: 95% Wilson interval of the accuracy on the split\'s n images.</p>'
    return "<h2>Metrics</h2>" + _table(headers, rows) + note


def _confusion_section(run: Path, metrics: Mapping[str, Any], classes: Sequence[str]) -> str:
    parts = []
    for split, m in metrics.items():
        cm = m.get("confusion_matrix")
        if not cm:
            continue
        parts.append(f"<h3>{_e(split)}</h3>" + _img(run / f"confusion_{split}.png", f"confusion matrix on {split}"))
        rows = [[classes[i] if i < len(classes) else i, *counts] for i, counts in enumerate(cm)]
        per_class = m.get("per_class") or {}
        table = _table(["true \\ predicted", *[str(c) for c in classes]], rows)
        parts.append(f"<details><summary>counts ({_e(split)})</summary>{table}</details>")
        if per_class:
            pc_rows = [
                [name, v.get("precision"), v.get("recall"), v.get("f1"), v.get("support")]
                for name, v in per_class.items()
            ]
            parts.append(
                f"<details><summary>per class ({_e(split)})</summary>{_table(['class', 'precision', 'recall', 'f1', 'support'], pc_rows, sortable=True)}</details>"
            )
    return "<h2>Confusion matrix</h2>" + "".join(parts) if parts else ""


def _losses_section(run: Path, errors: Mapping[str, Any] | None, note: str) -> str:
    if not errors:
        return ""
    parts = ["<h2>Top losses and most confused pairs</h2>"]
    if note:
        parts.append(f'<p class="note">Images not shown: {_e(note)}</p>')
    for split, doc in errors.items():
        rows = doc.get("top_losses") or []
        parts.append(f"<h3>{_e(split)}: {len(rows)} highest losses of {_e(doc.get('n', '?'))}</h3>")
        parts.append(_img(run / f"top_losses_{split}.png", f"top losses on {split}"))
        table_rows = [[r["id"], r["true"], r["predicted"], r["p_predicted"], r["p_true"], r["loss"]] for r in rows]
        parts.append(
            f"<details><summary>table ({_e(split)})</summary>{_table(['id', 'true', 'predicted', 'p(predicted)', 'p(true)', 'loss'], table_rows, sortable=True, text_cols=3)}</details>"
        )
        pairs = doc.get("most_confused") or []
        if pairs:
            parts.append(f"<h4>most confused pairs ({_e(split)})</h4>")
            parts.append(
                _table(
                    ["true", "predicted as", "count", "rate"],
                    [[p["true"], p["predicted"], p["count"], p["rate"]] for p in pairs[:20]],
                    sortable=True,
                    text_cols=2,
                )
            )
    return "".join(parts)


def _features_section(config: Mapping[str, Any]) -> str:
    features = config.get("features") or {}
    if not features:
        return ""
    rows = [
        ["name", features.get("name")],
        ["key", features.get("key")],
        ["dataset", features.get("dataset_source")],
        ["limit", features.get("dataset_limit")],
    ]
    spec = json.dumps(features.get("spec") or {}, indent=2, sort_keys=True)
    return (
        "<h2>Features</h2>"
        + _table(["", ""], rows, text_cols=2)
        + f"<details><summary>full spec</summary><pre>{_e(spec)}</pre></details>"
    )


def _params_section(config: Mapping[str, Any]) -> str:
    params = config.get("params") or {}
    rows = [[k, json.dumps(v) if not isinstance(v, str) else v] for k, v in params.items()]
    text = f"<h2>Head: {_e(config.get('head', '?'))}</h2>" + (
        _table(["parameter", "value"], rows, text_cols=2) if rows else ""
    )
    extra = {
        k: config[k]
        for k in (
            "validation",
            "invalid_skipped",
            "sweep",
            "equivalence",
            "unfreeze",
            "trainable",
            "training",
            "history",
            "dataset",
        )
        if k in config
    }
    if extra:
        text += f"<details><summary>run details</summary><pre>{_e(json.dumps(extra, indent=2, default=str))}</pre></details>"
    return text


def render_run(run_dir: str | os.PathLike[str], *, note: str = "", title: str | None = None, level: int = 1) -> str:
    """The HTML of a run, sweep-best, fine-tune or evaluate directory, from its files.

    Parameters
    ----------
    run_dir
        The directory.
    note
        Shown above the top-loss grids (why images are missing).
    title
        Page heading; default from the directory and head.
    level
        1 for a page, 2 when embedded in a sweep page (no ``<html>`` wrapper).

    Returns
    -------
    str
        A whole page (``level=1``) or a fragment.

    Raises
    ------
    RunError
        The directory has neither ``config.json`` nor ``metrics.json``.
    """
    run = Path(run_dir)
    config = _read_json(run / "config.json") or {}
    metrics = _read_json(run / "metrics.json") or {}
    if not config and not metrics:
        raise RunError(
            f"{run} has neither config.json nor metrics.json; point to a run, sweep, finetune or evaluate directory"
        )
    classes = [
        str(c) for c in config.get("classes") or next((list(m.get("per_class") or {}) for m in metrics.values()), [])
    ]
    kind = {"finetune": "fine-tune", "ensemble": "ensemble"}.get(
        config.get("kind", ""), "evaluation" if not config else "run"
    )
    heading = title or f"{kind} {_run_name(run)}" + (
        f" - {config.get('head')}" if config.get("head") and kind != "ensemble" else ""
    )
    subtitle = [
        str(config.get("created") or ""),
        f"{len(classes)} classes: " + ", ".join(classes[:12]) + (" ..." if len(classes) > 12 else ""),
    ]
    sections = [
        f"<h{level}>{_e(heading)}</h{level}>",
        f'<p class="muted">{" &middot; ".join(_e(part) for part in subtitle if part)}</p>',
        _metrics_section(metrics),
        _members_section(run, config),
        ("<h2>Training curves</h2>" + _img(run / "training_curves.png", "training curves"))
        if (run / "training_curves.png").is_file()
        else "",
        _confusion_section(run, metrics, classes),
        _losses_section(run, _read_json(run / "top_losses.json"), note),
        _params_section(config) if config else "",
        _features_section(config),
    ]
    return _page(heading, sections) if level == 1 else "\n".join(s for s in sections if s)


def _run_name(run: Path) -> str:
    """The directory's name as the user knows it: never the temporary one it is built in; a sweep's best run says whose."""
    from featurecache.training.runconfig import final_name

    name = final_name(run)
    parent = run.resolve().parent
    return f"{final_name(parent)}/{name}" if name == "best" and (parent / "leaderboard.json").is_file() else name


def _members_section(run: Path, config: Mapping[str, Any]) -> str:
    """An ensemble's leaderboard: the ensemble next to each member."""
    from featurecache.training.metrics import format_interval, interval, tied_with_best

    board = _read_json(run / "leaderboard.json") if config.get("kind") == "ensemble" else None
    rows = (board or {}).get("rows") or []
    if not rows:
        return ""
    metric_cols = [c for c in ("val_log_loss", "val_macro_f1", "test_accuracy") if any(c in r for r in rows)]
    # tied_with_best compares with the first row: the best one, so rank a copy by accuracy.
    order = sorted(range(len(rows)), key=lambda i: -(rows[i].get("val_accuracy") or 0.0))
    tied = dict(zip(order, tied_with_best([rows[i] for i in order]), strict=True))
    table_rows = []
    for i, r in enumerate(rows):
        span = interval(r)
        table_rows.append(
            [
                r.get("name"),
                r.get("kind"),
                r.get("val_accuracy"),
                (format_interval(span, 4), span[0] if span else None),
                "yes" if tied[i] else "",
                *(r.get(c) for c in metric_cols),
            ]
        )
    headers = ["run", "kind", "val_accuracy", "val_accuracy 95% CI", "tied with best", *metric_cols]
    note = '<p class="muted">\u201ctied with best\u201d: its 95% Wilson interval overlaps the most accurate one\'s, so the two are not distinguishable on this validation set.</p>'
    return "<h2>Ensemble and members</h2>" + note + _table(headers, table_rows, sortable=True, text_cols=2)


def _leaderboard_section(board: Mapping[str, Any]) -> str:
    from featurecache.training.metrics import format_interval, interval, tied_with_best

    rows = board.get("rows") or []
    metric = board.get("metric", "val_accuracy")
    skip = {"rank", "trial", "name", "head", "status", "params", "error", "fit_seconds", "seconds"}
    others = {k for r in rows for k in r if k not in skip and k != metric and not k.endswith("_n")}
    # The ranking metric, then the other validation metrics, then test: the order people read in,
    # before any parameter (a sweep page is read for its scores first).
    metric_cols = [metric, *sorted(others, key=lambda k: (not k.startswith("val_"), k))]
    ci_of = metric if metric.endswith("accuracy") else "val_accuracy"
    spans = [interval(r, ci_of) for r in rows]
    tied = tied_with_best(rows, metric) if metric.endswith("accuracy") else [False] * len(rows)
    ci_cols = [f"{ci_of} 95% CI", "tied with best"] if any(spans) else []
    # One column per (head, parameter): heads share names (class_weight) with other meanings.
    # A parameter every trial of its head shares says nothing about the ranking: it is listed
    # once above the table instead of as a column.
    values: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        for k, v in (r.get("params") or {}).items():
            values.setdefault((r["head"], k), set()).add(json.dumps(v, sort_keys=True))
    params = sorted(hk for hk, vs in values.items() if len(vs) > 1)
    constant = sorted(hk for hk, vs in values.items() if len(vs) == 1)
    # The interval and the tie beside the ranking metric: visible without scrolling sideways.
    headers = [
        "rank",
        "trial",
        metric_cols[0],
        *ci_cols,
        *metric_cols[1:],
        "head",
        *(f"{h}.{k}" for h, k in params),
        "status",
        "fit s",
        "error",
    ]
    table_rows = []
    for r, span, tie in zip(rows, spans, tied, strict=True):
        p = r.get("params") or {}
        rank = r.get("rank")
        cells = [
            (str(rank) if rank is not None else "-", rank if rank is not None else 1e9),  # failed trials sort last
            (r["trial"][:8], r["trial"]),
            r.get(metric),
            *([(format_interval(span, 4), span[0] if span else None), "yes" if tie else ""] if ci_cols else []),
            *(r.get(c) for c in metric_cols[1:]),
            r.get("head"),
            *(_param_text(p[k]) if h == r.get("head") and k in p else "" for h, k in params),
            r.get("status"),
            r.get("fit_seconds"),
            r.get("error") or "",
        ]
        table_rows.append(cells)
    notes = ["Click a column to sort (or open the page with #sort=N or #sort=N-desc, N = column number from 0)."]
    if ci_cols:
        n = next(r.get(f"{ci_of.split('_', 1)[0]}_n") for r, sp in zip(rows, spans, strict=True) if sp)
        notes.append(
            f"CI: 95% Wilson interval of {ci_of} on {n} images (one image moves it by {1 / n:.3g}). "
            "\u201ctied with best\u201d: the interval overlaps the best trial's, so the two are not distinguishable on this validation set."
        )
    if constant:
        same = {hk: json.loads(next(iter(values[hk]))) for hk in constant}
        shown = ", ".join(f"{h}.{k}={v if isinstance(v, str) else json.dumps(v)}" for (h, k), v in same.items())
        notes.append(f"Same in every trial of its head: {shown}.")
    text = "".join(f'<p class="muted">{_e(note)}</p>' for note in notes)
    return f"<h2>Leaderboard ({len(rows)} trials, ranked by {_e(metric)})</h2>{text}" + _table(
        headers, table_rows, sortable=True, table_id="leaderboard", text_cols=0
    )


def _param_text(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return (json.dumps(value), str(value)) if not isinstance(value, str) else (value, value)


def render_sweep(sweep_dir: str | os.PathLike[str], *, note: str = "") -> str:
    """The HTML of a sweep directory: leaderboard (every trial's parameters, sortable), plot and best run.

    ``note`` is shown above the best run's top-loss grids (why images are missing).

    Raises
    ------
    RunError
        The directory has no ``leaderboard.json``.
    """
    out = Path(sweep_dir)
    board = _read_json(out / "leaderboard.json")
    if board is None:
        raise RunError(f"{out} has no leaderboard.json; point to a directory written by `featurecache sweep`")
    meta = _read_json(out / "sweep.json") or {}
    heading = f"sweep {out.resolve().name} on {board.get('features', '?')}"
    best = out / "best"
    sections = [
        f"<h1>{_e(heading)}</h1>",
        f'<p class="muted">features key {_e(board.get("key", ""))}; validation: {_e(meta.get("validation", "?"))}; updated {_e(meta.get("updated", ""))}</p>',
        _leaderboard_section(board),
        _img(out / "leaderboard.png", "leaderboard"),
        (
            "<h2>Best run</h2>"
            + render_run(best, note=note, title=f"best: {(meta.get('best') or {}).get('label', '')}", level=2)
        )
        if (best / "config.json").is_file()
        else "",
        f"<details><summary>request</summary><pre>{_e(json.dumps(meta.get('request', {}), indent=2))}</pre></details>"
        if meta
        else "",
    ]
    return _page(heading, sections)


def write_report(
    path: str | os.PathLike[str],
    *,
    top: int | None = None,
    splits: Sequence[str] | None = None,
    data: str | None = None,
    limit: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    analyse: bool = True,
    strict: bool = False,
    images: Mapping[str, Any] | None = None,
) -> Path:
    """(Re)write ``report.html`` in a run, fine-tune, evaluate or sweep directory.

    Parameters
    ----------
    path
        The directory; a sweep is recognised by its ``leaderboard.json``.
    top
        Top-loss images per split (default 16).
    splits
        Splits for the top-loss grids (default every split with predictions).
    data, limit, cache_dir
        Where the images are (default what the run records), see
        :func:`featurecache.report.top_losses`.
    analyse
        Recompute the top losses and confused pairs first (for a sweep: of its best run).
    strict
        Fail when the images cannot be loaded, instead of a page that says why they are missing.
    images
        Per split, the images already at hand (a ``SplitImages``; ``evaluate`` passes them).

    Returns
    -------
    pathlib.Path
        The ``report.html`` written.

    Raises
    ------
    RunError
        Not a run or sweep directory (or, with ``strict``, the images are not found).
    """
    from featurecache.report.losses import DEFAULT_TOP, analyse_run

    target = Path(path)
    if not target.is_dir():
        raise RunError(f"{target} is not a directory; pass a run, finetune, evaluate or sweep directory")
    # An ensemble's directory has a leaderboard.json too (its members), but it is a run.
    sweep = (target / "leaderboard.json").is_file() and not (target / "config.json").is_file()
    run = target / "best" if sweep else target
    note = ""
    has_predictions = (run / "predictions.npz").is_file() or any(run.glob("predictions_*.npz"))
    # An evaluate directory records no dataset: its grids are drawn by evaluate, with its images.
    knows_images = images is not None or (run / "config.json").is_file()
    if analyse and has_predictions and knows_images:
        result = analyse_run(
            run,
            n=top or DEFAULT_TOP,
            splits=splits,
            data=data,
            limit=limit,
            cache_dir=cache_dir,
            strict=strict,
            images=images,
        )
        note = result.note
        if sweep:
            _write_text(run / REPORT_FILE, render_run(run, note=note))
    page = render_sweep(target, note=note) if sweep else render_run(target, note=note)
    return _write_text(target / REPORT_FILE, page)


def _write_text(path: Path, text: str) -> Path:
    from featurecache.cache.fsio import write_atomic

    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
