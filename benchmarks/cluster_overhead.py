"""Scheduling overhead of extraction on a Dask cluster, with units that stand in for a device.

A device busy on a unit's batches costs the host no CPU, so each unit's decode and backbone
are stood in for by a fixed sleep, and a 2-core machine can show how throughput scales with
workers and what each unit costs on top of its compute. Two paths:

``--path units`` (default) goes through :func:`featurecache.extraction.cluster.run_units` exactly as
``extract(..., client=...)`` does: the plan scattered to every worker, tasks of
``--units-per-task`` units through the bounded window, a real feature store on disk, every
unit's chunks and completion marker really written (through ``store.write_unit``, overlapped
with the next unit as the real runner does), and the coordinator's re-plan from the markers at
the end. Only the worker plugin's runner is replaced (:class:`StandInModels`): it sleeps
``--unit-seconds`` per unit instead of decoding and calling a backbone.

``--path loop`` times the submission loop alone (:func:`featurecache.extraction.cluster.run_windowed`).

    python -m benchmarks.cluster_overhead --workers 1,2,4,8 --unit-seconds 0.05 --units-per-task 4

Each worker count times ``--units-per-worker`` x N units, ``--repeat`` times, and prints one
JSON line for its fastest run: units/s, the efficiency (units/s over N times one worker's),
the per-unit overhead ``wall / (units / N) - unit_seconds`` (and, for ``units``, the same past
the round's fixed start ``round_fixed_s``: plugin check, plan broadcast, marker listing,
timed on an empty call), and the CPU each unit cost the coordinating process (client and
scheduler: one process on a LocalCluster) and the workers together; CPU per unit holds on a
busy machine better than wall time does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.extraction.cluster import PLUGIN_NAME, ModelCache

FEATURES = 16


def _sleep_units(n: int, seconds: float) -> int:
    time.sleep(n * seconds)
    return n


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


class _StandInModel:
    output_shape = (None, FEATURES)


class _SleepRunner:
    """The unit runner with the device stood in for: sleep per unit, then the real write."""

    def __init__(self, st: Any, seconds: float) -> None:
        self.st = st
        self.seconds = seconds

    def run(self, units: list[Any], *, progress: bool, record: dict[str, Any] | None = None) -> None:
        from featurecache.cache import store

        with ThreadPoolExecutor(
            1, thread_name_prefix="fc-write"
        ) as writer:  # as UnitRunner: writes overlap the next unit
            pending = []
            for u in units:
                time.sleep(self.seconds)
                feats = np.zeros((len(u.digests), *self.st.feature_shape), dtype=self.st.dtype)
                valid = np.ones(len(u.digests), dtype=bool) if u.view == 0 else None
                pending.append(writer.submit(store.write_unit, self.st, u, feats, valid=valid, record=record))
            for f in pending:
                f.result()


class StandInModels(ModelCache):
    """The worker plugin with the device stood in for (registered under the real plugin's name)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def model(self, p: Any) -> Any:
        return _StandInModel()

    def runner(self, p: Any, store_path: str, options: Any) -> tuple[Any, dict[str, Any]]:
        from featurecache.cache.store import FeatureStore

        return _SleepRunner(FeatureStore(store_path), self.seconds), {"xla": False, "gpu": False}


def _cluster(workers: int) -> tuple[Any, Any]:
    from distributed import Client, LocalCluster

    lc = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None)
    client = Client(lc)
    client.wait_for_workers(workers)
    return lc, client


def _timed(client: Any, fn: Any) -> dict[str, float]:
    w0, c0, t0 = client.run(_cpu), _cpu(), time.perf_counter()
    fn()
    wall, c1, w1 = time.perf_counter() - t0, _cpu(), client.run(_cpu)
    return {"wall_s": wall, "coordinator_cpu_s": c1 - c0, "workers_cpu_s": sum(w1[k] - w0[k] for k in w0)}


def _fastest(runs: list[dict[str, float]]) -> dict[str, float]:
    """The fastest of repeated runs: on a shared machine, other work only ever adds time."""
    return min(runs, key=lambda r: r["wall_s"])


def measure_units(
    workers: int,
    *,
    units: int,
    unit_seconds: float,
    units_per_task: int,
    window: int | None,
    repeat: int = 1,
    store_dir: str | None = None,
) -> dict[str, float]:
    """Time ``run_units`` over ``units`` units of a real store on ``workers`` one-thread processes (fastest of ``repeat``)."""
    from featurecache.extraction import cluster
    from featurecache.extraction.extract import plan, prepare_units
    from featurecache.extraction.options import ExtractOptions

    lc, client = _cluster(workers)
    try:
        client.register_plugin(StandInModels(unit_seconds), name=PLUGIN_NAME)
        with tempfile.TemporaryDirectory(prefix="fc-overhead-", dir=store_dir) as tmp:
            p = plan("builtin:digits", backbone="mobilenetv2", weights="random", size=32, cache_dir=Path(tmp))
            st, todo, _ = prepare_units(p, batch_size=2, chunk_rows=2, client=client)
            if len(todo) < units * repeat + workers:
                raise SystemExit(
                    f"--units {units} x --repeat {repeat} is more than this dataset's {len(todo) - workers} units (less warm-up)"
                )
            opts = ExtractOptions(batch_size=4)
            # Warm-up: connections, imports, the plan on every worker.
            cluster.run_units(client, p, st, todo[:workers], options=opts, units_per_task=1)
            runs = []
            for k in range(repeat):
                run = todo[workers + k * units : workers + (k + 1) * units]
                # A round's fixed cost (plugin check, plan broadcast, marker listing), paid once per call.
                fixed = _timed(client, lambda: cluster.run_units(client, p, st, [], options=opts))["wall_s"]
                out = _timed(
                    client,
                    lambda run=run: cluster.run_units(
                        client, p, st, run, options=opts, units_per_task=units_per_task, window=window
                    ),
                )
                runs.append({**out, "round_fixed_s": fixed})
                assert all(u.slot in st.markers(u.view) for u in run)
    finally:
        client.close()
        lc.close()
    return _fastest(runs)


def measure_loop(
    workers: int, *, units: int, unit_seconds: float, units_per_task: int, window: int | None, repeat: int = 1
) -> dict[str, float]:
    """Time the submission loop ``run_windowed`` alone over sleeping tasks (fastest of ``repeat``)."""
    from featurecache.extraction.cluster import run_windowed

    lc, client = _cluster(workers)
    try:
        calls = [(min(units_per_task, units - i), unit_seconds) for i in range(0, units, units_per_task)]
        w = window or 2 * workers
        list(
            run_windowed(client, _sleep_units, calls[:workers], window=w, gather=False)
        )  # warm-up: connections, imports
        runs = [
            _timed(client, lambda: list(run_windowed(client, _sleep_units, calls, window=w, gather=False)))
            for _ in range(repeat)
        ]
    finally:
        client.close()
        lc.close()
    return _fastest(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--units-per-worker", type=int, default=24, help="units timed per run: this many times the workers")
    ap.add_argument("--unit-seconds", type=float, default=0.05)
    ap.add_argument("--units-per-task", type=int, default=1)
    ap.add_argument(
        "--window", type=int, default=None, help="tasks in flight (default: run_units's, twice the threads)"
    )
    ap.add_argument("--path", choices=("units", "loop"), default="units")
    ap.add_argument("--repeat", type=int, default=3, help="runs per worker count; the fastest is reported")
    ap.add_argument(
        "--store-dir",
        default=None,
        help="folder of the temporary store (--path units; e.g. /dev/shm to leave the disk out)",
    )
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    kw: dict[str, Any] = dict(
        unit_seconds=args.unit_seconds, units_per_task=args.units_per_task, window=args.window, repeat=args.repeat
    )
    rows = []
    for n in (int(x) for x in args.workers.split(",")):
        units = n * args.units_per_worker  # as long a run for every N: the same share of ramp-up and tail
        r = (
            measure_units(n, units=units, **kw, store_dir=args.store_dir)
            if args.path == "units"
            else measure_loop(n, units=units, **kw)
        )
        rows.append({"workers": n, "units": units, **r, "units_per_s": units / r["wall_s"]})
    base = rows[0]["units_per_s"] / rows[0]["workers"]
    for r in rows:
        n, per_worker = r["workers"], args.units_per_worker
        r.update(
            efficiency=r["units_per_s"] / (base * n),
            overhead_ms_per_unit=1000 * (r["wall_s"] / per_worker - args.unit_seconds),
            **(
                {
                    "overhead_ms_per_unit_past_round_start": 1000
                    * ((r["wall_s"] - r["round_fixed_s"]) / per_worker - args.unit_seconds)
                }
                if "round_fixed_s" in r
                else {}
            ),
            coordinator_cpu_ms_per_unit=1000 * r["coordinator_cpu_s"] / r["units"],
            workers_cpu_ms_per_unit=1000 * r["workers_cpu_s"] / r["units"],
        )
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    if args.out:
        doc = {"args": vars(args), "python": platform.python_version(), "load_avg": os.getloadavg(), "rows": rows}
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
