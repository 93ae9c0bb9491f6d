"""Running a sweep's trials: each in a worker (dense trials grouped), through joblib locally or on a Dask cluster.

The trials run through joblib, preferring process workers: ``DenseHead`` seeds Keras globally,
which must not leak between trials running at the same time. joblib's loky backend memory-maps
numpy arrays larger than 1 MB that it sends to workers, so every worker reads the same arrays
instead of receiving a pickled copy per trial; the arrays are made plain contiguous numpy first
so that applies, and each trial records how it received them (training features over the memory
budget stay in the store and travel as a reference). With ``n_jobs=1`` trials run in the calling
process. Under a caller's ``joblib.parallel_config(backend="dask")`` the work items go to that
backend's Dask client instead, the training data broadcast to every worker.

A worker that dies (killed, out of memory, a lost node) loses the trials it was running: loky
stops joblib's whole call, Dask returns the lost task's ``KilledWorker``. Correctness does not
rest on Dask's or loky's retries: after each round the sweep re-plans from the trial files on
disk (a trial another worker finished is kept, even if its result never came back) and runs
the rest again, for at most :data:`MAX_ROUNDS` rounds.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from featurecache._runtime import quiet_tf
from featurecache.cache.faults import checkpoint
from featurecache.errors import SweepError, UsageError, one_line
from featurecache.training.sweeps.grid import TrialSpec
from featurecache.training.sweeps.leaderboard import row, sort_key
from featurecache.training.sweeps.records import finish_record, finished_records, new_record

__all__ = [
    "MAX_GROUP",
    "MAX_ROUNDS",
    "TF_THREADS_ENV",
    "TrialContext",
    "plan_work",
    "run_pending",
    "shared_arrays",
    "sweep_tf_threads",
]

#: TensorFlow threads per sweep process for dense trials; 0 = TensorFlow's default (all cores).
TF_THREADS_ENV = "FEATURECACHE_TF_THREADS"
#: Most dense trials trained together in one pass (bounds one worker's memory and the work lost to a crash).
MAX_GROUP = 16
#: Rounds of (run, re-plan from the trial files) before a sweep that keeps losing workers gives up.
MAX_ROUNDS = 3
#: Exceptions by which joblib (loky) and Dask report a worker process that died under a task.
_WORKER_DEATHS = frozenset({"TerminatedWorkerError", "KilledWorker", "BrokenProcessPool"})

#: ``(sort key, trial id, estimator, predictions)`` of the best trial trained in this call.
SessionBest = tuple[tuple[Any, ...], str, Any, Any]


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one sweep call needs besides its configuration and the data (sent to each worker).

    Parameters
    ----------
    trials_dir
        Where the trial records go.
    parent_pid
        The sweep's process id (a record says how its worker received the features).
    top_k
        Top-k accuracies evaluated.
    tf_threads
        TensorFlow threads of a process that trains dense trials (:func:`sweep_tf_threads`).
    call
        Token of this sweep call, written in each record.
    """

    trials_dir: str
    parent_pid: int
    top_k: tuple[int, ...] = (1, 3, 5)
    tf_threads: int = 1
    call: str = ""


def sweep_tf_threads() -> int:
    """TensorFlow intra- and inter-op threads of every process that trains dense trials.

    The same number whatever ``--jobs`` is, so a trial computes the same bits in the calling
    process (``--jobs 1``) and in any worker: CPU kernels may split a reduction differently for
    another thread count. (BLAS did: lbfgs fits with a thread per core in the caller and one per
    worker differed by up to 4e-4 in validation log loss; ``train.blas_threads`` now fixes
    those.) One thread by default (heads on cached features are small matrices; parallelism
    comes from ``--jobs``); ``$FEATURECACHE_TF_THREADS`` sets another, 0 leaves TensorFlow's default.

    Raises
    ------
    UsageError
        The variable is not a non-negative integer.
    """
    raw = os.environ.get(TF_THREADS_ENV, "").strip()
    if not raw:
        return 1
    if not raw.isdigit():
        raise UsageError(
            f"${TF_THREADS_ENV}={raw!r} is not a number of threads; set it to e.g. 1, or 0 for TensorFlow's default"
        )
    return int(raw)


def _limit_tf_threads(threads: int) -> int:
    """Set this process's TensorFlow threads (before TensorFlow starts); return the threads in effect.

    It only works before TensorFlow runs its first op in the process; a process that already
    did keeps its setting, and the trial record shows it (``worker.tf_threads``).
    """
    quiet_tf.install_inherited()  # a sweep worker's first TensorFlow import: as quiet as its command
    import tensorflow as tf

    if threads > 0:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            pass
    return int(tf.config.threading.get_intra_op_parallelism_threads())


def _run_trial(trial: TrialSpec, data: Any, ctx: TrialContext) -> tuple[dict[str, Any], Any, Any]:
    """Fit and score one trial, write its result file, return (record, estimator, predictions).

    Runs in a worker process (or in the caller when ``n_jobs=1``). Any exception becomes a
    failed record: one bad configuration must not stop the sweep. A dense trial runs with
    ``ctx.tf_threads`` TensorFlow threads, in a worker or in the caller.
    """
    from featurecache.training.heads import make_head
    from featurecache.training.train import evaluate_arrays, fit_head

    record = new_record(trial, data, ctx.parent_pid, ctx.call)
    if trial.head == "dense":
        record["worker"]["tf_threads"] = _limit_tf_threads(ctx.tf_threads)
    started = time.perf_counter()
    estimator = preds = None
    try:
        estimator = make_head(trial.head, trial.params)
        fit_head(estimator, data)
        record["fit_seconds"] = round(time.perf_counter() - started, 4)
        checkpoint("trial_fitted")  # a worker dying here loses a trained head before its record exists
        metrics, preds = evaluate_arrays(estimator, data, top_k=ctx.top_k)
        record.update(status="ok", metrics=metrics, error=None)
    except Exception as exc:  # noqa: BLE001 - recorded as a failed trial, the sweep goes on
        record.update(status="failed", metrics={}, error=one_line(exc))
        estimator = preds = None
    finish_record(record, ctx.trials_dir, time.perf_counter() - started)
    return record, estimator, preds


def _run_group(trials: Sequence[TrialSpec], data: Any, ctx: TrialContext) -> list[tuple[dict[str, Any], Any, Any]]:
    """Fit several dense trials in one shared pass (``heads.dense_group``), then score each.

    A trial's record notes the group it trained in; its ``fit_seconds`` is its share of the
    group's training time. If the group fails as a whole, each trial runs alone, so one bad
    configuration still fails only itself.
    """
    from featurecache.training.heads import make_head
    from featurecache.training.train import evaluate_arrays, fit_dense_together

    if len(trials) == 1:
        return [_run_trial(trials[0], data, ctx)]
    threads = _limit_tf_threads(ctx.tf_threads)
    started = time.perf_counter()
    try:
        estimators = fit_dense_together([make_head(t.head, t.params) for t in trials], data)
    except Exception:  # noqa: BLE001 - retried one by one, where each failure is recorded
        return [_run_trial(t, data, ctx) for t in trials]
    fit_seconds = time.perf_counter() - started
    checkpoint("trial_fitted")
    out = []
    for trial, estimator in zip(trials, estimators, strict=True):
        t0 = time.perf_counter()
        record = new_record(trial, data, ctx.parent_pid, ctx.call)
        record["worker"]["tf_threads"] = threads
        record["trained_together"] = {"heads": len(trials), "fit_seconds": round(fit_seconds, 4)}
        record["fit_seconds"] = round(fit_seconds / len(trials), 4)
        preds = None
        try:
            metrics, preds = evaluate_arrays(estimator, data, top_k=ctx.top_k)
            record.update(status="ok", metrics=metrics, error=None)
        except Exception as exc:  # noqa: BLE001 - recorded as a failed trial, the sweep goes on
            record.update(status="failed", metrics={}, error=one_line(exc))
            estimator = None
        finish_record(record, ctx.trials_dir, fit_seconds / len(trials) + time.perf_counter() - t0)
        out.append((record, estimator, preds))
    return out


def plan_work(pending: Sequence[TrialSpec], workers: int, *, together: bool = True) -> list[list[TrialSpec]]:
    """Split trials into work items: dense trials that can share a pass grouped, the rest alone.

    Parameters
    ----------
    pending
        Trials to run.
    workers
        Parallel workers; a group of compatible dense trials is split into about this many
        parts so every worker gets a share.
    together
        ``False``: every trial is its own item (the one-at-a-time behaviour).

    Returns
    -------
    list of list of TrialSpec
        Work items in a stable order (groups first, largest first, then single trials).
    """
    from featurecache.training.heads.dense_group import group_key_of

    groups: dict[tuple[Any, ...], list[TrialSpec]] = {}
    singles: list[list[TrialSpec]] = []
    for t in pending:
        if together and t.head == "dense":
            groups.setdefault(group_key_of(t.params), []).append(t)  # trial params are coerced
        else:
            singles.append([t])
    items: list[list[TrialSpec]] = []
    for members in groups.values():
        size = min(MAX_GROUP, max(1, math.ceil(len(members) / max(1, workers))))
        items.extend(members[i : i + size] for i in range(0, len(members), size))
    items.sort(key=len, reverse=True)  # the longest work starts first
    return items + singles


def shared_arrays(data: Any) -> Any:
    """``data`` with its numpy arrays plain and contiguous, so joblib memory-maps them for its workers.

    ``ascontiguousarray`` is a no-op for what ``load_training_data`` returns, a guard otherwise.
    Training features streamed from the store (over the memory budget) are not numpy and
    travel as a reference.
    """
    fields = ("X_train", "y_train", "X_val", "y_val", "X_train_views", "X_test", "y_test")
    return replace(
        data, **{f: np.ascontiguousarray(getattr(data, f)) for f in fields if isinstance(getattr(data, f), np.ndarray)}
    )


def _dask_client() -> Any | None:
    """The client of an active ``joblib.parallel_config(backend="dask")``, else None."""
    from joblib.parallel import get_active_backend

    backend, _ = get_active_backend()
    return backend.client if type(backend).__name__ == "DaskDistributedBackend" else None


def _workers(n_jobs: int, client: Any | None) -> int:
    """Parallel trials for ``n_jobs``: -1 = every core here (or every thread of the cluster)."""
    if n_jobs > 0:
        return n_jobs
    cores = sum(client.nthreads().values()) if client is not None else (os.cpu_count() or 1)
    return max(1, cores + 1 + n_jobs)


def _round(
    todo: Sequence[TrialSpec], data: Any, ctx: TrialContext, *, n_jobs: int, together: bool, lost: list[BaseException]
) -> Iterator[tuple[dict[str, Any], Any, Any]]:
    """One round: every trial of ``todo`` run once, results as they finish; worker deaths appended to ``lost``."""
    client = _dask_client()
    workers = max(1, min(_workers(n_jobs, client), len(todo)))
    items = plan_work(todo, workers, together=together)
    workers = max(1, min(workers, len(items)))
    if client is not None:
        yield from _dask_round(client, items, data, ctx, window=workers, lost=lost)
        return
    from joblib import Parallel, delayed

    # prefer="processes" (loky by default) rather than backend="loky", so a caller's
    # parallel_config(n_jobs=..., backend="threading") still applies.
    parallel = Parallel(n_jobs=workers, prefer="processes", return_as="generator_unordered")
    try:
        for results in parallel(delayed(_run_group)(item, data, ctx) for item in items):
            yield from results
    except Exception as exc:
        if type(exc).__name__ not in _WORKER_DEATHS:
            raise
        lost.append(exc)  # loky stops the whole call: the trials without a record run next round


def _dask_round(
    client: Any,
    items: Sequence[Sequence[TrialSpec]],
    data: Any,
    ctx: TrialContext,
    *,
    window: int,
    lost: list[BaseException],
) -> Iterator[tuple[dict[str, Any], Any, Any]]:
    """One round on a Dask cluster: the work items through a bounded window of futures, the data broadcast.

    Submitted by the client itself rather than through ``joblib.Parallel``: joblib's dask
    backend (1.6) never reports a task whose worker died (``KilledWorker``) to an unordered
    ``Parallel``, which then waits forever. Here a lost task comes back as its exception, the
    round goes on, and its trials run next round. The data is broadcast to every worker once per
    round (joblib's automatic scatter would put it on one worker, whose death fails every
    trial); a worker that replaced a dead one fetches it from a peer.
    """
    from featurecache.extraction.cluster import run_windowed

    [data_f] = client.scatter([data], broadcast=True, hash=False)
    try:
        calls = [(list(item), data_f, ctx) for item in items]
        with contextlib.closing(run_windowed(client, _run_group, calls, window=window)) as results:
            for _index, result in results:
                if isinstance(result, BaseException):
                    lost.append(result)
                else:
                    yield from result
    finally:
        data_f.release()


class _Tracker:
    """The results of one sweep call as they arrive: records, dense curves, the best trial, the progress bar."""

    def __init__(self, records: dict[str, dict[str, Any]], histories: dict[str, Any], metric: str, bar: Any) -> None:
        self.records, self.histories, self.metric, self.bar = records, histories, metric, bar
        self.best: SessionBest | None = None

    def add(self, record: dict[str, Any], estimator: Any = None, preds: Any = None) -> None:
        self.records[record["trial"]] = record
        if getattr(estimator, "history_", None):
            self.histories[record["trial"]] = estimator.history_
        status = "failed" if record["status"] != "ok" else ""
        if record["status"] == "ok" and estimator is not None:
            key = sort_key(row(record), self.metric)
            if self.best is None or key < self.best[0]:
                self.best = (key, record["trial"], estimator, preds)
        if self.best is not None:
            best_value = row(self.records[self.best[1]]).get(self.metric)
            status = f"best {self.metric} {best_value:.4f}" if isinstance(best_value, float) else status
        self.bar.advance(1, status)


def run_pending(
    pending: Sequence[TrialSpec],
    data: Any,
    ctx: TrialContext,
    *,
    key: str,
    records: dict[str, dict[str, Any]],
    histories: dict[str, Any],
    metric: str,
    n_jobs: int,
    together: bool,
    bar: Any,
    stats: dict[str, Any] | None = None,
) -> SessionBest | None:
    """Run the pending trials, adding their records (and dense curves) as they finish.

    A round that loses a worker is followed by another over the trials that have no record yet
    (read back from ``ctx.trials_dir``: a trial another worker finished is not run again), for at
    most :data:`MAX_ROUNDS` rounds.

    Parameters
    ----------
    pending
        Trials to run.
    data
        Their ``TrainingData`` (features for ``key``).
    ctx
        Per-call context sent to every trial.
    key
        Feature-set key (a record on disk must carry it to count).
    records, histories
        Filled with each trial's record, and the training curves of the dense ones.
    metric
        Ranking metric (for the best trial and the progress bar).
    n_jobs, together
        As :func:`featurecache.sweep.sweep`.
    bar
        A :class:`featurecache.progress.ProgressBar`.
    stats
        If given, filled with ``rounds`` and ``lost_tasks`` (tasks whose worker died).

    Returns
    -------
    tuple or None
        The best trial trained in this call as ``(sort key, id, estimator, predictions)``, or ``None``.

    Raises
    ------
    SweepError
        Trials still have no record after :data:`MAX_ROUNDS` rounds (their finished ones are kept).
    """
    tracker = _Tracker(records, histories, metric, bar)
    stats = stats if stats is not None else {}
    stats.update(rounds=0, lost_tasks=0)
    todo = list(pending)
    lost: list[BaseException] = []
    with bar:
        for _ in range(MAX_ROUNDS):
            stats["rounds"] += 1
            for record, estimator, preds in _round(todo, data, ctx, n_jobs=n_jobs, together=together, lost=lost):
                tracker.add(record, estimator, preds)
            # Trials other workers finished while a round was being aborted left their records.
            missing = [t for t in todo if t.id not in records]
            for record in finished_records(missing, Path(ctx.trials_dir), key, call=ctx.call).values():
                tracker.add(record)
            todo = [t for t in todo if t.id not in records]
            stats["lost_tasks"] = len(lost)
            if not todo:
                break
            print(
                f"featurecache: a sweep worker died ({_brief(lost[-1] if lost else None)}); running its {len(todo)} unfinished trials again",
                file=sys.stderr,
            )
    if todo:
        raise SweepError(
            f"sweep workers kept dying ({_brief(lost[-1] if lost else None)}): {len(todo)} trials have no result after {MAX_ROUNDS} rounds; "
            f"{len(records)} finished trials are saved in {ctx.trials_dir}: run the same command again to resume, "
            "with fewer --jobs if memory ran out"
        )
    return tracker.best


def _brief(exc: BaseException | None) -> str:
    return one_line(exc, limit=160) if exc is not None else "no error"
