"""resize_image vs keras.layers.Resizing, AugmentSpec parsing, augment_batch determinism."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from featurecache.data import RESIZE_METHODS, AugmentSpec, augment_batch, resize_image
from featurecache.errors import AugmentSpecError, UsageError

RNG = np.random.default_rng(7)
DOWN = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)  # non-square, downsampled to 24
UP = RNG.integers(0, 256, (13, 9, 3), dtype=np.uint8)  # upsampled to 32


# ------------------------------------------------------------------------------ resize


@pytest.mark.parametrize("method", RESIZE_METHODS)
@pytest.mark.parametrize("image,size", [(DOWN, 24), (UP, 32)], ids=["down", "up"])
def test_resize_matches_keras_resizing_layer(method, image, size):
    ours = resize_image(image, size, method=method)
    assert ours.dtype == np.float32 and ours.shape == (size, size, 3)
    layer = keras.layers.Resizing(size, size, interpolation=method)
    theirs = np.asarray(layer(image[None].astype(np.float32)))[0]
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(resize_image(image.astype(np.float32), size, method=method), ours)


def test_resize_matches_resizing_inside_a_compiled_model():
    # The fine-tuning model runs Resizing in graph mode through predict(); check that path too.
    inputs = keras.Input((37, 53, 3))
    outputs = [keras.layers.Resizing(24, 24, interpolation=m, name=f"resize_{m}")(inputs) for m in RESIZE_METHODS]
    model = keras.Model(inputs, outputs)
    predicted = model.predict(DOWN[None].astype(np.float32), verbose=0)
    for method, theirs in zip(RESIZE_METHODS, predicted, strict=True):
        np.testing.assert_array_equal(resize_image(DOWN, 24, method=method), theirs[0], err_msg=method)


def test_resize_batch_and_errors():
    batch = np.stack([DOWN, DOWN[::-1]])
    out = resize_image(batch, 16)
    assert out.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(out[1], resize_image(DOWN[::-1], 16))
    with pytest.raises(UsageError, match="'bilinear'"):
        resize_image(DOWN, 16, method="gaussian")
    with pytest.raises(UsageError, match="size"):
        resize_image(DOWN, 0)
    with pytest.raises(UsageError, match="shape"):
        resize_image(DOWN[..., 0], 16)


# ------------------------------------------------------------------------------ AugmentSpec

FULL = "flip,rotation=15,zoom=0.1,shift=0.1,shear=5,brightness=0.2,contrast=0.2"


def test_parse_full_spec_and_round_trip():
    spec = AugmentSpec.parse(FULL)
    assert spec == AugmentSpec(flip=True, rotation=15, zoom=0.1, shift=0.1, shear=5, brightness=0.2, contrast=0.2)
    assert str(spec) == FULL
    assert AugmentSpec.parse(str(spec)) == spec
    assert AugmentSpec.parse(" Zoom = 0.1 , FLIP ") == AugmentSpec(flip=True, zoom=0.1)
    assert not spec.is_identity()
    canonical = spec.canonical()
    assert list(canonical) == ["flip", "rotation", "zoom", "shift", "shear", "brightness", "contrast"]
    assert json.loads(json.dumps(canonical)) == canonical
    assert (
        canonical
        == AugmentSpec.parse(
            "shear=5.0,contrast=0.20,flip=true,rotation=15,zoom=.1,shift=0.1,brightness=0.2"
        ).canonical()
    )


@pytest.mark.parametrize("text", [None, "", "  ", "none", "NONE", "flip=false"])
def test_identity_specs(text):
    spec = AugmentSpec.parse(text)
    assert spec.is_identity() and spec == AugmentSpec()
    assert str(spec) == "none"
    assert AugmentSpec.parse(str(spec)) == spec


def test_floats_are_rounded_to_6_significant_digits_on_construction():
    a, b = AugmentSpec.parse("rotation=15.0000001,zoom=0.123456789"), AugmentSpec.parse("rotation=15,zoom=0.123457")
    assert a == b and a.canonical() == b.canonical()
    assert a.zoom == 0.123457  # the transform uses the same number the key records


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("flip,rotate=15", "unknown name 'rotate'"),
        ("rotation", "needs a value"),
        ("zoom=abc", "not a number"),
        ("rotation=-5", "out of range"),
        ("zoom=1", "out of range"),
        ("shear=90", "out of range"),
        ("rotation=nan", "out of range"),
        ("flip,flip", "given twice"),
        ("flip=maybe", "flip takes no value"),
        ("none,flip", "'none' must stand alone"),
    ],
)
def test_bad_specs_give_one_helpful_line(text, fragment):
    with pytest.raises(AugmentSpecError) as info:
        AugmentSpec.parse(text)
    message = str(info.value)
    assert fragment in message and "\n" not in message
    assert "example" in message
    if "unknown" in fragment:
        assert "'rotate'" in message and "rotation=X (max rotation in degrees)" in message and "contrast=X" in message


# ------------------------------------------------------------------------------ augment_batch

S = 24
BATCH = RNG.uniform(0, 255, (6, S, S, 3)).astype(np.float32)
INDICES = [3, 10, 11, 40, 41, 99]


def test_same_sample_same_pixels_in_any_batch_and_order():
    spec = AugmentSpec.parse(FULL)
    full = augment_batch(BATCH, spec, seed=5, view=1, indices=INDICES)
    assert full.dtype == np.float32 and full.shape == BATCH.shape
    assert full.min() >= 0 and full.max() <= 255
    order = [4, 0, 5, 2, 1, 3]
    shuffled = augment_batch(BATCH[order], spec, seed=5, view=1, indices=[INDICES[i] for i in order])
    np.testing.assert_array_equal(shuffled, full[order])
    for j in (0, 3):
        alone = augment_batch(BATCH[j : j + 1], spec, seed=5, view=1, indices=[INDICES[j]])
        np.testing.assert_array_equal(alone[0], full[j])
    np.testing.assert_array_equal(augment_batch(BATCH[::2], spec, seed=5, view=1, indices=INDICES[::2]), full[::2])


def test_view_seed_and_index_change_the_result():
    spec = AugmentSpec.parse("rotation=20,zoom=0.2")
    base = augment_batch(BATCH[:2], spec, seed=5, view=1, indices=[0, 1])
    assert not np.array_equal(base, BATCH[:2])
    for kwargs in (
        {"seed": 5, "view": 2, "indices": [0, 1]},
        {"seed": 6, "view": 1, "indices": [0, 1]},
        {"seed": 5, "view": 1, "indices": [7, 8]},
    ):
        other = augment_batch(BATCH[:2], spec, **kwargs)
        assert not np.array_equal(other[0], base[0]) and not np.array_equal(other[1], base[1]), kwargs


def test_identity_spec_leaves_pixels_unchanged():
    out = augment_batch(BATCH, AugmentSpec(), seed=0, view=3, indices=INDICES)
    np.testing.assert_array_equal(out, BATCH)
    assert out is not BATCH


def test_flip_only_flips_exactly_when_the_documented_draw_says_so():
    out = augment_batch(BATCH, AugmentSpec(flip=True), seed=9, view=2, indices=INDICES)
    flips = [np.random.default_rng([9, 2, i]).random(8)[0] < 0.5 for i in INDICES]
    assert any(flips) and not all(flips)
    for j, flipped in enumerate(flips):
        np.testing.assert_array_equal(out[j], BATCH[j, :, ::-1] if flipped else BATCH[j])


def test_brightness_only_adds_the_documented_offset():
    out = augment_batch(BATCH, AugmentSpec(brightness=0.2), seed=1, view=1, indices=INDICES)
    for j, i in enumerate(INDICES):
        u = np.random.default_rng([1, 1, i]).random(8)[6]
        expected = np.clip(BATCH[j] + np.float32((2 * u - 1) * 0.2 * 255), 0, 255)
        np.testing.assert_array_equal(out[j], expected)


@pytest.mark.parametrize("fill", ["reflect", "nearest", "wrap", "constant"])
def test_fill_modes(fill):
    spec = AugmentSpec(shift=0.3)
    out = augment_batch(BATCH[:2], spec, seed=2, view=1, indices=[0, 1], fill=fill)
    assert out.shape == (2, S, S, 3) and np.isfinite(out).all()


def test_fill_modes_fill_the_exposed_border_each_their_way():
    # Images with a one-pixel frame of 100 around values in [150, 250]: a pixel the shift pulls
    # from outside is 0 with "constant" (no input pixel is 0), exactly the frame's 100 with
    # "nearest", and mostly inner values with "reflect" and "wrap", which differ from each other.
    from itertools import combinations

    from featurecache.data.transforms import FILL_MODES

    images = np.random.default_rng(5).uniform(150, 250, (4, S, S, 3)).astype(np.float32)
    images[:, [0, -1], :, :] = 100.0
    images[:, :, [0, -1], :] = 100.0
    spec = AugmentSpec(shift=0.3)
    out = {fill: augment_batch(images, spec, seed=2, view=1, indices=[0, 1, 2, 3], fill=fill) for fill in FILL_MODES}
    for a, b in combinations(FILL_MODES, 2):
        assert not np.array_equal(out[a], out[b]), f"fill {a!r} and {b!r} give the same images"
    exposed = (out["constant"] == 0).all(axis=-1)
    inside = (out["constant"] > 0).all(axis=-1)
    assert exposed.sum() >= 4 * S and inside.sum() >= 4 * S * S // 4, (
        "the shift must expose a border and keep an interior"
    )
    assert (out["nearest"][exposed] == 100.0).all()
    for fill in ("reflect", "wrap"):
        assert (out[fill][exposed] > 100.0).mean() > 0.5, fill  # inner pixels, not the frame, not 0
    assert not np.array_equal(out["reflect"][exposed], out["wrap"][exposed])
    # Where no pixel comes from outside, the fill mode changes nothing.
    far = inside & (np.abs(out["constant"] - out["nearest"]).max(axis=-1) == 0)
    assert far.sum() >= S
    for fill in FILL_MODES:
        np.testing.assert_array_equal(out[fill][far], out["constant"][far], err_msg=fill)


def test_augment_batch_errors():
    spec = AugmentSpec(flip=True)
    with pytest.raises(UsageError, match="indices"):
        augment_batch(BATCH, spec, seed=0, view=1, indices=[1, 2])
    with pytest.raises(UsageError, match="fill"):
        augment_batch(BATCH, spec, seed=0, view=1, indices=INDICES, fill="mirror")
    with pytest.raises(UsageError, match="shape"):
        augment_batch(BATCH[0], spec, seed=0, view=1, indices=[0])
    with pytest.raises(UsageError, match="seed"):
        augment_batch(BATCH, spec, seed=-1, view=1, indices=INDICES)
