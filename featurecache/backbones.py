"""Backbone registry over ``keras.applications``: what to build, how to feed it, where to cut it.

How it works
------------
* **Registry.** ``_REGISTRY`` is one literal table of frozen :class:`BackboneSpec` rows (filled by a
  small helper per family, as timm fills its registry), one per ``keras.applications`` image model.
  A row holds everything the rest of featurecache needs without building the model: constructor,
  preprocessing module, default and minimum input size, feature layer, block names, and the static
  parameter count / feature size shown by ``featurecache backbones``.
* **Stable layer names.** Keras names unnamed layers from per-thread counters, so the 18th
  ``Activation`` built in a process is ``activation_17`` and the same MobileNetV3 built after another
  model gets different names. Every registry model is therefore built with fresh counters
  (:func:`_canonical_layer_names`): ``activation_17``, ``conv2d_5`` or ``add_3`` then name the same
  layer in every process, which is what feature layers, ``--layer`` values, block patterns and the
  cache key rely on.
* **Blocks.** Each block has a regular expression over layer names. A layer whose name matches a
  block's pattern belongs to it; an auto-named layer (``conv2d_12``, ``activation_3``) belongs to the
  block of the next matched layer, because Keras lists ``model.layers`` in topological order and a
  block's unnamed layers lie before its named end (``mixed3``, ``add_5``). Every layer therefore falls
  in exactly one block, and fine-tuning unfreezes by block name, never by layer index.
* **Weights identity.** The cache key uses a digest of the weights themselves, never their name:
  the bytes of a weights file, the seed of a random initialisation (made reproducible by
  ``keras.utils.set_random_seed``), or the values of the ImageNet weights. Digests are memoised in a
  small JSON file so that a cache hit neither re-hashes a file nor builds a model.
"""

from __future__ import annotations

import collections
import contextlib
import difflib
import hashlib
import json
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from featurecache.cache.keys import POOLINGS
from featurecache.errors import BackboneError, UnknownBackboneError, UsageError, WeightsUnavailableError, choices

if TYPE_CHECKING:
    import keras

__all__ = [
    "BackboneSpec",
    "WeightsRef",
    "block_layers",
    "build_base",
    "build_feature_model",
    "check_input_size",
    "custom_backbone",
    "get_backbone",
    "list_backbones",
    "list_layers",
    "model_summary_row",
    "parse_weights",
    "preprocess_input",
    "recorded_weights_source",
    "weights_identity",
]

PREPROCESS_MODES = ("caffe", "tf", "torch", "none")
WEIGHT_SUFFIXES = (".weights.h5", ".h5", ".hdf5", ".keras")
MEMO_FILE = "weights-digests.json"


@dataclass(frozen=True)
class BackboneSpec:
    """Everything featurecache knows about one backbone without building it.

    Attributes
    ----------
    name : str
        Lowercase registry name (``"vgg19"``), or ``"custom"`` for a user model file.
    constructor : str
        Attribute of ``keras.applications`` (``"VGG19"``); for a custom backbone, the model file path.
    module : str
        ``keras.applications`` submodule whose ``preprocess_input`` feeds the model (``"vgg19"``);
        empty for a custom backbone, which uses ``preprocess`` with ``imagenet_utils``.
    default_size : int
        Input height and width the ImageNet weights were trained at.
    min_size : int
        Smallest input height and width Keras builds with ``include_top=False``.
    feature_layer : str
        Name of the layer whose output is the ``include_top=False`` model's output.
    blocks : tuple of str
        Block names, earliest first, for unfreezing by name.
    preprocess : str
        ``"caffe"``, ``"tf"``, ``"torch"``, or ``"none"`` when the model normalises inside itself.
    family : str
        Architecture family (``"vgg"``, ``"resnet"``, ``"efficientnet"``, ...).
    block_patterns : tuple of str
        One regular expression per block, matched in full against layer names (see module docstring).
    feature_dim : int or None
        Channels of ``feature_layer``'s output.
    params : int or None
        Parameter count of the ``include_top=False`` model (``model.count_params()``).
    """

    name: str
    constructor: str
    module: str
    default_size: int
    min_size: int
    feature_layer: str
    blocks: tuple[str, ...]
    preprocess: str
    family: str
    block_patterns: tuple[str, ...] = ()
    feature_dim: int | None = None
    params: int | None = None


@dataclass(frozen=True)
class WeightsRef:
    """Which weights to put in a backbone.

    Attributes
    ----------
    kind : {"imagenet", "random", "file"}
        Keras's ImageNet weights, a seeded random initialisation, or a local weights file.
    path : str or None
        Absolute path of the weights file when ``kind="file"``.
    seed : int
        Seed passed to ``keras.utils.set_random_seed`` before construction when ``kind="random"``.
    """

    kind: Literal["imagenet", "random", "file"]
    path: str | None = None
    seed: int = 0


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def _spec(
    name: str,
    constructor: str,
    module: str,
    family: str,
    *,
    preprocess: str,
    feature_layer: str,
    blocks: Sequence[tuple[str, str]],
    feature_dim: int,
    params: int,
    default_size: int = 224,
    min_size: int = 32,
) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        constructor=constructor,
        module=module,
        default_size=default_size,
        min_size=min_size,
        feature_layer=feature_layer,
        blocks=tuple(block for block, _ in blocks),
        preprocess=preprocess,
        family=family,
        block_patterns=tuple(pattern for _, pattern in blocks),
        feature_dim=feature_dim,
        params=params,
    )


def _vgg(name: str, constructor: str, params: int) -> BackboneSpec:
    blocks = [(f"block{i}", rf"block{i}_.*") for i in range(1, 6)]
    return _spec(name, constructor, name, "vgg", preprocess="caffe", feature_layer="block5_pool", blocks=blocks, feature_dim=512, params=params)


def _resnet(name: str, constructor: str, params: int, *, v2: bool) -> BackboneSpec:
    blocks = [("conv1", r"conv1_.*|pool1_.*"), *[(f"conv{i}", rf"conv{i}_.*") for i in range(2, 6)]]
    if v2:
        blocks.append(("post", r"post_.*"))
    return _spec(
        name,
        constructor,
        "resnet_v2" if v2 else "resnet",
        "resnet_v2" if v2 else "resnet",
        preprocess="tf" if v2 else "caffe",
        feature_layer="post_relu" if v2 else "conv5_block3_out",
        blocks=blocks,
        feature_dim=2048,
        params=params,
    )


def _densenet(name: str, constructor: str, feature_dim: int, params: int) -> BackboneSpec:
    # Each transition block (pool2..pool4) goes with the dense block before it, as Keras numbers it.
    blocks = [
        ("conv1", r"conv1_.*|pool1"),
        *[(f"conv{i}", rf"conv{i}_.*|pool{i}_.*") for i in range(2, 5)],
        ("conv5", r"conv5_.*"),
        ("top", r"bn|relu"),
    ]
    return _spec(name, constructor, "densenet", "densenet", preprocess="torch", feature_layer="relu", blocks=blocks, feature_dim=feature_dim, params=params)


def _efficientnet(name: str, constructor: str, size: int, feature_dim: int, params: int, *, stages: int, v2: bool) -> BackboneSpec:
    # Stages, not sub-blocks: "block6" covers block6a..block6o; the Rescaling/Normalization
    # preprocessing layers in front of the stem are auto-named and join "stem".
    blocks = [("stem", r"stem_.*"), *[(f"block{i}", rf"block{i}[a-z]_.*") for i in range(1, stages + 1)], ("top", r"top_.*")]
    module = "efficientnet_v2" if v2 else "efficientnet"
    return _spec(
        name,
        constructor,
        module,
        module,
        preprocess="none",
        feature_layer="top_activation",
        blocks=blocks,
        feature_dim=feature_dim,
        params=params,
        default_size=size,
    )


def _convnext(variant: str, feature_dim: int, params: int) -> BackboneSpec:
    prefix = f"convnext_{variant}"
    blocks = [
        ("stem", rf"{prefix}_(?:prestem_normalization|stem)"),
        ("stage_0", rf"{prefix}_stage_0_.*"),
        *[(f"stage_{i}", rf"{prefix}_(?:downsampling_block_{i - 1}|stage_{i}_.*)") for i in range(1, 4)],
        # The include_top=False output is an unnamed LayerNormalization after the last stage.
        ("top", r"layer_normalization(?:_\d+)?"),
    ]
    return _spec(
        f"convnext{variant}",
        f"ConvNeXt{variant.capitalize() if variant != 'xlarge' else 'XLarge'}",
        "convnext",
        "convnext",
        preprocess="none",
        feature_layer="layer_normalization",
        blocks=blocks,
        feature_dim=feature_dim,
        params=params,
    )


def _mobilenet_v3(name: str, constructor: str, n_blocks: int, feature_layer: str, feature_dim: int, params: int) -> BackboneSpec:
    blocks = [
        ("stem", r"conv|conv_bn"),
        ("expanded_conv", r"expanded_conv_[a-z].*"),  # block 0 has no number in its prefix
        *[(f"expanded_conv_{i}", rf"expanded_conv_{i}_.*") for i in range(1, n_blocks + 1)],
        ("top", r"conv_1|conv_1_bn"),
    ]
    return _spec(name, constructor, "mobilenet_v3", "mobilenet_v3", preprocess="none", feature_layer=feature_layer, blocks=blocks, feature_dim=feature_dim, params=params)


def _nasnet(name: str, constructor: str, n: int, size: int, feature_layer: str, feature_dim: int, params: int) -> BackboneSpec:
    # One block per cell; every weighted layer of a cell ends in the cell id ("_stem_1", "_reduce_4",
    # "_5"). Normal-cell patterns must not take reduction/stem adjust layers ("adjust_bn_reduce_8").
    def normal(i: int) -> tuple[str, str]:
        return (f"normal_{i}", rf".*(?:normal|adjust)_.*(?<!reduce)(?<!stem)_{i}")

    blocks = [
        ("stem", r"stem_conv1|stem_bn1"),
        ("stem_1", r".*_stem_1"),
        ("stem_2", r".*_stem_2"),
        *[normal(i) for i in range(n)],
        (f"reduce_{n}", rf".*_reduce_{n}"),
        *[normal(i) for i in range(n + 1, 2 * n + 1)],
        (f"reduce_{2 * n}", rf".*_reduce_{2 * n}"),
        *[normal(i) for i in range(2 * n + 1, 3 * n + 1)],
    ]
    return _spec(
        name, constructor, "nasnet", "nasnet", preprocess="tf", feature_layer=feature_layer, blocks=blocks, feature_dim=feature_dim, params=params, default_size=size
    )


def _xception() -> BackboneSpec:
    # Blocks 2..13 end in a residual Add that Keras leaves unnamed ("add", "add_1", ..., "add_11");
    # naming it in the pattern keeps the shortcut conv/BN of block k inside block k.
    blocks = [
        ("block1", r"block1_.*"),
        *[(f"block{k}", rf"block{k}_.*|add" + ("" if k == 2 else f"_{k - 2}")) for k in range(2, 14)],
        ("block14", r"block14_.*"),
    ]
    return _spec(
        "xception",
        "Xception",
        "xception",
        "xception",
        preprocess="tf",
        feature_layer="block14_sepconv2_act",
        blocks=blocks,
        feature_dim=2048,
        params=20861480,
        default_size=299,
        min_size=71,
    )


def _inception_resnet_v2() -> BackboneSpec:
    blocks = [
        ("mixed_5b", r"mixed_5b"),
        *[(f"block35_{i}", rf"block35_{i}_.*") for i in range(1, 11)],
        ("mixed_6a", r"mixed_6a"),
        *[(f"block17_{i}", rf"block17_{i}_.*") for i in range(1, 21)],
        ("mixed_7a", r"mixed_7a"),
        *[(f"block8_{i}", rf"block8_{i}_.*") for i in range(1, 11)],
        ("conv_7b", r"conv_7b|conv_7b_bn|conv_7b_ac"),
    ]
    return _spec(
        "inceptionresnetv2",
        "InceptionResNetV2",
        "inception_resnet_v2",
        "inception_resnet_v2",
        preprocess="tf",
        feature_layer="conv_7b_ac",
        blocks=blocks,
        feature_dim=1536,
        params=54336736,
        default_size=299,
        min_size=75,
    )


def _mobilenet_blocks_v1() -> list[tuple[str, str]]:
    return [("stem", r"conv1|conv1_bn|conv1_relu"), *[(f"block_{i}", rf"conv_(?:pad|dw|pw)_{i}(?:_.*)?") for i in range(1, 14)]]


def _mobilenet_blocks_v2() -> list[tuple[str, str]]:
    return [
        ("stem", r"Conv1.*|bn_Conv1"),
        ("expanded_conv", r"expanded_conv_.*"),
        *[(f"block_{i}", rf"block_{i}_.*") for i in range(1, 17)],
        ("top", r"Conv_1.*|out_relu"),
    ]


# Parameter counts are ``count_params()`` of the include_top=False model with Keras 3.15; they and
# feature_dim are checked against built models by tests/test_backbones.py and the registry audit.
_REGISTRY: MappingProxyType[str, BackboneSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            _vgg("vgg16", "VGG16", 14714688),
            _vgg("vgg19", "VGG19", 20024384),
            _resnet("resnet50", "ResNet50", 23587712, v2=False),
            _resnet("resnet101", "ResNet101", 42658176, v2=False),
            _resnet("resnet152", "ResNet152", 58370944, v2=False),
            _resnet("resnet50v2", "ResNet50V2", 23564800, v2=True),
            _resnet("resnet101v2", "ResNet101V2", 42626560, v2=True),
            _resnet("resnet152v2", "ResNet152V2", 58331648, v2=True),
            _spec(
                "inceptionv3",
                "InceptionV3",
                "inception_v3",
                "inception_v3",
                preprocess="tf",
                feature_layer="mixed10",
                # The stem before mixed0 is auto-named and joins "mixed0".
                blocks=[(f"mixed{i}", f"mixed{i}") for i in range(11)],
                feature_dim=2048,
                params=21802784,
                default_size=299,
                min_size=75,
            ),
            _inception_resnet_v2(),
            _xception(),
            _densenet("densenet121", "DenseNet121", 1024, 7037504),
            _densenet("densenet169", "DenseNet169", 1664, 12642880),
            _densenet("densenet201", "DenseNet201", 1920, 18321984),
            _spec(
                "mobilenet",
                "MobileNet",
                "mobilenet",
                "mobilenet",
                preprocess="tf",
                feature_layer="conv_pw_13_relu",
                blocks=_mobilenet_blocks_v1(),
                feature_dim=1024,
                params=3228864,
            ),
            _spec(
                "mobilenetv2",
                "MobileNetV2",
                "mobilenet_v2",
                "mobilenet_v2",
                preprocess="tf",
                feature_layer="out_relu",
                blocks=_mobilenet_blocks_v2(),
                feature_dim=1280,
                params=2257984,
            ),
            _mobilenet_v3("mobilenetv3small", "MobileNetV3Small", 10, "activation_17", 576, 939120),
            _mobilenet_v3("mobilenetv3large", "MobileNetV3Large", 14, "activation_19", 960, 2996352),
            _nasnet("nasnetmobile", "NASNetMobile", 4, 224, "activation_187", 1056, 4269716),
            _nasnet("nasnetlarge", "NASNetLarge", 6, 331, "activation_259", 4032, 84916818),
            _efficientnet("efficientnetb0", "EfficientNetB0", 224, 1280, 4049571, stages=7, v2=False),
            _efficientnet("efficientnetb1", "EfficientNetB1", 240, 1280, 6575239, stages=7, v2=False),
            _efficientnet("efficientnetb2", "EfficientNetB2", 260, 1408, 7768569, stages=7, v2=False),
            _efficientnet("efficientnetb3", "EfficientNetB3", 300, 1536, 10783535, stages=7, v2=False),
            _efficientnet("efficientnetb4", "EfficientNetB4", 380, 1792, 17673823, stages=7, v2=False),
            _efficientnet("efficientnetb5", "EfficientNetB5", 456, 2048, 28513527, stages=7, v2=False),
            _efficientnet("efficientnetb6", "EfficientNetB6", 528, 2304, 40960143, stages=7, v2=False),
            _efficientnet("efficientnetb7", "EfficientNetB7", 600, 2560, 64097687, stages=7, v2=False),
            _efficientnet("efficientnetv2b0", "EfficientNetV2B0", 224, 1280, 5919312, stages=6, v2=True),
            _efficientnet("efficientnetv2b1", "EfficientNetV2B1", 240, 1280, 6931124, stages=6, v2=True),
            _efficientnet("efficientnetv2b2", "EfficientNetV2B2", 260, 1408, 8769374, stages=6, v2=True),
            _efficientnet("efficientnetv2b3", "EfficientNetV2B3", 300, 1536, 12930622, stages=6, v2=True),
            _efficientnet("efficientnetv2s", "EfficientNetV2S", 384, 1280, 20331360, stages=6, v2=True),
            _efficientnet("efficientnetv2m", "EfficientNetV2M", 480, 1280, 53150388, stages=7, v2=True),
            _efficientnet("efficientnetv2l", "EfficientNetV2L", 480, 1280, 117746848, stages=7, v2=True),
            _convnext("tiny", 768, 27820128),
            _convnext("small", 768, 49454688),
            _convnext("base", 1024, 87566464),
            _convnext("large", 1536, 196230336),
            _convnext("xlarge", 2048, 348147968),
        )
    }
)


def _normalise_name(name: str) -> str:
    # "VGG-19", "vgg_19", "ResNet50V2", "EfficientNet B0" all name one registry row.
    return re.sub(r"[\s_\-]+", "", name).lower()


def get_backbone(name: str) -> BackboneSpec:
    """Look up a registry backbone by name.

    Parameters
    ----------
    name : str
        Registry name, case-insensitive; ``-``, ``_`` and spaces are ignored (``"VGG-19"``).

    Returns
    -------
    BackboneSpec
        The registry row.

    Raises
    ------
    UnknownBackboneError
        If no backbone has this name; the message lists every valid name.
    """
    key = _normalise_name(name)
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, list(_REGISTRY), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownBackboneError(f"unknown backbone {name!r}{hint}; choose one of {choices(_REGISTRY)}")


def list_backbones() -> list[BackboneSpec]:
    """Return every registry backbone, in registry order (by family, smallest first).

    Returns
    -------
    list of BackboneSpec
        One row per ``keras.applications`` image model.
    """
    return list(_REGISTRY.values())


def model_summary_row(spec: BackboneSpec) -> dict[str, object]:
    """Summarise a backbone for ``featurecache backbones`` from the static table (builds nothing).

    Parameters
    ----------
    spec : BackboneSpec
        The backbone.

    Returns
    -------
    dict
        ``name``, ``family``, ``params`` (include_top=False count), ``feature_dim``,
        ``default_size``, ``min_size``, ``preprocess``, ``feature_layer``.
    """
    return {
        "name": spec.name,
        "family": spec.family,
        "params": spec.params,
        "feature_dim": spec.feature_dim,
        "default_size": spec.default_size,
        "min_size": spec.min_size,
        "preprocess": spec.preprocess,
        "feature_layer": spec.feature_layer,
    }


# --------------------------------------------------------------------------------------------
# Custom backbones
# --------------------------------------------------------------------------------------------


def _read_keras_file(path: Path) -> tuple[list[str], str, int | None]:
    """Layer names, output layer name and input height of a ``.keras`` file, without TensorFlow.

    A ``.keras`` file is a zip whose ``config.json`` describes the model.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))["config"]
        layers = config["layers"]
        names = [entry["config"]["name"] for entry in layers]
        if "output_layers" in config:  # Functional; a single output may be stored unnested
            outputs = config["output_layers"]
            output = outputs[0] if isinstance(outputs[0], str) else outputs[0][0]
        else:  # Sequential
            output = names[-1]
        shape = next((e["config"].get("batch_shape") for e in layers if e.get("class_name") == "InputLayer"), None)
        shape = shape or config.get("build_input_shape")
    except (OSError, KeyError, IndexError, TypeError, ValueError, zipfile.BadZipFile) as error:
        raise BackboneError(f"cannot read custom backbone {path} ({type(error).__name__}: {error}); pass a model saved with model.save('model.keras')") from error
    return names, output, (shape[1] if shape and len(shape) == 4 else None)


def custom_backbone(path: str, *, layer: str | None = None, preprocess: str = "none") -> BackboneSpec:
    """Describe a user's ``.keras`` model file as a backbone.

    Reads the file's ``config.json`` only (no TensorFlow): the input size, the output layer (the
    default feature layer) and the layer names. The weights stored in the file are the backbone's
    weights: pass ``WeightsRef("file", path)`` (``parse_weights(path)``) to use them.

    Parameters
    ----------
    path : str
        Path of a model saved with ``model.save("....keras")``.
    layer : str or None
        Layer to cut at; default the model's output layer.
    preprocess : {"caffe", "tf", "torch", "none"}
        ``keras.applications.imagenet_utils`` mode the model expects; ``"none"`` passes [0, 255] RGB.

    Returns
    -------
    BackboneSpec
        ``name="custom"``, ``constructor`` the absolute path, ``family="custom"`` and a single block
        ``"backbone"`` holding every layer.

    Raises
    ------
    BackboneError
        If the file is missing or unreadable, or ``layer`` is not one of its layers.
    UsageError
        If ``preprocess`` is not a known mode.
    """
    if preprocess not in PREPROCESS_MODES:
        raise UsageError(f"unknown preprocess mode {preprocess!r} for a custom backbone; choose one of {choices(PREPROCESS_MODES)}")
    file = Path(path).expanduser().absolute()
    if not file.is_file() or not file.name.endswith(".keras"):
        raise BackboneError(f"custom backbone {str(file)!r} is not an existing .keras file; save the model with model.save('model.keras') and pass that path")
    names, output_name, height = _read_keras_file(file)
    if layer is not None and layer not in names:
        raise _unknown_layer_error(layer, names, f"custom backbone {file}", listing=False)
    return BackboneSpec(
        name="custom",
        constructor=str(file),
        module="",
        default_size=height or 224,
        # A model built for one input size accepts only that size.
        min_size=height or 1,
        feature_layer=layer or output_name,
        blocks=("backbone",),
        preprocess=preprocess,
        family="custom",
        block_patterns=(".*",),
    )


# --------------------------------------------------------------------------------------------
# Preprocessing and sizes
# --------------------------------------------------------------------------------------------


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
        raise BackboneError(f"input size {size} does not fit custom backbone {spec.constructor}, built for {spec.min_size}; pass --size {spec.min_size}")
    if size < spec.min_size:
        raise BackboneError(f"input size {size} is below {spec.name}'s minimum {spec.min_size}; pass --size {spec.min_size} or more")


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def parse_weights(value: str, *, seed: int = 0) -> WeightsRef:
    """Parse a ``--weights`` value.

    Parameters
    ----------
    value : str
        ``"imagenet"``, ``"random"``, or the path of a ``.weights.h5``, legacy ``.h5``/``.hdf5`` or
        ``.keras`` file.
    seed : int
        Seed of the random initialisation for ``"random"``.

    Returns
    -------
    WeightsRef
        With an absolute ``path`` for a file.

    Raises
    ------
    WeightsUnavailableError
        If the file does not exist or has an unsupported suffix.
    """
    word = value.strip().lower()
    if word == "imagenet":
        return WeightsRef("imagenet")
    if word == "random":
        return WeightsRef("random", seed=int(seed))
    path = os.path.abspath(os.path.expanduser(value))
    if not os.path.isfile(path):
        raise WeightsUnavailableError(f"weights file {path} does not exist; pass --weights imagenet, --weights random, or the path of an existing {'/'.join(WEIGHT_SUFFIXES)} file")
    if not path.lower().endswith(WEIGHT_SUFFIXES):
        raise WeightsUnavailableError(f"weights file {path} has an unsupported suffix; allowed: {choices(WEIGHT_SUFFIXES)}; save weights with model.save_weights('x.weights.h5')")
    return WeightsRef("file", path=path)


def _read_memo(memo_dir: Path | None) -> dict:
    if memo_dir is None:
        return {}
    try:
        memo = json.loads((Path(memo_dir) / MEMO_FILE).read_text())
    except (OSError, ValueError):
        return {}  # a missing or torn memo only costs a recomputation
    return memo if isinstance(memo, dict) else {}


def _update_memo(memo_dir: Path | None, section: str, key: str, value: object) -> None:
    if memo_dir is None:
        return
    memo_dir = Path(memo_dir)
    memo = _read_memo(memo_dir)
    memo.setdefault(section, {})[key] = value
    # Write-then-rename so a concurrent reader never sees half a file; a lost concurrent update, or
    # a read-only memo_dir, only means one more recomputation later.
    try:
        memo_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=memo_dir, prefix=".memo-", suffix=".tmp", delete=False) as handle:
            try:
                json.dump(memo, handle, indent=1, sort_keys=True)
            except BaseException:
                Path(handle.name).unlink(missing_ok=True)
                raise
        os.replace(handle.name, memo_dir / MEMO_FILE)
    except OSError:
        pass


def _file_sha256(path: str, memo_dir: Path | None) -> str:
    """sha256 of a weights or model file, memoised with the dataset files' digests.

    Uses :func:`featurecache.data.dataset.file_digests` and its memo (size + mtime, and never
    trusting a file modified within the last 2 s, so a rewrite of the same size is noticed).

    Raises
    ------
    OSError
        The file cannot be read.
    """
    import errno

    from featurecache.data.dataset import MEMO_FILENAME, file_digests

    memo_path = None if memo_dir is None else Path(memo_dir) / MEMO_FILENAME
    digest = file_digests([Path(path)], memo_path=memo_path)[0]
    if digest.startswith("unreadable:"):
        code = getattr(errno, digest.split(":", 1)[1], errno.EIO)
        raise OSError(code, os.strerror(code), path)
    return digest


def _weights_sha256(model: keras.Model) -> str:
    import keras

    digest = hashlib.sha256()
    # Values, shapes and dtypes in model.weights order; variable names are left out because
    # auto-generated names are not part of what the weights are.
    for variable in model.weights:
        array = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _local_identity(ref: WeightsRef, memo_dir: Path | None) -> str:
    """Identity of random or file weights: needs neither the backbone nor a model."""
    if ref.kind == "random":
        return f"random:seed={ref.seed}"
    try:
        return f"file:sha256={_file_sha256(str(ref.path), memo_dir)}"
    except OSError as error:
        raise WeightsUnavailableError(f"cannot read weights file {ref.path}: {error.strerror or error}; pass an existing weights file") from error


def weights_identity(ref: WeightsRef, spec: BackboneSpec, *, memo_dir: Path | None) -> str:
    """Identify the actual weights for the cache key, without building a model when memoised.

    * file: ``"file:sha256=<hex>"`` of the file bytes, memoised by (path, size, mtime_ns);
    * random: ``"random:seed=<seed>"``;
    * imagenet: ``"imagenet:sha256=<hex>"`` over all weight values of the base model, memoised by
      (backbone, Keras version) since Keras pins each weights file by hash. MobileNet/MobileNetV2
      pick their ImageNet file by input size; the digest is of the default-size file and the input
      size, which is keyed separately, tells the files apart.
    * custom backbone: ``"custom:sha256=<hex of the .keras file>"``, plus ``"+"`` and the identity of
      ``ref`` when it is not that same file.

    Parameters
    ----------
    ref : WeightsRef
        The weights.
    spec : BackboneSpec
        The backbone.
    memo_dir : Path or None
        Directory of the digest memo (``weights-digests.json``); None disables memoisation.

    Returns
    -------
    str
        The identity.

    Raises
    ------
    WeightsUnavailableError
        If ImageNet weights must be downloaded to be hashed and cannot be, or a file is unreadable.
    """
    if spec.family == "custom":
        _check_custom_weights(spec, ref)
        model_id = f"custom:sha256={_file_sha256(spec.constructor, memo_dir)}"
        if ref.kind == "file" and ref.path == spec.constructor:
            return model_id
        return f"{model_id}+{_local_identity(ref, memo_dir)}"
    if ref.kind != "imagenet":
        return _local_identity(ref, memo_dir)
    key = f"{spec.name}@keras-{metadata.version('keras')}"
    memoised = _read_memo(memo_dir).get("imagenet", {}).get(key)
    if isinstance(memoised, str):
        return f"imagenet:sha256={memoised}"
    digest = _weights_sha256(build_base(spec, ref, input_size=spec.default_size))
    _update_memo(memo_dir, "imagenet", key, digest)
    return f"imagenet:sha256={digest}"


def recorded_weights_source(identity: str, source: str | None) -> str | None:
    """The ``--weights`` value that reproduces a recorded weights identity.

    Extraction records the ``--weights`` value beside the identity; entries and runs made
    before it did can still name random and ImageNet weights from the identity alone
    (``random:seed=0`` -> ``random``), but not a file.

    Parameters
    ----------
    identity : str
        The recorded identity (see :func:`weights_identity`).
    source : str or None
        The ``--weights`` value the caller was given or found recorded; used as is when set.

    Returns
    -------
    str or None
        The value to pass to :func:`parse_weights`; None when only the user can say which file
        it was. Check the result with :func:`weights_identity`: a recorded source may have changed.
    """
    if source:
        return str(source)
    if identity.startswith(("random", "imagenet")):
        return identity.split(":", 1)[0]
    return None


def _keras_models_dir() -> str:
    # Where keras.utils.get_file caches application weights.
    return os.path.join(os.environ.get("KERAS_HOME", os.path.join("~", ".keras")), "models")


def _offline_error(spec: BackboneSpec, error: Exception) -> WeightsUnavailableError | None:
    """Turn Keras's failed weights download into a one-line error with the fix, or None."""
    text = " ".join(str(error).split())
    found = re.search(r"https?://\S+", text)
    if found is None:
        return None
    url = found.group(0).rstrip(":,;)")
    file_name = url.rsplit("/", 1)[-1]
    reason = text.split(" -- ", 1)[1] if " -- " in text else type(error).__name__
    return WeightsUnavailableError(
        f"cannot download ImageNet weights {file_name} for {spec.name} ({reason}); "
        f"download {url} on a machine with internet and pass --weights /path/to/{file_name}, "
        f"or put it in {_keras_models_dir()}/"
    )


def _check_custom_weights(spec: BackboneSpec, ref: WeightsRef) -> None:
    if ref.kind == "imagenet":
        raise WeightsUnavailableError(
            f"custom backbone {spec.constructor} has no ImageNet weights; pass --weights {spec.constructor} "
            "to use the weights stored in it, --weights random, or a weights file for the same model"
        )


def _load_weights_file(model: keras.Model, spec: BackboneSpec, path: str) -> None:
    import keras

    def fail(reason: str) -> WeightsUnavailableError:
        return WeightsUnavailableError(
            f"cannot load weights file {path} into {spec.name}: {reason}; pass weights saved from the same backbone built with include_top=False"
        )

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if path.endswith(".keras"):
                source = keras.saving.load_model(path, compile=False)
                # A fine-tuned export nests the backbone as one layer: take the first model whose
                # weights have exactly our shapes.
                shapes = [tuple(w.shape) for w in model.weights]
                candidates = [source, *(layer for layer in source.layers if isinstance(layer, keras.Model))]
                match = next((c for c in candidates if [tuple(w.shape) for w in c.weights] == shapes), None)
                if match is None:
                    raise fail(f"its {len(source.weights)} weights do not match the {len(shapes)} weights of {spec.name}")
                model.set_weights(match.get_weights())
            else:
                model.load_weights(path)
    except WeightsUnavailableError:
        raise
    except (ValueError, OSError, KeyError, TypeError) as error:
        # Keras's first sentence says what failed ("A total of 5 objects could not be loaded").
        first = " ".join(str(error).split("\n", 1)[0].split()).split(". ", 1)[0].rstrip(":.")
        raise fail(first or type(error).__name__) from error
    # Keras only warns when it leaves part of a model at its random initial values.
    skipped = [str(w.message) for w in caught if "retain their freshly-initialized weights" in str(w.message)]
    if skipped:
        raise fail(f"{len(skipped)} parts of the model were not in the file")


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _canonical_layer_names() -> Iterator[None]:
    """Build with fresh auto-name counters, as in a new process (see module docstring).

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


def _build_custom(spec: BackboneSpec, weights: WeightsRef) -> keras.Model:
    import keras

    _check_custom_weights(spec, weights)
    model = keras.saving.load_model(spec.constructor, compile=False)
    if weights.kind == "random":
        keras.utils.set_random_seed(weights.seed)
        model = keras.models.clone_model(model)  # same architecture, freshly initialised
    elif weights.path != spec.constructor:
        _load_weights_file(model, spec, str(weights.path))
    return model


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
        return _build_custom(spec, weights)
    import keras

    constructor = getattr(keras.applications, spec.constructor)
    options = {"include_top": False, "input_shape": (input_size, input_size, 3), "pooling": None}
    with _canonical_layer_names():
        if weights.kind == "imagenet":
            try:
                model = constructor(weights="imagenet", **options)
            except Exception as error:  # get_file raises a bare Exception on a failed download
                offline = _offline_error(spec, error)
                if offline is None:
                    raise
                raise offline from error
        else:
            if weights.kind == "random":
                keras.utils.set_random_seed(weights.seed)
            model = constructor(weights=None, **options)
    if weights.kind == "file":
        _load_weights_file(model, spec, str(weights.path))
    if model.layers[-1].name != spec.feature_layer:
        # Names are part of the cache key and of --layer / --unfreeze; never let them drift silently.
        raise BackboneError(
            f"Keras {keras.__version__} names {spec.name}'s output layer {model.layers[-1].name!r}, not {spec.feature_layer!r}; "
            "this Keras version is not supported by featurecache's registry"
        )
    return model


def _unknown_layer_error(layer: str, names: Sequence[str], backbone: str, *, listing: bool = True) -> BackboneError:
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)  # closest first
    near = f"close matches: {', '.join(map(repr, close))}" if close else f"it has {len(names)} layers"
    fix = f"`featurecache backbones --layers {backbone}` lists them" if listing else "pass one of its layer names"
    return BackboneError(f"layer {layer!r} is not in {backbone} ({near}); {fix}")


def build_feature_model(
    spec: BackboneSpec,
    weights: WeightsRef,
    *,
    input_size: int,
    layer: str | None = None,
    pooling: Literal["avg", "max", "flatten", "none"] = "avg",
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
                raise _unknown_layer_error(name, names, f"custom backbone {spec.constructor}", listing=False)
            raise _unknown_layer_error(name, names, spec.name)
        features = base.get_layer(name).output
    if pooling in ("avg", "max") and len(features.shape) != 4:
        raise BackboneError(f"layer {name!r} of {spec.name} outputs shape {tuple(features.shape)}, not a spatial map; pass --pooling flatten or none")
    pool = pooling_layer(pooling, name=f"features_{pooling}")
    if pool is not None:
        features = pool(features)
    return keras.Model(base.input, features, name=f"{spec.name}_features")


def pooling_layer(pooling: str, *, name: str) -> Any:
    """The Keras layer of ``--pooling`` (``avg``, ``max``, ``flatten``), or ``None`` for ``none``.

    Shared by feature extraction and the fine-tune rebuild, so both pool the same way.
    """
    import keras

    layer = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D, "flatten": keras.layers.Flatten}.get(pooling)
    return None if layer is None else layer(name=name)


# --------------------------------------------------------------------------------------------
# Blocks and layers
# --------------------------------------------------------------------------------------------


def block_layers(model: keras.Model, spec: BackboneSpec) -> dict[str, list[str]]:
    """Map each block of ``spec`` to the names of its layers in ``model``, in model order.

    A layer matching a block's pattern belongs to that block; an auto-named layer belongs to the
    block of the next matched layer (layers after the last matched one join its block). Blocks cut
    away from ``model`` map to an empty list.

    Parameters
    ----------
    model : keras.Model
        The base model (or a feature model cut from it) whose ``layers`` are the backbone's.
    spec : BackboneSpec
        The backbone.

    Returns
    -------
    dict
        ``{block: [layer names]}`` for every block in ``spec.blocks`` order; every layer of
        ``model`` appears exactly once.

    Raises
    ------
    BackboneError
        If no layer of ``model`` matches any block (the model is not this backbone).
    """
    patterns = [re.compile(p) for p in spec.block_patterns]
    names = [layer.name for layer in model.layers]
    owner: list[int | None] = [next((j for j, p in enumerate(patterns) if p.fullmatch(n)), None) for n in names]
    matched = [j for j in owner if j is not None]
    if not matched:
        raise BackboneError(f"no layer of model {model.name!r} belongs to a block of {spec.name}; pass the {spec.name} base model")
    following = matched[-1]  # trailing unnamed layers (MobileNetV3's last activation) join the last block
    for i in reversed(range(len(names))):
        if owner[i] is None:
            owner[i] = following
        else:
            following = owner[i]
    groups: dict[str, list[str]] = {block: [] for block in spec.blocks}
    for name, j in zip(names, owner):
        groups[spec.blocks[j]].append(name)  # type: ignore[index]
    return groups


def list_layers(spec: BackboneSpec, *, input_size: int | None = None) -> list[dict[str, object]]:
    """Describe every layer of the base model (built with random weights), for ``--layers``.

    Parameters
    ----------
    spec : BackboneSpec
        The backbone.
    input_size : int or None
        Input size to build at; default ``spec.min_size`` (the model's own size for a custom
        backbone). Output shapes depend on it.

    Returns
    -------
    list of dict
        ``name``, ``type``, ``output_shape``, ``params`` and ``block`` per layer, in model order.
    """
    size = input_size or (spec.default_size if spec.family == "custom" else spec.min_size)
    model = build_base(spec, WeightsRef("random"), input_size=size)
    block_of = {name: block for block, names in block_layers(model, spec).items() for name in names}
    return [
        {
            "name": layer.name,
            "type": type(layer).__name__,
            "output_shape": tuple(layer.output.shape),
            "params": layer.count_params(),
            "block": block_of[layer.name],
        }
        for layer in model.layers
    ]
