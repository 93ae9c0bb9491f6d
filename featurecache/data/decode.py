"""Robust image decoding: file or bytes -> ``uint8 (H, W, 3)`` RGB, or one clear error.

``Image.open(p).convert("RGB")`` is what most transfer-learning code does, and it is wrong in
quiet ways that end up as bad features rather than errors:

* transparent pixels keep whatever colour the encoder left under them (often black) -- we
  composite RGBA / LA / palette-with-transparency images on a fixed white background;
* 16-bit images are clipped (``I;16`` -> ``L`` saturates at 255) or truncated to their high
  byte (16-bit colour PNGs) -- we scale ``value * 255 / 65535`` and round;
* EXIF orientation is ignored, so phone photos come out sideways -- we apply it;
* truncated JPEGs decode as half-grey images when ``ImageFile.LOAD_TRUNCATED_IMAGES`` is set --
  we never set it, so they raise;
* any byte string some Pillow plugin accepts (TGA has no magic number) decodes as noise -- we
  only let Pillow try the formats whose extensions we accept.

Decoding a 12 MP photo only to shrink it to 224 px spends most of its time on pixels the resize
throws away. With ``draft=size`` a JPEG is decoded by libjpeg at the largest DCT scale (1/2, 1/4
or 1/8) whose output still has both sides ``>= size`` (``Image.draft``), so the resize that
follows still shrinks; other formats, and JPEGs under twice ``size``, decode in full as before.
The pixels differ slightly from a full decode followed by the same resize, which is why
extraction keys this choice (``decode="fast"``).

RGB JPEGs are decoded straight into a NumPy buffer of 4-byte pixels and returned as its
``[..., :3]`` view (:func:`_decode_rgb_direct`): the same pixels, without the copy Pillow's
``np.asarray`` makes; ``resize_image`` resizes such views without copying them either. That
copy holds the GIL: on 500x375 web photos it was half the decode time (1.70 -> 0.81 ms per
image) and most of the time a decode thread held the GIL, which capped a 16-core thread pool
at ~1,900 images/s (``benchmarks/gpu_feed.py``).

Every failure is an :class:`~featurecache.errors.ImageDecodeError` with a one-line reason;
extraction marks that image invalid and goes on. Decoding keeps no state, so it is safe to call
from a thread pool.
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from featurecache.errors import ImageDecodeError, one_line

__all__ = ["DECODE_MODES", "IMAGE_EXTENSIONS", "decode_image", "decode_workers", "draft_size", "drop_channels"]

#: File extensions (lower case, with the dot) treated as images by the dataset sources.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Pillow formats matching IMAGE_EXTENSIONS ("JPEG" also opens multi-picture camera JPEGs,
# MPO). Restricting Image.open to these turns "a text file named x.jpg" into an error
# instead of letting a magic-less plugin such as TGA decode it as noise.
_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")

#: How extraction decodes images: ``exact`` decodes in full (the pixels plain Keras sees);
#: ``fast`` decodes JPEGs at the smallest DCT scale that still covers the input size.
DECODE_MODES: tuple[str, ...] = ("exact", "fast")

_WHITE = 255  # background that transparent pixels are composited on
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# EXIF orientation -> the Pillow transpose that undoes it (the table ImageOps.exif_transpose
# uses); needed where pixels come from TensorFlow rather than from a Pillow image.
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112


def decode_image(data: bytes | str | Path, *, draft: int | None = None) -> np.ndarray:
    """Decode one image to ``uint8`` RGB.

    Parameters
    ----------
    data
        The encoded bytes, or the path of an image file. Only the first frame of animated
        GIF / WebP / multi-page TIFF files is decoded.
    draft
        The size the image will be resized to. When given, a JPEG at least twice that size
        on both sides is decoded at reduced DCT scale (1/2, 1/4 or 1/8), the largest
        reduction whose output still has both sides ``>= draft`` (:func:`draft_size`).
        ``None`` (the default) decodes every pixel.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape ``(H, W, 3)``, EXIF orientation applied, transparency
        composited on white, 16-bit samples scaled to 8 bits. For RGB JPEGs it is a
        view (pixel stride 4 bytes), not C-contiguous (``np.ascontiguousarray`` packs it).

    Raises
    ------
    ImageDecodeError
        The file cannot be read, is empty, is not an image of a supported format, is truncated
        or corrupt, is larger than ``PIL.Image.MAX_IMAGE_PIXELS``, or has an unsupported pixel
        mode. The message is one line; for a path it names the path.
    """
    if draft is not None and (isinstance(draft, bool) or not isinstance(draft, (int, np.integer)) or draft < 1):
        raise TypeError(f"decode_image(draft=...) takes a positive int size or None, got {draft!r}")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(data), draft)
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        try:
            return _decode_bytes(read_image_bytes(path), draft)
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"cannot decode {path}: {exc}") from exc.__cause__
    raise TypeError(f"decode_image() takes bytes or a path, got {type(data).__name__}")


def decode_workers() -> int:
    """Default number of decode threads: one per CPU core this process may run on (at least 2).

    Pillow's JPEG/PNG decoders and TensorFlow's resize release the GIL, so threads scale
    with cores (``benchmarks/decode_workers.py`` measures threads against processes); the
    backbone, on a GPU, needs almost none of them, and on a CPU the decode threads and the
    backbone share the cores anyway. Respects ``taskset`` / cgroup CPU affinity.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(2, cores)


def read_image_bytes(path: Path) -> bytes:
    """Read a file for :func:`decode_image`; an ``OSError`` becomes an ``ImageDecodeError``."""
    try:
        return path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ImageDecodeError(f"cannot read file ({reason})") from exc


def draft_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The ``(width, height)`` a JPEG of that size decodes to with ``decode_image(draft=size)``.

    libjpeg scales by ``1/s`` for the largest ``s`` in 8, 4, 2, 1 with ``s * size`` at most
    both sides, rounding up, so both sides of the result stay ``>= size`` (for an image that
    was at least ``size`` on both sides) and a resize to ``size`` still shrinks.
    """
    scale = min(width // size, height // size)
    s = next(s for s in (8, 4, 2, 1) if scale >= s) if scale >= 1 else 1
    return -(-width // s), -(-height // s)


def _decode_bytes(raw: bytes, draft: int | None = None) -> np.ndarray:
    if not raw:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(raw), formats=_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"too many pixels, refused as a possible decompression bomb: {_one_line(exc)}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"not an image in a supported format ({', '.join(_FORMATS)}); it starts with {raw[:12]!r}"
        ) from exc
    except Exception as exc:  # a plugin choking on a malformed header raises anything
        raise ImageDecodeError(f"unreadable image header: {_one_line(exc)}") from exc
    with im:
        # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that. Turning that warning into
        # an error with warnings.catch_warnings() would mutate process-global filters, which is
        # not thread-safe, so the limit is checked here against the same (unchanged) setting.
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and im.width * im.height > limit:
            raise ImageDecodeError(
                f"{im.width}x{im.height} = {im.width * im.height} pixels is over the decompression-bomb limit "
                f"PIL.Image.MAX_IMAGE_PIXELS={limit}; downscale the image, or raise that limit in your own code if you trust it"
            )
        if draft is not None and im.format == "JPEG":
            # Square target: both sides must cover it whatever the EXIF orientation. Pillow
            # picks the same scale as draft_size(); mode None keeps the colour conversion.
            im.draft(None, (int(draft), int(draft)))
        if im.format == "JPEG" and im.mode == "RGB":
            return _decode_rgb_direct(im)
        _load(im)
        if _is_16bit_colour_png(raw):
            rgb = _png16_colour_to_rgb(raw)
            orientation = _orientation(im)
            if orientation in _ORIENTATION_TRANSPOSE:
                rgb = np.asarray(Image.fromarray(rgb).transpose(_ORIENTATION_TRANSPOSE[orientation]))
            return np.ascontiguousarray(rgb)
        try:
            # In place: without it an upright photo (the common case) is copied whole for nothing.
            ImageOps.exif_transpose(im, in_place=True)
        except Exception as exc:
            raise ImageDecodeError(f"unreadable EXIF orientation: {_one_line(exc)}") from exc
        return np.ascontiguousarray(_to_rgb(im))


def _load(im: Image.Image) -> None:
    try:
        im.load()  # frame 0 only; raises on truncated data since LOAD_TRUNCATED_IMAGES stays off
    except Exception as exc:
        raise ImageDecodeError(f"corrupt or truncated {im.format} data: {_one_line(exc)}") from exc


def _decode_rgb_direct(im: Image.Image) -> np.ndarray:
    """Decode an RGB JPEG straight into a NumPy buffer: the pixels of the plain path, one copy fewer.

    Pillow keeps RGB pixels 4 bytes apart (the 4th is padding), so ``np.asarray(im)`` packs
    them through ``tobytes`` (chunked, then joined): ~50 ms per 12 MP photo, as long as a
    third of the decode. Here the image's memory is an ``(H, W, 4)`` NumPy buffer mapped
    before ``load`` (``Image.core.map_buffer``, which Pillow itself uses for raw files), so
    libjpeg writes into it and the result is a ``[..., :3]`` view; ``resize_image`` resizes
    such views without a copy. EXIF orientation is applied as ``ImageOps.exif_transpose``
    does (same tag, same table), on 32-bit pixels. Anything unexpected falls back to the plain path.
    """
    buf = aligned_empty((im.height, im.width, 4), np.uint8)
    try:
        im.im = Image.core.map_buffer(buf, im.size, "raw", 0, ("RGB", 0, 1))
        mapped = im.im
    except Exception:  # noqa: BLE001 - a Pillow without map_buffer: the plain path
        mapped = None
    _load(im)
    try:
        if mapped is None or im.im is not mapped or im.mode != "RGB":
            ImageOps.exif_transpose(im, in_place=True)
            return np.ascontiguousarray(_to_rgb(im))
        method = _ORIENTATION_TRANSPOSE.get(im.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(f"unreadable EXIF orientation: {_one_line(exc)}") from exc
    if method is not None:
        # One 32-bit word per pixel, so a rotation moves whole pixels rather than bytes.
        view = _TRANSPOSE_VIEWS[method](buf.view(np.uint32)[..., 0])
        turned = aligned_empty(view.shape, np.uint32)
        np.copyto(turned, view)
        buf = turned.view(np.uint8).reshape(*turned.shape, 4)
    return buf[..., :3]


def drop_channels(arr: np.ndarray, keep: int = 3) -> np.ndarray:
    """The first ``keep`` channels of ``arr`` (``(..., C)``) as a new C-contiguous array.

    What ``np.ascontiguousarray(arr[..., :keep])`` returns, 5x faster: NumPy copies a
    channel-strided view pixel by pixel (~0.8 ms for a 500x375 RGB view of 4-byte pixels), but
    one channel at a time it runs long strided loops (~0.16 ms), outside the GIL like any NumPy
    copy of this size.
    """
    out = np.empty((*arr.shape[:-1], keep), dtype=arr.dtype)
    for c in range(keep):
        out[..., c] = arr[..., c]
    return out


def aligned_empty(shape: tuple[int, ...], dtype: Any, *, alignment: int = 64) -> np.ndarray:
    """``np.empty(shape, dtype)`` whose data starts on an ``alignment``-byte boundary.

    TensorFlow reads such arrays without copying them (``featurecache.data.transforms``);
    NumPy only promises 16 bytes.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start : start + nbytes].view(dtype).reshape(shape)


# Pillow's transposes as NumPy views of an (H, W) array (ROTATE_90 turns counter-clockwise).
_TRANSPOSE_VIEWS = {
    Image.Transpose.FLIP_LEFT_RIGHT: lambda a: a[:, ::-1],
    Image.Transpose.FLIP_TOP_BOTTOM: lambda a: a[::-1],
    Image.Transpose.ROTATE_90: lambda a: np.rot90(a, 1),
    Image.Transpose.ROTATE_180: lambda a: a[::-1, ::-1],
    Image.Transpose.ROTATE_270: lambda a: np.rot90(a, -1),
    Image.Transpose.TRANSPOSE: lambda a: a.T,
    Image.Transpose.TRANSVERSE: lambda a: a[::-1, ::-1].T,
}


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N and I (32-bit int)
        values = np.asarray(im)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageDecodeError(
                "32-bit integer pixels outside 0..65535 have no defined 8-bit scaling; save the image as 8- or 16-bit"
            )
        grey = _scale16(values)
        transparency = im.info.get("transparency")
        if isinstance(transparency, int):
            alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
            return _composite(np.repeat(grey[..., None], 3, axis=-1), alpha)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode == "F":
        raise ImageDecodeError(
            "32-bit float pixels (mode F) have no defined 8-bit scaling; save the image as 8- or 16-bit"
        )
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        # convert("RGBA") resolves palette / colour-key transparency and un-premultiplies RGBa.
        rgba = np.asarray(im.convert("RGBA"))
        return _composite(rgba[..., :3], rgba[..., 3])
    if mode == "RGB":
        return np.asarray(im)
    try:
        return np.asarray(im.convert("RGB"))  # L, 1, P, CMYK, YCbCr, RGBX, HSV
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(f"pixel mode {mode!r} cannot be converted to RGB: {_one_line(exc)}") from exc


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-composite on white: ``round(c * a / 255 + 255 * (1 - a / 255))`` in exact integers."""
    c = rgb.astype(np.uint32)
    a = alpha.astype(np.uint32)[..., None]
    # (x + 127) // 255 rounds x / 255 to nearest; 255 is odd, so there are no ties.
    return ((c * a + _WHITE * (255 - a) + 127) // 255).astype(np.uint8)


def _scale16(values: np.ndarray) -> np.ndarray:
    """``round(v * 255 / 65535)`` in exact integers (no ties: 65535 is odd)."""
    v = values.astype(np.uint64)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _is_16bit_colour_png(raw: bytes) -> bool:
    # IHDR is always the first chunk: bit depth at byte 24, colour type at byte 25.
    # Pillow decodes grey 16-bit PNGs exactly (mode I;16) but keeps only the high byte of
    # 16-bit RGB / grey+alpha / RGBA ones, so those are decoded by TensorFlow instead.
    return raw[:8] == _PNG_SIGNATURE and len(raw) > 25 and raw[24] == 16 and raw[25] in (2, 4, 6)


def _png16_colour_to_rgb(raw: bytes) -> np.ndarray:
    import tensorflow as tf  # lazy: heavy, and only needed for this rare kind of file

    try:
        values = tf.io.decode_png(raw, channels=0, dtype=tf.uint16).numpy()
    except Exception as exc:
        raise ImageDecodeError(f"corrupt 16-bit PNG data: {_one_line(exc)}") from exc
    scaled = _scale16(values)
    if scaled.shape[-1] == 2:  # grey + alpha
        return _composite(np.repeat(scaled[..., :1], 3, axis=-1), scaled[..., 1])
    if scaled.shape[-1] == 4:
        return _composite(scaled[..., :3], scaled[..., 3])
    return scaled


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception as exc:
        raise ImageDecodeError(f"unreadable EXIF orientation: {_one_line(exc)}") from exc


#: An exception's message on one line, without its type (the message names the image's problem).
_one_line = functools.partial(one_line, type_name=False, limit=None)
