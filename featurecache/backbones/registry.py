"""The backbone registry: one frozen :class:`BackboneSpec` per ``keras.applications`` image model, looked up by name.

``_REGISTRY`` is one literal table of frozen rows (filled by a small helper per family, as timm
fills its registry). A row holds everything the rest of featurecache needs without building the
model: constructor, preprocessing module, default and minimum input size, feature layer, block
names and patterns (see :mod:`featurecache.backbones.blocks`), and the static parameter count /
feature size shown by ``featurecache backbones``. Lookup errors list the valid names.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

from featurecache.backbones.spec import BackboneSpec
from featurecache.errors import UnknownBackboneError, choices


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
    return _spec(
        name,
        constructor,
        name,
        "vgg",
        preprocess="caffe",
        feature_layer="block5_pool",
        blocks=blocks,
        feature_dim=512,
        params=params,
    )


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
    return _spec(
        name,
        constructor,
        "densenet",
        "densenet",
        preprocess="torch",
        feature_layer="relu",
        blocks=blocks,
        feature_dim=feature_dim,
        params=params,
    )


def _efficientnet(
    name: str, constructor: str, size: int, feature_dim: int, params: int, *, stages: int, v2: bool
) -> BackboneSpec:
    # Stages, not sub-blocks: "block6" covers block6a..block6o; the Rescaling/Normalization
    # preprocessing layers in front of the stem are auto-named and join "stem".
    blocks = [
        ("stem", r"stem_.*"),
        *[(f"block{i}", rf"block{i}[a-z]_.*") for i in range(1, stages + 1)],
        ("top", r"top_.*"),
    ]
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


def _mobilenet_v3(
    name: str, constructor: str, n_blocks: int, feature_layer: str, feature_dim: int, params: int
) -> BackboneSpec:
    blocks = [
        ("stem", r"conv|conv_bn"),
        ("expanded_conv", r"expanded_conv_[a-z].*"),  # block 0 has no number in its prefix
        *[(f"expanded_conv_{i}", rf"expanded_conv_{i}_.*") for i in range(1, n_blocks + 1)],
        ("top", r"conv_1|conv_1_bn"),
    ]
    return _spec(
        name,
        constructor,
        "mobilenet_v3",
        "mobilenet_v3",
        preprocess="none",
        feature_layer=feature_layer,
        blocks=blocks,
        feature_dim=feature_dim,
        params=params,
    )


def _nasnet(
    name: str, constructor: str, n: int, size: int, feature_layer: str, feature_dim: int, params: int
) -> BackboneSpec:
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
        name,
        constructor,
        "nasnet",
        "nasnet",
        preprocess="tf",
        feature_layer=feature_layer,
        blocks=blocks,
        feature_dim=feature_dim,
        params=params,
        default_size=size,
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
    return [
        ("stem", r"conv1|conv1_bn|conv1_relu"),
        *[(f"block_{i}", rf"conv_(?:pad|dw|pw)_{i}(?:_.*)?") for i in range(1, 14)],
    ]


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
    if str(name).endswith(".keras"):  # a user's model file (backbones.custom)
        from featurecache.backbones.custom import custom_backbone

        return custom_backbone(str(name))
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


def model_summary_row(spec: BackboneSpec) -> dict[str, Any]:
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
