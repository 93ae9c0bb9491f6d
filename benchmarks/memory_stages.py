"""Python memory per extraction stage, from ``tracemalloc``: which stage's objects grow with n.

``benchmarks.memory_profile`` shows *that* peak RSS grows per image; this shows *where*: it
wraps the stages of one ``featurecache.extract`` (dataset digest, planning, model build, the
unit runner, each unit write, the view write) and records for each call the traced Python
memory at entry, its peak inside, and at exit. Run it at two sizes and divide the differences
by the extra images. Peaks of a stage that runs inside another (a unit write inside the
runner) reset the outer one's, so read inner stages' peaks, and outer stages' entry and exit.

    python -m benchmarks.memory_stages 3000 /tmp/fc-mem
    python -m benchmarks.memory_stages 15000 /tmp/fc-mem
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tracemalloc
from pathlib import Path
from typing import Any


def run(n: int, work: Path, *, backbone: str = "mobilenetv2", size: int = 32) -> list[tuple[str, float, float, float]]:
    """``(stage, MiB at entry, peak MiB inside, MiB at exit)`` per call, in call order."""
    import featurecache as fc
    import featurecache.extraction.extract as ex
    from benchmarks.memory_profile import _folder
    from featurecache.cache import store, views
    from featurecache.cache.store import FeatureStore
    from featurecache.data.dataset import Dataset
    from featurecache.extraction import pipeline as units

    folder = work / f"imgs-{n}"
    if not folder.exists():
        _folder(folder, n)
    rows: list[tuple[str, float, float, float]] = []

    def wrap(owner: Any, name: str) -> None:
        f = getattr(owner, name)

        @functools.wraps(f)
        def traced(*a: Any, **k: Any) -> Any:
            cur0, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            try:
                return f(*a, **k)
            finally:
                cur1, peak = tracemalloc.get_traced_memory()
                rows.append(
                    (
                        f"{getattr(owner, '__name__', owner)}.{name}",
                        round(cur0 / 2**20, 2),
                        round(peak / 2**20, 2),
                        round(cur1 / 2**20, 2),
                    )
                )
                tracemalloc.reset_peak()

        setattr(owner, name, traced)

    for owner, name in [
        (Dataset, "digest"),
        (views, "write_view"),
        (FeatureStore, "index"),
        (store, "write_unit"),
        (ex, "plan"),
        (ex, "_start_prefetch"),
        (ex, "prepare_units"),
        (ex, "make_runner"),
        (units.UnitRunner, "run"),
        (ex, "_write_view"),
    ]:
        wrap(owner, name)
    cache = work / f"cache-{n}"
    shutil.rmtree(cache, ignore_errors=True)
    import tensorflow  # noqa: F401 - imported before tracing starts: its import is not a stage

    tracemalloc.start()
    fc.extract(str(folder), backbone=backbone, weights="random", size=size, cache_dir=cache, progress=False)
    tracemalloc.stop()
    shutil.rmtree(cache, ignore_errors=True)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_stages", description=__doc__.split("\n\n")[0])
    parser.add_argument("n", type=int)
    parser.add_argument("work", type=Path)
    a = parser.parse_args()
    for row in run(a.n, a.work):
        print(row)
