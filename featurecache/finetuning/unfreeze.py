"""Choose what fine-tuning trains: backbone blocks by registry name, never by layer index.

How it works
------------
``--unfreeze`` names blocks from the backbone registry (``block5``), the last N blocks
(``top:2``), ``all`` or ``none``. Blocks that come after the run's feature layer were cut away
by the rebuild, so naming one is an error that says so. Every BatchNormalization layer of the
backbone stays non-trainable: together with the training wrapper
(:mod:`featurecache.finetune.training`), which calls the backbone with ``training=False``, it
keeps the moving statistics the head was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from featurecache.errors import UsageError, choices

if TYPE_CHECKING:
    from featurecache.finetuning.rebuild import Rebuilt

__all__ = ["resolve_unfreeze", "trainable_text", "unfreeze_blocks"]


def resolve_unfreeze(text: str, blocks: Sequence[str], *, cut_away: Sequence[str] = ()) -> tuple[str, ...]:
    """Parse an ``--unfreeze`` value into block names.

    Parameters
    ----------
    text
        Comma-separated items: block names, ``top:N`` (the last N blocks), ``all`` (every layer
        of the backbone) or ``none`` (only the head trains).
    blocks
        The backbone's blocks present in the model, earliest first.
    cut_away
        Registry blocks after the feature layer (not in the model), for a precise error.

    Returns
    -------
    tuple of str
        The chosen blocks in model order; ``("all",)`` for ``all``.

    Raises
    ------
    UsageError
        An unknown block or a bad ``top:N``; the message lists the valid values.
    """
    valid = f"{choices(blocks)} or 'all', 'none', 'top:N' (N = 1..{len(blocks)})"
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise UsageError(f"--unfreeze is empty; pass one or more of {valid}")
    chosen: set[str] = set()
    for item in items:
        low = item.lower()
        if low == "all":
            return ("all",)
        if low == "none":
            continue
        if low.startswith("top:"):
            try:
                n = int(low[4:])
            except ValueError:
                n = 0
            if not 1 <= n <= len(blocks):
                raise UsageError(
                    f"--unfreeze {item!r}: N must be an integer from 1 to {len(blocks)} (the model has {len(blocks)} blocks); valid: {valid}"
                )
            chosen.update(blocks[-n:])
        elif item in blocks:
            chosen.add(item)
        elif item in cut_away:
            raise UsageError(
                f"--unfreeze block {item!r} comes after the run's feature layer, so the model does not contain it; valid: {valid}"
            )
        else:
            raise UsageError(f"--unfreeze got unknown block {item!r}; valid: {valid}")
    return tuple(b for b in blocks if b in chosen)


def unfreeze_blocks(rebuilt: Rebuilt, unfreeze: str) -> dict[str, dict[str, Any]]:
    """Make the chosen backbone blocks and the head trainable, everything else frozen.

    BatchNormalization layers of the backbone always stay frozen (and in inference mode).

    Parameters
    ----------
    rebuilt
        From :func:`featurecache.finetune.rebuild_model`.
    unfreeze
        See :func:`resolve_unfreeze`.

    Returns
    -------
    dict
        Per group (each unfrozen block, then ``head``): ``layers`` (names of the layers with
        trainable weights), ``params`` (trainable parameters), ``batchnorm_frozen``.

    Raises
    ------
    UsageError
        Bad ``unfreeze`` (the message lists the valid blocks).
    """
    import keras

    from featurecache import backbones

    spec = rebuilt.backbone_spec
    groups = backbones.block_layers(rebuilt.backbone, spec)
    present = [b for b in spec.blocks if groups.get(b)]
    cut_away = [b for b in spec.blocks if not groups.get(b)]
    chosen = resolve_unfreeze(unfreeze, present, cut_away=cut_away)
    wanted = present if chosen == ("all",) else list(chosen)
    backbone = rebuilt.backbone
    backbone.trainable = True  # the container must be trainable for its layers' flags to count
    for lyr in backbone.layers:
        lyr.trainable = False
    summary: dict[str, dict[str, Any]] = {}
    for block in wanted:
        names, n_params, n_bn = [], 0, 0
        for name in groups[block]:
            lyr = backbone.get_layer(name)
            if isinstance(lyr, keras.layers.BatchNormalization):
                n_bn += 1
                continue
            lyr.trainable = True
            if lyr.trainable_weights:
                names.append(name)
                n_params += sum(int(np.prod(w.shape)) for w in lyr.trainable_weights)
        summary[block] = {"layers": names, "params": n_params, "batchnorm_frozen": n_bn}
    head_layers = [lyr for lyr in rebuilt.head.layers[1:] if lyr.trainable_weights]
    summary["head"] = {
        "layers": [lyr.name for lyr in head_layers],
        "params": sum(int(np.prod(w.shape)) for lyr in head_layers for w in lyr.trainable_weights),
        "batchnorm_frozen": 0,
    }
    return summary


def trainable_text(trainable: Mapping[str, Mapping[str, Any]], rebuilt: Rebuilt) -> str:
    """One progress line: trainable parameters of each group out of the model's total.

    Parameters
    ----------
    trainable
        From :func:`unfreeze_blocks`.
    rebuilt
        The model it was applied to.

    Returns
    -------
    str
    """
    parts = []
    for block, info in trainable.items():
        bn = f", {info['batchnorm_frozen']} BatchNorm frozen" if info["batchnorm_frozen"] else ""
        parts.append(f"{block}: {len(info['layers'])} layers, {info['params']:,} params{bn}")
    total = sum(int(np.prod(w.shape)) for w in rebuilt.model.weights)
    n_train = sum(info["params"] for info in trainable.values())
    return f"trainable ({n_train:,} of {total:,} parameters): " + "; ".join(parts)
