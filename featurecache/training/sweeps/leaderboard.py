"""The leaderboard: trial records as rows, ranked by a validation metric, written as CSV/JSON/PNG and shown as a table."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from featurecache.cache.fsio import jsonable, write_atomic, write_json
from featurecache.errors import UsageError
from featurecache.training.metrics import format_interval, interval, tied_with_best

__all__ = [
    "METRIC_COLUMNS",
    "format_interval",
    "interval",
    "leaderboard_table",
    "metric_names",
    "rank",
    "row",
    "sort_key",
    "tied_with_best",
    "write_leaderboard",
]

#: Metric columns per split, in display order (top-k columns are added per k).
METRIC_COLUMNS = ("accuracy", "log_loss", "macro_f1", "kappa")


def metric_names(top_k: Sequence[int]) -> tuple[str, ...]:
    """The validation metrics a sweep can rank by, for these top-k values."""
    return (*(f"val_{m}" for m in METRIC_COLUMNS), *(f"val_top{k}_accuracy" for k in sorted(set(top_k)) if k > 1))


def row(record: Mapping[str, Any]) -> dict[str, Any]:
    """A trial record as a flat leaderboard row (``rank`` unset)."""
    out: dict[str, Any] = {
        "rank": None,
        "trial": record["trial"],
        "name": record.get("label") or record["head"],
        "head": record["head"],
        # JSON types (lists, not tuples) whether the record is fresh or read back from disk.
        "params": jsonable(record["params"]),
        "status": record["status"],
    }
    for split in ("val", "test"):
        m = (record.get("metrics") or {}).get(split)
        if not m:
            continue
        out[f"{split}_n"] = m.get("n")  # for the accuracy's confidence interval
        out[f"{split}_accuracy"] = m["accuracy"]
        out[f"{split}_log_loss"] = m["log_loss"]
        out[f"{split}_macro_f1"] = m["macro_f1"]
        out[f"{split}_kappa"] = m["cohen_kappa"]
        for k, v in sorted(m.get("top_k_accuracy", {}).items(), key=lambda kv: int(kv[0])):
            if int(k) > 1:  # top-1 is the accuracy column
                out[f"{split}_top{k}_accuracy"] = v
    out["fit_seconds"] = record.get("fit_seconds")
    out["seconds"] = record.get("seconds")
    out["error"] = record.get("error")
    return out


def sort_key(r: Mapping[str, Any], metric: str) -> tuple[Any, ...]:
    """Order of a row on the leaderboard: best ``metric`` first (losses ascend), missing values last."""

    def value(name: str, lower_is_better: bool) -> float:
        v = r.get(name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return math.inf  # missing or undefined ranks last
        return float(v) if lower_is_better else -float(v)

    # Ties on the metric go to the better-calibrated head, then the faster one; the id
    # makes the order total, so the same results always give the same leaderboard.
    return (value(metric, "loss" in metric), value("val_log_loss", True), value("fit_seconds", True), r["trial"])


def rank(records: Sequence[Mapping[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Rows of ``records``: the successful ones ranked 1.. by ``metric``, then the failed ones (rank None)."""
    rows = [row(r) for r in records]
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: sort_key(r, metric))
    for i, r in enumerate(ok, start=1):
        r["rank"] = i
    return ok + [r for r in rows if r["status"] != "ok"]


def write_leaderboard(
    out: Path, rows: Sequence[Mapping[str, Any]], *, metric: str, key: str, name: str, plots: bool = True
) -> None:
    """Write ``leaderboard.csv``, ``leaderboard.json`` and (with ``plots``, when a trial succeeded) ``leaderboard.png`` in ``out``."""
    columns: list[str] = ["rank", "trial", "head", "name", "status"]
    for r in rows:
        columns += [c for c in r if c not in columns and c not in ("params", "error", "fit_seconds", "seconds")]
    columns += ["fit_seconds", "seconds", "error", "params"]

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({**r, "params": json.dumps(jsonable(r["params"]), sort_keys=True)})

    write_atomic(out / "leaderboard.csv", write_csv)
    write_json(out / "leaderboard.json", {"metric": metric, "key": key, "features": name, "rows": list(rows)})
    if plots and any(r["status"] == "ok" for r in rows):
        from featurecache.report import plot_leaderboard

        try:
            plot_leaderboard(rows, out / "leaderboard.png", metric=metric, top=30)
        except UsageError:
            # Every successful trial has an undefined metric (e.g. kappa on one class):
            # nothing to draw, the CSV and JSON still hold the results.
            (out / "leaderboard.png").unlink(missing_ok=True)


def leaderboard_table(
    rows: Sequence[Mapping[str, Any]],
    *,
    metric: str = "val_accuracy",
    top: int = 20,
    title: str | None = None,
    width: int | None = None,
) -> Any:
    """A rich table of the best ``top`` trials (failed trials are summarised in the caption).

    The configuration goes last, wrapped between its tokens to the terminal's width (kappa, F1,
    the trial id and the loss give way, in that order, when it would not fit otherwise); accuracy comes with its 95% Wilson
    interval, and ``*`` marks the trials whose interval overlaps the best one's.

    Parameters
    ----------
    rows
        ``SweepResult.leaderboard``.
    metric
        The ranking metric (its column is highlighted).
    top
        Number of ranked rows shown.
    title
        Table title.
    width
        Terminal width (default: the console's).

    Returns
    -------
    rich.table.Table
    """
    from rich import box
    from rich.table import Table

    from featurecache._runtime.tables import fit_last_column

    def fmt(v: Any, digits: int = 4) -> str:
        return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

    # Short headers keep the table readable in 80 columns; the caption says they are validation metrics.
    short = {
        "val_accuracy": "acc",
        "val_log_loss": "loss",
        "val_macro_f1": "F1",
        "val_kappa": "kappa",
        "test_accuracy": "test",
    }
    ranked = [r for r in rows if r.get("rank") is not None]
    failed = [r for r in rows if r.get("rank") is None]
    shown = ranked[:top]
    columns = ["val_accuracy", "val_log_loss", "val_macro_f1", "val_kappa"]
    if metric not in columns:
        columns.append(metric)
    if any("test_accuracy" in r for r in ranked):
        columns.append("test_accuracy")
    # The interval of the ranking metric when it is an accuracy, else of the validation accuracy.
    ci_of = metric if metric.endswith("accuracy") else "val_accuracy"
    spans = [interval(r, ci_of) for r in shown]
    tied = tied_with_best(ranked, metric)[: len(shown)] if metric.endswith("accuracy") else [False] * len(shown)
    caption = f"validation metrics; {min(top, len(ranked))} of {len(ranked)} trials ranked by {metric}"
    if any(s is not None for s in spans):
        n = next(r.get(f"{ci_of.split('_', 1)[0]}_n") for r, s in zip(shown, spans, strict=True) if s is not None)
        caption += f"; CI: 95% Wilson interval of {short.get(ci_of, ci_of)} on {n} images"
        if any(tied):
            caption += f"; *: {sum(tied)} trial(s) whose interval overlaps the best's (not distinguishable)"
    if failed:
        caption += f"; {len(failed)} failed (see leaderboard.csv)"

    def build(texts: Sequence[str], dropped: frozenset[str]) -> Any:
        kept = [c for c in columns if c not in dropped]
        left_out = [short.get(c, c) for c in ("trial", *columns) if c in dropped]
        note = f"; {', '.join(left_out)}: in leaderboard.csv (too wide here)" if left_out else ""
        table = Table(
            title=title,
            caption=caption + note,
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            padding=(0, 1),
            caption_justify="left",
            title_justify="left",
        )
        table.add_column("#", justify="right", no_wrap=True)
        if "trial" not in dropped:
            table.add_column("trial", no_wrap=True)
        for c in kept:
            table.add_column(
                short.get(c, c.replace("_", " ")), justify="right", no_wrap=True, style="bold" if c == metric else None
            )
            if c == ci_of and any(s is not None for s in spans):
                table.add_column("CI", justify="right", no_wrap=True)
        table.add_column("fit s", justify="right", no_wrap=True)
        table.add_column("configuration", no_wrap=True)
        for r, span, tie, text in zip(shown, spans, tied, texts, strict=True):
            cells = []
            for c in kept:
                cells.append(fmt(r.get(c), 3))
                if c == ci_of and any(s is not None for s in spans):
                    cells.append(format_interval(span, 2))
            trial = [] if "trial" in dropped else [r["trial"][:8]]
            table.add_row(str(r["rank"]) + ("*" if tie else " "), *trial, *cells, fmt(r.get("fit_seconds"), 1), text)
        return table

    return fit_last_column(
        build,
        [str(r["name"]) for r in shown],
        optional=("val_kappa", "val_macro_f1", "trial", "val_log_loss"),
        width=width,
    )
