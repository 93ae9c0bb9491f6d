"""Building a backbone's Keras models: the base with its weights, the feature model cut and pooled from it, and the input they take.

Stable layer names
------------------
Keras names unnamed layers from per-thread counters, so the 18th ``Activation`` built in a
process is ``activation_17`` and the same MobileNetV3 built after another model gets different
names. Every registry model is therefore built with fresh counters
(:func:`_canonical_layer_names`): ``activation_17``, ``conv2d_5`` or ``add_3`` then name the same
layer in every process, which is what feature layers, ``--layer`` values, block patterns and the
cache key rely on.

Preprocessing belongs to the backbone (``keras.applications.<module>.preprocess_input``) and is
not inside the built model: feed :func:`preprocess_input` output to it.
"""

from __future__ import annotations

import collections
import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from featurecache.backbones.custom import build_custom
from featurecache.backbones.spec import BackboneSpec, unknown_layer_error
from featurecache.backbones.weights import WeightsRef, load_weights_file, offline_error
from featurecache.cache.keys import POOLINGS
from featurecache.errors import BackboneError, UsageError, choices

if TYPE_CHECKING:
    import keras


@contextlib.contextmanager
def _canonical_layer_names() -> Iterator[None]:
    """Build with fresh auto-name counters, as in a new process (see the module docstring).

    Afterwards each counter is set to the larger of its old and new value, so layers created later
    never reuse a name. Models built here share names with each other (two VGG19s both have
    ``block1_conv1``), as any two Keras applications do.
    """
    try:
        # Keras has no public way to scope name counters; clear_session() would also reset the
        # user's dtype policy and other global settings.
        from keras.src.backend.common import global_state
    except ImportError:  # pragma: no cover - a Keras that moved it; build_base's name check catches drift
        yield
        return
    key = "object_name_uids"
    before = global_state.get_global_attribute(key, default=collections.defaultdict(int), set_to_default=True)
    global_state.set_global_attribute(key, collections.defaultdict(int))
    try:
        yield
    finally:
        after = global_state.get_global_attribute(key, default=collections.defaultdict(int))
        merged = collections.defaultdict(int, before)
        for name, count in after.items():
            merged[name] = max(merged[name], count)
        global_state.set_global_attribute(key, merged)


def build_base(spec: BackboneSpec, weights: WeightsRef, *, input_size: int) -> keras.Model:
    """Build the ``include_top=False`` backbone with the given weights.

    Parameters
    ----------
    spec : BackboneSpec
        The backbone.
    weights : WeightsRef
        ``imagenet`` downloads through Keras (cached in ``~/.keras/models``); ``random`` calls
        ``keras.utils.set_random_seed(seed)`` right before the constructor, so the same seed
        rebuilds the same model (this reseeds Python's, NumPy's and the backend's global
        generators, which is how Keras seeds initialisers); ``file`` builds with ``weights=None``
        and loads the file (``.weights.h5``, legacy ``.h5``, or the weights of a ``.keras`` model).
    input_size : int
        Input height and width.

    Returns
    -------
    keras.Model
        Input ``(input_size, input_size, 3)`` preprocessed float32 images, output the spatial map of
        ``spec.feature_layer`` (no pooling).

    Raises
    ------
    BackboneError
        If ``input_size`` is below the minimum.
    WeightsUnavailableError
        If the ImageNet weights cannot be downloaded (the message names the file and how to get
        it) or a weights file does not fit this backbone.
    """
    check_input_size(spec, input_size)
    if spec.family == "custom":
        return build_custom(spec, weights)
    import keras

    constructor = getattr(keras.applications, spec.constructor)
    options = {"include_top": False, "input_shape": (input_size, input_size, 3), "pooling": None}
    with _canonical_layer_names():
        if weights.kind == "imagenet":
            try:
                # Keras prints "Downloading data from ..." on stdout, which is for results (--json).
                with contextlib.redirect_stdout(sys.stderr):
                    model = constructor(weights="imagenet", **options)
            except Exception as error:  # get_file raises a bare Exception on a failed download
                offline = offline_error(spec, error)
                if offline is None:
                    raise
                raise offline from error
        else:
            if weights.kind == "random":
                keras.utils.set_random_seed(weights.seed)
            model = constructor(weights=None, **options)
    if weights.kind == "file":
        load_weights_file(model, spec, str(weights.path))
    if model.layers[-1].name != spec.feature_layer:
        # Names are part of the cache key and of --layer / --unfreeze; never let them drift silently.
        raise BackboneError(
            f"Keras {keras.__version__} names {spec.name}'s output layer {model.layers[-1].name!r}, not {spec.feature_layer!r}; "
            "this Keras version is not supported by featurecache's registry"
        )
    return model


def build_feature_model(
    spec: BackboneSpec,
    weights: WeightsRef,
    *,
    input_size: int,
    layer: str | None = None,
    pooling: str = "avg",  # one of POOLINGS, checked below
) -> keras.Model:
    """Build the feature extractor: the base cut at ``layer``, then ``pooling``.

    The output equals ``keras.Model(base.input, base.get_layer(layer).output)`` followed by a
    mean (``avg``), max (``max``) over the spatial axes, a flatten, or nothing (``none``).
    Preprocessing is not inside the model: feed :func:`preprocess_input` output.

    Parameters
    ----------
    spec : BackboneSpec
        The backbone.
    weights : WeightsRef
        The weights (see :func:`build_base`).
    input_size : int
        Input height and width.
    layer : str or None
        Layer to cut at; default ``spec.feature_layer``.
    pooling : {"avg", "max", "flatten", "none"}
        Reduction of the spatial map.

    Returns
    -------
    keras.Model
        Named ``"<backbone>_features"``.

    Raises
    ------
    UsageError
        If ``pooling`` is unknown.
    BackboneError
        If ``layer`` is not in the backbone (the message lists close names) or its output is not a
        spatial map that ``avg``/``max`` can pool.
    WeightsUnavailableError
        As :func:`build_base`.
    """
    if pooling not in POOLINGS:
        raise UsageError(f"unknown pooling {pooling!r}; choose one of {choices(POOLINGS)}")
    import keras

    base = build_base(spec, weights, input_size=input_size)
    name = layer or spec.feature_layer
    if name == base.layers[-1].name:
        features = base.output
    else:
        names = [lyr.name for lyr in base.layers]
        if name not in names:
            if spec.family == "custom":
                raise unknown_layer_error(name, names, f"custom backbone {spec.constructor}", listing=False)
            raise unknown_layer_error(name, names, spec.name)
        features = base.get_layer(name).output
    if pooling in ("avg", "max") and len(features.shape) != 4:
        raise BackboneError(
            f"layer {name!r} of {spec.name} outputs shape {tuple(features.shape)}, not a spatial map; pass --pooling flatten or none"
        )
    pool = pooling_layer(pooling, name=f"features_{pooling}")
    if pool is not None:
        features = pool(features)
    return keras.Model(base.input, features, name=f"{spec.name}_features")


def pooling_layer(pooling: str, *, name: str) -> Any:
    """The Keras layer of ``--pooling`` (``avg``, ``max``, ``flatten``), or ``None`` for ``none``.

    Shared by feature extraction and the fine-tune rebuild, so both pool the same way.

    Parameters
    ----------
    pooling : {"avg", "max", "flatten", "none"}
        The reduction (one of ``featurecache.cache.keys.POOLINGS``).
    name : str
        Name of the layer.

    Returns
    -------
    keras.layers.Layer or None
        A new layer, or None when ``pooling`` is ``"none"`` (or unknown: check it first).
    """
    import keras

    layer = {
        "avg": keras.layers.GlobalAveragePooling2D,
        "max": keras.layers.GlobalMaxPooling2D,
        "flatten": keras.layers.Flatten,
    }.get(pooling)
    return None if layer is None else layer(name=name)


def preprocess_input(spec: BackboneSpec, x: np.ndarray) -> np.ndarray:
    """Apply the backbone's own ``preprocess_input`` to a float32 copy of ``x``.

    Keras's preprocessing works in place on float arrays; the copy keeps the caller's images intact.

    Parameters
    ----------
    spec : BackboneSpec
        The backbone.
    x : numpy.ndarray
        RGB images in [0, 255], shape ``(n, h, w, 3)``.

    Returns
    -------
    numpy.ndarray
        float32 array of the same shape, as the backbone expects it.
    """
    import keras

    copy = np.array(x, dtype=np.float32, copy=True)
    if spec.module:
        return np.asarray(getattr(keras.applications, spec.module).preprocess_input(copy), dtype=np.float32)
    if spec.preprocess == "none":
        return copy
    return np.asarray(keras.applications.imagenet_utils.preprocess_input(copy, mode=spec.preprocess), dtype=np.float32)


def check_input_size(spec: BackboneSpec, size: int) -> None:
    """Reject an input size the backbone cannot take, with the fix.

    Parameters
    ----------
    spec : BackboneSpec
        The backbone.
    size : int
        Input height and width.

    Raises
    ------
    BackboneError
        If ``size`` is below ``spec.min_size`` (or differs from a fixed-size custom model's size).
    """
    if spec.family == "custom" and spec.min_size > 1 and size != spec.min_size:
        raise BackboneError(
            f"input size {size} does not fit custom backbone {spec.constructor}, built for {spec.min_size}; pass --size {spec.min_size}"
        )
    if size < spec.min_size:
        raise BackboneError(
            f"input size {size} is below {spec.name}'s minimum {spec.min_size}; pass --size {spec.min_size} or more"
        )
