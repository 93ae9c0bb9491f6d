"""Decoding at the needed DCT scale (``decode="fast"``), antialiased resize, and their keys."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurecache.cache.keys import FeatureSpec
from featurecache.data import decode_image, decode_workers, load_dataset, resize_image
from featurecache.data.decode import draft_size
from featurecache.errors import UsageError


def _photo(width: int, height: int, *, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus a little noise: JPEG-friendly, with structure to compare."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([255 * xx / width, 255 * yy / height, 128 + 100 * np.sin(xx / 37.0 + yy / 23.0)], axis=-1)
    img += rng.normal(0, 4, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(arr: np.ndarray, *, orientation: int = 1, quality: int = 92) -> bytes:
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize(
    "width,height,size,expected",
    [
        (1000, 700, 96, (250, 175)),  # min(10, 7) -> 1/4 (1/8 would give 88 rows < 96)
        (1000, 700, 300, (500, 350)),  # min(3, 2) -> 1/2
        (4000, 3000, 224, (500, 375)),  # min(17, 13) -> 1/8, the smallest libjpeg offers
        (401, 800, 200, (201, 400)),  # exactly twice on the short side -> 1/2, rounded up
    ],
)
def test_fast_decode_takes_the_largest_dct_scale_that_covers_the_target(
    width: int, height: int, size: int, expected: tuple[int, int]
) -> None:
    raw = _jpeg(_photo(width, height))
    out = decode_image(raw, draft=size)
    assert (out.shape[1], out.shape[0]) == expected == draft_size(width, height, size)
    assert min(out.shape[:2]) >= size  # the resize after it still shrinks
    # One step further would no longer cover the target, unless 1/8 is already reached.
    if expected != (-(-width // 8), -(-height // 8)):
        w, h = expected
        assert min(-(-w // 2), -(-h // 2)) < size or min(width // w, height // h) >= 8


def test_fast_decode_equals_exact_below_twice_the_size_and_for_other_formats() -> None:
    small = _jpeg(_photo(150, 120))
    np.testing.assert_array_equal(decode_image(small, draft=96), decode_image(small))
    buf = io.BytesIO()
    Image.fromarray(_photo(800, 600)).save(buf, format="PNG")
    np.testing.assert_array_equal(decode_image(buf.getvalue(), draft=96), decode_image(buf.getvalue()))  # not a JPEG


def test_fast_decode_is_close_to_exact_after_the_resize() -> None:
    raw = _jpeg(_photo(1200, 900, seed=1))
    exact = resize_image(decode_image(raw), 64, antialias=True)
    fast = resize_image(decode_image(raw, draft=64), 64, antialias=True)
    # Different bytes (so keyed), the same picture: libjpeg's 1/8 scale also decodes the 4:2:0
    # chroma at 1/8 of its own resolution, which costs this strongly coloured test image most.
    assert 0 < np.abs(fast - exact).mean() < 3.0


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_fast_decode_keeps_the_exif_orientation(orientation: int) -> None:
    upright = _photo(400, 800, seed=2)  # portrait
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    stored = np.asarray(Image.fromarray(upright).transpose(undo))  # what the camera writes
    raw = _jpeg(stored, orientation=orientation)
    exact = decode_image(raw)
    fast = decode_image(raw, draft=96)
    assert exact.shape == (800, 400, 3)
    assert fast.shape == (200, 100, 3)  # 1/4 of each side, still upright
    small = resize_image(upright, 32)
    assert np.abs(resize_image(fast, 32) - small).mean() < 3.0
    assert np.abs(resize_image(exact, 32) - small).mean() < 3.0


def test_decode_rejects_a_bad_draft() -> None:
    with pytest.raises(TypeError, match="draft"):
        decode_image(_jpeg(_photo(20, 20)), draft=0)


def test_decode_workers_scale_with_cores() -> None:
    import os

    assert decode_workers() == max(2, len(os.sched_getaffinity(0)))


def _spec(**kw: object) -> FeatureSpec:
    base = dict(
        backbone="mobilenetv2",
        weights="random:seed=0",
        layer="out_relu",
        pooling="avg",
        input_size=96,
        resize="bilinear",
        preprocess="mobilenet_v2:tf",
        augment={},
        views=0,
        augment_splits=(),
        seed=0,
        dtype="float32",
    )
    base.update(kw)
    return FeatureSpec(**base)  # type: ignore[arg-type]


def test_decode_and_antialias_change_the_key_only_when_not_default() -> None:
    plain = _spec()
    assert "decode" not in plain.key_fields() and "antialias" not in plain.key_fields()  # old keys stay valid
    assert _spec(decode="exact", antialias=False).key == plain.key
    keys = {plain.key, _spec(decode="fast").key, _spec(antialias=True).key, _spec(decode="fast", antialias=True).key}
    assert len(keys) == 4
    assert _spec(decode="fast").key_fields()["decode"] == "fast"


def test_antialias_differs_from_bilinear_and_matches_tensorflow_and_keras() -> None:
    import keras
    import tensorflow as tf

    img = _photo(300, 200, seed=3)
    aa = resize_image(img, 24, antialias=True)
    plain = resize_image(img, 24)
    assert np.abs(aa - plain).mean() > 0.5
    np.testing.assert_array_equal(aa, tf.image.resize(img.astype(np.float32), (24, 24), antialias=True).numpy())
    layer = keras.layers.Resizing(24, 24, interpolation="bilinear", antialias=True)
    np.testing.assert_allclose(aa, np.asarray(layer(img[None].astype(np.float32)))[0], atol=1e-4)


def test_load_resized_fast_decodes_at_the_draft_and_differs_from_exact(tmp_path: Path) -> None:
    from featurecache.extraction.extract import load_resized

    for c in ("a", "b"):
        (tmp_path / "ds" / c).mkdir(parents=True)
        (tmp_path / "ds" / c / "big.jpg").write_bytes(_jpeg(_photo(700, 500, seed=ord(c))))
        (tmp_path / "ds" / c / "small.jpg").write_bytes(_jpeg(_photo(40, 40, seed=ord(c))))
    split = load_dataset(str(tmp_path / "ds")).splits["train"]
    n = len(split)
    exact, valid, _ = load_resized(split, 0, n, size=32, method="bilinear")
    fast, valid_f, _ = load_resized(split, 0, n, size=32, method="bilinear", decode="fast", antialias=True)
    assert valid.all() and valid_f.all()
    for i in range(n):
        np.testing.assert_array_equal(exact[i], resize_image(split.load(i), 32))
        np.testing.assert_array_equal(fast[i], resize_image(split.load(i, draft=32), 32, antialias=True))
        big = split.ids[i].endswith("big.jpg")
        assert split.load(i, draft=32).shape[:2] == ((63, 88) if big else (40, 40))
        assert np.array_equal(fast[i], exact[i]) is False if big else True


def test_plan_rejects_an_unknown_decode_mode(cache_dir: Path) -> None:
    from featurecache.extraction.extract import plan

    with pytest.raises(UsageError, match="--decode exact or --decode fast"):
        plan(
            "builtin:digits",
            backbone="mobilenetv2",
            weights="random",
            size=32,
            limit=5,
            decode="quick",
            cache_dir=cache_dir,
        )
    p = plan(
        "builtin:digits",
        backbone="mobilenetv2",
        weights="random",
        size=32,
        limit=5,
        decode="fast",
        antialias=True,
        cache_dir=cache_dir,
    )
    assert p.spec.decode == "fast" and p.spec.antialias is True


def test_cli_extract_fast_antialias_is_its_own_entry_and_train_head_finds_it(cache_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from featurecache.cli.main import app

    folder = tmp_path / "photos"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(3):
            (folder / c / f"{i}.jpg").write_bytes(_jpeg(_photo(160, 120, seed=10 * ord(c) + i)))
    common = [
        "--data",
        str(folder),
        "--backbone",
        "mobilenetv2",
        "--weights",
        "random",
        "--size",
        "32",
        "--cache",
        str(cache_dir),
    ]
    runner = CliRunner()
    exact = runner.invoke(app, ["extract", *common, "--json"])
    fast = runner.invoke(app, ["extract", *common, "--decode", "fast", "--antialias", "--json"])
    assert exact.exit_code == 0 and fast.exit_code == 0, fast.output
    k_exact, k_fast = json.loads(exact.stdout)["key"], json.loads(fast.stdout)["key"]
    assert k_exact != k_fast
    trained = runner.invoke(
        app,
        [
            "train-head",
            *common,
            "--decode",
            "fast",
            "--antialias",
            "--head",
            "logreg",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--no-plots",
            "--json",
        ],
    )
    assert trained.exit_code == 0, trained.output
    assert Path(json.loads(trained.stdout)["run_dir"]).name.startswith(
        f"logreg-{k_fast[:8]}"
    )  # the fast entry, not the exact one


@pytest.mark.slow
def test_finetune_rebuild_reproduces_fast_antialiased_features(cache_dir: Path, tmp_path: Path) -> None:
    """The rebuilt model decodes at the same draft and antialiases, so the equivalence check passes."""
    from featurecache import extract
    from featurecache.finetuning.finetune import check_equivalence, load_run_data, rebuild_model
    from featurecache.training.train import train_head

    folder = tmp_path / "photos"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(4):
            (folder / c / f"{i}.jpg").write_bytes(_jpeg(_photo(200, 150, seed=10 * ord(c) + i)))
    res = extract(
        str(folder),
        backbone="mobilenetv2",
        weights="random",
        size=32,
        decode="fast",
        antialias=True,
        cache_dir=cache_dir,
        progress=False,
    )
    run = train_head(
        res.key, head="logreg", out=tmp_path / "run", cache_dir=cache_dir, plots=False, val_fraction=0.25
    ).run_dir
    rebuilt = rebuild_model(run, cache_dir=cache_dir)
    with np.load(run / "predictions.npz") as npz:
        preds = {k: npz[k] for k in npz.files}
    run_data = load_run_data(rebuilt.config, preds, cache_dir=cache_dir)
    report = check_equivalence(rebuilt, run_data, preds, cache_dir=cache_dir)
    assert report.passed and report.n == 2
    assert rebuilt.model.get_layer("fc_resize").antialias is True
    # Random-weight MobileNetV2 features span ~1e-12, so the standardising head amplifies the
    # rebuilt backbone's float32 round-off (~1e-6 of the largest feature) to ~5e-5 in probability,
    # and to over 1e-4 on CPUs whose oneDNN kernels round otherwise. A limit below that measures
    # the CPU: the check accepts differences within the head's own round-off bound, and says so.
    tight = check_equivalence(rebuilt, run_data, preds, cache_dir=cache_dir, tolerance=report.max_abs_diff / 10)
    assert tight.passed and tight.roundoff > tight.tolerance and tight.max_abs_diff <= tight.roundoff
    assert "the head's float32 round-off bound" in tight.summary()
    assert tight.roundoff < 1e-2  # a bound on round-off, far below what a wrong resize or preprocessing gives


# ------------------------------------------------ large JPEGs decoded straight into NumPy (issue 12)


def _plain_decode(raw: bytes) -> np.ndarray:
    """What featurecache's exact decode always gave (and Keras' load_img + exif): Pillow, transposed, packed."""
    from PIL import ImageOps

    im = Image.open(io.BytesIO(raw))
    im = ImageOps.exif_transpose(im)
    return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("size", [(1280, 832), (500, 375), (37, 23)])
def test_rgb_jpeg_decodes_straight_into_numpy_with_the_plain_pixels(orientation: int, size: tuple[int, int]) -> None:
    arr = _photo(*size, seed=orientation)
    raw = _jpeg(arr, orientation=orientation)
    out = decode_image(raw)
    np.testing.assert_array_equal(out, _plain_decode(raw))
    assert out.dtype == np.uint8 and out.strides[1:] == (4, 1)  # the direct path: a view of 4-byte pixels
    # The fast path decodes straight into NumPy too, and resizes as a contiguous copy does.
    small = decode_image(raw, draft=96)
    assert small.strides[1:] == (4, 1)
    np.testing.assert_array_equal(resize_image(out, 40), resize_image(np.ascontiguousarray(out), 40))
    np.testing.assert_array_equal(resize_image(small, 40), resize_image(np.ascontiguousarray(small), 40))


def test_drop_channels_equals_a_contiguous_copy_of_the_first_channels() -> None:
    from featurecache.data.decode import drop_channels

    rng = np.random.default_rng(9)
    for arr in (rng.integers(0, 256, size=(5, 7, 4), dtype=np.uint8), rng.random((2, 5, 7, 4), dtype=np.float32)):
        out = drop_channels(arr)
        assert out.flags.c_contiguous and out.dtype == arr.dtype
        np.testing.assert_array_equal(out, np.ascontiguousarray(arr[..., :3]))
    view = decode_image(_jpeg(_photo(37, 23)))
    np.testing.assert_array_equal(drop_channels(view), np.ascontiguousarray(view))


def test_large_truncated_or_greyscale_jpegs_keep_their_behaviour() -> None:
    from featurecache.errors import ImageDecodeError

    raw = _jpeg(_photo(1280, 832))
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(raw[: len(raw) // 2])
    buf = io.BytesIO()
    Image.fromarray(_photo(1280, 832)[..., 0]).save(buf, format="JPEG")  # mode L: the plain path
    grey = decode_image(buf.getvalue())
    assert grey.flags.c_contiguous and grey.shape == (832, 1280, 3)
    np.testing.assert_array_equal(grey, _plain_decode(buf.getvalue()))


@pytest.mark.parametrize("method", ["bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5"])
def test_resizing_the_rgb_view_of_4_byte_pixels_equals_resizing_a_contiguous_copy(method: str) -> None:
    from featurecache.data.decode import aligned_empty
    from featurecache.data.transforms import _padded_rgb

    rng = np.random.default_rng(5)
    padded = aligned_empty((2, 150, 97, 4), np.uint8)  # aligned: TensorFlow reads it in place (DLPack)
    padded[:] = rng.integers(0, 256, size=padded.shape, dtype=np.uint8)
    assert padded.ctypes.data % 64 == 0
    raw = np.empty(padded.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + 16  # 16 bytes past a 64-byte boundary, whatever malloc returned
    shifted = raw[start : start + padded.nbytes].reshape(padded.shape)  # not aligned: copied
    shifted[:] = padded
    assert shifted.ctypes.data % 64 != 0
    for view in (padded[0, :, :, :3], padded[..., :3], shifted[..., :3]):  # one image, a batch, unaligned
        assert _padded_rgb(view) is not None
        for antialias in (False, True):
            for size in (32, 200):  # shrink and enlarge
                np.testing.assert_array_equal(
                    resize_image(view, size, method=method, antialias=antialias),
                    resize_image(np.ascontiguousarray(view), size, method=method, antialias=antialias),
                )
    # Views whose 4-byte pixels would reach past their memory are copied as before, not widened.
    tight = padded.copy()  # its memory ends right after the last pixel
    assert _padded_rgb(tight[..., 1:]) is None
    assert _padded_rgb(tight[:, :, :50, :3]) is None
    assert _padded_rgb(np.ascontiguousarray(padded[..., :3])) is None
