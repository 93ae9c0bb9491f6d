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

import numpy as np

__all__ = ["CLASSES", "KINDS", "make_folder", "photo_crops"]

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


def make_folder(folder: str | Path, kind: str, n: int, *, seed: int = 0) -> Path:
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
        (d / f"{kind}{i:05d}{ext}").write_bytes(data)
    return folder


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.realistic", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    print(make_folder(a.folder, a.kind, a.n, seed=a.seed))
