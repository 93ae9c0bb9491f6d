"""Can the decoder feed the GPU? Backbone images/s on the accelerator vs decode images/s on all cores.

``benchmarks/gpu_runner.py`` measures featurecache end to end, which needs TensorFlow. The GPU
machine lent to this project has JAX and PyTorch but no TensorFlow, and TensorFlow's wheel
(about 600 MB) is far over what may be carried there (64 MiB). This script measures the two
halves that decide whether extraction on such a machine is bound by the decoder or by the
backbone, with what is there:

* **backbone**: plain ``keras.applications`` ResNet50 and VGG19 at 224 px, ``include_top=False``,
  average pooling, random weights, on whichever backend Keras has (``KERAS_BACKEND``; JAX on the
  GPU machine, whose ``predict`` is XLA-compiled like featurecache's ``--xla``), in float32 and
  in ``mixed_float16``. Inputs are host NumPy batches, so host-to-device copies are counted, as
  in extraction.
* **decode**: featurecache's own :func:`~featurecache.data.decode_image` (Pillow, no TensorFlow)
  on generated camera (12 MP, ``exact`` and ``fast``), web (500x375) and screenshot (PNG)
  folders, in a thread pool of 1, 2, 4, ... up to all cores, and in a process pool of all
  cores. The resize that follows it in extraction (0.6 ms of CPU per image here) is left out.

The ratio of the two says how many cores of decoding one GPU needs per backbone::

    python -m benchmarks.gpu_feed --out "$OUT"        # on the GPU machine (KERAS_BACKEND=jax)
    python -m benchmarks.gpu_feed --tiny              # anywhere: does it run? (about a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.realistic import make_folder_parallel

_APPS = {"resnet50": "ResNet50", "vgg19": "VGG19", "mobilenetv3small": "MobileNetV3Small"}


_INPUTS: dict[tuple[int, int], np.ndarray] = {}


def _inputs(n: int, size: int) -> np.ndarray:
    """One array of random inputs per shape, shared by every row (making 2 GB of them takes seconds)."""
    if (n, size) not in _INPUTS:
        _INPUTS[(n, size)] = np.random.default_rng(0).random((n, size, size, 3), dtype=np.float32) * 2 - 1
    return _INPUTS[(n, size)]


def backbone_rate(name: str, *, size: int, precision: str, n: int, batch_size: int) -> dict[str, Any]:
    """Images/s of ``model.predict`` on host arrays (compile excluded), for one backbone and precision."""
    import keras

    previous = keras.config.dtype_policy()
    if precision != "float32":
        keras.config.set_dtype_policy(precision)
    try:
        t0 = time.perf_counter()
        model = getattr(keras.applications, _APPS[name])(
            input_shape=(size, size, 3), include_top=False, weights=None, pooling="avg"
        )
        build_s = time.perf_counter() - t0
    finally:
        keras.config.set_dtype_policy(previous)
    x = _inputs(n, size)
    t0 = time.perf_counter()
    model.predict(x[:batch_size], batch_size=batch_size, verbose=0)  # compile outside the timing
    compile_s = time.perf_counter() - t0
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = model.predict(x, batch_size=batch_size, verbose=0)
        runs.append(time.perf_counter() - t0)
    assert out.shape[0] == n and np.isfinite(out).all()
    return {
        "backbone": name,
        "precision": precision,
        "images_per_s": round(n / min(runs), 1),
        "runs_s": [round(r, 3) for r in runs],
        "build_s": round(build_s, 2),
        "first_call_s": round(compile_s, 2),
    }


def _decode(path: str, draft: int | None) -> int:
    from featurecache.data import decode_image

    return int(decode_image(path, draft=draft).shape[0])


def _decode_pixels(path: str, draft: int | None) -> np.ndarray:
    """As a process pool must: the decoded pixels go back to the caller (pickled through a pipe)."""
    from featurecache.data import decode_image

    return np.ascontiguousarray(decode_image(path, draft=draft))


def _warm(_: int) -> int:
    import featurecache.data  # noqa: F401 - imports outside the timing

    return os.getpid()


def decode_rates(paths: list[str], *, draft: int | None, workers: list[int], reps: int) -> dict[str, Any]:
    """Images/s of ``decode_image`` over ``paths`` with thread pools of each size and one process pool."""
    out: dict[str, Any] = {"threads": {}, "processes": {}}
    _decode(paths[0], draft)
    for w in workers:
        with ThreadPoolExecutor(w) as pool:
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                list(pool.map(lambda p: _decode(p, draft), paths))
                times.append(time.perf_counter() - t0)
        out["threads"][str(w)] = round(len(paths) / statistics.median(times), 1)
    top = max(workers)
    with ProcessPoolExecutor(top) as pool:
        list(pool.map(_warm, range(top * 2)))
        for label, fn in (("processes", _decode), ("processes_pixels_back", _decode_pixels)):
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                list(pool.map(fn, paths, [draft] * len(paths), chunksize=4))
                times.append(time.perf_counter() - t0)
            out.setdefault(label, {})[str(top)] = round(len(paths) / statistics.median(times), 1)
    return out


def markdown(result: dict[str, Any]) -> str:
    """Two tables for BENCHMARKS.md: backbone images/s, and decode images/s by workers."""
    lines = [
        f"{result['device']} | {result['cpus']} CPUs | Keras {result['keras']} on {result['backend']} | "
        f"batch {result['batch_size']} | {result['size']} px",
        "",
        "| backbone | precision | images/s | decode cores it needs (camera fast / web) |",
        "| --- | --- | --- | --- |",
    ]
    per_core = {k: v["threads"].get("1") for k, v in result["decode"].items() if isinstance(v, dict)}
    for row in result["backbone"]:
        if "error" in row:
            lines.append(f"| {row['backbone']} | {row['precision']} | failed: {row['error'][:60]} | |")
            continue
        need = " / ".join(
            f"{row['images_per_s'] / per_core[k]:.1f}" if per_core.get(k) else "?" for k in ("camera fast", "web")
        )
        lines.append(f"| {row['backbone']} | {row['precision']} | {row['images_per_s']:.0f} | {need} |")
    workers = result["workers"]
    lines += [
        "",
        "| data | "
        + " | ".join(f"{w} thread{'s' if w > 1 else ''}" for w in workers)
        + f" | {max(workers)} processes |",
        "| --- |" + " --- |" * (len(workers) + 2),
    ]
    lines[-2] += f" {max(workers)} processes, pixels sent back |"
    for kind, rates in result["decode"].items():
        top = str(max(workers))
        cells = [f"{rates['threads'][str(w)]:.0f}" for w in workers] + [
            f"{rates['processes'][top]:.0f}",
            f"{rates.get('processes_pixels_back', {}).get(top, float('nan')):.0f}",
        ]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Make the data, measure both halves, print the tables, write JSON and markdown."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_feed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="smoke test: 32 px backbones, a few images, CPU is fine")
    parser.add_argument("--backbones", default="resnet50,vgg19")
    parser.add_argument("--precisions", default="float32,mixed_float16")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--n-backbone", type=int, default=4096)
    parser.add_argument("--n-camera", type=int, default=96)
    parser.add_argument("--n-web", type=int, default=480)
    parser.add_argument("--n-screenshot", type=int, default=96)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--decode-only", action="store_true", help="skip the backbones (no Keras needed)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    size = 32 if args.tiny else 224
    if args.tiny:
        args.batch_size, args.n_backbone, args.n_camera, args.n_web, args.n_screenshot, args.reps = 8, 16, 4, 8, 4, 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = sorted({w for w in (1, 2, 4, 8, 16, 32, cpus) if w <= cpus})
    work = Path(tempfile.mkdtemp(prefix="fc-feed-"))
    started = time.perf_counter()
    decode: dict[str, Any] = {}
    try:
        folders = {
            kind: make_folder_parallel(work / kind, kind, n, workers=cpus, seed=5)
            for kind, n in (("camera", args.n_camera), ("web", args.n_web), ("screenshot", args.n_screenshot))
        }
        print(f"[gpu_feed] data made in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        for label, kind, draft in (
            ("camera exact", "camera", None),
            ("camera fast", "camera", 224),
            ("web", "web", None),
            ("screenshot PNG", "screenshot", None),
        ):
            paths = sorted(str(p) for p in folders[kind].rglob("*.*"))
            decode[label] = decode_rates(paths, draft=draft, workers=workers, reps=args.reps)
            print(f"[gpu_feed] {label}: {decode[label]}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.decode_only:
        args.backbones = ""
    import keras

    device = "CPU only"
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        device = gpus[0].device_kind if gpus else device
    elif backend == "torch":
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else device
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else device
    rows = []
    for name in filter(None, args.backbones.split(",")):
        for precision in args.precisions.split(","):
            try:
                rows.append(
                    backbone_rate(name, size=size, precision=precision, n=args.n_backbone, batch_size=args.batch_size)
                )
            except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
                traceback.print_exc()
                rows.append(
                    {
                        "backbone": name,
                        "precision": precision,
                        "error": " ".join(f"{type(exc).__name__}: {exc}".split())[:300],
                    }
                )
            print(f"[gpu_feed] {rows[-1]}", file=sys.stderr, flush=True)
    result = {
        "benchmark": "featurecache.gpu_feed",
        "tiny": args.tiny,
        "device": device,
        "backend": backend,
        "keras": keras.__version__,
        "cpus": cpus,
        "size": size,
        "batch_size": args.batch_size,
        "workers": workers,
        "platform": platform.platform(),
        "n": {"backbone": args.n_backbone, "camera": args.n_camera, "web": args.n_web, "screenshot": args.n_screenshot},
        "backbone": rows,
        "decode": decode,
        "total_seconds": round(time.perf_counter() - started, 1),
        "command": "python -m benchmarks.gpu_feed " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    table = markdown(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"gpu_feed-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"gpu_feed-{stamp}.md").write_text(table)
    return result


if __name__ == "__main__":
    main()
