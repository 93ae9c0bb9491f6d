"""Rebuild a run's backbone and head as one Keras model on raw images.

How it works
------------
A run directory records the feature set's full spec (backbone, weights identity, layer,
pooling, input size, resize method, preprocessing mode) and, since extraction stores them, the
``--weights`` value and ``--limit`` the user passed. From these we build one Keras model that
computes exactly ``head(pool(backbone(preprocess(resize(x)))))`` from raw RGB images of any
size, using built-in layers only, so ``keras.saving.load_model`` opens the export with
``safe_mode`` on and without featurecache::

    image (None, None, 3) -> fc_resize (Resizing) -> [fc_preprocess_scale] -> fc_preprocess
      -> <backbone> (nested model, cut at the feature layer) -> fc_pool -> head layers -> predictions

Preprocessing modes become layers (:func:`preprocess_layers`): ``tf`` =
``Rescaling(1/127.5, offset=-1)``; ``torch`` = ``Rescaling(1/255)`` + ``Normalization(mean,
std**2)``; ``caffe`` = a frozen 1x1 ``Conv2D`` whose kernel is the RGB->BGR permutation and whose
bias is ``-mean`` (bit-exact: every product is ``x*1`` or ``x*0``); ``none`` = nothing. The head
layers come from :mod:`featurecache.finetune.convert`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featurecache.errors import EquivalenceError, RunError, UsageError, choices
from featurecache.finetuning.convert import check_expressible, keras_head

if TYPE_CHECKING:
    import keras

__all__ = [
    "POOL_LAYER",
    "PREPROCESS_LAYER",
    "RESIZE_LAYER",
    "Branch",
    "Rebuilt",
    "build_branch",
    "preprocess_layers",
    "rebuild_model",
]

RESIZE_LAYER = "fc_resize"
PREPROCESS_LAYER = "fc_preprocess"
POOL_LAYER = "fc_pool"

# keras.applications.imagenet_utils constants of the "caffe" (BGR) and "torch" modes.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Rebuilt:
    """A run rebuilt as one Keras model, plus the pieces fine-tuning needs.

    Attributes
    ----------
    model
        Raw RGB images ``(b, H, W, 3)`` in [0, 255] -> class probabilities ``(b, n_classes)``.
    features
        The same layers up to ``fc_pool``: images -> the features the head reads.
    head
        The head layers as a model on the features (shares layers and weights with ``model``).
    backbone
        The nested backbone model (cut at the feature layer), named after the backbone.
    backbone_spec
        The registry row (``featurecache.backbones.BackboneSpec``).
    config
        The run's ``config.json``.
    run_dir
        The run directory.
    classes
        Class names, in output column order.
    """

    model: Any = field(repr=False)
    features: Any = field(repr=False)
    head: Any = field(repr=False)
    backbone: Any = field(repr=False)
    backbone_spec: Any
    config: Mapping[str, Any] = field(repr=False)
    run_dir: Path
    classes: tuple[str, ...]

    @property
    def spec(self) -> Mapping[str, Any]:
        """The cached feature set's spec from the run config."""
        return self.config["features"]["spec"]

    @property
    def branches(self) -> tuple[Branch, ...]:
        """The one image-to-features path, as :func:`featurecache.finetune.equivalence` diagnoses it."""
        return (
            Branch(
                features=self.features,
                backbone=self.backbone,
                backbone_spec=self.backbone_spec,
                spec=self.spec,
                key=str(self.config["features"].get("key", "")),
                name=str(self.config["features"].get("name", "")),
            ),
        )


@dataclass(frozen=True)
class Branch:
    """One backbone's path from images to the features a head reads.

    Attributes
    ----------
    features
        Before :func:`build_branch` returns a model: the symbolic feature tensor; in a
        ``Rebuilt`` / ``Assembled``: the model images -> features.
    backbone
        The nested backbone model, frozen.
    backbone_spec
        The registry row.
    spec, key, name
        The cached feature set's spec, key and entry name.
    """

    features: Any = field(repr=False)
    backbone: Any = field(repr=False)
    backbone_spec: Any
    spec: Mapping[str, Any] = field(repr=False)
    key: str = ""
    name: str = ""


def _read_run(run: str | os.PathLike[str]) -> tuple[Path, dict[str, Any], Any]:
    from featurecache.training.runconfig import is_assembled, read_run_config
    from featurecache.training.rundir import load_run

    run_dir = Path(run)
    if is_assembled(read_run_config(run_dir)):
        raise RunError(
            f"{run_dir} is an ensemble or a head on several feature sets, which has no single backbone to rebuild; "
            "use featurecache.finetuning.assemble.assemble_run (predict, evaluate and `finetune --epochs 0` do)"
        )
    config, estimator = load_run(run_dir)
    if "features" not in config or "spec" not in config.get("features", {}) or "classes" not in config:
        raise RunError(
            f"{run_dir}/config.json has no features.spec or classes, so it is not a train-head run; point to a directory written by `featurecache train-head`"
        )
    return run_dir, config, estimator


def _resolve_weights(features: Mapping[str, Any], bspec: Any, *, override: str | None, cache_dir: Any) -> Any:
    """The ``WeightsRef`` the features were made with, checked against the recorded identity.

    ``features`` is a run's ``config["features"]`` or one of its parts: ``spec`` and ``weights_source``.
    """
    from featurecache import backbones
    from featurecache.cache import store

    spec = features["spec"]
    recorded = str(spec["weights"])
    source = backbones.recorded_weights_source(recorded, override or features.get("weights_source"))
    if source is None:
        raise RunError(
            f"the run does not record which weights file its features were made with (identity {recorded}); "
            "pass --weights PATH to that file"
        )
    ref = backbones.parse_weights(source, seed=int(spec.get("seed", 0)))
    identity = backbones.weights_identity(ref, bspec, memo_dir=store.memo_dir(store.resolve_cache_dir(cache_dir)))
    if identity != recorded:
        raise EquivalenceError(
            f"weights {source!r} have identity {identity} but the run's features were made with {recorded}; "
            "pass --weights with the weights used at extraction (the same file, or random with the same seed)"
        )
    return ref


def rebuild_model(
    run: str | os.PathLike[str],
    *,
    weights: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Rebuilt:
    """Rebuild a run's backbone and head as one Keras model on raw images.

    Parameters
    ----------
    run
        A run directory written by ``train-head``.
    weights
        The backbone weights (``imagenet``, ``random`` or a file); default what the run
        records. Their identity must equal the one the features were cached with.
    cache_dir
        Cache root, for the weights-digest memo.

    Returns
    -------
    Rebuilt
        With the backbone frozen and the head trainable (see
        :func:`featurecache.finetune.unfreeze.unfreeze_blocks`).

    Raises
    ------
    RunError
        The run directory, its config or its head is missing.
    UsageError
        The head cannot be expressed in Keras (k-NN, forests, isotonic calibration, ...).
    EquivalenceError
        The weights are not those the features were made with.
    WeightsUnavailableError, BackboneError
        The weights cannot be loaded or the backbone cannot be built as recorded.
    """
    import keras

    run_dir, config, estimator = _read_run(run)
    spec = config["features"]["spec"]
    classes = tuple(str(c) for c in config["classes"])
    check_expressible(estimator)  # before the backbone: a k-NN run fails in a second, not after a download
    inputs = keras.Input(shape=(None, None, 3), dtype="float32", name="image")
    branch = build_branch(inputs, config["features"], weights=weights, cache_dir=cache_dir)
    x, bspec = branch.features, branch.backbone_spec
    feature_shape = tuple(int(d) for d in x.shape[1:])
    apply_head = keras_head(
        estimator, feature_shape=feature_shape, n_classes=len(classes), feature_dtype=str(spec.get("dtype", "float32"))
    )
    outputs = apply_head(x)
    model = keras.Model(inputs, outputs, name=f"featurecache_{bspec.name}")
    features = keras.Model(inputs, x, name="fc_features")
    head_in = keras.Input(shape=feature_shape, dtype="float32", name="fc_head_input")
    head = keras.Model(head_in, apply_head(head_in), name="fc_head")
    return Rebuilt(
        model=model,
        features=features,
        head=head,
        backbone=branch.backbone,
        backbone_spec=bspec,
        config=config,
        run_dir=run_dir,
        classes=classes,
    )


def build_branch(
    inputs: Any,
    features: Mapping[str, Any],
    *,
    weights: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    suffix: str = "",
    backbone_name: str | None = None,
) -> Branch:
    """Images -> one cached feature set's features, with built-in layers: resize, preprocess, backbone, pool.

    Parameters
    ----------
    inputs
        The symbolic image tensor ``(None, None, None, 3)``, float32 RGB in [0, 255].
    features
        A run's ``config["features"]`` or one part of it: ``spec`` (backbone, weights identity,
        layer, pooling, input size, resize, preprocessing), ``weights_source``, ``key``, ``name``.
    weights
        Override of the recorded ``--weights`` value; its identity must match.
    cache_dir
        Cache root, for the weights-digest memo.
    suffix
        Appended to the layer names (``fc_resize<suffix>`` ...), so several branches fit in one model.
    backbone_name
        Name of the nested backbone model; default the backbone's registry name.

    Returns
    -------
    Branch
        With ``features`` the symbolic feature tensor; the backbone frozen.

    Raises
    ------
    RunError
        The feature layer is not in the backbone as this Keras builds it.
    EquivalenceError
        The weights are not those the features were made with.
    WeightsUnavailableError, BackboneError
        The weights cannot be loaded or the backbone cannot be built as recorded.
    """
    import keras

    from featurecache import backbones

    spec = features["spec"]
    name = str(spec["backbone"])
    if name == "custom":  # a user's .keras file, found where its weights are (backbones.custom)
        source = next(
            (str(w) for w in (weights, features.get("weights_source")) if w and str(w).endswith(".keras")), None
        )
        if source is None:
            raise RunError(
                "the run does not record its custom backbone's .keras file; pass --weights PATH to that file"
            )
        name = source
    bspec = backbones.get_backbone(name)
    ref = _resolve_weights(features, bspec, override=weights, cache_dir=cache_dir)
    size = int(spec["input_size"])
    base = backbones.build_base(bspec, ref, input_size=size)
    layer = str(spec["layer"])
    if layer not in [lyr.name for lyr in base.layers]:
        raise RunError(
            f"the run's feature layer {layer!r} is not in {bspec.name} as Keras {keras.__version__} builds it; re-extract the features with this Keras"
        )
    # A new functional view over the same layers: cut at the feature layer, named after the backbone.
    backbone = keras.Model(base.inputs, base.get_layer(layer).output, name=backbone_name or bspec.name)
    # Stage-2 state: frozen backbone (BatchNorm then also runs in inference mode), trainable head.
    backbone.trainable = False
    x = keras.layers.Resizing(
        size,
        size,
        interpolation=str(spec["resize"]),
        antialias=bool(spec.get("antialias", False)),
        name=f"{RESIZE_LAYER}{suffix}",
    )(inputs)
    mode = str(spec["preprocess"]).rsplit(":", 1)[-1]
    for lyr in preprocess_layers(mode, suffix=suffix):
        x = lyr(x)
    x = backbone(x, training=False)
    pooling = str(spec["pooling"])
    pool = backbones.pooling_layer(pooling, name=f"{POOL_LAYER}{suffix}")
    if pool is not None and not (pooling in ("avg", "max") and len(x.shape) != 4):
        x = pool(x)
    return Branch(
        features=x,
        backbone=backbone,
        backbone_spec=bspec,
        spec=spec,
        key=str(features.get("key", "")),
        name=str(features.get("name", "")),
    )


def preprocess_layers(mode: str, *, suffix: str = "") -> list[keras.layers.Layer]:
    """Built-in Keras layers equal to ``keras.applications`` ``preprocess_input`` in ``mode``.

    Parameters
    ----------
    mode
        ``"tf"``, ``"torch"``, ``"caffe"`` or ``"none"``.
    suffix
        Appended to the layer names (one set of layers per backbone in an ensemble).

    Returns
    -------
    list of keras.layers.Layer
        Frozen layers to apply in order to float32 RGB in [0, 255]; the last one is named
        ``fc_preprocess<suffix>``. Empty for ``"none"``.

    Raises
    ------
    UsageError
        Unknown mode.
    """
    import keras

    if mode == "none":
        return []
    if mode == "tf":
        return [keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name=f"{PREPROCESS_LAYER}{suffix}")]
    if mode == "torch":
        return [
            keras.layers.Rescaling(1.0 / 255.0, name=f"{PREPROCESS_LAYER}_scale{suffix}"),
            keras.layers.Normalization(
                mean=list(_TORCH_MEAN), variance=[s * s for s in _TORCH_STD], name=f"{PREPROCESS_LAYER}{suffix}"
            ),
        ]
    if mode == "caffe":
        kernel = np.zeros((1, 1, 3, 3), dtype=np.float32)
        for out_channel, in_channel in enumerate((2, 1, 0)):  # BGR output from RGB input
            kernel[0, 0, in_channel, out_channel] = 1.0
        bias = -np.asarray(_CAFFE_MEAN_BGR, dtype=np.float32)
        return [
            keras.layers.Conv2D(
                3,
                1,
                name=f"{PREPROCESS_LAYER}{suffix}",
                trainable=False,
                kernel_initializer=keras.initializers.Constant(kernel),
                bias_initializer=keras.initializers.Constant(bias),
            )
        ]
    raise UsageError(
        f"unknown preprocess mode {mode!r} in the run config; expected one of {choices(('caffe', 'tf', 'torch', 'none'))}"
    )
