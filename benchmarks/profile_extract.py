"""Where extraction spends its time: py-spy profiles of a serial loop and of ``featurecache.extract``.

Three runs over the same generated JPEG folder, each under ``py-spy record --threads --idle``:

* ``serial``: the loop a user writes by hand -- decode, resize and preprocess a batch, call the
  backbone, write to Zarr, next batch -- all in one thread, nothing overlapped;
* ``extract``: ``featurecache.extract`` of this checkout (decode threads, a prepare thread
  that runs ahead, the backbone as a ``tf.function`` in the main thread, a writer thread);
* ``extract@REV`` (with ``--before PATH``, a checkout of an older revision): the same call
  there, to compare versions.

For each run it prints the wall time and, for the thread that calls the backbone, the share
of samples spent in each stage (backbone, decode, resize, preprocess, write, waiting, other).
Overlap shows as that thread spending its time in the backbone rather than in the others.

    python -m benchmarks.profile_extract                      # 3000 images, mobilenetv2 @ 96 px
    python -m benchmarks.profile_extract --before /tmp/old    # plus a checkout of an older revision

Needs ``py-spy`` (``pip install py-spy``). Results go to ``benchmarks/results/profile-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: One-off costs of a run, by the first pattern found anywhere in a sample's stack.
SETUP: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("import", ("_find_and_load",)),
    ("dataset", ("load_dataset", "dataset_digest", "plan (")),
    ("model", ("build_feature_model", "build_model (")),
    ("store", ("create_entry",)),
)
#: Stage of a per-image sample, in priority order (``waiting`` only when nothing else matches).
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("write", ("write_unit", "zarr/", "numcodecs")),
    ("decode", ("decode_image", "_decode_bytes", "PIL/", "read_image_bytes")),
    ("resize", ("resize_image", "_resize_into")),
    ("preprocess", ("preprocess_input",)),
    ("augment", ("augment_batch",)),
    ("backbone", ("compiled_forward", "forward_in_batches", "tensorflow/", "keras/")),
    (
        "waiting",
        ("wait (threading", "result (concurrent", "_worker (concurrent", "get (queue", "acquire", "sleep", "select ("),
    ),
)


def _stage(stack: str) -> str:
    if not stack.strip():
        return "setup:exit"  # no Python frame: interpreter start-up or shutdown
    for name, patterns in SETUP:
        if any(p in stack for p in patterns):
            return f"setup:{name}"
    for name, patterns in STAGES:
        if any(p in stack for p in patterns):
            return name
    return "other"


def summarise(raw: Path) -> dict[str, Any]:
    """Per thread: samples and the share of each stage, from a ``py-spy --format raw`` file."""
    threads: dict[str, Counter[str]] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        thread, _, rest = stack.partition(";")
        threads.setdefault(thread, Counter())[_stage(rest)] += int(count)
    out: dict[str, Any] = {}
    for thread, counts in threads.items():
        total = sum(counts.values())
        setup = {k.split(":", 1)[1]: counts.pop(k) for k in [k for k in counts if k.startswith("setup:")]}
        rest = max(1, total - sum(setup.values()))
        # Shares of the samples after setup: what the thread does while images flow.
        out[thread] = {
            "samples": total,
            "setup_share": round(sum(setup.values()) / total, 3),
            "setup": {k: round(v / total, 3) for k, v in sorted(setup.items(), key=lambda kv: -kv[1])},
            **{k: round(v / rest, 3) for k, v in counts.most_common()},
        }
    return out


def _backbone_thread(summary: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The thread with the most backbone samples (the one that calls the model)."""
    return max(summary.items(), key=lambda kv: kv[1].get("backbone", 0) * kv[1]["samples"] * (1 - kv[1]["setup_share"]))


def serial(folder: Path, *, backbone: str, size: int, batch_size: int, out: Path) -> None:
    """The hand-written loop: one thread, one batch at a time, nothing overlapped."""
    import numpy as np
    import tensorflow as tf
    import zarr

    from featurecache import backbones
    from featurecache.data import load_dataset, resize_image

    split = load_dataset(str(folder)).splits["train"]
    spec = backbones.get_backbone(backbone)
    model = backbones.build_feature_model(
        spec, backbones.parse_weights("random", seed=0), input_size=size, pooling="avg"
    )
    fn = tf.function(
        lambda t: model(t, training=False), input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)]
    )
    n = len(split)
    arr = zarr.create_array(
        str(out), shape=(n, int(model.output_shape[-1])), chunks=(1024, int(model.output_shape[-1])), dtype="float32"
    )
    for b in range(0, n, batch_size):
        x = np.stack([resize_image(split.load(i), size) for i in range(b, min(n, b + batch_size))])
        arr[b : b + len(x)] = fn(tf.convert_to_tensor(backbones.preprocess_input(spec, x))).numpy()


def _worker(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    if args.worker == "serial":
        serial(
            args.folder,
            backbone=args.backbone,
            size=args.size,
            batch_size=args.batch_size,
            out=args.scratch / "serial.zarr",
        )
    else:
        import featurecache as fc

        fc.extract(
            str(args.folder),
            backbone=args.backbone,
            weights="random",
            size=args.size,
            batch_size=args.batch_size,
            cache_dir=args.scratch / "cache",
            progress=False,
        )
    import featurecache

    print(
        json.dumps(
            {"seconds": time.perf_counter() - t0, "featurecache": str(Path(featurecache.__file__).parent.parent)}
        )
    )


def _profile(mode: str, *, pythonpath: Path, folder: Path, scratch: Path, args: argparse.Namespace) -> dict[str, Any]:
    raw = scratch / f"{mode}.txt"
    # Run as a script (not -m) so that only `featurecache` comes from PYTHONPATH, the checkout profiled.
    env = dict(os.environ, PYTHONPATH=str(pythonpath), TF_CPP_MIN_LOG_LEVEL="3")
    beside = Path(sys.executable).parent / "py-spy"  # installed in this environment, not on PATH
    cmd = [
        str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy",
        "record",
        "--format",
        "raw",
        "--threads",
        "--idle",
        "--rate",
        "200",
        "-o",
        str(raw),
        "--",
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "serial" if mode == "serial" else "extract",
        "--folder",
        str(folder),
        "--scratch",
        str(scratch / mode),
        "--backbone",
        args.backbone,
        "--size",
        str(args.size),
        "--batch-size",
        str(args.batch_size),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode}: py-spy run failed:\n{proc.stderr[-2000:]}")
    done = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    seconds = done["seconds"]
    summary = summarise(raw)
    name, main = _backbone_thread(summary)
    return {
        "checkout": done["featurecache"],
        "seconds": round(seconds, 2),
        "images_per_s": round(args.n / seconds, 1),
        "backbone_thread": main,
        "threads": {k: v for k, v in summary.items() if v["samples"] >= 0.05 * main["samples"]},
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Profile the serial loop and ``featurecache.extract`` (and optionally an older checkout)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_extract", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--backbone", default="mobilenetv2")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--before", type=Path, default=None, help="checkout of an older revision to profile too")
    parser.add_argument("--worker", choices=("serial", "extract"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return {}
    from benchmarks.run import _make_images, _write_images

    work = Path(tempfile.mkdtemp(prefix="fc-profile-"))
    try:
        images, labels = _make_images(args.n, 128, seed=0)
        _write_images(images, labels, work / "jpegs")
        result: dict[str, Any] = {
            "n": args.n,
            "backbone": args.backbone,
            "size": args.size,
            "batch_size": args.batch_size,
            "cpus": os.cpu_count(),
            "runs": {},
        }
        modes = [("serial", ROOT), ("extract", ROOT)] + ([("extract@before", args.before)] if args.before else [])
        for mode, path in modes:
            print(f"[profile] {mode} ...", file=sys.stderr, flush=True)
            result["runs"][mode] = _profile(mode, pythonpath=path, folder=work / "jpegs", scratch=work, args=args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for mode, r in result["runs"].items():
        bt = r["backbone_thread"]
        shares = ", ".join(f"{k} {v:.0%}" for k, v in bt.items() if k not in ("samples", "setup_share", "setup"))
        setup = ", ".join(f"{k} {v:.0%}" for k, v in bt["setup"].items())
        print(
            f"{mode:16s} {r['seconds']:6.1f} s {r['images_per_s']:6.1f} img/s | backbone thread: setup {bt['setup_share']:.0%} ({setup}); "
            f"after setup: {shares}"
        )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"profile-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
