"""The docs' recipe (docs/guide/reproducing.md) for computing cached features without featurecache matches the cache.

The test runs the README's own code block (not a copy), so the documentation cannot drift from
what extraction does: decode (Pillow, EXIF orientation, RGB, transparency on white), resize
(``tf.image.resize`` bilinear, no antialias, float32), the backbone's ``preprocess_input``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

import featurecache as fc

README = Path(__file__).resolve().parents[2] / "docs" / "guide" / "reproducing.md"
SECTION = "# Reproducing cached features outside featurecache"


def _recipe() -> str:
    text = README.read_text(encoding="utf-8")
    assert SECTION in text
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]


def _photos(root: Path) -> None:
    rng = np.random.default_rng(7)

    def pixels(h: int, w: int) -> np.ndarray:
        # Smooth content, as in photos: JPEG keeps it, so the test is not about JPEG noise.
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
        return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)

    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir(parents=True)
    Image.fromarray(pixels(48, 64)).save(root / "cat" / "plain.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: must be rotated before resizing
    Image.fromarray(pixels(40, 70)).save(root / "cat" / "rotated.jpg", quality=90, exif=exif)
    Image.fromarray(pixels(50, 50)[..., 0]).save(root / "dog" / "grey.jpg", quality=90)
    rgba = np.dstack([pixels(36, 30), rng.integers(0, 256, (36, 30), dtype=np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "dog" / "transparent.png")


def test_readme_recipe_reproduces_cached_features(tmp_path: Path) -> None:
    import keras

    data = tmp_path / "photos"
    _photos(data)
    res = fc.extract(
        str(data), backbone="mobilenetv2", weights="random", size=48, cache_dir=tmp_path / "cache", progress=False
    )
    fs = fc.open_features(res.key, cache_dir=tmp_path / "cache")
    cached, ids = fs.features("train"), [str(i) for i in fs.ids("train")]
    assert len(ids) == 4 and fs.valid("train").all()

    namespace: dict = {}
    exec(compile(_recipe(), str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    keras.utils.set_random_seed(0)  # what --weights random --seed 0 does before building
    model = keras.applications.MobileNetV2(weights=None, include_top=False, pooling="avg", input_shape=(48, 48, 3))
    ours = namespace["features_of"](
        [data / i for i in ids], model, keras.applications.mobilenet_v2.preprocess_input, 48
    )

    assert ours.shape == cached.shape
    # Relative to the features' scale: random-weight MobileNetV2 features are ~1e-11 in size.
    scale = float(np.abs(cached).max())
    assert scale > 0
    np.testing.assert_allclose(ours, cached, rtol=0, atol=1e-5 * scale)
    # Not trivially satisfied: the sideways photo is rotated (a plain Pillow decode is not).
    with Image.open(data / "cat" / "rotated.jpg") as im:
        assert np.asarray(im).shape == (40, 70, 3)
    assert namespace["load_rgb"](data / "cat" / "rotated.jpg").shape == (70, 40, 3)
