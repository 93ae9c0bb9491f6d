"""decode_image against a corpus of odd and broken files generated with Pillow (and by hand).

Every valid file is checked against a reference computed here from the pixels that were
written, not against Pillow's own conversion: compositing on white, 16-bit scaling and EXIF
rotation are written out as formulas.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurecache.data import IMAGE_EXTENSIONS, decode_image
from featurecache.errors import ImageDecodeError

RNG = np.random.default_rng(1234)


def _save(tmp_path: Path, name: str, image: Image.Image, **kwargs) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def _composite_ref(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.rint(rgb.astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _scale16_ref(values: np.ndarray) -> np.ndarray:
    return np.rint(values.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)


def _png(width: int, height: int, bit_depth: int, colour_type: int, samples: np.ndarray) -> bytes:
    """A minimal PNG written by hand (Pillow cannot write 16-bit colour PNGs)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    dtype = ">u2" if bit_depth == 16 else "u1"
    rows = samples.astype(dtype).reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------ valid files


@pytest.mark.parametrize(
    "fmt,ext,kwargs",
    [("PNG", "png", {}), ("BMP", "bmp", {}), ("TIFF", "tif", {}), ("WEBP", "webp", {"lossless": True})],
)
def test_lossless_rgb_formats_decode_exactly(tmp_path, fmt, ext, kwargs):
    pixels = RNG.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    path = _save(tmp_path, f"x.{ext}", Image.fromarray(pixels), format=fmt, **kwargs)
    out = decode_image(path)
    assert out.dtype == np.uint8 and out.shape == (13, 17, 3)
    np.testing.assert_array_equal(out, pixels)
    np.testing.assert_array_equal(decode_image(str(path)), pixels)
    np.testing.assert_array_equal(decode_image(path.read_bytes()), pixels)


def test_grayscale_is_repeated_to_rgb(tmp_path):
    grey = RNG.integers(0, 256, (9, 11), dtype=np.uint8)
    out = decode_image(_save(tmp_path, "g.png", Image.fromarray(grey)))
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=-1))


# Values chosen to catch clipping (anything > 255 would be 255) and truncation (v >> 8).
VALUES16 = np.array([[0, 1, 128, 129, 255, 256], [257, 32767, 32768, 40000, 65407, 65535]], dtype=np.uint16)


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("TIFF", "tif")])
def test_16bit_grey_is_scaled_not_clipped(tmp_path, fmt, ext):
    im = Image.fromarray(VALUES16)
    assert im.mode == "I;16"
    out = decode_image(_save(tmp_path, f"g16.{ext}", im, format=fmt))
    expected = _scale16_ref(VALUES16)
    assert expected[1, 3] == 156  # 40000 * 255 / 65535, not clipped to 255
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=-1))


def test_16bit_rgb_png_is_scaled_exactly(tmp_path):
    rgb = np.stack([VALUES16, VALUES16[::-1], VALUES16[:, ::-1]], axis=-1)  # (2, 6, 3)
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png(6, 2, 16, 2, rgb))
    np.testing.assert_array_equal(decode_image(path), _scale16_ref(rgb))


def test_16bit_rgba_png_is_scaled_then_composited(tmp_path):
    rgb = np.stack([VALUES16, VALUES16[::-1], VALUES16[:, ::-1]], axis=-1)
    alpha = np.array([[0, 65535, 32768, 1000, 65535, 20000], [65535, 0, 5000, 65535, 40000, 65535]], dtype=np.uint16)
    path = tmp_path / "rgba16.png"
    path.write_bytes(_png(6, 2, 16, 6, np.concatenate([rgb, alpha[..., None]], axis=-1)))
    np.testing.assert_array_equal(decode_image(path), _composite_ref(_scale16_ref(rgb), _scale16_ref(alpha)))


def test_rgba_png_is_composited_on_white(tmp_path):
    rgba = RNG.integers(0, 256, (8, 10, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0  # fully transparent row: pure white, whatever colour is underneath
    rgba[1, :, 3] = 255
    out = decode_image(_save(tmp_path, "a.png", Image.fromarray(rgba, "RGBA")))
    expected = _composite_ref(rgba[..., :3], rgba[..., 3])
    np.testing.assert_array_equal(out, expected)
    assert (out[0] == 255).all()
    np.testing.assert_array_equal(out[1], rgba[1, :, :3])


def test_la_png_is_composited_on_white(tmp_path):
    la = RNG.integers(0, 256, (7, 5, 2), dtype=np.uint8)
    out = decode_image(_save(tmp_path, "la.png", Image.fromarray(la, "LA")))
    grey = np.repeat(la[..., :1], 3, axis=-1)
    np.testing.assert_array_equal(out, _composite_ref(grey, la[..., 1]))


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    index = RNG.integers(0, 3, (6, 6), dtype=np.uint8)
    palette = [10, 20, 30, 200, 0, 0, 0, 0, 250]
    im = Image.fromarray(index, "P")
    im.putpalette(palette + [0] * (768 - len(palette)))
    out = decode_image(_save(tmp_path, "p.png", im, transparency=1))
    colours = np.array(palette, dtype=np.uint8).reshape(3, 3)
    expected = colours[index]
    expected[index == 1] = 255  # index 1 is transparent -> white background
    np.testing.assert_array_equal(out, expected)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = np.zeros((16, 16, 4), dtype=np.uint8)
    cmyk[:, :8] = (0, 255, 255, 0)  # red
    cmyk[:, 8:] = (255, 255, 0, 0)  # blue
    path = _save(tmp_path, "cmyk.jpg", Image.fromarray(cmyk, "CMYK"), quality=95)
    assert Image.open(path).mode == "CMYK"
    out = decode_image(path)
    assert out.shape == (16, 16, 3)
    np.testing.assert_allclose(out[:, :4].reshape(-1, 3).mean(0), (255, 0, 0), atol=12)
    np.testing.assert_allclose(out[:, 12:].reshape(-1, 3).mean(0), (0, 0, 255), atol=12)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 32 wide x 16 high, left half red; orientation 6 means "rotate 90 degrees clockwise
    # to display", so the decoded image is 16 wide x 32 high with red on top.
    stored = np.zeros((16, 32, 3), dtype=np.uint8)
    stored[:, :16] = (255, 0, 0)
    stored[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path, "rot.jpg", Image.fromarray(stored), exif=exif.tobytes(), quality=95, subsampling=0)
    out = decode_image(path)
    assert out.shape == (32, 16, 3)
    expected = np.rot90(stored, k=-1)  # clockwise
    away_from_edge = np.r_[0:12, 20:32]  # JPEG blurs the red/blue boundary
    np.testing.assert_allclose(out[away_from_edge].astype(int), expected[away_from_edge].astype(int), atol=8)


def test_animated_gif_gives_first_frame(tmp_path):
    red = Image.new("RGB", (8, 6), (255, 0, 0))
    blue = Image.new("RGB", (8, 6), (0, 0, 255))
    path = tmp_path / "anim.gif"
    red.save(path, save_all=True, append_images=[blue], duration=100, loop=0)
    with Image.open(path) as im:
        assert getattr(im, "n_frames", 1) == 2
    out = decode_image(path)
    assert out.shape == (6, 8, 3)
    assert (out == np.array([255, 0, 0], dtype=np.uint8)).all()


# ------------------------------------------------------------------------------ broken files


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _expect_error(data, *fragments: str) -> str:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message.lower(), message
    return message


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    message = _expect_error(path, "empty")
    assert str(path) in message


def test_truncated_jpeg_is_an_error_not_grey(tmp_path):
    data = _jpeg_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    _expect_error(path, "truncated")


def test_truncated_png_is_an_error(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _expect_error(path, "truncated")


# 18-byte TGA header (uncompressed true-colour, 4x4, 24 bpp) + pixels: Pillow's TGA plugin has no
# magic number and opens this, so a file named .jpg holding it must still be refused.
_TGA_LOOKALIKE = b"\x00\x00\x02" + bytes(9) + b"\x04\x00\x04\x00\x18\x00" + bytes(48)


@pytest.mark.parametrize("content", [b"hello, this is not an image at all\n", _TGA_LOOKALIKE])
def test_non_image_with_image_extension(tmp_path, content):
    path = tmp_path / "fake.jpg"
    path.write_bytes(content)
    _expect_error(path, "not an image")


def test_decompression_bomb_is_refused_without_changing_the_limit(tmp_path, monkeypatch):
    small = _save(tmp_path, "ok.png", Image.new("RGB", (9, 9)))
    warn_zone = _save(tmp_path, "warn.png", Image.new("RGB", (12, 12)))  # 144 px: Pillow only warns
    error_zone = _save(tmp_path, "bomb.png", Image.new("RGB", (20, 20)))  # 400 px > 2 x limit: Pillow raises
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert decode_image(small).shape == (9, 9, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the error must not rely on it
        _expect_error(warn_zone, "decompression")
    _expect_error(error_zone, "decompression")
    assert Image.MAX_IMAGE_PIXELS == 100


def test_unreadable_files(tmp_path):
    _expect_error(tmp_path / "missing.png", "cannot read", "no such file")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    _expect_error(folder, "cannot read")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied(tmp_path):
    path = _save(tmp_path, "locked.png", Image.new("RGB", (4, 4)))
    path.chmod(0)
    try:
        _expect_error(path, "cannot read", "permission")
    finally:
        path.chmod(0o644)


def test_image_extensions():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"} == IMAGE_EXTENSIONS
