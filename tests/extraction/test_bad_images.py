"""A real-world-ish image folder through ``extract``: every odd and broken kind of file at once.

Valid files must be valid with the right pixels: each one's stored features are compared with
the backbone run on a decode computed here from the pixels that were written (compositing,
16-bit scaling and EXIF rotation as formulas), not with featurecache's own decoder. Broken
files must be marked invalid (zeros, ``valid`` False) and listed with their reason; with
``on_error="fail"`` the run stops at the first one and keeps every unit finished before it.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import featurecache as fc
from featurecache.cache import store, views
from featurecache.cli.main import app
from featurecache.data import load_dataset
from featurecache.errors import ImageDecodeError

REPO = Path(__file__).resolve().parents[2]
# Pillow warns before we refuse the 10000 x 10000 image; the refusal is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
SIZE = 32
# vgg16 with random weights: features of order 0.1-1 (mobilenetv2's random ones are ~1e-12,
# too small to tell a right decode from a wrong one), and it builds in a fraction of a second.
OPTIONS = dict(backbone="vgg16", weights="random", size=SIZE, batch_size=4)
RNG = np.random.default_rng(7)

# id -> a word its failure reason must contain
INVALID = {
    "odd/big.png": "decompression-bomb limit",  # 10000 x 10000: Pillow only warns, we refuse
    "odd/bomb.png": "decompression bomb",  # 20000 x 20000: Pillow refuses to open it
    "odd/fake.png": "not an image",
    "odd/truncated.jpg": "truncated",
    "odd/unreadable.png": "cannot read file",  # turned into a directory after indexing
    "odd/vanished.jpg": "cannot read file",  # deleted after indexing
    "odd/zero.jpg": "empty file",
}


@dataclass(frozen=True)
class Corpus:
    root: Path
    expected: dict[str, np.ndarray]  # id -> reference uint8 RGB decode of each valid file
    naive: dict[str, np.ndarray]  # id -> what a careless Image.open().convert("RGB") gives
    dataset: object  # the Dataset indexed before two files were made unreadable


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows: list[bytes] | bytes) -> bytes:
    """A PNG written by hand: 16-bit colour (Pillow cannot write it) and huge 1-bit images."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    if isinstance(rows, bytes):  # one row repeated: compress it streaming, never holding the image
        comp = zlib.compressobj(9)
        raw = b"".join(comp.compress(b"\x00" + rows) for _ in range(height)) + comp.flush()
    else:
        raw = zlib.compress(b"".join(b"\x00" + r for r in rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.rint(rgb.astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _scale16(values: np.ndarray) -> np.ndarray:
    return np.rint(values.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)


def _make_corpus(root: Path) -> Corpus:
    good, odd = root / "good", root / "odd"
    good.mkdir(parents=True)
    odd.mkdir()
    expected: dict[str, np.ndarray] = {}
    naive: dict[str, np.ndarray] = {}
    for i in range(4):  # plain files first, so the first write unit holds only them
        px = RNG.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
        Image.fromarray(px).save(good / f"g{i}.png")
        expected[f"good/g{i}.png"] = px

    # -- valid, but odd
    frames = [RNG.integers(0, 4, (18, 22), dtype=np.uint8) for _ in range(3)]
    palette = np.array([[250, 10, 10], [10, 200, 30], [20, 40, 230], [240, 240, 20]], dtype=np.uint8)
    gif = [Image.fromarray(f, "P") for f in frames]
    for im in gif:
        im.putpalette(palette.ravel().tolist() + [0] * (768 - palette.size))
    gif[0].save(odd / "animated.gif", save_all=True, append_images=gif[1:], duration=100, loop=0)
    expected["odd/animated.gif"] = palette[frames[0]]

    cmyk = np.zeros((24, 24, 4), dtype=np.uint8)
    cmyk[:, :12] = (0, 255, 255, 0)
    cmyk[:, 12:] = (255, 120, 0, 30)
    Image.fromarray(cmyk, "CMYK").save(odd / "cmyk.jpg", quality=95)
    with Image.open(odd / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
        expected["odd/cmyk.jpg"] = np.asarray(im.convert("RGB"))

    stored = np.zeros((16, 32, 3), dtype=np.uint8)  # 32 wide, left half red: shown 16 wide, red on top
    stored[:, :16] = (230, 20, 20)
    stored[:, 16:] = (20, 20, 230)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(odd / "exif_rotated.jpg", quality=95, exif=exif)
    with Image.open(odd / "exif_rotated.jpg") as im:
        raw = np.asarray(im.convert("RGB"))
    expected["odd/exif_rotated.jpg"] = np.rot90(raw, k=-1)
    naive["odd/exif_rotated.jpg"] = raw

    grey = RNG.integers(0, 256, (21, 19), dtype=np.uint8)
    Image.fromarray(grey).save(odd / "grey.png")
    expected["odd/grey.png"] = np.repeat(grey[..., None], 3, axis=-1)

    grey16 = RNG.integers(0, 65536, (17, 23), dtype=np.uint16)
    Image.fromarray(grey16).save(odd / "grey16.png")
    expected["odd/grey16.png"] = np.repeat(_scale16(grey16)[..., None], 3, axis=-1)
    naive["odd/grey16.png"] = np.repeat(np.minimum(grey16, 255).astype(np.uint8)[..., None], 3, axis=-1)

    index = RNG.integers(0, 3, (20, 20), dtype=np.uint8)
    pal = Image.fromarray(index, "P")
    pal.putpalette([200, 30, 30, 0, 0, 0, 30, 30, 200] + [0] * 759)
    pal.save(odd / "palette_transparent.png", transparency=1)
    colours = np.array([[200, 30, 30], [255, 255, 255], [30, 30, 200]], dtype=np.uint8)
    expected["odd/palette_transparent.png"] = colours[index]
    naive["odd/palette_transparent.png"] = np.array([[200, 30, 30], [0, 0, 0], [30, 30, 200]], dtype=np.uint8)[index]

    rgb16 = RNG.integers(0, 65536, (14, 18, 3), dtype=np.uint16)
    (odd / "rgb16.png").write_bytes(_png(18, 14, 16, 2, [r.astype(">u2").tobytes() for r in rgb16]))
    expected["odd/rgb16.png"] = _scale16(rgb16)

    rgba = RNG.integers(0, 256, (22, 20, 4), dtype=np.uint8)
    rgba[:8, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(odd / "rgba.png")
    expected["odd/rgba.png"] = _composite(rgba[..., :3], rgba[..., 3])
    naive["odd/rgba.png"] = rgba[..., :3]

    tif = RNG.integers(0, 256, (15, 25, 3), dtype=np.uint8)
    Image.fromarray(tif).save(odd / "tiff.tif")
    expected["odd/tiff.tif"] = tif

    webp = RNG.integers(0, 256, (19, 21, 3), dtype=np.uint8)
    Image.fromarray(webp).save(odd / "webp.webp", lossless=True)
    expected["odd/webp.webp"] = webp

    # -- broken
    (odd / "zero.jpg").write_bytes(b"")
    jpeg = odd / "truncated.jpg"
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    (odd / "fake.png").write_text("these are my notes, saved with the wrong extension\n")
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None and 10000 * 10000 > limit and 20000 * 20000 > 2 * limit
    (odd / "big.png").write_bytes(_png(10000, 10000, 1, 0, bytes(1250)))  # a few KB on disk
    (odd / "bomb.png").write_bytes(_png(20000, 20000, 1, 0, bytes(2500)))
    Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(odd / "vanished.jpg")
    Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(odd / "unreadable.png")

    # -- not images at all: skipped by name, and counted
    (odd / "notes.txt").write_text("not an image\n")
    (odd / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")

    dataset = load_dataset(str(root))
    dataset.digest()  # indexed and hashed now; the files below break afterwards, mid-run
    (odd / "vanished.jpg").unlink()
    (odd / "unreadable.png").unlink()
    (odd / "unreadable.png").mkdir()  # as root, chmod 000 would not stop us reading; this does
    return Corpus(root, expected, naive, dataset)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return _make_corpus(tmp_path_factory.mktemp("bad") / "photos")


@pytest.fixture(scope="module")
def skipped_run(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> fc.ExtractResult:
    return fc.extract(
        corpus.dataset, cache_dir=tmp_path_factory.mktemp("cache"), chunk_rows=4, progress=False, **OPTIONS
    )


@pytest.fixture(scope="module")
def reference_features():
    """Features of plain keras.applications VGG16 (same seed) on a reference decode."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))

    def features(images: list[np.ndarray]) -> np.ndarray:
        x = np.stack([tf.image.resize(im.astype("float32"), (SIZE, SIZE), method="bilinear").numpy() for im in images])
        return base(keras.applications.vgg16.preprocess_input(x), training=False).numpy().mean(axis=(1, 2))

    return features


def test_invalid_files_are_marked_and_listed_with_reasons(corpus: Corpus, skipped_run: fc.ExtractResult) -> None:
    fs = fc.open_features(skipped_run.key, cache_dir=skipped_run.path.parents[1])
    ids = list(fs.ids("train"))
    assert sorted(ids) == sorted([*corpus.expected, *INVALID])
    reasons = {f["id"]: f["reason"] for f in skipped_run.failures}
    assert set(reasons) == set(INVALID), reasons
    for sid, word in INVALID.items():
        assert word in reasons[sid], (sid, reasons[sid])
        assert "\n" not in reasons[sid]
    valid = fs.valid("train")
    feats = fs.features("train")
    for row, sid in enumerate(ids):
        assert valid[row] == (sid not in INVALID), sid
        if sid in INVALID:
            assert not feats[row].any(), f"{sid} is invalid, so its features must be zeros"
    assert fs.failures() == [
        {"split": "train", **f} for f in [{"id": f["id"], "reason": f["reason"]} for f in skipped_run.failures]
    ]
    # notes.txt and .DS_Store are skipped by name before any decoding, and counted
    assert skipped_run.skipped_files == 2
    skipped = dict(corpus.dataset.skipped)
    assert "not an image type" in skipped["odd/notes.txt"] and "hidden" in skipped["odd/.DS_Store"]


def test_valid_odd_files_have_the_right_pixels(
    corpus: Corpus, skipped_run: fc.ExtractResult, reference_features
) -> None:
    fs = fc.open_features(skipped_run.key, cache_dir=skipped_run.path.parents[1])
    row_of = {sid: i for i, sid in enumerate(fs.ids("train"))}
    names = sorted(corpus.expected)
    stored = fs.features("train")[[row_of[n] for n in names]]
    expected = reference_features([corpus.expected[n] for n in names])
    tol = 1e-4 * np.abs(expected).max()
    for name, got, want in zip(names, stored, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=tol, err_msg=name)
    # The comparison has the power to see a wrong decode: the careless conversions (sideways
    # photo, black under transparency, clipped 16-bit) give clearly different features.
    wrong = reference_features([corpus.naive[n] for n in sorted(corpus.naive)])
    for name, w in zip(sorted(corpus.naive), wrong, strict=True):
        assert np.abs(stored[names.index(name)] - w).max() > 100 * tol, name


def test_on_error_fail_stops_at_the_first_bad_file_and_keeps_finished_units(
    corpus: Corpus, skipped_run: fc.ExtractResult, tmp_path: Path
) -> None:
    with pytest.raises(ImageDecodeError, match="odd/big.png") as info:
        fc.extract(corpus.dataset, cache_dir=tmp_path, chunk_rows=4, on_error="fail", progress=False, **OPTIONS)
    assert "\n" not in str(info.value) and "--on-error skip" in str(info.value)
    assert next(views.iter_entries(tmp_path), None) is None, "no feature set is written when a file fails"
    st = next(store.iter_stores(tmp_path))
    done = sorted(st.markers(0, refresh=True))
    assert done and done == list(range(len(done))), "the units before the bad file are kept"
    kept = {m: m.stat().st_mtime_ns for m in (st.path / "units" / "v0").glob("u*/zarr.json")}
    assert len(kept) == len(done)
    assert not list((tmp_path / ".locks").glob("*.lease"))

    res = fc.extract(corpus.dataset, cache_dir=tmp_path, chunk_rows=4, on_error="skip", progress=False, **OPTIONS)
    assert {m: m.stat().st_mtime_ns for m in kept} == kept, "finished units are not recomputed"
    a = fc.open_features(res.key, cache_dir=tmp_path)
    b = fc.open_features(skipped_run.key, cache_dir=skipped_run.path.parents[1])
    np.testing.assert_array_equal(a.features("train"), b.features("train"))
    np.testing.assert_array_equal(a.valid("train"), b.valid("train"))
    assert a.failures() == b.failures()


def test_cli_skip_exits_0_with_a_summary_line(corpus: Corpus, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    args = [
        "extract",
        "--data",
        str(corpus.root),
        "--backbone",
        "vgg16",
        "--weights",
        "random",
        "--size",
        str(SIZE),
        "--cache",
        str(tmp_path),
        "--quiet",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    warning = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    # vanished.jpg and unreadable.png are gone from the folder for a fresh run: 5 broken files
    assert len(warning) == 1 and "5 images could not be decoded" in warning[0] and "cache failures" in warning[0], (
        res.stderr
    )
    assert "note: skipped 2 files (hidden, not an image type" in res.stderr
    listing = CliRunner().invoke(app, ["cache", "failures", res.stdout.split("key ")[1][:12], "--cache", str(tmp_path)])
    assert listing.exit_code == 0 and "odd/zero.jpg\tempty file" in listing.stdout


def test_cli_fail_is_one_line_naming_the_file(corpus: Corpus, tmp_path: Path) -> None:
    args = [
        "extract",
        "--data",
        str(corpus.root),
        "--backbone",
        "vgg16",
        "--weights",
        "random",
        "--size",
        str(SIZE),
        "--cache",
        str(tmp_path),
        "--on-error",
        "fail",
        "--quiet",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("FEATURECACHE_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "featurecache", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )
    assert proc.returncode != 0
    errors = proc.stderr.splitlines()  # the one line only: TensorFlow's start-up lines are silenced
    assert (
        len(errors) == 1 and errors[0].startswith("error: train/odd/big.png:") and "decompression-bomb" in errors[0]
    ), proc.stderr
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
