"""Decode + resize throughput: threads vs processes vs one thread, side by side in one run.

Extraction decodes and resizes in a thread pool. That only scales with cores if Pillow's
decoder and TensorFlow's resize release the GIL; a process pool always scales but pays for
sending each resized ``float32`` image back (size x size x 3 x 4 bytes) and for its own start.
This measures images/s of ``decode_image`` + ``resize_image`` (what ``load_resized`` runs per
file) over the same files with 1 thread, N threads and N processes, interleaved and repeated,
so a busy machine slows every side alike::

    python -m benchmarks.decode_workers --kind camera --n 24 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.realistic import make_folder


def _one(path: str, size: int, draft: int | None) -> np.ndarray:
    from featurecache.data import decode_image, resize_image

    return resize_image(decode_image(path, draft=draft), size)


def _warm(_: int) -> int:
    from featurecache.data import resize_image

    resize_image(np.zeros((8, 8, 3), np.uint8), 4)  # import TensorFlow in each worker, outside the timing
    return os.getpid()


def measure(paths: list[str], *, size: int, workers: int, decode: str, reps: int) -> dict[str, Any]:
    """Median images/s of serial, threaded and process-pool decode+resize (pools started once)."""
    draft = size if decode == "fast" else None
    times: dict[str, list[float]] = {"serial": [], "threads": [], "processes": []}
    with ThreadPoolExecutor(workers) as threads, ProcessPoolExecutor(workers) as procs:
        list(procs.map(_warm, range(workers * 2)))
        _one(paths[0], size, draft)
        for _ in range(reps):
            t0 = time.perf_counter()
            for p in paths:
                _one(p, size, draft)
            times["serial"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            list(threads.map(lambda p: _one(p, size, draft), paths))
            times["threads"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            list(procs.map(_one, paths, [size] * len(paths), [draft] * len(paths)))
            times["processes"].append(time.perf_counter() - t0)
    rate = {k: round(len(paths) / statistics.median(v), 2) for k, v in times.items()}
    return {
        "decode": decode,
        "workers": workers,
        "images_per_s": rate,
        "threads_over_serial": round(rate["threads"] / rate["serial"], 2),
        "processes_over_serial": round(rate["processes"] / rate["serial"], 2),
        "threads_over_processes": round(rate["threads"] / rate["processes"], 2),
        "runs_s": {k: [round(t, 2) for t in v] for k, v in times.items()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Make the images, measure exact and fast decoding, print JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_workers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="camera")
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    folder = make_folder(Path(tempfile.mkdtemp(prefix="fc-dw-")), args.kind, args.n, seed=3)
    load_before = os.getloadavg()
    paths = sorted(str(p) for p in folder.rglob("*.*"))
    try:
        results = [
            measure(paths, size=args.size, workers=args.workers, decode=d, reps=args.reps) for d in ("exact", "fast")
        ]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out = {
        "kind": args.kind,
        "n": args.n,
        "size": args.size,
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "results": results,
        "load_after": os.getloadavg(),
        "command": "python -m benchmarks.decode_workers " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
