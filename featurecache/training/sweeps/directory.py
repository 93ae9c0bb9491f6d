"""The sweep directory: its ``sweep.json``, the checks that allow resuming it, and its ``best/`` run.

``<out>/sweep.json`` records the feature-set key, the validation set, every request made of the
directory and every trial; resuming into a directory made for other features (or another
validation set) is refused. Trials an earlier call ran there with another grid stay in the
leaderboard and compete for ``best/``, a full run directory of the best head (the fitted
estimator comes back from its worker; it is refitted only when an earlier call trained it).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from featurecache.cache.fsio import jsonable
from featurecache.cache.keys import digest_of
from featurecache.errors import UsageError
from featurecache.training.runconfig import TRIAL_ID, recorded_name
from featurecache.training.sweeps.grid import TrialSpec
from featurecache.training.sweeps.records import SWEEP_FORMAT, TRIALS_DIR, read_record

__all__ = ["BEST_DIR", "check_sweep_dir", "default_sweep_dir", "earlier_trials", "keep_best", "sweep_meta"]

BEST_DIR = "best"


def check_sweep_dir(out: Path, *, fs: Any, validation: str) -> dict[str, Any] | None:
    """The existing ``sweep.json`` if ``out`` may be resumed for ``fs``, None for a new sweep.

    Raises
    ------
    UsageError
        ``out`` was made for other features or another validation set, its ``sweep.json`` is
        unreadable, or ``out`` is something other than a sweep directory.
    """
    meta_path = out / "sweep.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            raise UsageError(f"{meta_path} is unreadable; remove {out} or pass another --out") from None
        old = meta.get("features", {})
        if old.get("key") != fs.key:
            raise UsageError(
                f"sweep directory {out} was made for features {old.get('name')} (key {str(old.get('key'))[:12]}), not "
                f"{fs.name} (key {fs.key[:12]}); pass another --out, or remove {out} to start over"
            )
        if meta.get("validation") != validation:
            raise UsageError(
                f"sweep directory {out} validated on the {meta.get('validation')}, this sweep would use the "
                f"{validation}; pass the same --val-fraction and seed, or another --out"
            )
        return meta
    # A sweep killed before its first sweep.json left trials/ (and maybe temp files) only:
    # that is an interrupted start, resumed like any sweep (trial files carry their key).
    if out.exists() and (
        not out.is_dir() or any(not p.name.startswith(".") and p.name != TRIALS_DIR for p in out.iterdir())
    ):
        raise UsageError(f"{out} exists and is not a sweep directory (no sweep.json); pass a new or empty --out")
    return None


def default_sweep_dir(runs_dir: str | os.PathLike[str], key: str, planned: Sequence[TrialSpec]) -> Path:
    """``<runs_dir>/sweep-<key8>-<trials6>``: one directory per feature set and set of trials.

    The suffix digests the sorted trial ids, so re-running a command resumes its own directory
    while a sweep with another grid (or ``--trials``) gets a new one instead of replacing the
    first one's leaderboard and ``best/``.
    """
    return Path(runs_dir) / f"sweep-{key[:8]}-{digest_of({'trials': sorted(t.id for t in planned)})[:6]}"


def sweep_meta(
    meta: Mapping[str, Any] | None, *, fs: Any, validation: str, request: Mapping[str, Any], trials: Sequence[TrialSpec]
) -> dict[str, Any]:
    """``sweep.json`` for this call: the earlier calls' requests kept, this one's added, every trial listed."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "format": SWEEP_FORMAT,
        "features": {"key": fs.key, "name": fs.name},
        "validation": validation,
        "created": (meta or {}).get("created", now),
        "updated": now,
        "request": request,
        "requests": _requests(meta, dict(request)),
        "trials": [t.id for t in trials],
    }


def _requests(meta: Mapping[str, Any] | None, request: dict[str, Any]) -> list[Any]:
    """Every distinct request made of this sweep directory, oldest first (a resumed command is not repeated)."""
    earlier = list((meta or {}).get("requests") or ([meta["request"]] if meta and meta.get("request") else []))
    return earlier if jsonable(request) in earlier else [*earlier, request]


def earlier_trials(
    meta: Mapping[str, Any] | None, trials_dir: Path, key: str, planned: Sequence[TrialSpec]
) -> list[TrialSpec]:
    """Trials an earlier call recorded in this sweep directory that this call did not plan."""
    ids = {t.id for t in planned}
    out: list[TrialSpec] = []
    meta_path = trials_dir.parent / "sweep.json"
    for tid in (meta or {}).get("trials", []):
        tid = recorded_name(
            tid, TRIAL_ID, source=meta_path, fix="remove that entry of its trials list, or pass another --out"
        )
        if tid in ids:
            continue
        record = read_record(trials_dir / f"{tid}.json", key)
        if record is not None:
            out.append(TrialSpec(record["head"], record["params"], record.get("given") or {}))
            ids.add(tid)
    return out


def _save_best(
    out: Path,
    *,
    row: Mapping[str, Any],
    trial: TrialSpec,
    estimator: Any,
    preds: Any,
    record: Mapping[str, Any],
    data: Any,
    metric: str,
    plots: bool = True,
) -> Path:
    """Write the best head as ``<out>/best`` (``write_run`` builds it aside, then swaps it in)."""
    from featurecache.training.rundir import write_run

    return write_run(
        out / BEST_DIR,
        estimator=estimator,
        head=trial.head,
        params=trial.params,
        data=data,
        metrics=record["metrics"],
        predictions=preds,
        seconds=float(record.get("fit_seconds") or 0.0),
        extra={
            "sweep": {
                "dir": str(out),
                "trial": trial.id,
                "label": trial.label,
                "metric": metric,
                "value": row.get(metric),
            }
        },
        plots=plots,
    )


def _best_is_saved(out: Path, trial_id: str, key: str) -> bool:
    try:
        config = json.loads((out / BEST_DIR / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        config.get("sweep", {}).get("trial") == trial_id
        and config.get("features", {}).get("key") == key
        and (out / BEST_DIR / "head.json").is_file()
    )


def keep_best(
    out_dir: Path,
    *,
    row: Mapping[str, Any],
    trial: TrialSpec,
    record: Mapping[str, Any],
    session_best: tuple[tuple[Any, ...], str, Any, Any] | None,
    data: Any,
    fs: Any,
    metric: str,
    top_k: Sequence[int],
    val_fraction: float,
    seed: int,
    plots: bool = True,
) -> None:
    """Write ``<out>/best`` for the best trial unless it is there already (refitting it if an earlier call ran it)."""
    if session_best is not None and session_best[1] == trial.id:
        _, _, estimator, preds = session_best
        _save_best(
            out_dir,
            row=row,
            trial=trial,
            estimator=estimator,
            preds=preds,
            record=record,
            data=data,
            metric=metric,
            plots=plots,
        )
    elif not _best_is_saved(out_dir, trial.id, fs.key):
        # The best trial ran in an earlier, interrupted call (or on a worker that died after
        # writing its record): its head was not kept, refit it.
        from featurecache.training.heads import make_head
        from featurecache.training.train import evaluate_arrays, fit_head, load_training_data

        if data is None:
            data = load_training_data(fs, val_fraction=val_fraction, seed=seed)
        t0 = time.perf_counter()
        estimator = fit_head(make_head(trial.head, trial.params), data)
        fit_seconds = time.perf_counter() - t0
        metrics, preds = evaluate_arrays(estimator, data, top_k=top_k)
        refit = {**record, "metrics": metrics, "fit_seconds": fit_seconds}
        _save_best(
            out_dir,
            row=row,
            trial=trial,
            estimator=estimator,
            preds=preds,
            record=refit,
            data=data,
            metric=metric,
            plots=plots,
        )
