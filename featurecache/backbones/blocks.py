"""Which named block each layer of a backbone belongs to, for unfreezing by name and for ``featurecache backbones --layers``.

Each block has a regular expression over layer names (``BackboneSpec.block_patterns``, written
beside the rest of each family's row in :mod:`featurecache.backbones.registry`). A layer whose
name matches a block's pattern belongs to it; an auto-named layer (``conv2d_12``,
``activation_3``) belongs to the block of the next matched layer, because Keras lists
``model.layers`` in topological order and a block's unnamed layers lie before its named end
(``mixed3``, ``add_5``). Every layer therefore falls in exactly one block, and fine-tuning
unfreezes by block name, never by layer index.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from featurecache.backbones.build import build_base
from featurecache.backbones.spec import BackboneSpec
from featurecache.backbones.weights import WeightsRef
from featurecache.errors import BackboneError

if TYPE_CHECKING:
    import keras


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
        raise BackboneError(
            f"no layer of model {model.name!r} belongs to a block of {spec.name}; pass the {spec.name} base model"
        )
    following = matched[-1]  # trailing unnamed layers (MobileNetV3's last activation) join the last block
    for i in reversed(range(len(names))):
        known = owner[i]
        if known is None:
            owner[i] = following
        else:
            following = known
    groups: dict[str, list[str]] = {block: [] for block in spec.blocks}
    for name, j in zip(names, owner, strict=True):
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
