"""Custom backbones: a user's ``.keras`` model file described as a :class:`BackboneSpec` and loaded with its weights.

:func:`custom_backbone` reads only the file's ``config.json`` (a ``.keras`` file is a zip), so
describing a custom backbone, and a cache hit on it, never imports TensorFlow. The whole model is
one block, ``"backbone"``; its default feature layer is the model's output.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from featurecache.backbones.spec import PREPROCESS_MODES, BackboneSpec, unknown_layer_error
from featurecache.backbones.weights import WeightsRef, load_weights_file
from featurecache.errors import BackboneError, UsageError, WeightsUnavailableError, choices

if TYPE_CHECKING:
    import keras


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
        raise BackboneError(
            f"cannot read custom backbone {path} ({type(error).__name__}: {error}); pass a model saved with model.save('model.keras')"
        ) from error
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
        raise UsageError(
            f"unknown preprocess mode {preprocess!r} for a custom backbone; choose one of {choices(PREPROCESS_MODES)}"
        )
    file = Path(path).expanduser().absolute()
    if not file.is_file() or not file.name.endswith(".keras"):
        raise BackboneError(
            f"custom backbone {str(file)!r} is not an existing .keras file; save the model with model.save('model.keras') and pass that path"
        )
    names, output_name, height = _read_keras_file(file)
    if layer is not None and layer not in names:
        raise unknown_layer_error(layer, names, f"custom backbone {file}", listing=False)
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


def check_custom_weights(spec: BackboneSpec, ref: WeightsRef) -> None:
    """Refuse ImageNet weights for a custom backbone, which has none.

    Parameters
    ----------
    spec : BackboneSpec
        A custom backbone (see :func:`custom_backbone`).
    ref : WeightsRef
        The weights asked for.

    Raises
    ------
    WeightsUnavailableError
        If ``ref`` is ImageNet; the message lists the weights that do work.
    """
    if ref.kind == "imagenet":
        raise WeightsUnavailableError(
            f"custom backbone {spec.constructor} has no ImageNet weights; pass --weights {spec.constructor} "
            "to use the weights stored in it, --weights random, or a weights file for the same model"
        )


def build_custom(spec: BackboneSpec, weights: WeightsRef) -> keras.Model:
    """Load a custom backbone's model file with the given weights.

    Parameters
    ----------
    spec : BackboneSpec
        A custom backbone (see :func:`custom_backbone`).
    weights : WeightsRef
        The model file itself keeps its stored weights; ``random`` re-initialises the same
        architecture after ``keras.utils.set_random_seed(seed)``; another file is loaded into it.

    Returns
    -------
    keras.Model
        The whole model, uncut.

    Raises
    ------
    WeightsUnavailableError
        If ``weights`` is ImageNet or a weights file does not fit the model.
    """
    import keras

    check_custom_weights(spec, weights)
    model = keras.saving.load_model(spec.constructor, compile=False)
    if weights.kind == "random":
        keras.utils.set_random_seed(weights.seed)
        model = keras.models.clone_model(model)  # same architecture, freshly initialised
    elif weights.path != spec.constructor:
        load_weights_file(model, spec, str(weights.path))
    return model
