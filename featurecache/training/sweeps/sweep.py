"""Stage 2 at scale: grid or random search over heads on one cached feature set (the public :func:`sweep`).

How it works. A sweep turns ``--grid`` strings and ``--trials N`` into a list of *trials*
(:mod:`featurecache.sweeps.grid`: a head and its coerced parameters, identified by a digest of
both), reads the features once (:func:`featurecache.train.load_training_data`) and runs the
trials whose result file is missing or failed (:mod:`featurecache.sweeps.execute`, through
joblib, on process workers or a Dask cluster; :mod:`featurecache.sweeps.records`). At the end
the trials are ranked by ``metric`` (losses ascend) and written as ``leaderboard.csv`` /
``leaderboard.json`` / ``leaderboard.png`` (:mod:`featurecache.sweeps.leaderboard`), and the
best head is saved as a full run directory ``<out>/best``
(:mod:`featurecache.sweeps.directory`, which also owns ``sweep.json`` and the resume checks).

The names the rest of the package and its users import (``sweep``, ``SweepResult``,
``TrialSpec``, ``parse_grid``, ``plan_trials``, ``plan_work``, ``leaderboard_table``,
``default_sweep_dir``, ``sweep_tf_threads``) are importable from here.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featurecache._runtime.options import expands
from featurecache._runtime.progress import ProgressBar
from featurecache.cache import views
from featurecache.cache.concat import ConcatFeatures  # at run time: the pipeline type check reads sweep's hints
from featurecache.cache.fsio import write_json  # atomic, unique temp name per writer
from featurecache.errors import SweepError
from featurecache.training.options import SweepOptions
from featurecache.training.rundir import clean_leftovers
from featurecache.training.sweeps.directory import (
    BEST_DIR,
    check_sweep_dir,
    default_sweep_dir,
    earlier_trials,
    keep_best,
    sweep_meta,
)
from featurecache.training.sweeps.execute import (
    MAX_GROUP,
    TF_THREADS_ENV,
    TrialContext,
    plan_work,
    run_pending,
    shared_arrays,
    sweep_tf_threads,
)
from featurecache.training.sweeps.grid import TrialSpec, parse_grid, plan_trials
from featurecache.training.sweeps.leaderboard import leaderboard_table, rank, write_leaderboard
from featurecache.training.sweeps.records import SWEEP_FORMAT, TRIALS_DIR, finished_records

__all__ = [
    "BEST_DIR",
    "MAX_GROUP",
    "SWEEP_FORMAT",
    "TF_THREADS_ENV",
    "TRIALS_DIR",
    "SweepResult",
    "TrialSpec",
    "default_sweep_dir",
    "leaderboard_table",
    "parse_grid",
    "plan_trials",
    "plan_work",
    "sweep",
    "sweep_tf_threads",
]


@dataclass(frozen=True)
class SweepResult:
    """What :func:`sweep` produced.

    ``rounds`` counts the rounds this call ran its trials in (more than one when a worker died
    and its unfinished trials ran again); ``lost_tasks`` the work items lost with a dead worker.
    """

    out_dir: Path
    leaderboard: list[dict[str, Any]] = field(repr=False)
    best_run: Path
    seconds: float
    skipped: int
    metric: str = "val_accuracy"
    key: str = ""
    failed: int = 0
    rounds: int = 0
    lost_tasks: int = 0

    @property
    def best(self) -> dict[str, Any]:
        """The leaderboard row of the best trial."""
        return self.leaderboard[0]

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "out_dir": str(self.out_dir),
            "best_run": str(self.best_run),
            "metric": self.metric,
            "key": self.key,
            "best": self.best,
            "trials": len(self.leaderboard),
            "skipped": self.skipped,
            "failed": self.failed,
            "rounds": self.rounds,
            "lost_tasks": self.lost_tasks,
            "seconds": round(self.seconds, 3),
            "leaderboard": self.leaderboard,
        }


@expands(SweepOptions)
def sweep(
    features: str | Sequence[str] | views.FeatureSet | ConcatFeatures,
    options: SweepOptions | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> SweepResult:
    """Train many heads on one cached feature set, rank them, save the best as a run.

    Parameters
    ----------
    features
        Key, key prefix, entry name, or an open :class:`FeatureSet`; several (``"KEY1,KEY2"``)
        are concatenated (:mod:`featurecache.concat`).
    options
        A :class:`~featurecache.training.options.SweepOptions` holding the options below from
        ``grid`` to ``tensorboard`` (default: all defaults). Each of them may also be passed as
        a keyword, which wins over ``options``.
    grid
        Grid strings, e.g. ``"logreg:C=0.01,0.1,1,10"`` or
        ``"dense:hidden=256,512-128;dropout=0.2,0.5;lr=1e-3,1e-4"`` (see :func:`parse_grid`).
    trials
        Random configurations per head of ``heads``, drawn from each head's search space.
    heads
        Heads for ``trials`` (or one default trial each when ``grid`` and ``trials`` are empty).
    n_jobs
        Parallel trials (joblib, process workers; ``-1`` = all cores; 1 = in this process).
    out
        Sweep directory; default ``<runs_dir>/sweep-<key8>-<trials6>`` (:func:`default_sweep_dir`:
        another grid gets another directory). An existing sweep directory for the same features
        is resumed; trials an earlier call ran there with another grid are kept, ranked with
        this call's and compete for ``best/``.
    runs_dir
        Parent of the default ``out``.
    val_fraction, seed
        Validation hold-out when the features have no ``val`` split; ``seed`` also seeds the
        random draws.
    metric
        Ranking metric: ``val_accuracy`` (default), ``val_log_loss``, ``val_macro_f1``,
        ``val_kappa`` or ``val_top<k>_accuracy``; metrics named ``*loss`` rank lowest first.
    cache_dir
        Cache root.
    together
        Train dense trials that see the same batches (same ``batch_size``, ``seed``,
        ``class_weight``, ``pool``) together, in one pass over the features per group
        (:mod:`featurecache.heads.dense_group`; each head's result is what it would be alone).
        ``False``: one trial at a time.
    progress
        Progress bar over trials on stderr.
    tensorboard
        Also write TensorBoard logs there: one HParams session per trial (head, parameters,
        final metrics) and the curves of the dense trials trained in this call
        (:mod:`featurecache.report.tensorboard`).
    plots
        Write the PNG plots (leaderboard, the best run's) and ``report.html``.

    Returns
    -------
    SweepResult
        Ranked rows (successful trials by rank, then failed ones), the best run directory,
        the number of trials reused from an earlier run (``skipped``) and of failed ones.

    Raises
    ------
    UsageError, UnknownHeadError, HeadParamError
        Bad grid, head, parameter, metric, ``n_jobs``, or an ``out`` made for other features.
    EntryNotFoundError, IncompleteEntryError
        The features are not (completely) in the cache.
    SweepError
        Every trial failed, or workers kept dying for :data:`~featurecache.sweeps.execute.MAX_ROUNDS`
        rounds (a round that loses a worker is followed by one over its unfinished trials; the
        finished trials are kept: run again).
    """
    from featurecache.training.train import load_training_data, resolve_features, validation_label

    o = SweepOptions.merge(options, overrides)  # every value checked before any work
    grid, trials, heads, seed, metric, val_fraction, plots = (
        o.grid,
        o.trials,
        list(o.heads),
        o.seed,
        o.metric,
        o.val_fraction,
        o.plots,
    )
    started = time.perf_counter()
    top_k = SweepOptions.TOP_K
    planned = plan_trials(grid=grid, trials=trials, heads=heads, seed=seed)
    fs = resolve_features(features, cache_dir=cache_dir)
    out_dir = Path(o.out) if o.out is not None else default_sweep_dir(o.runs_dir, fs.key, planned)
    validation = validation_label(fs, val_fraction=val_fraction, seed=seed)
    request = {"grid": list(grid), "trials": trials, "heads": heads, "seed": seed, "metric": metric}
    every, meta = _open_sweep_dir(out_dir, fs=fs, validation=validation, request=request, planned=planned)
    trials_dir = out_dir / TRIALS_DIR

    records = finished_records(every, trials_dir, fs.key)
    pending = [t for t in planned if t.id not in records]
    skipped = len(records) - (len(every) - len(planned))  # earlier calls' trials are not this call's skips
    data = None
    histories: dict[str, Any] = {}  # curves of the dense trials of this call, for TensorBoard
    session_best = None  # (sort key, id, estimator, preds) of the best trial trained in this call
    stats: dict[str, Any] = {"rounds": 0, "lost_tasks": 0}
    if pending:
        data = shared_arrays(load_training_data(fs, val_fraction=val_fraction, seed=seed))
        # The same TensorFlow and BLAS threads in every process, whatever the number of workers, so
        # results do not depend on --jobs (train.fit_head and evaluate_arrays set the BLAS threads).
        ctx = TrialContext(os.path.abspath(trials_dir), os.getpid(), top_k, sweep_tf_threads(), call=uuid.uuid4().hex)
        session_best = run_pending(
            pending,
            data,
            ctx,
            key=fs.key,
            records=records,
            histories=histories,
            metric=metric,
            n_jobs=o.n_jobs,
            together=o.together,
            bar=ProgressBar(progress, len(pending), f"sweep {fs.key[:12]}"),
            stats=stats,
        )

    rows = rank([records[t.id] for t in every], metric)
    write_leaderboard(out_dir, rows, metric=metric, key=fs.key, name=fs.name, plots=plots)
    failed = sum(1 for r in rows if r["status"] != "ok")
    if not rows or rows[0]["status"] != "ok":
        first = rows[0]["error"] if rows else "no trials"
        raise SweepError(
            f"all {len(rows)} trials failed (first: {first}); see {out_dir / 'leaderboard.csv'} and fix the grid"
        )

    best_row = rows[0]
    best_trial = next(t for t in every if t.id == best_row["trial"])
    keep_best(
        out_dir,
        row=best_row,
        trial=best_trial,
        record=records[best_trial.id],
        session_best=session_best,
        data=data,
        fs=fs,
        metric=metric,
        top_k=top_k,
        val_fraction=val_fraction,
        seed=seed,
        plots=plots,
    )
    meta["best"] = {
        "trial": best_trial.id,
        "label": best_trial.label,
        metric: best_row.get(metric),
        "run": str(out_dir / BEST_DIR),
    }
    write_json(out_dir / "sweep.json", meta)
    _write_reports(out_dir, o.tensorboard, rows=rows, records=records, histories=histories, metric=metric, plots=plots)
    return SweepResult(
        out_dir=out_dir,
        leaderboard=rows,
        best_run=out_dir / BEST_DIR,
        seconds=time.perf_counter() - started,
        skipped=skipped,
        metric=metric,
        key=fs.key,
        failed=failed,
        rounds=stats["rounds"],
        lost_tasks=stats["lost_tasks"],
    )


def _open_sweep_dir(
    out_dir: Path, *, fs: Any, validation: str, request: Mapping[str, Any], planned: Sequence[TrialSpec]
) -> tuple[list[TrialSpec], dict[str, Any]]:
    """Check ``out_dir`` may hold this sweep, record the call in its ``sweep.json``; return (every trial, meta).

    Trials of earlier calls with other grids come first: they stay in the directory's
    leaderboard and compete for ``best/``.
    """
    meta = check_sweep_dir(out_dir, fs=fs, validation=validation)
    trials_dir = out_dir / TRIALS_DIR
    every = [*earlier_trials(meta, trials_dir, fs.key, planned), *planned]
    meta = sweep_meta(meta, fs=fs, validation=validation, request=request, trials=every)
    # sweep.json first, then trials/: a directory with trials/ is always recognisable as a sweep.
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "sweep.json", meta)
    trials_dir.mkdir(exist_ok=True)
    # A best/ being written when an earlier call was killed (".best-<pid>-*": before rundir).
    clean_leftovers(out_dir / BEST_DIR, also=(f".{BEST_DIR}-",))
    return every, meta


def _write_reports(
    out_dir: Path,
    tensorboard: str | os.PathLike[str] | None,
    *,
    rows: Sequence[Mapping[str, Any]],
    records: Mapping[str, Mapping[str, Any]],
    histories: Mapping[str, Any],
    metric: str,
    plots: bool = True,
) -> None:
    """``report.html`` of the sweep (with ``plots``) and, with ``tensorboard``, its trials as TensorBoard runs."""
    from featurecache.report.html import write_report

    if plots:
        write_report(out_dir, analyse=False)  # report.html: leaderboard and the best run (analysed as it was written)
    if tensorboard is not None:
        from featurecache.report.tensorboard import write_sweep_logs

        write_sweep_logs(
            tensorboard,
            rows,
            metrics={t: r.get("metrics") or {} for t, r in records.items()},
            histories=histories,
            metric=metric,
        )
