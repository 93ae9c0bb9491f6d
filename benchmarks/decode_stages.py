"""CPU per image of each decoding step on a folder of photos, one thread, all in one process.

The profile behind issue 12's decode changes: where a 12 MP JPEG's time goes in the naive
script (``keras.utils.load_img(target_size)``) and in featurecache's exact and fast paths.
CPU time (``time.process_time``, which also counts TensorFlow's resize threads) barely moves
with other processes' load, unlike wall time.

    python -m benchmarks.decode_stages /tmp/camera --n 12      # a folder from benchmarks.realistic
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def measure(folder: Path, *, n: int = 12, size: int = 224, reps: int = 2) -> dict[str, Any]:
    """Milliseconds of CPU per image for each step (median over ``reps`` passes over ``n`` files)."""
    import keras
    from PIL import Image, ImageOps

    from featurecache.data import decode_image, resize_image

    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]

    def pillow_plain(p: Path) -> np.ndarray:  # what featurecache's exact decode did before issue 12
        im = Image.open(io.BytesIO(p.read_bytes()))
        im.load()
        ImageOps.exif_transpose(im, in_place=True)
        return np.asarray(im)

    steps: dict[str, Callable[[Path], Any]] = {
        "read + sha256 (the dataset digest)": lambda p: hashlib.sha256(p.read_bytes()).hexdigest(),
        "naive: load_img(target_size) + img_to_array": lambda p: keras.utils.img_to_array(
            keras.utils.load_img(p, target_size=(size, size))
        ),
        "Pillow full decode + exif_transpose + np.asarray (exact before)": pillow_plain,
        "exact before: + resize": lambda p: resize_image(pillow_plain(p), size),
        "exact: decode_image": lambda p: decode_image(p),
        "exact: decode_image + resize_image": lambda p: resize_image(decode_image(p), size),
        "fast: decode_image(draft) + resize_image": lambda p: resize_image(decode_image(p, draft=size), size),
    }
    for f in steps.values():  # warm-up: imports, TensorFlow's first op
        f(paths[0])
    out: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for name, f in steps.items():
            c0 = time.process_time()
            for p in paths:
                f(p)
            out[name].append(1000 * (time.process_time() - c0) / len(paths))
    return {
        "files": len(paths),
        "size": size,
        "reps": reps,
        "cpu_ms_per_image": {k: round(float(np.median(v)), 1) for k, v in out.items()},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_stages", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=2)
    a = parser.parse_args()
    print(json.dumps(measure(a.folder, n=a.n, size=a.size, reps=a.reps), indent=1))
