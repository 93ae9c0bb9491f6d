"""One prepared script for a machine with a GPU: extraction speed of big backbones, in one run.

Measures ResNet50 and VGG19 at 224 px (ImageNet-sized backbones, random weights: no download),
``--precision float32`` vs ``mixed``, fed

* from an ``.npz`` of decoded images (the backbone's own speed, decoding out of the way),
* from a folder of ~500x375 web JPEGs (decode-bound on a small CPU),
* from a folder of 12 MP camera JPEGs with ``--decode exact`` and ``--decode fast``,

against the raw backbone (the same model as a ``tf.function`` on pre-resized, preprocessed
tensors, same precision). Each figure is end to end (model build, tracing, decode, writes)
and steady state (first to last write unit). It prints a markdown table ready for
BENCHMARKS.md and writes the JSON beside it. Meant to finish in under 8 minutes on one GPU
with 16 cores; ``--tiny`` is a smoke test that runs anywhere (CPU included) in about a minute::

    python -m benchmarks.gpu_runner --out "$OUT"          # on the GPU machine
    python -m benchmarks.gpu_runner --tiny                # anywhere: does the runner run?
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.realistic import make_folder_parallel, photo_crops


def _npz(path: Path, n: int, *, side: int) -> Path:
    from PIL import Image

    crops = photo_crops(n, seed=7)
    x = np.empty((n, side, side, 3), dtype=np.uint8)
    y = np.empty(n, dtype=np.int64)
    for i, (crop, label) in enumerate(crops):
        x[i] = np.asarray(Image.fromarray(crop).resize((side, side), Image.Resampling.BILINEAR))
        y[i] = label
    np.savez(path, x=x, y=y)
    return path


def _raw_rate(backbone: str, *, size: int, precision: str, n: int, batch_size: int) -> float:
    """Images/s of the bare feature model on ready tensors, in the given precision."""
    import tensorflow as tf

    from featurecache import backbones
    from featurecache.extraction.extract import build_model, plan

    p = plan("builtin:digits", backbone=backbone, weights="random", size=size, precision=precision, limit=2)
    model = build_model(p)
    gpu = bool(tf.config.list_physical_devices("GPU"))
    fn = tf.function(
        lambda t: model(t, training=False),
        input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)],
        jit_compile=gpu,
    )
    x = backbones.preprocess_input(
        p.backbone, np.random.default_rng(0).uniform(0, 255, (batch_size, size, size, 3)).astype(np.float32)
    )
    t = tf.convert_to_tensor(x)
    fn(t).numpy()  # trace and compile outside the timing
    reps = max(2, n // batch_size)
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn(t)
    out.numpy()
    return reps * batch_size / (time.perf_counter() - t0)


def _extract(
    source: Path, work: Path, *, backbone: str, size: int, precision: str, decode: str, batch_size: int
) -> dict[str, float]:
    import featurecache as fc

    cache = work / f"cache-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    res = fc.extract(
        str(source),
        backbone=backbone,
        weights="random",
        size=size,
        precision=precision,
        decode=decode,
        batch_size=batch_size,
        cache_dir=cache,
        progress=False,
    )
    wall = time.perf_counter() - t0
    n = sum(s["n"] for s in res.splits.values())
    markers = sorted(
        (p.stat().st_mtime_ns, json.loads(p.read_text())["rows"]) for p in (res.path / "_units").rglob("c*")
    )
    rows_after_first = sum(stop - start for _, (start, stop) in markers[1:])
    span = (markers[-1][0] - markers[0][0]) / 1e9 if len(markers) > 1 else float("nan")
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "images": n,
        "end_to_end": n / wall,
        "steady": rows_after_first / span if span > 0 else float("nan"),
        "seconds": wall,
    }


def markdown(result: dict[str, Any]) -> str:
    """The table for BENCHMARKS.md."""
    lines = [
        f"{result['device']} | {result['cpus']} CPUs | batch {result['batch_size']} | images/s end to end (steady state)",
        "",
        "| backbone | precision | raw backbone | .npz | web JPEG (500x375) | camera JPEG exact | camera JPEG fast |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        cells = [
            f"{row[k]['end_to_end']:.0f} ({row[k]['steady']:.0f})"
            for k in ("npz", "web", "camera_exact", "camera_fast")
        ]
        lines.append(f"| {row['backbone']} | {row['precision']} | {row['raw']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build the data, run every combination, print the table, write JSON and markdown."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="smoke test: 32 px, a few images, CPU is fine")
    parser.add_argument("--backbones", default="resnet50,vgg19")
    parser.add_argument("--precisions", default="float32,mixed")
    parser.add_argument("--n-npz", type=int, default=4096)
    parser.add_argument("--n-web", type=int, default=4096)
    parser.add_argument("--n-camera", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    size = 32 if args.tiny else 224
    if args.tiny:
        args.n_npz, args.n_web, args.n_camera, args.batch_size = 16, 8, 2, 8
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else "CPU only"
    cpus = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="fc-gpu-"))
    started = time.perf_counter()
    try:
        t0 = time.perf_counter()
        npz = _npz(work / "images.npz", args.n_npz, side=256 if not args.tiny else 48)
        web = make_folder_parallel(work / "web", "web", args.n_web, workers=cpus)
        camera = make_folder_parallel(work / "camera", "camera", args.n_camera, workers=cpus)
        data_s = time.perf_counter() - t0
        print(f"[gpu_runner] data made in {data_s:.0f} s", file=sys.stderr, flush=True)
        rows = []
        for backbone in args.backbones.split(","):
            for precision in args.precisions.split(","):
                common = dict(backbone=backbone, size=size, precision=precision, batch_size=args.batch_size)
                row: dict[str, Any] = {
                    "backbone": backbone,
                    "precision": precision,
                    "raw": _raw_rate(
                        backbone,
                        size=size,
                        precision=precision,
                        n=max(args.n_npz, 256) if not args.tiny else 16,
                        batch_size=args.batch_size,
                    ),
                }
                row["npz"] = _extract(npz, work, decode="exact", **common)
                row["web"] = _extract(web, work, decode="exact", **common)
                row["camera_exact"] = _extract(camera, work, decode="exact", **common)
                row["camera_fast"] = _extract(camera, work, decode="fast", **common)
                rows.append(row)
                print(
                    f"[gpu_runner] {backbone} {precision} done at {time.perf_counter() - started:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from featurecache.extraction.extract import library_versions

    result = {
        "benchmark": "featurecache.gpu_runner",
        "tiny": args.tiny,
        "device": device,
        "cpus": cpus,
        "size": size,
        "batch_size": args.batch_size,
        "n": {"npz": args.n_npz, "web": args.n_web, "camera": args.n_camera},
        "platform": platform.platform(),
        "versions": library_versions(),
        "data_seconds": round(data_s, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
        "command": "python -m benchmarks.gpu_runner " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    table = markdown(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"gpu-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"gpu-{stamp}.md").write_text(table)
    return result


if __name__ == "__main__":
    main()
