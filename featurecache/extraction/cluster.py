"""Extraction units on a Dask distributed cluster.

The process that calls :func:`featurecache.extract.extract` with a ``client`` stays the
coordinator: it plans, holds the feature store's lease, allocates the units and writes the
view. Workers only run units, a few consecutive ones per task, through the same pipeline as a
local run (:func:`featurecache.units.make_runner`); each worker builds a spec's model once
and keeps it in a :class:`ModelCache` worker plugin. Tasks go out through a bounded window of
futures (a worker death then fails at most a window of tasks), and each future is released as
soon as it finishes; results are not even fetched, since the markers are what counts. Correctness never rests on Dask's retry counters: after a round,
the coordinator re-plans from the completion markers on disk and resubmits the units that
have none, for at most ``rounds`` rounds. Units are idempotent, so a unit run twice writes
the same bytes; the cache root must be a path every worker sees. Before planning, the files a
large dataset's digest memo lacks are hashed as tasks too (:func:`file_hasher`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections import Counter
from collections.abc import Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

from distributed import WorkerPlugin

from featurecache.errors import FeatureCacheError, IncompleteEntryError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from featurecache.cache.store import FeatureStore, Unit
    from featurecache.data.dataset import FileHash, FileHasher
    from featurecache.extraction.options import ExtractOptions
    from featurecache.extraction.pipeline import Plan

PLUGIN_NAME = "featurecache-models"
#: Rounds of (submit, re-plan from markers) before an extraction gives up.
MAX_ROUNDS = 3
#: Files missing from the digest memo from which ``extract`` hashes them as tasks on the
#: cluster: fewer are read sooner by this process's threads than tasks would be scheduled.
DIGEST_MIN_FILES = 20_000
#: Files per hashing task: about 2 s of reading for 100 KiB images at 100 MB/s.
DIGEST_BATCH_FILES = 2_000


class ModelCache(WorkerPlugin):
    """Worker plugin: TensorFlow threads set before TensorFlow starts, and one model per spec.

    Parameters
    ----------
    threads
        TensorFlow intra-op threads per worker (default: the worker's ``nthreads``).
    """

    name = PLUGIN_NAME

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self.models: dict[str, Any] = {}
        self.runners: dict[tuple[Any, ...], tuple[Any, dict[str, Any]]] = {}

    def setup(self, worker: Any) -> None:
        """Set TensorFlow's thread pools from the worker's cores, before TensorFlow is imported."""
        threads = int(self.threads or getattr(getattr(worker, "state", worker), "nthreads", 1) or 1)
        # TensorFlow reads these when its runtime starts; a worker that already started it
        # (another plugin, a previous task) keeps its pools.
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
        os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # several workers may share a device
        from featurecache._runtime import quiet_tf

        quiet_tf.install_inherited()  # a --cluster local:N worker: as quiet as its command

    def teardown(self, worker: Any) -> None:
        """Drop the models (the worker process is going away or the plugin is replaced)."""
        self.models.clear()
        self.runners.clear()

    def model(self, p: Plan) -> Any:
        """``p``'s feature model, built on first use and kept."""
        if p.spec.key not in self.models:
            self.models[p.spec.key] = _build_on_event_loop(p)
        return self.models[p.spec.key]

    def runner(self, p: Plan, store_path: str, options: ExtractOptions) -> tuple[Any, dict[str, Any]]:
        """The unit runner of ``p`` over the store at ``store_path``, built once per worker.

        The store is opened afresh on every call: a store removed and recreated since (with
        other chunk rows) must never be written through a stale description.
        """
        from featurecache.cache.store import FeatureStore

        st = FeatureStore(store_path)
        key = (p.spec.key, p.dataset.digest(), store_path, st.chunk_rows, st.attrs.get("created"), options)
        if key not in self.runners:
            from featurecache.extraction.pipeline import make_runner

            self.runners[key] = make_runner(
                p,
                st,
                self.model(p),
                batch_size=options.batch_size,
                on_error=options.on_error,
                workers=options.workers,
                xla=options.xla,
            )
        return self.runners[key]


def _build_on_event_loop(p: Plan) -> Any:
    """Build ``p``'s model on the worker's event-loop thread, blocking that loop meanwhile.

    Keras seeds ``--weights random`` initialisers from Python's process-global ``random``
    generator (``keras.utils.set_random_seed`` reseeds it, then each initialiser draws from it).
    A worker's event loop draws from the same generator at any time (connection jitter and
    the like), so a model built in a task thread got different weights on every worker. While
    the loop runs this build, nothing else in the process draws, and every worker builds the
    very model a local run builds.
    """
    import asyncio

    from distributed import get_worker

    from featurecache.extraction.pipeline import build_model

    async def build() -> Any:
        return build_model(p)

    loop = get_worker().loop.asyncio_loop  # type: ignore[attr-defined]  # distributed types it a tornado IOLoop; it is an AsyncIOLoop
    return asyncio.run_coroutine_threadsafe(build(), loop).result()


def _plugin() -> ModelCache:
    from distributed import get_worker

    worker = get_worker()
    plugin = cast("ModelCache | None", worker.plugins.get(PLUGIN_NAME))  # ours: registered under our name
    if plugin is None:  # a worker that joined before registration finished
        plugin = ModelCache()
        plugin.setup(worker)
        worker.plugins[PLUGIN_NAME] = plugin
    return plugin


def _feature_shape_task(p: Plan) -> tuple[int, ...]:
    return tuple(int(d) for d in _plugin().model(p).output_shape[1:])


def _units_task(p: Plan, store_path: str, units: list[Unit], options: ExtractOptions) -> int:
    """Run ``units`` on this worker; the markers they write are the result that counts (rows are returned)."""
    from distributed import get_worker

    from featurecache.extraction.pipeline import unit_record

    runner, compute = _plugin().runner(p, store_path, options)
    runner.run(units, progress=False, record=unit_record(compute, worker=get_worker().address))
    return sum(len(u.digests) for u in units)


def _has_plugin(dask_worker: Any) -> bool:
    return PLUGIN_NAME in dask_worker.plugins


def ensure_plugin(client: Any) -> None:
    """Register :class:`ModelCache` unless every worker has it (re-registering would drop their models)."""
    have = client.run(_has_plugin)
    if not have or not all(have.values()):
        client.register_plugin(ModelCache(), name=PLUGIN_NAME)


def feature_shape(client: Any, p: Plan) -> tuple[int, ...]:
    """The feature shape of ``p``'s model, asked of a worker (which keeps the model it built)."""
    ensure_plugin(client)
    fut = client.submit(_feature_shape_task, p, pure=False)
    try:
        return tuple(fut.result())
    finally:
        fut.release()


def run_units(
    client: Any,
    p: Plan,
    st: FeatureStore,
    units: list[Unit],
    *,
    options: ExtractOptions,
    units_per_task: int = 4,
    window: int | None = None,
    rounds: int = MAX_ROUNDS,
    stats: dict[str, Any] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Run ``units`` (allocated by the caller, who holds the lease) on the cluster of ``client``.

    Parameters
    ----------
    client
        A connected ``dask.distributed.Client``.
    p, st, units
        The plan, its store and the units to run.
    options
        Batch size, decode threads, error policy and XLA for the workers' runners.
    units_per_task
        Consecutive units per task: more amortises scheduling, fewer loses less to a death.
    window
        Most tasks in flight at once (default twice the cluster's threads).
    rounds
        Rounds of submit and re-plan from the markers before giving up.
    stats
        If given, filled with ``tasks``, ``submissions`` (per ``(view, slot)``), ``failed``
        and ``rounds``, for tests and benchmarks.

    Returns
    -------
    (int, dict)
        Image views computed, and the compute record of a worker with a ``cluster`` summary
        (tasks, failed tasks, rounds, the most times one unit was submitted).

    Raises
    ------
    FeatureCacheError
        A worker raised one (an undecodable image with ``on_error="fail"``, a full disk...):
        these fail the same way on any worker, so they are not retried.
    IncompleteEntryError
        Units still lack markers after ``rounds`` rounds (the last worker error is named).
    """
    if units_per_task < 1:
        raise UsageError(f"--units-per-task must be an integer >= 1, got {units_per_task!r}")
    ensure_plugin(client)
    window = window or max(2, 2 * sum(client.nthreads().values()))
    stats = stats if stats is not None else {}
    submissions: Counter[tuple[int, int]] = Counter()
    stats.update(tasks=0, failed=0, rounds=0, submissions=submissions)
    todo = list(units)
    finished: dict[int, Any] = {}
    last_error: BaseException | None = None
    for _round in range(rounds):
        stats["rounds"] += 1
        # Scattered once per round to every worker: a worker that replaced a dead one gets it
        # from a peer, and a round that lost every copy scatters again.
        [plan_f] = client.scatter([p], broadcast=True, hash=False)
        batches = [todo[i : i + units_per_task] for i in range(0, len(todo), units_per_task)]
        for batch in batches:
            submissions.update((u.view, u.slot) for u in batch)
        stats["tasks"] += len(batches)
        try:
            calls = [(plan_f, str(st.path), batch, options) for batch in batches]
            # Results are not fetched: the markers the units wrote are what counts (and record the compute).
            with contextlib.closing(
                run_windowed(client, _units_task, calls, window=window, gather=False)
            ) as results:  # closing cancels the rest
                for _, result in results:
                    if isinstance(result, FeatureCacheError):
                        raise result  # fails the same on any worker (bad image with --on-error fail, full disk)
                    if isinstance(
                        result, BaseException
                    ):  # KilledWorker, lost connections, worker crashes: re-plan below
                        last_error = result
                        stats["failed"] += 1
        finally:
            plan_f.release()
        # One listing per view: refreshed per unit, this read every marker once per unit (quadratic).
        finished = {view: st.markers(view, refresh=True) for view in {u.view for u in todo}}
        todo = [u for u in todo if u.slot not in finished[u.view]]
        if not todo:
            break
        print(
            f"featurecache: {len(todo)} units have no marker after a round on the cluster ({_brief(last_error)}); resubmitting",
            file=sys.stderr,
        )
    if todo:
        raise IncompleteEntryError(
            f"{len(todo)} units of {st.name} still have no completion marker after {rounds} rounds on the cluster "
            f"(last worker error: {_brief(last_error)}); the finished units are kept, so run the same extract command again"
        )
    for view in set(range(st.views)) - set(finished):
        st.markers(view, refresh=True)  # the workers wrote them; the view is built from this listing
    compute = next((st.markers(u.view)[u.slot].get("compute") for u in units[:1]), None)
    # Recorded in the view: how the cluster ran it, including how often the busiest unit was sent.
    summary = {
        "tasks": stats["tasks"],
        "failed": stats["failed"],
        "rounds": stats["rounds"],
        "units_per_task": units_per_task,
        "max_submissions": max(submissions.values(), default=0),
        "workers": len(client.nthreads()),
    }
    return sum(len(u.digests) for u in units), {**(compute or {}), "cluster": summary}


def run_windowed(
    client: Any, fn: Any, calls: list[tuple[Any, ...]], *, window: int, gather: bool = True
) -> Generator[tuple[int, Any], None, None]:
    """Submit ``fn(*args)`` for each of ``calls``, at most ``window`` in flight, yielding results as they finish.

    A task's exception is yielded, not raised, so the caller decides what is fatal. Each future
    is released as soon as it is read (the scheduler then forgets it), and whatever is still in
    flight is cancelled if the caller stops early.

    Parameters
    ----------
    client
        A ``distributed.Client``.
    fn
        The task function.
    calls
        Positional arguments of each task, in submission order.
    window
        Most tasks in flight.
    gather
        Fetch each result. Without it a finished task yields None and only failures cost a
        round trip: a result is one more message through the scheduler and one more worker
        connection per task, which the coordinator pays serially.

    Yields
    ------
    (int, object)
        In completion order, each task's index in ``calls`` and its result (None without
        ``gather``) or exception.
    """
    from distributed import as_completed

    pending = iter(enumerate(calls))
    done = as_completed()
    index: dict[str, int] = {}

    def submit_next() -> None:
        nxt = next(pending, None)
        if nxt is not None:
            fut = client.submit(fn, *nxt[1], pure=False)
            index[fut.key] = nxt[0]
            done.add(fut)

    for _ in range(max(1, window)):
        submit_next()
    try:
        for fut in done:
            try:
                # "lost": it finished, then its worker died with the (unwanted) result.
                result = fut.result() if gather or fut.status not in ("finished", "lost") else None
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                result = exc
            finally:
                fut.release()
            submit_next()
            yield index.pop(fut.key), result
    finally:
        for fut in list(done.futures):
            fut.cancel()


def _hash_task(paths: list[str]) -> list[FileHash]:
    from featurecache.data.dataset import iter_file_hashes

    return list(iter_file_hashes(paths))


def file_hasher(
    client: Any,
    *,
    min_files: int | None = None,
    batch_files: int = DIGEST_BATCH_FILES,
    stats: dict[str, int] | None = None,
) -> FileHasher:
    """A :data:`~featurecache.data.dataset.FileHasher` that reads files as tasks on ``client``'s cluster.

    Hashing a million files is a job of its own; the cluster's workers read them in parallel
    (through the same shared file system they read the images from). The coordinator keeps
    the memo: :func:`~featurecache.data.dataset.file_digests` memoises what comes back, and
    hashes here any file a worker could not read or saw with another size or mtime, so the
    digests equal those of hashing in one process.

    Parameters
    ----------
    client
        A connected ``dask.distributed.Client``.
    min_files
        Fewer files to hash than this are hashed by this process's threads (default
        :data:`DIGEST_MIN_FILES`, read when called).
    batch_files
        Files per task.
    stats
        If given, filled with ``tasks`` and ``failed`` (batches hashed here after their task failed).

    Returns
    -------
    FileHasher
        Yields one ``(digest, (size, mtime_ns) or None, read_ns)`` per path, in order.
    """
    from featurecache.data.dataset import iter_file_hashes

    def hasher(paths: Sequence[str]) -> Iterator[FileHash]:
        if len(paths) < (DIGEST_MIN_FILES if min_files is None else min_files):
            yield from iter_file_hashes(paths)
            return
        calls = [(list(paths[b : b + batch_files]),) for b in range(0, len(paths), batch_files)]
        window = max(2, 2 * sum(client.nthreads().values()))
        ready: dict[int, list[FileHash]] = {}  # finished out of order, held until their turn
        turn = failed = 0
        with contextlib.closing(run_windowed(client, _hash_task, calls, window=window)) as results:
            for i, result in results:
                if isinstance(result, BaseException):  # a lost worker: hash its batch here
                    failed += 1
                    result = list(iter_file_hashes(calls[i][0]))
                ready[i] = result
                while turn in ready:
                    yield from ready.pop(turn)
                    turn += 1
        if stats is not None:
            stats.update(tasks=len(calls), failed=failed)

    return hasher


def _brief(exc: BaseException | None) -> str:
    if exc is None:
        return "none"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"


def connect(
    cluster: str | None = None,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    *,
    verbose: bool = False,
) -> Any:
    """A Dask client from the CLI's ``--cluster local:N``, ``--scheduler`` or ``--scheduler-file``.

    A ``local:N`` cluster is quiet: Dask's log lines (a worker restarted, one still alive at
    close, a task's traceback; featurecache reports what matters) are shown only with
    ``verbose``, and its HTTP server takes a free port instead of
    8787, which another cluster on the machine may hold. It serves a dashboard only with
    ``verbose`` (the CLI's ``-v`` prints its link).

    Returns
    -------
    distributed.Client or None
        None when none of them is given. A ``local:N`` cluster is closed with the client.

    Raises
    ------
    UsageError
        More than one is given, ``--cluster`` is not ``local:N``, or Dask is not installed.
    """
    given = [x for x in (cluster, scheduler, scheduler_file) if x]
    if not given:
        return None
    if len(given) > 1:
        raise UsageError("pass only one of --cluster, --scheduler and --scheduler-file")
    from distributed import Client, LocalCluster

    if cluster:
        kind, _, n = cluster.partition(":")
        if kind != "local" or not n.isdigit() or int(n) < 1:
            raise UsageError(
                f"--cluster {cluster!r} is not understood; pass local:N, e.g. --cluster local:2 for two worker processes"
            )
        # dashboard_address=None would still bind the scheduler's HTTP server to 8787 (and warn
        # when that is taken): port 0 lets the system pick a free one.
        lc = LocalCluster(
            n_workers=int(n),
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            scheduler_kwargs={"dashboard": verbose},
            silence_logs=logging.WARNING if verbose else logging.CRITICAL,
        )
        try:
            client = Client(lc)
        except BaseException:
            lc.close()
            raise
        setattr(client, "_featurecache_cluster", lc)  # noqa: B010 - closed by close(); Client declares no such attribute
        return client
    if scheduler_file:
        return Client(scheduler_file=scheduler_file)
    return Client(scheduler)


def close(client: Any) -> None:
    """Close a client from :func:`connect` (and its local cluster, if it made one)."""
    if client is None:
        return
    lc = getattr(client, "_featurecache_cluster", None)
    try:
        client.close()
    finally:
        if lc is not None:
            lc.close()
