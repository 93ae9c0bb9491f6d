"""Benchmark datasets that look like users' folders, generated offline from scikit-learn's photos.

Users' images are not 128 px synthetic JPEGs: they are camera and phone photos (8-24 MP, with
an EXIF orientation tag), web photos around 500x375, and screenshots saved as PNG with an alpha
channel. Every kind here is made from the two photos scikit-learn ships
(``sklearn.datasets.load_sample_images``: china.jpg and flower.jpg, 640x427), so nothing is
downloaded:

* **camera**: a random crop (40-100 % of the photo, random position, maybe mirrored), upscaled
  with Lanczos to 4000x3000 (12 MP), plus per-pixel sensor-like grain (Gaussian, sigma 6), saved
  as a quality-90 JPEG. A quarter of the files are stored rotated with EXIF orientation 6 or 8
  (as phones do), so a decoder that ignores the tag sees them sideways.
* **web**: the same kind of crop resized to about 500x375 (landscape or portrait), quality 85.
* **screenshot**: an RGBA PNG: a flat UI-like background, rectangles of text-like stripes, a
  photo crop pasted in, and a transparent margin.

The class of an image is which photo and which half of it the crop's centre lies in (4
classes), so the same generator gives a small labelled set for comparing head accuracy under
different decoding and resizing choices. Everything is deterministic in ``seed``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CLASSES",
    "KINDS",
    "bench_kind",
    "bench_resize_quality",
    "make_folder",
    "make_folder_parallel",
    "photo_crops",
]

KINDS: tuple[str, ...] = ("camera", "web", "screenshot")
#: photo x horizontal half of the crop centre
CLASSES: tuple[str, ...] = ("china_left", "china_right", "flower_left", "flower_right")
CAMERA_SIZE = (4000, 3000)
_EXIF_ORIENTATION = 0x0112


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.asarray(img, dtype=np.uint8) for img in load_sample_images().images]


def photo_crops(n: int, *, seed: int) -> Iterator[tuple[np.ndarray, int]]:
    """``n`` random crops of the sample photos with their class (see :data:`CLASSES`).

    Parameters
    ----------
    n
        Number of crops.
    seed
        Seed of crop positions, sizes and mirroring.

    Returns
    -------
    iterator of (uint8 (h, w, 3), int)
        Crops of aspect ratio 4:3 and their class index.
    """
    photos = _photos()
    rng = np.random.default_rng(seed)
    for i in range(n):
        which = i % len(photos)
        img = photos[which]
        h, w = img.shape[:2]
        ch = int(h * rng.uniform(0.4, 1.0))
        cw = min(w, int(ch * 4 / 3))
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        crop = img[y : y + ch, x : x + cw]
        right = (x + cw / 2) >= w / 2
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
            right = not right  # the label follows the content, not the file
        yield np.ascontiguousarray(crop), 2 * which + int(right)


def _camera(crop: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    from PIL import Image

    big = np.asarray(Image.fromarray(crop).resize(CAMERA_SIZE, Image.Resampling.LANCZOS), dtype=np.int16)
    grain = rng.normal(0.0, 6.0, size=big.shape).astype(np.int16)
    im = Image.fromarray(np.clip(big + grain, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    orientation = int(rng.choice([1, 1, 1, 6, 8, 1, 1, 3]))
    if orientation != 1:
        # Store the pixels the way a phone held sideways does; the tag says how to undo it.
        undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
        im = im.transpose(undo)
    exif[_EXIF_ORIENTATION] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue(), ".jpg"


def _web(crop: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    from PIL import Image

    size = (500, 375) if rng.random() < 0.75 else (375, 500)
    im = Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue(), ".jpg"


def _screenshot(crop: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    from PIL import Image

    w, h = int(rng.integers(900, 1400)), int(rng.integers(600, 900))
    canvas = np.zeros((h, w, 4), dtype=np.uint8)
    canvas[..., :3] = rng.integers(200, 256, size=3, dtype=np.uint8)
    canvas[..., 3] = 255
    for _ in range(int(rng.integers(4, 10))):  # panels with text-like stripes
        y0, x0 = int(rng.integers(0, h - 60)), int(rng.integers(0, w - 200))
        ph, pw = int(rng.integers(40, min(300, h - y0))), int(rng.integers(150, min(600, w - x0)))
        canvas[y0 : y0 + ph, x0 : x0 + pw, :3] = rng.integers(0, 256, size=3, dtype=np.uint8)
        canvas[y0 + 4 : y0 + ph : 12, x0 + 8 : x0 + pw - 8, :3] = 30
    photo = np.asarray(Image.fromarray(crop).resize((w // 2, h // 2), Image.Resampling.BILINEAR))
    canvas[h // 4 : h // 4 + photo.shape[0], w // 4 : w // 4 + photo.shape[1], :3] = photo
    margin = int(rng.integers(10, 40))
    canvas[:margin, :, 3] = 0  # transparent margin (a window shadow); decoders composite it on white
    canvas[-margin:, :, 3] = 0
    buf = io.BytesIO()
    Image.fromarray(canvas, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), ".png"


_MAKERS = {"camera": _camera, "web": _web, "screenshot": _screenshot}


def make_folder(folder: str | Path, kind: str, n: int, *, seed: int = 0, offset: int = 0) -> Path:
    """Write ``n`` images of ``kind`` into ``folder/<class>/`` (a dataset folder featurecache reads).

    Parameters
    ----------
    folder
        Created if missing; existing files of the same names are overwritten.
    kind
        One of :data:`KINDS`.
    n
        Number of images.
    seed
        Makes the crops, grain, orientations and layouts reproducible.
    offset
        Number of the first file, so several calls (e.g. in parallel, with other seeds) can
        fill one folder.

    Returns
    -------
    Path
        ``folder``.

    Raises
    ------
    ValueError
        Unknown ``kind``.
    """
    if kind not in _MAKERS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    folder = Path(folder)
    rng = np.random.default_rng([seed, 1])
    for i, (crop, label) in enumerate(photo_crops(n, seed=seed)):
        data, ext = _MAKERS[kind](crop, rng)
        d = folder / CLASSES[label]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{kind}{offset + i:06d}{ext}").write_bytes(data)
    return folder


def make_folder_parallel(folder: str | Path, kind: str, n: int, *, workers: int | None = None, seed: int = 0) -> Path:
    """:func:`make_folder` split over processes (a 12 MP JPEG takes about a second to make).

    Each process makes a contiguous range of file numbers with its own seed
    (``seed + 1000 + first number``), so the result depends on ``n`` and ``workers``.
    """
    import os
    from concurrent.futures import ProcessPoolExecutor

    workers = workers or os.cpu_count() or 1
    per = max(1, -(-n // workers))
    with ProcessPoolExecutor(workers) as pool:
        futures = [
            pool.submit(make_folder, folder, kind, min(per, n - start), seed=seed + 1000 + start, offset=start)
            for start in range(0, n, per)
        ]
        for f in futures:
            f.result()
    return Path(folder)


# ---------------------------------------------------------------------------------- benchmarks


def _naive_script(paths: list[Path], out: Path, *, size: int, batch_size: int) -> None:
    """What the seeds' scripts do: ``load_img(target_size)`` -> ``predict`` -> ``np.save``."""
    import keras

    model = keras.applications.MobileNetV3Small(
        input_shape=(size, size, 3), include_top=False, weights=None, pooling="avg"
    )
    feats = []
    for b in range(0, len(paths), batch_size):
        batch = np.stack(
            [
                keras.utils.img_to_array(keras.utils.load_img(p, target_size=(size, size)))
                for p in paths[b : b + batch_size]
            ]
        )
        feats.append(model.predict(batch, verbose=0))
    np.save(out, np.concatenate(feats))


def _rel_diff(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """How far features ``b`` are from ``a``, relative to the scale of ``a``."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = (a64 * b64).sum(1) / np.maximum(np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1), 1e-30)
    return {
        "mean_abs_over_mean_abs": float(np.abs(a64 - b64).mean() / np.abs(a64).mean()),
        "max_abs_over_max_abs": float(np.abs(a64 - b64).max() / np.abs(a64).max()),
        "median_row_cosine": float(np.median(cos)),
        "min_row_cosine": float(cos.min()),
    }


def bench_kind(
    work: Path,
    kind: str,
    *,
    n: int,
    size: int = 224,
    backbone: str = "mobilenetv3small",
    batch_size: int = 32,
    reps: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """featurecache (exact and fast decode) vs the naive script vs the raw backbone on one kind of data.

    All timings are end to end in this process (TensorFlow already imported, a warm-up run
    first), interleaved rep by rep so load from other processes hits every side alike. Both
    featurecache and the naive script build their model inside the timing; the raw backbone
    is the featurecache model as a ``tf.function`` on pre-decoded, pre-resized inputs.
    """
    import shutil
    import statistics
    import time

    import tensorflow as tf

    import featurecache as fc
    from featurecache import backbones
    from featurecache.cache import views
    from featurecache.data import load_dataset, resize_image

    folder = make_folder_parallel(work / kind, kind, n, seed=seed)
    split = load_dataset(str(folder)).splits["train"]
    paths = list(split.items.paths)  # type: ignore[attr-defined]
    spec = backbones.get_backbone(backbone)
    model = backbones.build_feature_model(
        spec, backbones.parse_weights("random", seed=0), input_size=size, pooling="avg"
    )
    x = backbones.preprocess_input(spec, np.stack([resize_image(split.load(i), size) for i in range(len(split))]))
    fn = tf.function(
        lambda t: model(t, training=False),
        input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)],
        reduce_retracing=True,
    )
    fn(tf.convert_to_tensor(x[:batch_size]))

    def raw() -> float:
        t0 = time.perf_counter()
        for b in range(0, len(x), batch_size):
            fn(tf.convert_to_tensor(x[b : b + batch_size])).numpy()
        return time.perf_counter() - t0

    def naive() -> float:
        t0 = time.perf_counter()
        _naive_script(paths, work / "naive.npy", size=size, batch_size=batch_size)
        return time.perf_counter() - t0

    keys: dict[str, str] = {}

    def featurecache(decode: str, antialias: bool = False) -> float:
        cache = work / f"cache-{kind}"
        shutil.rmtree(cache, ignore_errors=True)
        t0 = time.perf_counter()
        res = fc.extract(
            str(folder),
            backbone=backbone,
            weights="random",
            size=size,
            batch_size=batch_size,
            decode=decode,
            antialias=antialias,
            cache_dir=cache,
            progress=False,
        )
        took = time.perf_counter() - t0
        keys[f"{decode}{'-aa' if antialias else ''}"] = res.key
        feats[f"{decode}{'-aa' if antialias else ''}"] = views.find_by_key(cache, res.key).features("train")  # type: ignore[union-attr]
        return took

    feats: dict[str, np.ndarray] = {}
    sides: dict[str, Any] = {
        "naive": naive,
        "featurecache_exact": lambda: featurecache("exact"),
        "featurecache_fast": lambda: featurecache("fast"),
        "raw_backbone": raw,
    }
    for f in sides.values():  # warm-up: first-use costs of each path, not measured
        f()
    times: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(reps):
        for name, f in sides.items():
            c0 = time.process_time()  # all threads of this process: barely moved by other processes' load
            times[name].append(f())
            cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    out: dict[str, Any] = {
        "kind": kind,
        "n": n,
        "size": size,
        "backbone": backbone,
        "weights": "random",
        "batch_size": batch_size,
        "reps": reps,
        "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "images_per_s": {k: round(n / v, 1) for k, v in med.items()},
        "cpu_seconds": {k: [round(t, 3) for t in v] for k, v in cpu.items()},
        "cpu_fast_over_naive": round(med_cpu["naive"] / med_cpu["featurecache_fast"], 2),
        "cpu_exact_over_naive": round(med_cpu["naive"] / med_cpu["featurecache_exact"], 2),
        "fast_over_naive": round(med["naive"] / med["featurecache_fast"], 2),
        "exact_over_naive": round(med["naive"] / med["featurecache_exact"], 2),
        "fast_over_raw_backbone": round(med["raw_backbone"] / med["featurecache_fast"], 2),
        "exact_over_raw_backbone": round(med["raw_backbone"] / med["featurecache_exact"], 2),
        "fast_vs_exact_features": _rel_diff(feats["exact"], feats["fast"]),
    }
    shutil.rmtree(folder, ignore_errors=True)
    return out


def bench_resize_quality(
    work: Path, *, n: int = 120, size: int = 224, backbone: str = "mobilenetv3small", folds: int = 5, seed: int = 1
) -> dict[str, Any]:
    """Head accuracy on 12 MP camera photos under each decode x antialias choice.

    The same labelled photos (:data:`CLASSES`: which photo, which half) are extracted four
    times; a standardised logistic regression is scored by stratified ``folds``-fold
    cross-validation with the *same folds* for every variant, so the per-fold differences are
    paired. Random backbone weights (``imagenet`` cannot be downloaded here): the features are
    generic local-texture statistics, which is what aliasing disturbs.
    """
    import shutil
    import time

    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import featurecache as fc
    from featurecache.cache import views

    folder = make_folder(work / "quality", "camera", n, seed=seed)
    cv = StratifiedKFold(folds, shuffle=True, random_state=0)
    out: dict[str, Any] = {
        "n": n,
        "size": size,
        "backbone": backbone,
        "weights": "random",
        "folds": folds,
        "variants": {},
    }
    feats: dict[str, np.ndarray] = {}
    for decode in ("exact", "fast"):
        for antialias in (False, True):
            name = f"{decode}{'+antialias' if antialias else ''}"
            cache = work / f"cache-quality-{name}"
            t0 = time.perf_counter()
            res = fc.extract(
                str(folder),
                backbone=backbone,
                weights="random",
                size=size,
                decode=decode,
                antialias=antialias,
                cache_dir=cache,
                progress=False,
            )
            took = time.perf_counter() - t0
            fs = views.find_by_key(cache, res.key)
            x, y = fs.features("train"), fs.labels("train")  # type: ignore[union-attr]
            feats[name] = x
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
            scores = cross_val_score(clf, x, y, cv=cv)
            out["variants"][name] = {
                "accuracy_mean": round(float(scores.mean()), 4),
                "accuracy_folds": [round(float(s), 4) for s in scores],
                "extract_s": round(took, 2),
            }
            shutil.rmtree(cache, ignore_errors=True)
    base = np.asarray(out["variants"]["exact"]["accuracy_folds"])
    for name, v in out["variants"].items():
        v["paired_gain_over_exact"] = round(float((np.asarray(v["accuracy_folds"]) - base).mean()), 4)
        v["features_vs_exact"] = _rel_diff(feats["exact"], feats[name]) if name != "exact" else None
    shutil.rmtree(folder, ignore_errors=True)
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.realistic", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("folder", type=Path, help="where the images go (with --bench: a scratch folder)")
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bench",
        action="store_true",
        help="also run bench_kind: naive vs featurecache exact/fast vs raw, side by side",
    )
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path, help="with --bench: write the JSON result here too")
    a = parser.parse_args()
    if not a.bench:
        print(make_folder(a.folder, a.kind, a.n, seed=a.seed))
    else:
        import json

        res = bench_kind(a.folder, a.kind, n=a.n, size=a.size, reps=a.reps, seed=a.seed)
        res["command"] = "python -m benchmarks.realistic " + " ".join(__import__("sys").argv[1:])
        text = json.dumps(res, indent=1)
        if a.out:
            a.out.write_text(text + "\n")
        print(text)
