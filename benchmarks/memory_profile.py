"""Where extraction's peak RSS grows with the number of images: a staged profile at n and 10 n.

Peak RSS of extraction rose about 9 KiB per image (BENCHMARKS.md). This runs, in a fresh
interpreter per size, the stages of ``featurecache.extract`` one at a time on a folder of tiny
JPEGs and records after each stage the process's peak RSS (``VmHWM``), its RSS, and Python's
traced memory (``tracemalloc``: current and the peak *within* the stage), plus the top
allocation sites still alive after the digest and after the extraction. Growth that shows in
``tracemalloc`` is Python objects (per-image records); growth in RSS that does not is native
(TensorFlow / oneDNN caches, the allocator keeping freed pages).

Run from the repository root::

    python -m benchmarks.memory_profile --n 3000            # n and 10 n, ~5 min on 2 cores
    python -m benchmarks.memory_profile --n 3000 --no-tracemalloc   # RSS only (tracemalloc adds its own)
    python -m benchmarks.memory_profile --n 3000 --no-tracemalloc --code ../main   # another checkout
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

_STAGES = r"""
import gc, json, os, sys, time, tracemalloc
trace = {trace}
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) // 1024
out = {{'stages': []}}
def mark(name, t0):
    gc.collect()
    row = {{'stage': name, 'seconds': round(time.perf_counter() - t0, 2), 'peak_rss_mib': status('VmHWM'), 'rss_mib': status('VmRSS')}}
    if trace:
        cur, peak = tracemalloc.get_traced_memory()
        row.update(py_current_mib=round(cur / 2**20, 1), py_peak_in_stage_mib=round(peak / 2**20, 1))
        tracemalloc.reset_peak()
    out['stages'].append(row)
def top(n=8):
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    return [{{'site': str(s.traceback[0]), 'kib': s.size // 1024, 'blocks': s.count}} for s in snap.statistics('lineno')[:n]]
import numpy, PIL.Image
import tensorflow as tf
import featurecache as fc
from featurecache.cache import store
from featurecache.data import load_dataset
if trace:
    tracemalloc.start()
t = time.perf_counter(); mark('imports (TensorFlow)', t)
cache = {cache!r}
t = time.perf_counter(); ds = load_dataset({folder!r}, memo_dir=store.memo_dir(store.resolve_cache_dir(cache))); mark('load_dataset (list files)', t)
t = time.perf_counter(); ds.digest(); mark('dataset digest (hash files, manifest)', t)
if trace:
    out['top_after_digest'] = top()
t = time.perf_counter()
r = fc.extract(ds, backbone={backbone!r}, weights='random', size={size}, cache_dir=cache, progress=False)
mark('extract (model, units, writes)', t)
if trace:
    out['top_after_extract'] = top()
out['images'] = sum(s['n'] for s in r.splits.values())
print(json.dumps(out))
"""


def _folder(root: Path, n: int, *, src: int = 32) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(64, src, src, 3), dtype=np.uint8)
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = base[i % 64].copy()
        # Every file distinct, even after JPEG rounding: the bits of i as black/white 2x2 blocks.
        for b in range(17):
            r, c = 2 * (b // 16), 2 * (b % 16)
            img[r : r + 2, c : c + 2] = 255 * ((i >> b) & 1)
        Image.fromarray(img).save(root / f"c{i % 10}" / f"img{i:06d}.jpg", quality=90)
    return root


def profile(n: int, *, work: Path, backbone: str, size: int, trace: bool, code: Path = ROOT) -> dict[str, Any]:
    """Stages of one extraction of ``n`` tiny JPEGs in a fresh interpreter (see module doc)."""
    folder = _folder(work / f"imgs-{n}", n)
    script = _STAGES.format(
        trace=trace, cache=str(work / f"cache-{n}"), folder=str(folder), backbone=backbone, size=size
    )
    # The script runs in `code`'s root (python -c puts the working directory first on sys.path).
    env = {"PYTHONPATH": str(code), "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=code, env=env, capture_output=True, text=True, timeout=7200
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Profile at ``n`` and ``10 n`` and print per-image growth of each stage."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--backbone", default="mobilenetv2")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--no-tracemalloc", action="store_true")
    parser.add_argument(
        "--code", type=Path, default=ROOT, help="checkout whose featurecache is profiled (default: this one)"
    )
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fc-mem-"))
    kw = dict(
        work=work, backbone=args.backbone, size=args.size, trace=not args.no_tracemalloc, code=args.code.resolve()
    )
    try:
        small = profile(args.n, **kw)  # type: ignore[arg-type]
        big = profile(args.n * args.factor, **kw)  # type: ignore[arg-type]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    extra = big["images"] - small["images"]
    growth = []
    for a, b in zip(small["stages"], big["stages"], strict=True):
        row = {"stage": a["stage"]}
        for k in ("peak_rss_mib", "rss_mib", "py_current_mib", "py_peak_in_stage_mib"):
            if k in a:
                row[f"{k}_small"], row[f"{k}_big"] = a[k], b[k]
                row[f"{k}_kib_per_image"] = round((b[k] - a[k]) * 1024 / extra, 2)
        growth.append(row)
    result = {
        "n_small": small["images"],
        "n_big": big["images"],
        "growth": growth,
        "small": small,
        "big": big,
        "command": "python -m benchmarks.memory_profile " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
