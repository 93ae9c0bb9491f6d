"""featurecache against doing the same work by hand, measured side by side in one run.

Every figure is a *ratio* of two timings taken in the same process (or the same script) on
the same data, interleaved where that helps, so a busy machine slows both sides alike:

* **extraction overhead**: ``featurecache.extract`` images/s (cold cache, in a process that has
  already imported TensorFlow) over the raw images/s of the same backbone called as a
  ``tf.function`` on pre-decoded, pre-resized, preprocessed tensors with the same batch size.
  Measured from a folder of generated JPEGs and from the same images as an ``.npz``. *End to
  end* includes everything ``extract`` does (dataset digest, building the model, tracing,
  decoding, resizing, writing); *steady state* is the rate from the first write unit's
  completion marker to the last one's (file mtimes), which leaves out the one-off costs. Also
  the ratio of CPU seconds per image, which other processes on the machine barely disturb.
* **cache hit**: wall time of a repeated ``python -m featurecache extract`` on 10,000 images
  (``.npz`` and folder), interpreter start included.
* **head speed**: one epoch of a dense head on cached features vs one epoch of the same head
  behind the frozen backbone (``benchmarks/head_speed.py``), and a 24-configuration sweep
  (``featurecache.sweep``) vs the same sweep written as scikit-learn ``GridSearchCV(cv=
  PredefinedSplit)`` for logistic regression plus a plain Keras loop for the dense heads.
* **users' data** (``benchmarks/realistic.py``): 12 MP camera JPEGs with EXIF orientation,
  ~500x375 web JPEGs and RGBA PNG screenshots made from scikit-learn's sample photos;
  MobileNetV3Small @ 224: ``featurecache extract`` (``--decode exact`` and ``fast``) vs the
  seeds' naive script (``keras.utils.load_img(target_size)`` -> ``predict`` -> ``np.save``) vs
  the raw backbone, interleaved, and how far fast-decoded features are from exact ones.
* **memory**: peak RSS (``VmHWM``) of extraction subprocesses on n and 10 n images, and of
  training a dense head on features over a memory budget (streamed from Zarr) vs in memory.

Run from the repository root::

    python -m benchmarks.run            # about 10-15 minutes on 2 cores
    python -m benchmarks.run --quick    # a smoke test, about 3 minutes

It prints a table and writes ``benchmarks/results/run-<time>.json`` and ``.md`` (gitignored).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    """Environment for subprocesses: this checkout first on the path, TF quiet."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.pop("FEATURECACHE_DIR", None)
    return env


def _python(code: str, *, timeout: float = 900) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; it prints one JSON document as its last line."""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "ram_gib": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _write_images(images: np.ndarray, labels: np.ndarray, folder: Path, *, quality: int = 90) -> None:
    from PIL import Image

    for c in np.unique(labels):
        (folder / f"class{int(c)}").mkdir(parents=True, exist_ok=True)
    for i, (img, c) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(img).save(folder / f"class{int(c)}" / f"img{i:06d}.jpg", quality=quality)


def _make_images(n: int, size: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Photo-like test images: smooth blocks plus noise, so JPEG sizes are realistic."""
    rng = np.random.default_rng(seed)
    block = 8
    coarse = rng.integers(0, 256, size=(n, -(-size // block), -(-size // block), 3), dtype=np.uint8)
    images = np.repeat(np.repeat(coarse, block, axis=1), block, axis=2)[:, :size, :size]
    noise = rng.integers(-20, 21, size=images.shape, dtype=np.int16)
    return np.clip(images.astype(np.int16) + noise, 0, 255).astype(np.uint8), np.arange(n) % 10


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


# ---------------------------------------------------------------------------------- extraction


def bench_extraction(
    work: Path, *, n: int, src_size: int, size: int, backbone: str, batch_size: int, reps: int, n_raw: int = 3000
) -> dict[str, Any]:
    """Extraction throughput vs the raw backbone, from a JPEG folder and an .npz of the same images."""
    import tensorflow as tf

    import featurecache as fc
    from featurecache import backbones
    from featurecache.data import load_dataset, resize_image

    images, labels = _make_images(n, src_size, seed=0)
    folder, npz = work / "jpegs", work / "images.npz"
    _write_images(images, labels, folder)
    # The npz holds the *decoded JPEGs*, so both sources give the same pixels.
    split = load_dataset(str(folder)).splits["train"]
    decoded = np.stack([split.load(i) for i in range(len(split))])
    np.savez(npz, x=decoded, y=split.labels)
    del images

    spec = backbones.get_backbone(backbone)
    model = backbones.build_feature_model(
        spec, backbones.parse_weights("random", seed=0), input_size=size, pooling="avg"
    )
    # The raw rate does not depend on how many images there are: time it on the first n_raw.
    n_raw = min(n, n_raw)
    x = backbones.preprocess_input(
        spec, np.concatenate([resize_image(decoded[b : b + 256], size) for b in range(0, n_raw, 256)])
    )
    del decoded
    fn = tf.function(
        lambda t: model(t, training=False),
        input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)],
        reduce_retracing=True,
    )
    fn(tf.convert_to_tensor(x[:batch_size])).numpy()  # trace outside the timing

    def raw() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        for b in range(0, n_raw, batch_size):
            fn(tf.convert_to_tensor(x[b : b + batch_size])).numpy()
        return (time.perf_counter() - t0) / n_raw, (time.process_time() - c0) / n_raw

    def extract(source: Path, limit: int | None = None) -> dict[str, float]:
        cache = work / f"cache-{time.monotonic_ns()}"
        started, t0, c0 = time.time(), time.perf_counter(), time.process_time()
        fc.extract(
            str(source),
            backbone=backbone,
            weights="random",
            size=size,
            batch_size=batch_size,
            cache_dir=cache,
            limit=limit,
            progress=False,
        )
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        # Steady state from the completion markers: the rate from the first unit written to the
        # last, which leaves out the one-off costs (digest, model build, tracing).
        markers = sorted(
            (p.stat().st_mtime_ns, len(json.loads(p.read_text())["attributes"]["featurecache"]["digests"]))
            for p in (cache / "features").glob("*/units/v*/u*/zarr.json")
        )
        rows_after_first = sum(n for _, n in markers[1:])
        span = (markers[-1][0] - markers[0][0]) / 1e9 if len(markers) > 1 else float("nan")
        shutil.rmtree(cache, ignore_errors=True)
        return {
            "wall": wall,
            "cpu": cpu,
            "steady": rows_after_first / span if span > 0 else float("nan"),
            "first_unit_s": markers[0][0] / 1e9 - started,
            "units": len(markers),
        }

    raws: list[tuple[float, float]] = []
    runs: dict[str, list[dict[str, float]]] = {"npz": [], "folder": []}
    extract(npz, 16)  # warm up: imports and first-use costs of the extract path, not measured
    for _ in range(reps):
        # Interleaved, so a burst of load elsewhere hits both sides.
        raws.append(raw())
        runs["npz"].append(extract(npz))
        raws.append(raw())
        runs["folder"].append(extract(folder))
    raws.append(raw())

    raw_s = statistics.median(w for w, _ in raws)
    raw_cpu = statistics.median(c for _, c in raws)
    out: dict[str, Any] = {
        "n": n,
        "source_px": src_size,
        "size": size,
        "backbone": backbone,
        "weights": "random",
        "batch_size": batch_size,
        "reps": reps,
        "raw_images_per_s": round(1 / raw_s, 1),
        "raw_runs_images_per_s": [round(1 / w, 1) for w, _ in raws],
        "raw_cpu_ms_per_image": round(1000 * raw_cpu, 3),
    }
    for kind, rs in runs.items():
        wall = statistics.median(r["wall"] for r in rs)
        cpu = statistics.median(r["cpu"] for r in rs)
        steady = statistics.median(r["steady"] for r in rs)
        out[kind] = {
            "images_per_s": round(n / wall, 1),
            "seconds": round(wall, 3),
            "runs_s": [round(r["wall"], 3) for r in rs],
            "cpu_ms_per_image": round(1000 * cpu / n, 3),
            "ratio_end_to_end": _ratio(n / wall, 1 / raw_s),
            "ratio_steady_state": _ratio(steady, 1 / raw_s),
            "ratio_cpu": _ratio(raw_cpu * n, cpu),
            "steady_images_per_s": round(steady, 1),
            "first_unit_written_s": round(statistics.median(r["first_unit_s"] for r in rs), 3),
            "units": int(rs[0]["units"]),
        }
    return out


def profile_extraction(
    work: Path, *, n: int, src_size: int, size: int, backbone: str, batch_size: int
) -> dict[str, Any]:
    """cProfile of one extraction from the JPEG folder: where the calling thread's time goes."""
    import cProfile
    import pstats

    import featurecache as fc

    folder = work / "jpegs"
    prof = cProfile.Profile()
    cache = work / "cache-profile"
    prof.enable()
    fc.extract(
        str(folder),
        backbone=backbone,
        weights="random",
        size=size,
        batch_size=batch_size,
        cache_dir=cache,
        progress=False,
    )
    prof.disable()
    shutil.rmtree(cache, ignore_errors=True)
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(file).name}:{line}({func})",
                "calls": nc,
                "tottime": round(tt, 3),
                "cumtime": round(ct, 3),
            }
        )
    rows.sort(key=lambda r: -r["cumtime"])
    keep = [
        r
        for r in rows
        if any(
            k in r["function"]
            for k in ("extract.py", "store.py", "backbones.py", "dataset.py", "transforms.py", "decode.py")
        )
    ]
    return {"n": n, "top_cumulative": keep[:15]}


# ---------------------------------------------------------------------------------- cache hit


def bench_cache_hit(work: Path, *, n: int, size: int, reps: int) -> dict[str, Any]:
    """Wall seconds of a repeated CLI extract on ``n`` images (.npz and folder), interpreter start included."""
    images, labels = _make_images(n, 32, seed=1)
    npz, folder = work / "hit.npz", work / "hit-jpegs"
    np.savez(npz, x=images, y=labels)
    _write_images(images, labels, folder)
    out: dict[str, Any] = {"n": n, "size": size}
    for kind, source in (("npz", npz), ("folder", folder)):
        cache = work / f"hit-cache-{kind}"
        cmd = [
            sys.executable,
            "-m",
            "featurecache",
            "extract",
            "--data",
            str(source),
            "--backbone",
            "mobilenetv2",
            "--weights",
            "random",
            "--size",
            str(size),
            "--cache",
            str(cache),
            "--json",
        ]
        t0 = time.perf_counter()
        first = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, check=True)
        first_s = time.perf_counter() - t0
        assert not json.loads(first.stdout)["cached"]
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, check=True)
            times.append(time.perf_counter() - t0)
            assert json.loads(again.stdout)["cached"], "a repeated extract must be a cache hit"
        # The floor: starting Python and importing the CLI, which every command pays.
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import featurecache.cli.main"], cwd=ROOT, env=_env(), check=True)
        floor = time.perf_counter() - t0
        out[kind] = {
            "first_run_s": round(first_s, 2),
            "hit_s": round(statistics.median(times), 3),
            "hit_runs_s": [round(t, 3) for t in times],
            "python_and_imports_s": round(floor, 3),
        }
        shutil.rmtree(cache, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------- heads


def _synthetic_feature_set(cache: Path, *, n_train: int, n_val: int, dim: int, classes: int = 10, seed: int = 0) -> Any:
    """A complete cache entry of class-structured Gaussian features (learnable, unlike random-weight features)."""
    from featurecache.cache import views
    from featurecache.cache.keys import FeatureSpec

    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, size=(classes, dim)).astype(np.float32)

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(m) % classes
        # Noise wide enough that heads differ (validation accuracy well below 1).
        return (centres[y] + rng.normal(0, 14.0, size=(m, dim))).astype(np.float32), y

    parts = {"train": draw(n_train), "val": draw(n_val)}
    spec = FeatureSpec(
        backbone="synthetic",
        weights=f"random:seed={seed}",
        layer=f"gauss{dim}",
        pooling="none",
        input_size=1,
        resize="bilinear",
        preprocess="none",
        augment={},
        views=0,
        augment_splits=(),
        seed=seed,
        dtype="float32",
    )
    fs = views.write_arrays(
        cache,
        spec,
        classes=[str(c) for c in range(classes)],
        dataset_name=f"gauss-{n_train}x{dim}",
        splits={s: ([str(i) for i in range(len(y))], y, X[None], None) for s, (X, y) in parts.items()},
    )
    return fs, parts


def bench_sweep(work: Path, *, n_train: int, n_val: int, dim: int, dense_epochs: int, n_jobs: int) -> dict[str, Any]:
    """24 configurations: featurecache.sweep vs GridSearchCV(PredefinedSplit) + a plain Keras loop."""
    import keras
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, PredefinedSplit
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import featurecache as fc

    cache = work / "sweep-cache"
    fs, parts = _synthetic_feature_set(cache, n_train=n_train, n_val=n_val, dim=dim)
    Cs = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0]
    hidden, dropouts, lrs = [128, 256], [0.2, 0.5], [0.001, 0.003, 0.01]
    grid = [
        "logreg:C=" + ",".join(f"{c:g}" for c in Cs),
        f"dense:hidden={','.join(map(str, hidden))};dropout={','.join(map(str, dropouts))};lr={','.join(map(str, lrs))};"
        f"epochs={dense_epochs};patience=0",
    ]
    (Xtr, ytr), (Xva, yva) = parts["train"], parts["val"]

    def ours(together: bool = True) -> tuple[float, Any]:
        out = work / f"sweep-{time.monotonic_ns()}"
        t0 = time.perf_counter()
        res = fc.sweep(fs, grid=grid, n_jobs=n_jobs, out=out, together=together, progress=False)
        return time.perf_counter() - t0, res

    def plain() -> tuple[float, dict[str, float]]:
        t0 = time.perf_counter()
        X, y = np.concatenate([Xtr, Xva]), np.concatenate([ytr, yva])
        fold = np.r_[np.full(len(ytr), -1), np.zeros(len(yva), dtype=int)]
        search = GridSearchCV(
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, tol=1e-4)),
            {"logisticregression__C": Cs},
            cv=PredefinedSplit(fold),
            n_jobs=n_jobs,
            refit=False,
        ).fit(X, y)
        scores = {f"logreg C={c:g}": float(s) for c, s in zip(Cs, search.cv_results_["mean_test_score"], strict=True)}
        for h in hidden:
            for d in dropouts:
                for lr in lrs:
                    keras.utils.set_random_seed(0)
                    model = keras.Sequential(
                        [
                            keras.Input((dim,)),
                            keras.layers.Dense(h, activation="relu"),
                            keras.layers.Dropout(d),
                            keras.layers.Dense(10, activation="softmax"),
                        ]
                    )
                    model.compile(
                        optimizer=keras.optimizers.Adam(lr),
                        loss="sparse_categorical_crossentropy",
                        metrics=["accuracy"],
                    )
                    model.fit(Xtr, ytr, epochs=dense_epochs, batch_size=64, validation_data=(Xva, yva), verbose=0)
                    scores[f"dense {h} {d} {lr}"] = float(model.evaluate(Xva, yva, verbose=0, batch_size=256)[1])
        return time.perf_counter() - t0, scores

    ours()  # warm up imports and first traces for both sides (Keras, sklearn, zarr)
    plain_s, scores = plain()
    ours_s, res = ours()
    alone_s, alone = ours(together=False)  # dense heads one at a time: what grouping saves
    plain_s2, _ = plain()
    ours_s2, _ = ours()
    plain_t, ours_t = statistics.mean([plain_s, plain_s2]), statistics.mean([ours_s, ours_s2])
    best_plain = max(scores.values())
    same = all(
        a["val_accuracy"] == b["val_accuracy"]
        for a, b in zip(
            sorted(res.leaderboard, key=lambda r: r["trial"]),
            sorted(alone.leaderboard, key=lambda r: r["trial"]),
            strict=True,
        )
    )
    return {
        "configs": len(res.leaderboard),
        "n_train": n_train,
        "n_val": n_val,
        "dim": dim,
        "dense_epochs": dense_epochs,
        "n_jobs": n_jobs,
        "featurecache_s": round(ours_t, 2),
        "plain_s": round(plain_t, 2),
        "ratio_plain_over_featurecache": _ratio(plain_t, ours_t),
        "featurecache_one_by_one_s": round(alone_s, 2),
        "ratio_one_by_one_over_together": _ratio(alone_s, ours_t),
        "together_same_val_accuracy_as_one_by_one": same,
        "runs_s": {
            "featurecache": [round(ours_s, 2), round(ours_s2, 2)],
            "plain": [round(plain_s, 2), round(plain_s2, 2)],
        },
        "best_val_accuracy": {"featurecache": round(float(res.best["val_accuracy"]), 4), "plain": round(best_plain, 4)},
        "features_in_workers": sorted({str(r.get("worker", {}).get("features")) for r in _trial_records(res.out_dir)}),
    }


def _trial_records(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out_dir / "trials").glob("*.json"))]


def bench_head_epoch(work: Path, *, backbone: str, size: int, n: int) -> dict[str, Any]:
    """One epoch of a dense head on cached features vs behind the frozen backbone (benchmarks/head_speed.py)."""
    head_speed = importlib.import_module("benchmarks.head_speed")
    argv = [
        "--backbone",
        backbone,
        "--size",
        str(size),
        "--n",
        str(n),
        "--epochs",
        "3",
        "--out",
        str(work / "head_speed"),
    ]
    result = head_speed.main(argv)
    return {
        "backbone": result["backbone"],
        "size": result["size"],
        "n": result["n"],
        "batch_size": result["batch_size"],
        "cached_epoch_s": result["cached"]["steady_epoch_seconds"],
        "in_loop_epoch_s": result["in_loop"]["steady_epoch_seconds"],
        "ratio": result["ratio"],
        "extraction_s": result["extraction_seconds"],
        "break_even_epochs": result["break_even_epochs"],
    }


# ---------------------------------------------------------------------------------- precision


def bench_precision(work: Path, *, backbones_: Sequence[str], size: int, n: int) -> dict[str, Any]:
    """Max feature difference of --precision mixed and of XLA against plain float32 (on this CPU).

    Random weights of a backbone whose random activations are O(1) (MobileNetV2's shrink to
    ~1e-11 and underflow in float16, which says nothing about trained weights).
    """
    import featurecache as fc

    out: dict[str, Any] = {"n": n, "size": size, "device": "CPU"}
    for name in backbones_:
        feats: dict[str, np.ndarray] = {}
        seconds: dict[str, float] = {}
        for label, options in (("float32", {}), ("mixed", {"precision": "mixed"}), ("xla", {"xla": True})):
            cache = work / f"precision-{name}-{label}"
            t0 = time.perf_counter()
            res = fc.extract(
                "builtin:digits",
                backbone=name,
                weights="random",
                size=size,
                limit=n,
                cache_dir=cache,
                progress=False,
                **options,
            )
            seconds[label] = round(time.perf_counter() - t0, 2)
            feats[label] = fc.open_features(res.key, cache_dir=cache).features("train").astype(np.float64)
            shutil.rmtree(cache, ignore_errors=True)
        scale = float(np.abs(feats["float32"]).max())
        out[name] = {
            "max_abs_feature": round(scale, 4),
            "mixed_max_abs_diff": float(f"{np.abs(feats['mixed'] - feats['float32']).max():.3g}"),
            "mixed_max_rel_diff": float(f"{np.abs(feats['mixed'] - feats['float32']).max() / scale:.3g}"),
            "xla_max_abs_diff": float(f"{np.abs(feats['xla'] - feats['float32']).max():.3g}"),
            "cpu_seconds": seconds,
        }
    return out


# ---------------------------------------------------------------------------------- users' data


def bench_realistic(work: Path, *, quick: bool) -> dict[str, Any]:
    """featurecache vs the naive script vs the raw backbone on camera, web and screenshot folders."""
    from benchmarks.realistic import bench_kind

    sizes = {"camera": 4, "web": 16, "screenshot": 4} if quick else {"camera": 40, "web": 200, "screenshot": 40}
    return {
        kind: bench_kind(work, kind, n=n, size=64 if quick else 224, reps=1 if quick else 2)
        for kind, n in sizes.items()
    }


# ---------------------------------------------------------------------------------- memory

_PEAK = "int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"


def bench_memory(work: Path, *, n: int, size: int, backbone: str, stream_rows: int, dim: int) -> dict[str, Any]:
    """Peak RSS of extraction on n vs 10 n images, and of a dense head over a memory budget."""
    out: dict[str, Any] = {"n": n, "size": size, "backbone": backbone}
    images, labels = _make_images(10 * n, 64, seed=2)
    for mult in (1, 10):
        folder = work / f"mem-{mult}x"
        _write_images(images[: mult * n], labels[: mult * n], folder)
        code = (
            "import json, featurecache as fc\n"
            f"r = fc.extract({str(folder)!r}, backbone={backbone!r}, weights='random', size={size}, cache_dir={str(work / f'mem-cache-{mult}')!r}, progress=False)\n"
            f"print(json.dumps({{'peak_kib': {_PEAK}, 'rows': sum(s['n'] for s in r.splits.values())}}))"
        )
        res = _python(code)
        out[f"extract_{mult}x"] = {"images": res["rows"], "peak_rss_mib": round(res["peak_kib"] / 1024, 1)}
        shutil.rmtree(folder, ignore_errors=True)
    out["extract_peak_ratio_10x_over_1x"] = _ratio(
        out["extract_10x"]["peak_rss_mib"], out["extract_1x"]["peak_rss_mib"]
    )

    # Streaming: a feature set several times the budget trains the dense head from Zarr.
    cache = work / "stream-cache"
    fs, _ = _synthetic_feature_set(cache, n_train=stream_rows, n_val=2000, dim=dim, seed=3)
    feature_mib = stream_rows * dim * 4 / 2**20
    budget_mib = max(1, int(feature_mib / 4))
    for mode, budget in (("streamed", f"{budget_mib}MiB"), ("in_memory", "64GiB")):
        code = (
            "import json, time, featurecache as fc\n"
            "from featurecache.training.train import train_head, load_training_data, resolve_features\n"
            f"fs = resolve_features({fs.key!r}, cache_dir={str(cache)!r})\n"
            f"d = load_training_data(fs, max_memory={budget!r})\n"
            "t = time.perf_counter()\n"
            f"r = train_head(fs, head='dense', params={{'epochs': 1, 'patience': 0}}, out={str(work / ('run-' + mode))!r}, plots=False, data=d)\n"
            f"print(json.dumps({{'peak_kib': {_PEAK}, 'streamed': d.streamed, 'epoch_s': time.perf_counter() - t, 'val_accuracy': r.metrics['val']['accuracy']}}))"
        )
        res = _python(code)
        out[f"head_{mode}"] = {
            "budget": budget,
            "streamed": res["streamed"],
            "peak_rss_mib": round(res["peak_kib"] / 1024, 1),
            "epoch_s": round(res["epoch_s"], 2),
            "val_accuracy": round(res["val_accuracy"], 4),
        }
    out["head_features_mib"] = round(feature_mib, 1)
    # The in-memory run also trains under a budget below its features: it must fail clearly for sklearn heads.
    code = (
        "import json\n"
        "from featurecache.errors import MemoryBudgetError\n"
        "from featurecache.training.train import train_head\n"
        f"try:\n    train_head({fs.key!r}, cache_dir={str(cache)!r}, head='logreg', max_memory='{budget_mib}MiB', out={str(work / 'run-logreg')!r}, plots=False)\n"
        "    print(json.dumps({'error': None}))\n"
        "except MemoryBudgetError as exc:\n    print(json.dumps({'error': str(exc)}))"
    )
    out["sklearn_over_budget_error"] = _python(code)["error"]
    shutil.rmtree(cache, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------- report


def _goal(value: float | None, goal: str, ok: bool | None) -> str:
    if value is None or ok is None:
        return f"{goal} | n/a"
    return f"{goal} | {'met' if ok else 'NOT met'}"


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown table (what BENCHMARKS.md shows)."""
    rows: list[tuple[str, str, str]] = []
    ex = result.get("extraction")
    if ex:
        setting = f"{ex['backbone']} @ {ex['size']} px, {ex['n']} images ({ex['source_px']} px JPEG), batch {ex['batch_size']}; raw {ex['raw_images_per_s']:.0f} img/s"
        for kind, label in (("folder", "JPEG folder"), ("npz", ".npz array")):
            r = ex[kind]
            rows.append(
                (
                    f"extraction / raw backbone, {label}, end to end",
                    f"{r['ratio_end_to_end']:.2f} ({r['images_per_s']:.0f} img/s)",
                    _goal(r["ratio_end_to_end"], ">= 0.9", r["ratio_end_to_end"] >= 0.9),
                )
            )
            rows.append(
                (
                    f"extraction / raw backbone, {label}, steady state (after the first of {r['units']} units, written at {r['first_unit_written_s']:.1f} s)",
                    f"{r['ratio_steady_state']:.2f} ({r['steady_images_per_s']:.0f} img/s)",
                    _goal(r["ratio_steady_state"], ">= 0.9", r["ratio_steady_state"] >= 0.9),
                )
            )
            rows.append(
                (
                    f"raw / extraction CPU s per image, {label}",
                    f"{r['ratio_cpu']:.2f}",
                    _goal(r["ratio_cpu"], ">= 0.9", r["ratio_cpu"] >= 0.9),
                )
            )
        rows.insert(0, ("setting", setting, "|"))
    hit = result.get("cache_hit")
    if hit:
        for kind in ("npz", "folder"):
            r = hit[kind]
            rows.append(
                (
                    f"cache hit, CLI, {hit['n']} images ({kind})",
                    f"{r['hit_s']:.2f} s (Python + imports {r['python_and_imports_s']:.2f} s)",
                    _goal(r["hit_s"], "< 2 s", r["hit_s"] < 2.0),
                )
            )
    he = result.get("head_epoch")
    if he:
        rows.append(
            (
                f"one epoch: head behind frozen {he['backbone']} @ {he['size']} px / head on cached features ({he['n']} images)",
                f"{he['ratio']:.0f}x ({he['in_loop_epoch_s']:.2f} s vs {he['cached_epoch_s']:.3f} s)",
                _goal(he["ratio"], "> 1", he["ratio"] > 1),
            )
        )
    sw = result.get("sweep")
    if sw:
        rows.append(
            (
                f"{sw['configs']}-config sweep: plain sklearn+Keras / featurecache.sweep (n_jobs={sw['n_jobs']})",
                f"{sw['ratio_plain_over_featurecache']:.2f} ({sw['plain_s']:.1f} s vs {sw['featurecache_s']:.1f} s)",
                _goal(
                    sw["ratio_plain_over_featurecache"], ">= 1 (no slower)", sw["ratio_plain_over_featurecache"] >= 1.0
                ),
            )
        )
        if "ratio_one_by_one_over_together" in sw:
            rows.append(
                (
                    "same sweep: dense heads one by one / trained together (`--one-by-one`)",
                    f"{sw['ratio_one_by_one_over_together']:.2f} ({sw['featurecache_one_by_one_s']:.1f} s vs {sw['featurecache_s']:.1f} s; "
                    f"same val accuracy: {sw['together_same_val_accuracy_as_one_by_one']})",
                    _goal(
                        sw["ratio_one_by_one_over_together"],
                        "> 1 (shares work)",
                        sw["ratio_one_by_one_over_together"] > 1.0,
                    ),
                )
            )
    pr = result.get("precision")
    if pr:
        for name in (k for k in pr if isinstance(pr[k], dict)):
            r = pr[name]
            rows.append(
                (
                    f"--precision mixed vs float32, {name} random @ {pr['size']} px (CPU)",
                    f"max abs diff {r['mixed_max_abs_diff']:.2g} = {r['mixed_max_rel_diff']:.1e} of the largest feature; XLA vs float32: {r['xla_max_abs_diff']:.1g}",
                    "recorded, speed-up on GPU not measured | mixed keyed, XLA not",
                )
            )
    for kind, goal_fast, goal_exact in (("camera", 4.0, 1.0), ("web", 1.2, 1.2), ("screenshot", None, 1.0)):
        r = (result.get("realistic") or {}).get(kind)
        if not r:
            continue
        ips = r["images_per_s"]
        what = f"{r['n']} {kind} images, {r['backbone']} @ {r['size']} ({ips['naive']:.1f} / {ips['featurecache_exact']:.1f} / {ips['featurecache_fast']:.1f} / {ips['raw_backbone']:.1f} img/s naive / exact / fast / raw)"
        rows.append(
            (
                f"featurecache exact / naive script, {what}",
                f"{r['exact_over_naive']:.2f} (CPU s: {r.get('cpu_exact_over_naive', float('nan')):.2f})",
                _goal(r["exact_over_naive"], f">= {goal_exact}", r["exact_over_naive"] >= goal_exact),
            )
        )
        if goal_fast is not None:
            rows.append(
                (
                    f"featurecache --decode fast / naive script, {kind}",
                    f"{r['fast_over_naive']:.2f} (CPU s: {r.get('cpu_fast_over_naive', float('nan')):.2f})",
                    _goal(r["fast_over_naive"], f">= {goal_fast}", r["fast_over_naive"] >= goal_fast),
                )
            )
        d = r["fast_vs_exact_features"]
        rows.append(
            (
                f"features fast vs exact, {kind}",
                f"mean abs diff {d['mean_abs_over_mean_abs']:.3f} of mean abs feature; median cosine {d['median_row_cosine']:.5f}",
                "recorded | keyed",
            )
        )
    mem = result.get("memory")
    if mem:
        r1, r10 = mem["extract_1x"], mem["extract_10x"]
        rows.append(
            (
                f"extraction peak RSS, {r10['images']} / {r1['images']} images",
                f"{mem['extract_peak_ratio_10x_over_1x']:.2f} ({r10['peak_rss_mib']:.0f} vs {r1['peak_rss_mib']:.0f} MiB)",
                _goal(
                    mem["extract_peak_ratio_10x_over_1x"], "flat (<= 1.1)", mem["extract_peak_ratio_10x_over_1x"] <= 1.1
                ),
            )
        )
        s, m = mem["head_streamed"], mem["head_in_memory"]
        rows.append(
            (
                f"dense head on {mem['head_features_mib']:.0f} MiB of features, budget {s['budget']}",
                f"streamed={s['streamed']}, peak {s['peak_rss_mib']:.0f} MiB, {s['epoch_s']:.1f} s/epoch (in memory: {m['peak_rss_mib']:.0f} MiB, {m['epoch_s']:.1f} s)",
                _goal(1.0, "streams instead of failing", bool(s["streamed"])),
            )
        )
    lines = ["| figure | measured | goal | status |", "| --- | --- | --- | --- |"]
    for name, value, goal in rows:
        lines.append(f"| {name} | {value} | {goal} |")
    return "\n".join(lines) + "\n"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: a smoke test of the runner, not figures to quote"
    )
    parser.add_argument(
        "--only",
        default="extraction,profile,cache_hit,head_epoch,sweep,precision,realistic,memory",
        help="comma-separated sections to run",
    )
    parser.add_argument(
        "--backbone", default="mobilenetv2", help="backbone of the extraction figures (default: mobilenetv2)"
    )
    parser.add_argument("--size", type=int, default=96, help="input size of the extraction figures (default: 96)")
    parser.add_argument("--n", type=int, default=10_000, help="images of the extraction figures (default: 10000)")
    parser.add_argument("--jobs", type=int, default=2, help="n_jobs of both sweeps (default: 2)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default: benchmarks/results)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the selected sections, print the table, save JSON and markdown."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = _parse_args(argv)
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    q = args.quick
    result: dict[str, Any] = {
        "benchmark": "featurecache.run",
        "quick": q,
        "machine": _machine(),
        "load_before": _load(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    timings: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="fc-bench-"))
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        (
            "extraction",
            lambda: bench_extraction(
                work,
                n=600 if q else args.n,
                src_size=128,
                size=args.size,
                backbone=args.backbone,
                batch_size=32,
                reps=1 if q else 2,
            ),
        ),
        (
            "profile",
            lambda: profile_extraction(
                work, n=600 if q else args.n, src_size=128, size=args.size, backbone=args.backbone, batch_size=32
            ),
        ),
        ("cache_hit", lambda: bench_cache_hit(work, n=1000 if q else 10_000, size=32, reps=3)),
        ("head_epoch", lambda: bench_head_epoch(work, backbone=args.backbone, size=args.size, n=200 if q else 1000)),
        (
            "sweep",
            lambda: bench_sweep(
                work,
                n_train=600 if q else 3000,
                n_val=200 if q else 1000,
                dim=128 if q else 512,
                dense_epochs=2 if q else 5,
                n_jobs=args.jobs,
            ),
        ),
        ("precision", lambda: bench_precision(work, backbones_=("resnet50", "vgg16"), size=64, n=64 if q else 256)),
        ("realistic", lambda: bench_realistic(work, quick=q)),
        (
            "memory",
            lambda: bench_memory(
                work, n=100 if q else 300, size=64, backbone=args.backbone, stream_rows=20_000 if q else 60_000, dim=512
            ),
        ),
    ]
    try:
        for name, fn in steps:
            if "extraction" not in sections and name == "profile":
                continue  # the profile reads the folder the extraction section writes
            if name not in sections:
                continue
            print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            result[name] = fn()
            timings[name] = round(time.perf_counter() - t0, 1)
            print(f"[benchmarks] {name} done in {timings[name]} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["section_seconds"] = timings
    result["load_after"] = _load()
    result["children_max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    from featurecache.extraction.extract import library_versions

    result["versions"] = library_versions()
    table = markdown(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"run-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"run-{stamp}.md").write_text(table)
    print(f"wrote {args.out / f'run-{stamp}.json'} and .md", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
