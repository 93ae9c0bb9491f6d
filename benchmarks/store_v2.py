"""Store v2 figures, side by side in one run: what a changed dataset costs, and reading speed.

    python -m benchmarks.store_v2                 # 10,000 images, MobileNetV2 @ 96 px, ~6 min on 2 cores
    python -m benchmarks.store_v2 --n 2000        # quicker
    python -m benchmarks.store_v2 --scale 100000  # a hit and a plan on 100,000 files

Measures (issue 9's "Done when"):
* growing N images by 10%: wall time of the incremental extraction / a cold extraction of the
  grown dataset in a fresh cache (goal <= 0.15), and that both give the same bytes;
* relabel, re-split, rename, reorder, remove: images computed (goal 0) and wall time (goal < 2 s);
* reading a feature set for training vs one contiguous Zarr array of the same rows with the same
  codecs and chunking (format 1's layout) (goal >= 0.9 of its speed);
* storage after first extract, one label fixed and 10% more images: rows stored, bytes.
Writes ``benchmarks/results/store_v2.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = dict(backbone="mobilenetv2", weights="random", size=32, batch_size=64, progress=False)


def _images(folder: Path, n: int, start: int = 0) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    names = []
    for i in range(start, start + n):
        name = f"img{i:06d}.jpg"
        base = rng.integers(0, 256, (3,), dtype=np.uint8)
        img = np.clip(base + rng.normal(0, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / name, quality=90)
        names.append(name)
    return names


def _write(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return path


def _timed(csv_path: Path, cache: Path) -> tuple[float, Any]:
    import featurecache as fc

    t0 = time.perf_counter()
    res = fc.extract(str(csv_path), cache_dir=cache, **OPTIONS)
    return time.perf_counter() - t0, res


def _read_speed(fs: Any, repeats: int = 5) -> dict[str, float]:
    """Seconds to read the train split for training (features, labels, ids, valid): the feature set
    vs format 1's contiguous layout of the same rows, written with the same codecs and chunking."""
    import zarr

    from featurecache.cache.store import array_codecs, chunk_rows_for

    X, y, ids, ok = fs.features("train"), fs.labels("train"), fs.ids("train"), fs.valid("train")
    tmp = Path(tempfile.mkdtemp())
    rows = chunk_rows_for(X.shape[1:], str(X.dtype))
    g = zarr.open_group(str(tmp / "flat"), mode="w")
    g.create_array("features", shape=(1, *X.shape), chunks=(1, rows, *X.shape[1:]), dtype=X.dtype, **array_codecs())[
        :
    ] = X[None]
    g.create_array("labels", shape=y.shape, chunks=(rows,), dtype="int64", **array_codecs())[:] = y
    g.create_array("ids", shape=ids.shape, chunks=(rows,), dtype=str, **array_codecs())[:] = ids.astype(str)
    g.create_array("valid", shape=ok.shape, chunks=(rows,), dtype=bool, **array_codecs())[:] = ok
    best_view, best_flat = float("inf"), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fresh = type(fs)(fs.path)  # nothing cached: the manifest, rows and units are checked again
        a = (fresh.features("train"), fresh.labels("train"), fresh.ids("train"), fresh.valid("train"))
        best_view = min(best_view, time.perf_counter() - t0)
        t0 = time.perf_counter()
        old = zarr.open_group(str(tmp / "flat"), mode="r")
        b = (old["features"][0], old["labels"][:], old["ids"][:], old["valid"][:])
        best_flat = min(best_flat, time.perf_counter() - t0)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    shutil.rmtree(tmp)
    return {"view_s": best_view, "contiguous_s": best_flat, "speed_ratio": best_flat / best_view}


def scale(n: int, work: Path) -> dict[str, float]:
    """A hit and a plan on ``n`` small files: CLI wall time (interpreter start included) and ``plan()``."""
    import subprocess
    import sys

    from PIL import Image

    import featurecache as fc

    rng = np.random.default_rng(1)
    for c in range(10):
        (work / "scale" / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
            work / "scale" / f"c{i % 10}" / f"{i:06d}.png"
        )
    args = dict(backbone="mobilenetv2", weights="random", size=32, batch_size=128, progress=False)
    t0 = time.perf_counter()
    fc.extract(str(work / "scale"), cache_dir=work / "scale-cache", **args)
    cold = time.perf_counter() - t0
    cmd = [
        sys.executable,
        "-m",
        "featurecache",
        "extract",
        "--data",
        str(work / "scale"),
        "--backbone",
        "mobilenetv2",
        "--weights",
        "random",
        "--size",
        "32",
        "--cache",
        str(work / "scale-cache"),
        "--json",
    ]
    t0 = time.perf_counter()
    doc = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    hit = time.perf_counter() - t0
    t0 = time.perf_counter()
    fc.plan(str(work / "scale"), cache_dir=work / "scale-cache", backbone="mobilenetv2", weights="random", size=32)
    planned = time.perf_counter() - t0
    return {"files": n, "cold_s": cold, "cli_hit_s": hit, "hit_cached": doc["cached"], "plan_s": planned}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every measurement and print a table."""
    import featurecache as fc
    from featurecache.cache import store

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="images before growing by 10%%")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--backbone", default=OPTIONS["backbone"])
    ap.add_argument(
        "--size", type=int, default=96, help="input size (96: the backbone, not start-up, dominates a cold run)"
    )
    ap.add_argument(
        "--scale", type=int, default=0, help="also time a hit and a plan on this many small files (e.g. 100000)"
    )
    args = ap.parse_args(argv)
    OPTIONS.update(backbone=args.backbone, size=args.size)
    if args.scale:
        work = args.work or Path(tempfile.mkdtemp(prefix="fc-store-v2-"))
        out = scale(args.scale, work)
        print(
            f"  {out['files']} files: CLI hit {out['cli_hit_s']:.2f} s (cached: {out['hit_cached']}), plan {out['plan_s']:.2f} s (goal < 2 s), cold extraction {out['cold_s']:.0f} s"
        )
        shutil.rmtree(work, ignore_errors=True)
        return out
    work = args.work or Path(tempfile.mkdtemp(prefix="fc-store-v2-"))
    n, grow = args.n, max(1, args.n // 10)
    names = _images(work / "img", n + grow)
    splits = ["train"] * int(n * 0.7) + ["val"] * int(n * 0.15)
    splits += ["test"] * (n - len(splits))
    base = [(f"img/{nm}", "abcde"[i % 5], s) for i, (nm, s) in enumerate(zip(names[:n], splits, strict=True))]
    grown = base + [(f"img/{nm}", "abcde"[i % 5], "train") for i, nm in enumerate(names[n:])]
    out: dict[str, Any] = {"n": n, "grow": grow, "options": OPTIONS}

    # Cold extraction of the grown dataset, then base + incremental growth, side by side.
    t_cold, cold = _timed(_write(work / "grown.csv", grown), work / "cold")
    _timed(_write(work / "base.csv", base), work / "cache")
    t_incr, incr = _timed(work / "grown.csv", work / "cache")
    a, b = fc.open_features(incr.key, cache_dir=work / "cache"), fc.open_features(cold.key, cache_dir=work / "cold")
    same = all(np.array_equal(a.features(s), b.features(s)) for s in a.splits)
    out["grow_10pct"] = {
        "cold_s": t_cold,
        "incremental_s": t_incr,
        "ratio": t_incr / t_cold,
        "computed": incr.computed,
        "identical": same,
    }

    changes = {
        "relabel": [(p, "e" if i == 0 else lab, s) for i, (p, lab, s) in enumerate(base)],
        "resplit": [(p, lab, "test" if s == "val" else s) for p, lab, s in base],
        "reorder": list(reversed(base)),
        "remove": base[: n - grow],
    }
    shutil.copytree(work / "img", work / "moved")
    changes["rename"] = [(p.replace("img/", "moved/"), lab, s) for p, lab, s in base]
    out["changes"] = {}
    for name, rows in changes.items():
        t, res = _timed(_write(work / f"{name}.csv", rows), work / "cache")
        out["changes"][name] = {"seconds": t, "computed": res.computed}
    _timed(work / "base.csv", work / "cache")  # a hit, for comparison
    t_hit, _ = _timed(work / "base.csv", work / "cache")
    out["hit_s"] = t_hit
    out["read"] = _read_speed(a)

    # Storage after the three changes, in a fresh cache.
    fresh = work / "storage"
    _timed(work / "base.csv", fresh)
    _timed(work / "relabel.csv", fresh)
    _timed(work / "grown.csv", fresh)
    st = next(store.iter_stores(fresh))
    out["storage"] = {
        "rows": st.rows(0),
        "distinct_images": n + grow,
        "store_bytes": st.size_bytes(),
        "views_bytes": sum(v.size_bytes() for v in fc.iter_entries(fresh)),
    }

    print(f"store v2, {n} images (+{grow}), {OPTIONS['backbone']} @ {OPTIONS['size']} px, random weights")
    g = out["grow_10pct"]
    print(
        f"  grow by 10%: incremental {g['incremental_s']:.1f} s vs cold {g['cold_s']:.1f} s = {g['ratio']:.3f} (goal <= 0.15), "
        f"computed {g['computed']}, identical to cold: {g['identical']}"
    )
    for name, c in out["changes"].items():
        print(f"  {name:8s}: {c['computed']} computed, {c['seconds']:.2f} s (goal 0, < 2 s)")
    print(f"  cache hit: {out['hit_s']:.2f} s")
    r = out["read"]
    print(
        f"  read train: view {r['view_s']:.3f} s vs contiguous {r['contiguous_s']:.3f} s = {r['speed_ratio']:.2f}x its speed (goal >= 0.9)"
    )
    s = out["storage"]
    print(
        f"  storage after 3 changes: {s['rows']} rows for {s['distinct_images']} distinct images, {s['store_bytes'] / 2**20:.1f} MiB + views {s['views_bytes'] / 2**20:.2f} MiB"
    )
    dest = ROOT / "benchmarks" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "store_v2.json").write_text(json.dumps(out, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
