"""One Keras model for a run that reads several feature sets: an ensemble, or a head on concatenated features.

How it works
------------
A head trained on concatenated feature sets (:mod:`featurecache.concat`) and an ensemble of runs
(:mod:`featurecache.ensemble`) both need several backbones in one model. Each distinct feature
recipe -- backbone, weights, layer, pooling, input size, resize, preprocessing -- is built once
by :func:`featurecache.finetune.rebuild.build_branch` with its own resize and preprocessing
layers, and shared by every head that reads it::

    image -> fc_resize_0 -> fc_preprocess_0 -> <backbone 0> -> fc_pool_0 --+---------------> fc_head_0 --+
          -> fc_resize_1 -> fc_preprocess_1 -> <backbone 1> -> fc_pool_1 --+-> fc_concat_1 -> fc_head_1 --+-> combination -> predictions
                                                                           +---------------> fc_head_2 --+

Each member's head is converted by :func:`featurecache.finetune.convert.keras_head` and wrapped in
its own nested model (``fc_head_<m>``), so two heads' layer names never collide; a head on
several feature sets reads them through a ``Concatenate`` in the recorded column order. The
combination (:func:`featurecache.combine.keras_combine`) is built-in layers too, so the model
loads with ``keras.saving.load_model`` in safe mode, without featurecache.

Fine-tuning such a model end to end is not supported (only the export is): the training loop,
unfreezing by block and the BatchNorm wrapper of :mod:`featurecache.finetune.training` are
written for one backbone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from featurecache.cache.concat import feature_parts
from featurecache.errors import RunError, UsageError
from featurecache.finetuning.convert import check_expressible, keras_head
from featurecache.finetuning.rebuild import Branch, build_branch
from featurecache.training.runconfig import (  # re-exported: config readers live there
    ENSEMBLE_KIND,
    MEMBER_DIR,
    is_assembled,
    read_run_config,
    recorded_name,
)

__all__ = ["Assembled", "Member", "assemble_run", "is_assembled", "load_members", "read_run_config"]

# Spec fields that make two branches compute the same features from the same images.
_RECIPE = ("backbone", "weights", "layer", "pooling", "input_size", "resize", "preprocess")


@dataclass(frozen=True)
class Member:
    """One head of an assembled model: its run directory, config and fitted estimator."""

    run_dir: Path
    config: Mapping[str, Any] = field(repr=False)
    estimator: Any = field(repr=False)


@dataclass(frozen=True)
class Assembled:
    """A run with several feature sets rebuilt as one Keras model.

    Attributes
    ----------
    model
        Raw RGB images ``(b, H, W, 3)`` in [0, 255] -> class probabilities ``(b, n_classes)``.
    branches
        One per distinct feature recipe, each with ``features`` the model images -> its features.
    members
        The heads, in the run's order.
    config
        The run's ``config.json``.
    run_dir
        The run directory.
    classes
        Class names, in output column order.
    """

    model: Any = field(repr=False)
    branches: tuple[Branch, ...]
    members: tuple[Member, ...]
    config: Mapping[str, Any] = field(repr=False)
    run_dir: Path
    classes: tuple[str, ...]


def load_members(run_dir: str | os.PathLike[str], config: Mapping[str, Any] | None = None) -> list[Member]:
    """The fitted heads of a run: its members if it is an ensemble, else its own head.

    Every head is read with :func:`featurecache.rundir.load_run`.

    Raises
    ------
    RunError
        A member directory, its config or its head is missing.
    """
    from featurecache.training.rundir import load_run

    path = Path(run_dir)
    config = read_run_config(path) if config is None else config
    if config.get("kind") != ENSEMBLE_KIND:
        cfg, estimator = load_run(path)
        return [Member(path, cfg, estimator)]
    members = []
    for record in config.get("members", []):
        name = recorded_name(
            record.get("dir"),
            MEMBER_DIR,
            source=path / "config.json",
            fix="make the ensemble again with `featurecache ensemble`",
        )
        member_dir = path / name
        if not member_dir.is_dir():
            raise RunError(
                f"ensemble {path} lacks its member {record['dir']}; copy the whole ensemble directory, or make it again with `featurecache ensemble`"
            )
        cfg, estimator = load_run(member_dir)
        members.append(Member(member_dir, cfg, estimator))
    if not members:
        raise RunError(f"ensemble {path} lists no members; make it again with `featurecache ensemble`")
    return members


def _recipe(spec: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(spec.get(k)) for k in _RECIPE)


def assemble_run(
    run: str | os.PathLike[str],
    *,
    weights: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Assembled:
    """Build one Keras model for an ensemble or a head on several feature sets.

    Parameters
    ----------
    run
        An ensemble directory (``featurecache ensemble``) or a run trained on ``--features KEY1,KEY2``.
        An ordinary run works too (one branch, one head).
    weights
        Backbone weights override; only when the model has one backbone (each part records its own).
    cache_dir
        Cache root, for the weights-digest memo.

    Returns
    -------
    Assembled

    Raises
    ------
    RunError
        A run, member or head is missing, or a member's classes differ from the run's.
    UsageError
        A head Keras cannot express, an unknown combination method, or ``weights`` with several backbones.
    EquivalenceError, WeightsUnavailableError, BackboneError
        As :func:`featurecache.finetune.rebuild.build_branch`.
    """
    import keras

    run_dir = Path(run)
    config = read_run_config(run_dir)
    members = load_members(run_dir, config)  # a missing run fails here, with load_run's message
    classes = tuple(str(c) for c in config["classes"])
    for m in members:
        if tuple(str(c) for c in m.config.get("classes", ())) != classes:
            raise RunError(
                f"member {m.run_dir} predicts other classes than ensemble {run_dir}; make the ensemble again"
            )
        check_expressible(m.estimator)  # before any backbone: a k-NN member fails in a second
    parts = [feature_parts(m.config["features"]) for m in members]
    recipes: dict[tuple[str, ...], dict[str, Any]] = {}
    for member_parts in parts:
        for part in member_parts:
            recipes.setdefault(_recipe(part["spec"]), part)
    if weights is not None and len(recipes) > 1:
        raise UsageError(
            f"--weights names one backbone's weights but {run_dir} reads {len(recipes)} feature sets, each with its recorded weights; drop --weights"
        )

    inputs = keras.Input(shape=(None, None, 3), dtype="float32", name="image")
    names = [str(p["spec"]["backbone"]) for p in recipes.values()]
    branches: dict[tuple[str, ...], Branch] = {}
    for j, (recipe, part) in enumerate(recipes.items()):
        unique = names.count(names[j]) == 1
        branches[recipe] = build_branch(
            inputs,
            part,
            weights=weights,
            cache_dir=cache_dir,
            suffix=f"_{j}",
            backbone_name=names[j] if unique else f"{names[j]}_{j}",
        )
    probas = [
        _member_head(i, m, [branches[_recipe(p["spec"])].features for p in member_parts], len(classes))
        for i, (m, member_parts) in enumerate(zip(members, parts, strict=True))
    ]
    if config.get("kind") == ENSEMBLE_KIND:
        from featurecache.training.combine import keras_combine

        ens = config.get("ensemble", {})
        outputs = keras_combine(probas, str(ens.get("method")), ens.get("weights"))
    else:
        outputs = probas[0]
    model = keras.Model(inputs, outputs, name="featurecache_ensemble" if len(members) > 1 else "featurecache_concat")
    built = tuple(
        replace(b, features=keras.Model(inputs, b.features, name=f"fc_features_{j}"))
        for j, b in enumerate(branches.values())
    )
    return Assembled(
        model=model, branches=built, members=tuple(members), config=config, run_dir=run_dir, classes=classes
    )


def _member_head(i: int, member: Member, features: Sequence[Any], n_classes: int) -> Any:
    """Member ``i``'s probabilities: its head, as a nested model, on its features side by side."""
    import keras

    x = features[0] if len(features) == 1 else keras.layers.Concatenate(axis=-1, name=f"fc_concat_{i}")(list(features))
    feature_shape = tuple(int(d) for d in x.shape[1:])
    dtype = str(member.config["features"].get("spec", {}).get("dtype", "float32"))
    apply_head = keras_head(member.estimator, feature_shape=feature_shape, n_classes=n_classes, feature_dtype=dtype)
    head_in = keras.Input(shape=feature_shape, dtype="float32", name=f"fc_head_input_{i}")
    return keras.Model(head_in, apply_head(head_in), name=f"fc_head_{i}")(x)
