"""Resizing and deterministic per-sample augmentation.

Resizing is ``tf.image.resize`` -- the exact op that ``keras.layers.Resizing`` runs -- so the
features cached from ``resize_image`` match what the fine-tuning model (which has a ``Resizing``
layer inside) computes on the same image. By default it does not antialias (Keras's default):
shrinking a 12 MP photo to 224 px then samples about one pixel in 300 and the features see
aliasing. ``antialias=True`` (keyed, ``--antialias``) filters the whole footprint instead.

Augmentation is keyed, not streamed: the random parameters of sample ``i`` in view ``v`` are
drawn from ``np.random.default_rng([seed, v, i])`` and nothing else. The same sample therefore
gets the same pixels whichever batch, order, process or resumed run computes it, which is what
makes extraction write units idempotent. Changing how parameters are drawn or applied changes
stored features: bump ``featurecache.cache.keys.FORMAT_VERSION`` when you do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, SupportsFloat

import numpy as np

from featurecache.data.decode import drop_channels
from featurecache.errors import AugmentSpecError, UsageError, choices

__all__ = ["FILL_MODES", "RESIZE_METHODS", "AugmentSpec", "augment_batch", "resize_image"]

#: Interpolations accepted by both ``tf.image.resize`` and ``keras.layers.Resizing`` (the
#: latter rejects tf's "gaussian" and "mitchellcubic", so those are left out).
RESIZE_METHODS: tuple[str, ...] = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5")

#: How pixels that an affine transform pulls from outside the image are filled
#: (``ImageProjectiveTransformV3`` modes; "constant" fills with 0).
FILL_MODES: tuple[str, ...] = ("reflect", "nearest", "wrap", "constant")


def resize_image(image: np.ndarray, size: int, *, method: str = "bilinear", antialias: bool = False) -> np.ndarray:
    """Resize an image (or a batch) to ``size x size``, exactly as ``keras.layers.Resizing`` does.

    Parameters
    ----------
    image
        ``(H, W, 3)`` or ``(b, H, W, 3)`` array, ``uint8`` or float, values in ``[0, 255]``.
    size
        Output height and width.
    method
        One of :data:`RESIZE_METHODS`.
    antialias
        When shrinking, filter over the whole footprint of each output pixel
        (``tf.image.resize(antialias=True)``, ``keras.layers.Resizing(antialias=True)``)
        instead of interpolating between the nearest input pixels.

    Returns
    -------
    numpy.ndarray
        ``float32`` ``(size, size, 3)`` (or ``(b, size, size, 3)``). Not clipped: bicubic and
        lanczos may overshoot ``[0, 255]`` slightly, as the Keras layer does, so the two agree
        bit for bit.

    Raises
    ------
    UsageError
        Unknown ``method``, ``size < 1``, or an array that is not ``(..., H, W, 3)``.
    """
    if method not in RESIZE_METHODS:
        raise UsageError(
            f"resize method {method!r} is not one of {choices(RESIZE_METHODS)}; pass e.g. method='bilinear'"
        )
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise UsageError(f"resize size must be a positive int, got {size!r}")
    arr = np.asarray(image)
    if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise UsageError(f"resize_image expects an (H, W, 3) or (b, H, W, 3) image, got shape {arr.shape}")
    import tensorflow as tf  # lazy: keeps `featurecache --help` and cache hits fast

    # uint8 goes in as is: every resize kernel computes in float32 from the exact uint8 -> float
    # values, so the output equals casting first (as the float32 model input does before its
    # Resizing layer; tests/test_transforms.py checks every method), without a float copy of a
    # 12 MP photo (144 MB, more time than the resize itself).
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32, copy=False)
    padded = _padded_rgb(arr)
    if padded is not None:
        # A large decoded JPEG is the first 3 channels of 4-byte pixels (featurecache.data.decode).
        # Copying that view to 3 contiguous channels costs more than the resize, so the 4
        # channels are resized and the 4th dropped: every method resizes each channel on its
        # own, so the 3 kept are bit-identical (tests/test_decode_scale.py checks every method).
        out = tf.image.resize(_shared_tensor(padded), (int(size), int(size)), method=method, antialias=bool(antialias))
        return drop_channels(out.numpy().astype(np.float32, copy=False))
    out = tf.image.resize(tf.convert_to_tensor(arr), (int(size), int(size)), method=method, antialias=bool(antialias))
    return out.numpy().astype(np.float32, copy=False)


def _padded_rgb(arr: np.ndarray) -> np.ndarray | None:
    """The ``(..., H, W, 4)`` uint8 array whose first three channels ``arr`` is, if it is such a view."""
    base = arr.base
    if arr.dtype != np.uint8 or arr.flags.c_contiguous or not isinstance(base, np.ndarray) or 0 in arr.shape:
        return None
    strides = [4, 1]  # those of a C-contiguous (..., H, W, 4) array, minus its last channel
    for n in reversed(arr.shape[1:-1]):
        strides.insert(0, strides[0] * n)
    if list(arr.strides) != strides:
        return None
    low, high = np.lib.array_utils.byte_bounds(base)
    start = arr.__array_interface__["data"][0]
    if start < low or start + strides[0] * arr.shape[0] > high:
        return None  # the 4th byte of the last pixel is outside the memory arr comes from
    return np.lib.stride_tricks.as_strided(
        arr, shape=(*arr.shape[:-1], 4), strides=arr.strides, writeable=arr.flags.writeable
    )


#: TensorFlow's kernels require their input's memory aligned to Eigen's maximum alignment
#: (a failed check aborts the process, it does not raise); 64 bytes covers every build.
TENSOR_ALIGNMENT = 64


def _shared_tensor(arr: np.ndarray) -> Any:
    """``arr`` as a tensor sharing its memory when that is safe, else a copy (``tf.convert_to_tensor``).

    Copying a decoded 12 MP photo into a tensor took ~17 ms of CPU, ten times the resize
    itself; DLPack hands TensorFlow the same bytes without a copy. Only C-contiguous, writable
    (NumPy exports no read-only arrays), 64-byte aligned arrays qualify, which is what
    ``featurecache.data.decode`` allocates for large JPEGs.
    """
    import tensorflow as tf

    if arr.flags.c_contiguous and arr.flags.writeable and arr.ctypes.data % TENSOR_ALIGNMENT == 0:
        try:
            return tf.experimental.dlpack.from_dlpack(arr.__dlpack__())
        except Exception:  # noqa: BLE001 - any refusal: the copy below is always correct
            pass
    return tf.convert_to_tensor(arr)


# name -> (kind, meaning, upper bound, bound is inclusive)
_PARAMS: dict[str, tuple[str, str, float, bool]] = {
    "flip": ("bool", "horizontal flip with p=0.5", 1.0, True),
    "rotation": ("float", "max rotation in degrees", 180.0, True),
    "zoom": ("float", "max zoom fraction, scale in [1-z, 1+z]", 1.0, False),
    "shift": ("float", "max shift as a fraction of the size", 1.0, True),
    "shear": ("float", "max shear angle in degrees", 90.0, False),
    "brightness": ("float", "max brightness change as a fraction of 255", 1.0, True),
    "contrast": ("float", "max contrast change, factor in [1-c, 1+c]", 1.0, True),
}
_EXAMPLE = "flip,rotation=15,zoom=0.1,shift=0.1,shear=5,brightness=0.2,contrast=0.2"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _known() -> str:
    return "; ".join(
        f"{name}{'' if kind == 'bool' else '=X'} ({meaning})" for name, (kind, meaning, _, _) in _PARAMS.items()
    )


def _round6(x: SupportsFloat) -> float:
    # 6 significant digits: the key and the pixels must come from the same number, so values
    # are rounded once, on construction. "+ 0.0" turns -0.0 into 0.0.
    return float(f"{float(x):.6g}") + 0.0


@dataclass(frozen=True)
class AugmentSpec:
    """What random augmentation a view applies; the identity by default.

    Build one with :meth:`parse` from text such as ``"flip,rotation=15,zoom=0.1"``. Float
    fields are rounded to 6 significant digits on construction, so :meth:`canonical` (part of
    the cache key) describes exactly the transform that is applied.
    """

    flip: bool = False
    rotation: float = 0.0
    zoom: float = 0.0
    shift: float = 0.0
    shear: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.flip, (bool, np.bool_)):
            raise AugmentSpecError(f"augment flip must be True or False, got {self.flip!r}")
        object.__setattr__(self, "flip", bool(self.flip))
        for name, (kind, meaning, upper, inclusive) in _PARAMS.items():
            if kind != "float":
                continue
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise AugmentSpecError(
                    f"augment {name} must be a number ({meaning}), got {value!r}; example: {_EXAMPLE!r}"
                )
            value = _round6(value)
            too_big = value > upper if inclusive else value >= upper
            if not math.isfinite(value) or value < 0 or too_big:
                bound = f"<= {upper:g}" if inclusive else f"< {upper:g}"
                raise AugmentSpecError(
                    f"augment {name}={value!r} is out of range: need 0 <= {name} {bound} ({meaning}); example: {_EXAMPLE!r}"
                )
            object.__setattr__(self, name, value)

    @classmethod
    def parse(cls, text: str | None) -> AugmentSpec:
        """Parse ``"flip,rotation=15,zoom=0.1,..."``.

        Parameters
        ----------
        text
            Comma-separated ``name`` or ``name=value`` tokens; ``None``, ``""`` or ``"none"``
            is the identity. Names: flip, rotation, zoom, shift, shear, brightness, contrast.

        Returns
        -------
        AugmentSpec

        Raises
        ------
        AugmentSpecError
            Unknown name, missing or non-numeric value, value out of range, or a name given
            twice; the message names the token, the known names with their meaning and an example.
        """
        if text is None:
            return cls()
        if not isinstance(text, str):
            raise AugmentSpecError(f"augment spec must be a string like {_EXAMPLE!r}, got {type(text).__name__}")
        stripped = text.strip()
        if stripped.lower() in ("", "none"):
            return cls()
        values: dict[str, Any] = {}
        for raw_token in stripped.split(","):
            token = raw_token.strip()
            if not token:
                continue
            name, has_value, value_text = (part.strip() for part in token.partition("="))
            name = name.lower()

            def bad(why: str, token: str = token) -> AugmentSpecError:
                return AugmentSpecError(
                    f"bad augment token {token!r} in {text!r}: {why}; known: {_known()}; example: {_EXAMPLE!r}"
                )

            if name not in _PARAMS:
                raise bad(f"unknown name {name!r}" + (" ('none' must stand alone)" if name == "none" else ""))
            if name in values:
                raise bad(f"{name!r} is given twice")
            kind = _PARAMS[name][0]
            if kind == "bool":
                if not has_value or value_text.lower() in _TRUE:
                    values[name] = True
                elif value_text.lower() in _FALSE:
                    values[name] = False
                else:
                    raise bad(f"{name} takes no value or one of {', '.join(_TRUE + _FALSE)}")
                continue
            if not has_value or not value_text:
                raise bad(f"{name} needs a value, e.g. {name}=0.1")
            try:
                number = float(value_text)
            except ValueError:
                raise bad(f"{value_text!r} is not a number") from None
            values[name] = number
        try:
            return cls(**values)
        except AugmentSpecError as exc:
            raise AugmentSpecError(f"bad augment spec {text!r}: {exc}") from None

    def canonical(self) -> dict[str, Any]:
        """Normalised, stable dict of every field (the augmentation part of the cache key)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def is_identity(self) -> bool:
        """True when this spec changes no pixel."""
        return not self.flip and not any(getattr(self, name) for name, spec in _PARAMS.items() if spec[0] == "float")

    def is_geometric(self) -> bool:
        """True when the spec moves pixels (flip, rotation, zoom, shift or shear)."""
        return bool(self.flip or self.rotation or self.zoom or self.shift or self.shear)

    def __str__(self) -> str:
        parts = []
        for name, (kind, _, _, _) in _PARAMS.items():
            value = getattr(self, name)
            if kind == "bool" and value:
                parts.append(name)
            elif kind == "float" and value:
                parts.append(f"{name}={value:g}")
        return ",".join(parts) or "none"


# Order of the uniform draws in augment_batch; part of the stored output (see module doc).
_DRAWS = ("flip", "rotation", "zoom", "shift_x", "shift_y", "shear", "brightness", "contrast")


def sample_parameters(spec: AugmentSpec, *, seed: int, view: int, index: int) -> dict[str, float]:
    """The random parameters of one sample; depends only on ``(spec, seed, view, index)``.

    ``u = np.random.default_rng([seed, view, index]).random(8)`` is drawn whatever the spec, in
    the order flip, rotation, zoom, shift_x, shift_y, shear, brightness, contrast; each
    parameter is then ``(2 u - 1) * max`` (zoom and contrast: ``1 + (2 u - 1) * max``) and the
    flip happens when ``spec.flip and u[0] < 0.5``.

    Parameters
    ----------
    spec
        The augmentation spec.
    seed, view, index
        Non-negative integers identifying the sample's draw.

    Returns
    -------
    dict
        ``flip`` (0.0 or 1.0), ``rotation`` and ``shear`` (degrees), ``zoom`` (scale factor),
        ``shift_x`` / ``shift_y`` (fractions of the width / height), ``brightness`` (added
        value, in units of 255) and ``contrast`` (factor).
    """
    for name, value in (("seed", seed), ("view", view), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise UsageError(f"augmentation {name} must be a non-negative int, got {value!r}")
    u = np.random.default_rng([int(seed), int(view), int(index)]).random(len(_DRAWS))
    d = dict(zip(_DRAWS, (2.0 * u - 1.0).tolist(), strict=True))
    return {
        "flip": 1.0 if spec.flip and u[0] < 0.5 else 0.0,
        "rotation": d["rotation"] * spec.rotation,
        "zoom": 1.0 + d["zoom"] * spec.zoom,
        "shift_x": d["shift_x"] * spec.shift,
        "shift_y": d["shift_y"] * spec.shift,
        "shear": d["shear"] * spec.shear,
        "brightness": d["brightness"] * spec.brightness,
        "contrast": 1.0 + d["contrast"] * spec.contrast,
    }


def _inverse_affine(p: dict[str, float], height: int, width: int) -> np.ndarray:
    """The 8 ``ImageProjectiveTransformV3`` numbers mapping output pixels to input pixels.

    Forward map (input -> output), about the image centre in pixel-index coordinates:
    ``shift . rotate . shear . zoom . flip``. The op wants the inverse.
    """
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    theta = math.radians(p["rotation"])
    shear = math.radians(p["shear"])
    flip = np.diag([-1.0 if p["flip"] else 1.0, 1.0, 1.0])
    zoom = np.diag([p["zoom"], p["zoom"], 1.0])
    shear_m = np.array([[1.0, -math.sin(shear), 0.0], [0.0, math.cos(shear), 0.0], [0.0, 0.0, 1.0]])
    rotate = np.array(
        [[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0], [0.0, 0.0, 1.0]]
    )
    to_origin = np.array([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]])
    back = np.array([[1.0, 0.0, cx + p["shift_x"] * width], [0.0, 1.0, cy + p["shift_y"] * height], [0.0, 0.0, 1.0]])
    forward = back @ rotate @ shear_m @ zoom @ flip @ to_origin
    inv = np.linalg.inv(forward)
    inv = inv / inv[2, 2]
    return inv.ravel()[:8]


def augment_batch(
    images: np.ndarray,
    spec: AugmentSpec,
    *,
    seed: int,
    view: int,
    indices: Sequence[int],
    fill: str = "reflect",
) -> np.ndarray:
    """Apply ``spec`` to a batch; sample ``i`` depends only on ``(seed, view, indices[i])``.

    The geometric part (flip, rotation, zoom, shift, shear) is one affine per sample, applied
    to the whole batch in one ``ImageProjectiveTransformV3`` call with bilinear sampling; then
    brightness is added and contrast scales each channel about its mean; the result is clipped
    to ``[0, 255]``. See :func:`sample_parameters` for how parameters are drawn.

    Parameters
    ----------
    images
        ``float32`` ``(b, H, W, 3)`` in ``[0, 255]``, already resized.
    spec
        What to apply. The caller decides which views are augmented (view 0 never is).
    seed, view
        Non-negative ints; with the sample index they seed that sample's draw.
    indices
        ``b`` non-negative ints: each sample's row in its split.
    fill
        How pixels pulled from outside the image are filled: one of :data:`FILL_MODES`.

    Returns
    -------
    numpy.ndarray
        ``float32`` ``(b, H, W, 3)``; an unchanged copy when ``spec`` is the identity.

    Raises
    ------
    UsageError
        Bad shape, ``len(indices) != b``, bad ``fill``, or negative seed / view / index.
    """
    if not isinstance(spec, AugmentSpec):
        raise UsageError(f"augment_batch needs an AugmentSpec (use AugmentSpec.parse), got {type(spec).__name__}")
    if fill not in FILL_MODES:
        raise UsageError(f"fill mode {fill!r} is not one of {choices(FILL_MODES)}; pass e.g. fill='reflect'")
    # Contiguous float32, so per-sample reductions see the same memory layout in every batch.
    x = np.ascontiguousarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise UsageError(f"augment_batch expects a (b, H, W, 3) batch, got shape {x.shape}")
    idx = list(indices)
    if len(idx) != x.shape[0]:
        raise UsageError(f"augment_batch got {x.shape[0]} images but {len(idx)} indices; pass one index per image")
    params = [sample_parameters(spec, seed=seed, view=view, index=i) for i in idx]
    if spec.is_identity() or x.shape[0] == 0:
        return x.copy()
    height, width = x.shape[1], x.shape[2]
    if spec.is_geometric():
        import tensorflow as tf  # lazy

        transforms = np.stack([_inverse_affine(p, height, width) for p in params]).astype(np.float32)
        x = tf.raw_ops.ImageProjectiveTransformV3(
            images=tf.convert_to_tensor(x),
            transforms=tf.convert_to_tensor(transforms),
            output_shape=tf.constant([height, width], dtype=tf.int32),
            fill_value=tf.constant(0.0, dtype=tf.float32),
            interpolation="BILINEAR",
            fill_mode=fill.upper(),
        ).numpy()
    else:
        x = x.copy()
    if spec.brightness or spec.contrast:
        for j, p in enumerate(params):
            img = x[j]
            if spec.brightness:
                img += np.float32(p["brightness"] * 255.0)
            if spec.contrast:
                mean = img.mean(axis=(0, 1), dtype=np.float64).astype(np.float32)
                img[...] = (img - mean) * np.float32(p["contrast"]) + mean
    np.clip(x, 0.0, 255.0, out=x)
    return x
