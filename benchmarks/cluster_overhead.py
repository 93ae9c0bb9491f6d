"""Scheduling overhead of extraction on a Dask cluster, with units that stand in for a device.

Each "unit" sleeps a fixed time (a device busy on a batch costs the host no CPU), so a 2-core
machine can show how throughput scales with workers and what each unit costs on top, through
the very submission loop extraction uses (:func:`featurecache.cluster.run_windowed`: bounded
window, futures released as read).

    python -m benchmarks.cluster_overhead --workers 1,2,4,8 --units 64 --unit-seconds 0.2

Prints, per worker count, units/s, speed-up over one worker, the efficiency (speed-up / N) and
the per-unit overhead ``wall / (units / N) - unit_seconds``.
"""

from __future__ import annotations

import argparse
import json
import time


def _sleep_units(n: int, seconds: float) -> int:
    time.sleep(n * seconds)
    return n


def measure(workers: int, *, units: int, unit_seconds: float, units_per_task: int) -> dict[str, float]:
    """Units per second through ``run_windowed`` on a LocalCluster of ``workers`` one-thread processes."""
    from distributed import Client, LocalCluster

    from featurecache.cluster import run_windowed

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as lc, Client(lc) as client:
        client.wait_for_workers(workers)
        calls = [(min(units_per_task, units - i), unit_seconds) for i in range(0, units, units_per_task)]
        list(run_windowed(client, _sleep_units, calls[:workers], window=2 * workers))  # warm-up: connections, imports
        t0 = time.perf_counter()
        done = sum(r for r in run_windowed(client, _sleep_units, calls, window=2 * workers))
        wall = time.perf_counter() - t0
    assert done == units
    return {"workers": workers, "wall_s": wall, "units_per_s": units / wall, "overhead_ms_per_unit": 1000 * (wall / (units / workers) - unit_seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--units", type=int, default=64)
    ap.add_argument("--unit-seconds", type=float, default=0.2)
    ap.add_argument("--units-per-task", type=int, default=1)
    args = ap.parse_args()
    rows = [measure(int(n), units=args.units, unit_seconds=args.unit_seconds, units_per_task=args.units_per_task) for n in args.workers.split(",")]
    base = rows[0]["units_per_s"] / rows[0]["workers"]
    for r in rows:
        r["efficiency"] = r["units_per_s"] / (base * r["workers"])
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == "__main__":
    main()
