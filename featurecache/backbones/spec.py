"""What a backbone is, without building it: its spec dataclass, the preprocessing modes, and
the error for a layer it does not have. The registry, weights and custom model files all read it.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

from featurecache.errors import BackboneError

__all__ = ["PREPROCESS_MODES", "BackboneSpec", "unknown_layer_error"]

PREPROCESS_MODES = ("caffe", "tf", "torch", "none")


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
        One regular expression per block, matched in full against layer names (see :mod:`featurecache.backbones.blocks`).
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


def unknown_layer_error(layer: str, names: Sequence[str], backbone: str, *, listing: bool = True) -> BackboneError:
    """The error for a layer name a backbone does not have, naming the closest ones and the fix.

    Parameters
    ----------
    layer : str
        The name asked for.
    names : sequence of str
        The backbone's layer names.
    backbone : str
        How to name the backbone in the message (``"vgg19"``, ``"custom backbone /m.keras"``).
    listing : bool
        Point at ``featurecache backbones --layers`` (registry backbones only).

    Returns
    -------
    BackboneError
        One line; the caller raises it.
    """
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)  # closest first
    near = f"close matches: {', '.join(map(repr, close))}" if close else f"it has {len(names)} layers"
    fix = f"`featurecache backbones --layers {backbone}` lists them" if listing else "pass one of its layer names"
    return BackboneError(f"layer {layer!r} is not in {backbone} ({near}); {fix}")
