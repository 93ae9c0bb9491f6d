"""Stage 3: rebuild backbone + head from a run directory, check it, fine-tune it, export it.

How it works
------------
* **Rebuild.** A run directory records the feature set's full spec (backbone, weights identity,
  layer, pooling, input size, resize method, preprocessing mode) and, since extraction stores
  them, the ``--weights`` value and ``--limit`` the user passed. From these we build one Keras
  model that computes exactly ``head(pool(backbone(preprocess(resize(x)))))`` from raw RGB images
  of any size, using built-in layers only, so ``keras.saving.load_model`` opens the export with
  ``safe_mode`` on and without featurecache::

      image (None, None, 3) -> fc_resize (Resizing) -> [fc_preprocess_scale] -> fc_preprocess
        -> <backbone> (nested model, cut at the feature layer) -> fc_pool -> head layers -> predictions

  Preprocessing modes become layers: ``tf`` = ``Rescaling(1/127.5, offset=-1)``; ``torch`` =
  ``Rescaling(1/255)`` + ``Normalization(mean, std**2)``; ``caffe`` = a frozen 1x1 ``Conv2D``
  whose kernel is the RGB->BGR permutation and whose bias is ``-mean`` (bit-exact: every product
  is ``x*1`` or ``x*0``); ``none`` = nothing.
* **Heads.** A ``DenseHead`` is already a plain Keras model (``head.keras``); its layers are
  spliced in. Linear scikit-learn heads are converted: the ``StandardScaler`` is folded into the
  weights (``W/scale``, ``b - W.mean/scale``) and each probability rule becomes layers --
  multinomial logistic regression is ``softmax(z)``; one-vs-rest sigmoids normalised to sum 1
  (``SGDClassifier(log_loss)``, Platt-calibrated margins) are ``softmax(log_sigmoid(z))``, since
  ``exp(log sigmoid(z_i)) / sum_j exp(log sigmoid(z_j)) = sigmoid(z_i) / sum_j sigmoid(z_j)``
  (``-log sigmoid`` is capped where scikit-learn's sigmoid underflows to 0 in the features'
  dtype, reproducing its uniform fallback when every class underflows); a
  binary decision ``z`` is ``softmax([0, z])``; ``CalibratedClassifierCV`` averages one such branch
  per fold (``Average``). Classes unseen in training get a frozen class-map ``Dense`` (0/1 kernel,
  ``-1e30`` bias in logit space), so the output always has one column per run class.
* **Equivalence.** Before any training the rebuilt model runs on the run's clean validation
  images (raw, through its own Resizing layer) and must reproduce ``predictions.npz`` within
  ``tolerance``; otherwise :class:`~featurecache.errors.EquivalenceError` names the largest
  difference, where, and the likely cause (checked against the cached features when the entry
  is still in the cache).
* **Fine-tuning.** Blocks are unfrozen by registry name (``block5``, ``top:2``, ``all``); every
  BatchNormalization layer of the backbone stays non-trainable. Keras 3's ``fit`` passes
  ``training=True`` into every nested layer and overrides the ``training=False`` recorded in a
  functional graph (keras-team/keras#20285), so we train a small wrapper (never exported) whose
  ``call`` runs the image->features part with ``training=False`` and only the head with the
  outer flag: BatchNorm keeps its moving statistics and backbone dropout stays off. Augmentation
  runs in the input pipeline (per epoch ``e``, sample ``i`` is augmented from ``(seed, e+1, i)``),
  never inside the exported model.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featurecache.errors import (
    EquivalenceError,
    ImageDecodeError,
    RunError,
    UsageError,
    choices,
)

if TYPE_CHECKING:
    import keras

__all__ = [
    "KERAS_EXPRESSIBLE_HEADS",
    "OPTIMIZERS",
    "EquivalenceReport",
    "FinetuneResult",
    "ImagePredictor",
    "Rebuilt",
    "check_equivalence",
    "finetune",
    "keras_head",
    "load_run_data",
    "predict_rows",
    "preprocess_layers",
    "rebuild_model",
    "resolve_unfreeze",
    "unfreeze_blocks",
]

#: Heads that can be turned into Keras layers (and so fine-tuned end to end).
KERAS_EXPRESSIBLE_HEADS: tuple[str, ...] = ("dense", "logreg", "sgd", "linear-svm (calibration=sigmoid)", "ridge (calibration=sigmoid)")
OPTIMIZERS: tuple[str, ...] = ("adam", "rmsprop", "sgd")
FINETUNE_FORMAT = 1
MODEL_FILE = "model.keras"

RESIZE_LAYER = "fc_resize"
PREPROCESS_LAYER = "fc_preprocess"
POOL_LAYER = "fc_pool"
CLASS_MAP_LAYER = "fc_class_map"

# keras.applications.imagenet_utils constants of the "caffe" (BGR) and "torch" modes.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
# exp(-1e30 - max) underflows to exactly 0 in float32, so a missing class gets probability 0.
_MISSING_LOGIT = -1e30


# --------------------------------------------------------------------------------------------
# Run directories
# --------------------------------------------------------------------------------------------


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


def _read_run(run: str | os.PathLike[str]) -> tuple[Path, dict[str, Any], Any]:
    from featurecache.train import load_run

    run_dir = Path(run)
    config, estimator = load_run(run_dir)
    if "features" not in config or "spec" not in config.get("features", {}) or "classes" not in config:
        raise RunError(f"{run_dir}/config.json has no features.spec or classes, so it is not a train-head run; point to a directory written by `featurecache train-head`")
    return run_dir, config, estimator


def _resolve_weights(config: Mapping[str, Any], bspec: Any, *, override: str | None, cache_dir: Any) -> Any:
    """The ``WeightsRef`` the features were made with, checked against the recorded identity."""
    from featurecache import backbones
    from featurecache.cache import store

    spec = config["features"]["spec"]
    recorded = str(spec["weights"])
    source = override or config["features"].get("weights_source")
    if not source:
        # Runs made before extract recorded --weights: random and ImageNet weights can be
        # named from the identity alone; a file cannot.
        if recorded.startswith("random"):
            source = "random"
        elif recorded.startswith("imagenet"):
            source = "imagenet"
        else:
            raise RunError(
                f"the run does not record which weights file its features were made with (identity {recorded}); "
                "pass --weights PATH to that file"
            )
    ref = backbones.parse_weights(str(source), seed=int(spec.get("seed", 0)))
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
        With the backbone frozen and the head trainable (see :func:`unfreeze_blocks`).

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

    from featurecache import backbones

    run_dir, config, estimator = _read_run(run)
    spec = config["features"]["spec"]
    classes = tuple(str(c) for c in config["classes"])
    _check_expressible(estimator)  # before the backbone: a k-NN run fails in a second, not after a download
    bspec = backbones.get_backbone(str(spec["backbone"]))
    ref = _resolve_weights(config, bspec, override=weights, cache_dir=cache_dir)
    size = int(spec["input_size"])
    base = backbones.build_base(bspec, ref, input_size=size)
    layer = str(spec["layer"])
    names = [lyr.name for lyr in base.layers]
    if layer not in names:
        raise RunError(f"the run's feature layer {layer!r} is not in {bspec.name} as Keras {keras.__version__} builds it; re-extract the features with this Keras")
    # A new functional view over the same layers: cut at the feature layer, named after the backbone.
    backbone = keras.Model(base.inputs, base.get_layer(layer).output, name=bspec.name)
    # Stage-2 state: frozen backbone (BatchNorm then also runs in inference mode), trainable head.
    backbone.trainable = False

    inputs = keras.Input(shape=(None, None, 3), dtype="float32", name="image")
    x = keras.layers.Resizing(size, size, interpolation=str(spec["resize"]), name=RESIZE_LAYER)(inputs)
    mode = str(spec["preprocess"]).rsplit(":", 1)[-1]
    for lyr in preprocess_layers(mode):
        x = lyr(x)
    x = backbone(x, training=False)
    pooling = str(spec["pooling"])
    pool = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D, "flatten": keras.layers.Flatten}.get(pooling)
    if pool is not None and not (pooling in ("avg", "max") and len(x.shape) != 4):
        x = pool(name=POOL_LAYER)(x)
    feature_shape = tuple(int(d) for d in x.shape[1:])
    apply_head = keras_head(estimator, feature_shape=feature_shape, n_classes=len(classes), feature_dtype=str(spec.get("dtype", "float32")))
    outputs = apply_head(x)
    model = keras.Model(inputs, outputs, name=f"featurecache_{bspec.name}")
    features = keras.Model(inputs, x, name="fc_features")
    head_in = keras.Input(shape=feature_shape, dtype="float32", name="fc_head_input")
    head = keras.Model(head_in, apply_head(head_in), name="fc_head")
    return Rebuilt(model=model, features=features, head=head, backbone=backbone, backbone_spec=bspec, config=config, run_dir=run_dir, classes=classes)


def preprocess_layers(mode: str) -> list[keras.layers.Layer]:
    """Built-in Keras layers equal to ``keras.applications`` ``preprocess_input`` in ``mode``.

    Parameters
    ----------
    mode
        ``"tf"``, ``"torch"``, ``"caffe"`` or ``"none"``.

    Returns
    -------
    list of keras.layers.Layer
        Frozen layers to apply in order to float32 RGB in [0, 255]; the last one is named
        ``fc_preprocess``. Empty for ``"none"``.

    Raises
    ------
    UsageError
        Unknown mode.
    """
    import keras

    if mode == "none":
        return []
    if mode == "tf":
        return [keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name=PREPROCESS_LAYER)]
    if mode == "torch":
        return [
            keras.layers.Rescaling(1.0 / 255.0, name=f"{PREPROCESS_LAYER}_scale"),
            keras.layers.Normalization(mean=list(_TORCH_MEAN), variance=[s * s for s in _TORCH_STD], name=PREPROCESS_LAYER),
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
                name=PREPROCESS_LAYER,
                trainable=False,
                kernel_initializer=keras.initializers.Constant(kernel),
                bias_initializer=keras.initializers.Constant(bias),
            )
        ]
    raise UsageError(f"unknown preprocess mode {mode!r} in the run config; expected one of {choices(('caffe', 'tf', 'torch', 'none'))}")


# --------------------------------------------------------------------------------------------
# Heads as Keras layers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Branch:
    """One linear map and the rule that turns its scores into probabilities."""

    kernel: np.ndarray  # (d, m) float64
    bias: np.ndarray  # (m,)
    classes: np.ndarray  # (m,) column -> run class index
    log_sigmoid: bool  # scores are normalised sigmoids, not softmax logits
    # scipy's expit(z) is exactly 0 below -log(finfo(dtype).max), in the dtype scikit-learn
    # computes the sigmoid in (float32 for float32 features); None when not log_sigmoid.
    underflow: float | None = None


def _not_expressible(what: str) -> UsageError:
    return UsageError(
        f"fine-tuning needs a head that Keras can express, and {what} is not; "
        f"train one of {', '.join(KERAS_EXPRESSIBLE_HEADS)} with `featurecache train-head` and fine-tune that run"
    )


def _linear(clf: Any) -> tuple[np.ndarray, np.ndarray]:
    coef = np.asarray(getattr(clf, "coef_", None), dtype=np.float64)
    intercept = np.atleast_1d(np.asarray(getattr(clf, "intercept_", 0.0), dtype=np.float64))
    if coef.ndim != 2:
        raise _not_expressible(f"{type(clf).__name__} (no linear coef_)")
    return coef, np.broadcast_to(intercept, (coef.shape[0],)).copy()


def _underflow(fn: Callable[[np.ndarray], Any], d: int, dtype: np.dtype) -> float:
    """``-z`` below which scikit-learn's sigmoid of ``fn``'s output is exactly 0."""
    out_dtype = np.asarray(fn(np.zeros((1, d), dtype=dtype))).dtype
    return float(np.log(np.finfo(out_dtype if out_dtype.kind == "f" else np.float64).max))


def _sklearn_branches(clf: Any, dtype: np.dtype) -> list[_Branch]:
    """Probability branches of a fitted linear classifier (before any scaler).

    ``dtype`` is the dtype of the (scaled) features scikit-learn sees, which sets the dtype of
    its sigmoids.
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression, SGDClassifier

    classes = np.asarray(clf.classes_).astype(np.int64)
    if isinstance(clf, LogisticRegression):
        coef, icpt = _linear(clf)
        if len(classes) == 2:  # sigmoid(z) = softmax([0, z])[1]
            return [_Branch(np.stack([np.zeros_like(coef[0]), coef[0]], axis=1), np.array([0.0, icpt[0]]), classes, False)]
        return [_Branch(coef.T, icpt, classes, False)]
    if isinstance(clf, SGDClassifier):
        if clf.loss != "log_loss":
            raise _not_expressible(f"SGDClassifier(loss={clf.loss!r})")
        coef, icpt = _linear(clf)
        if len(classes) == 2:
            return [_Branch(np.stack([np.zeros_like(coef[0]), coef[0]], axis=1), np.array([0.0, icpt[0]]), classes, False)]
        return [_Branch(coef.T, icpt, classes, True, _underflow(clf.decision_function, coef.shape[1], dtype))]
    if isinstance(clf, CalibratedClassifierCV):
        if clf.method != "sigmoid":
            raise _not_expressible(f"a head calibrated with method={clf.method!r} (only 'sigmoid' is)")
        return [_calibrated_branch(cc, classes, dtype) for cc in clf.calibrated_classifiers_]
    raise _not_expressible(f"a {type(clf).__name__} head")


def _calibrated_branch(cc: Any, classes: np.ndarray, dtype: np.dtype) -> _Branch:
    """One fold of ``CalibratedClassifierCV(method="sigmoid")``: ``sigmoid(-(a f + b))`` per class."""
    est = cc.estimator
    if not hasattr(est, "decision_function"):
        raise _not_expressible(f"a calibrated {type(est).__name__} (no decision_function)")
    coef, icpt = _linear(est)
    est_classes = np.asarray(est.classes_).astype(np.int64)
    a = np.array([c.a_ for c in cc.calibrators], dtype=np.float64)
    b = np.array([c.b_ for c in cc.calibrators], dtype=np.float64)
    if len(classes) == 2:
        if coef.shape[0] != 1 or len(cc.calibrators) != 1:
            raise _not_expressible("a binary calibrated head whose fold saw one class")
        u_w, u_b = -a[0] * coef[0], -(a[0] * icpt[0] + b[0])
        return _Branch(np.stack([np.zeros_like(u_w), u_w], axis=1), np.array([0.0, u_b]), classes, False)
    if coef.shape[0] != len(est_classes) or len(cc.calibrators) != len(est_classes):
        raise _not_expressible("a calibrated head whose folds do not score every class they saw")
    kernel = (-a[:, None] * coef).T
    bias = -(a * icpt + b)
    calibrator = cc.calibrators[0]
    underflow = _underflow(lambda x: calibrator.predict(np.asarray(est.decision_function(x)).reshape(len(x), -1)[:, 0]), coef.shape[1], dtype)
    return _Branch(kernel, bias, est_classes, True, underflow)


def _unpack_pipeline(estimator: Any) -> tuple[bool, Any, Any]:
    """``(flatten, scaler or None, classifier)`` of a head pipeline."""
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    from featurecache.heads.sklearn_heads import flatten_features

    if not isinstance(estimator, Pipeline):
        return False, None, estimator
    flatten, scaler = False, None
    for name, step in estimator.steps[:-1]:
        if isinstance(step, FunctionTransformer) and step.func is flatten_features:
            flatten = True
        elif isinstance(step, StandardScaler) and scaler is None:
            scaler = step
        elif step is None or step == "passthrough":
            continue
        else:
            raise _not_expressible(f"a pipeline with a {type(step).__name__} step ({name!r})")
    return flatten, scaler, estimator.steps[-1][1]


def _check_expressible(estimator: Any) -> None:
    from featurecache.heads.dense import DenseHead

    if isinstance(estimator, DenseHead):
        return
    if not hasattr(estimator, "classes_"):
        raise RunError("the run's head is not fitted; re-run `featurecache train-head`")
    _, _, clf = _unpack_pipeline(estimator)
    _sklearn_branches(clf, np.dtype(np.float32))


def keras_head(estimator: Any, *, feature_shape: Sequence[int], n_classes: int, feature_dtype: str = "float32") -> Callable[[Any], Any]:
    """Turn a fitted head into Keras layers over the features.

    Parameters
    ----------
    estimator
        A fitted head from a run (``DenseHead`` or a scikit-learn pipeline).
    feature_shape
        Shape of one feature vector or map (without the batch axis).
    n_classes
        Number of run classes; the output has one probability column per class, in label order.
    feature_dtype
        dtype of the cached features the head was evaluated on (it sets the dtype, and so the
        underflow point, of scikit-learn's sigmoids).

    Returns
    -------
    callable
        ``apply(x)`` calling the head's layers on a symbolic tensor. The layers are created once,
        so applying it to two tensors shares one set of weights.

    Raises
    ------
    UsageError
        The head is not Keras-expressible (the message names the heads that are).
    """
    import keras

    from featurecache.heads.dense import DenseHead

    if isinstance(estimator, DenseHead):
        return _dense_head(estimator, feature_shape=feature_shape, n_classes=n_classes)
    if not hasattr(estimator, "classes_"):
        raise RunError("the run's head is not fitted; re-run `featurecache train-head`")
    flatten, scaler, clf = _unpack_pipeline(estimator)
    d = int(np.prod(feature_shape))
    dtype = np.dtype(feature_dtype)
    if scaler is not None:
        dtype = np.asarray(scaler.transform(np.zeros((1, d), dtype=dtype))).dtype
    branches = _sklearn_branches(clf, dtype)
    if len(feature_shape) > 1 and not flatten:
        raise _not_expressible(f"a head on {tuple(feature_shape)} feature maps without the flatten step")
    layers: list[list[Any]] = []
    for i, br in enumerate(branches):
        kernel, bias = br.kernel, br.bias
        if kernel.shape[0] != d:
            raise RunError(f"the head expects {kernel.shape[0]} features but the rebuilt backbone gives {d}; the run config does not match its head")
        if scaler is not None:
            # Fold z = W ((x - mean) / scale) + b into z = (W / scale) x + (b - W mean / scale).
            scale = np.asarray(scaler.scale_ if scaler.scale_ is not None else np.ones(d), dtype=np.float64)
            mean = np.asarray(scaler.mean_ if scaler.mean_ is not None else np.zeros(d), dtype=np.float64)
            kernel = kernel / scale[:, None]
            bias = bias - (mean / scale) @ br.kernel
        suffix = "" if len(branches) == 1 else f"_{i}"
        if br.log_sigmoid:
            # -log sigmoid(z) = softplus(-z), capped where float64 sigmoid underflows to 0: when
            # every class underflows scikit-learn returns the uniform distribution, and equal
            # capped values give exactly that.
            chain = [
                _dense(f"head_neg_logits{suffix}", -kernel, -bias),
                keras.layers.Activation("softplus", name=f"head_neg_log_sigmoid{suffix}"),
                keras.layers.ReLU(max_value=br.underflow, name=f"head_underflow{suffix}"),
                keras.layers.Rescaling(-1.0, name=f"head_log_sigmoid{suffix}"),
            ]
        else:
            chain = [_dense(f"head_logits{suffix}", kernel, bias)]
        cmap = _class_map(br.classes, n_classes, missing=_MISSING_LOGIT, name=f"{CLASS_MAP_LAYER}{suffix}")
        if cmap is not None:
            chain.append(cmap)
        chain.append(keras.layers.Activation("softmax", name="predictions" if len(branches) == 1 else f"head_proba{suffix}"))
        layers.append(chain)
    flat = keras.layers.Flatten(name="head_flatten") if len(feature_shape) > 1 else None
    average = keras.layers.Average(name="predictions") if len(layers) > 1 else None

    def apply(x: Any) -> Any:
        if flat is not None:
            x = flat(x)
        outs = []
        for chain in layers:
            y = x
            for lyr in chain:
                y = lyr(y)
            outs.append(y)
        return average(outs) if average is not None else outs[0]

    return apply


def _dense(name: str, kernel: np.ndarray, bias: np.ndarray) -> Any:
    import keras

    lyr = keras.layers.Dense(kernel.shape[1], name=name)
    lyr.build((None, kernel.shape[0]))
    lyr.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return lyr


def _class_map(present: np.ndarray, n_classes: int, *, missing: float, name: str) -> Any | None:
    """Frozen ``Dense`` scattering columns ``present`` into ``n_classes`` columns (None if identity)."""
    import keras

    present = np.asarray(present, dtype=np.int64)
    if len(present) == n_classes and np.array_equal(present, np.arange(n_classes)):
        return None
    if len(present) and (present.min() < 0 or present.max() >= n_classes):
        raise RunError(f"the head predicts class indices {present.tolist()} but the run has {n_classes} classes; retrain the head")
    kernel = np.zeros((len(present), n_classes), dtype=np.float32)
    kernel[np.arange(len(present)), present] = 1.0
    bias = np.full(n_classes, missing, dtype=np.float32)
    bias[present] = 0.0
    lyr = keras.layers.Dense(n_classes, name=name, trainable=False)
    lyr.build((None, len(present)))
    lyr.set_weights([kernel, bias])
    return lyr


def _dense_head(estimator: Any, *, feature_shape: Sequence[int], n_classes: int) -> Callable[[Any], Any]:
    head = estimator.model_
    if tuple(int(d) for d in head.input_shape[1:]) != tuple(feature_shape):
        raise RunError(
            f"the dense head reads features of shape {tuple(head.input_shape[1:])} but the rebuilt backbone gives {tuple(feature_shape)}; "
            "the run config does not match its head"
        )
    chain = head.layers[1:]
    # Splice a plain chain so the head's layer names ("predictions", ...) stay top-level;
    # anything else is nested whole.
    is_chain = all(
        len(lyr._inbound_nodes) == 1 and lyr.input is prev.output  # noqa: SLF001 - Keras has no public node API
        for prev, lyr in zip(head.layers[:-1], chain)
    )
    # Probabilities are mapped (not logits): unseen classes get 0 added, never -1e30.
    cmap = _class_map(np.asarray(estimator.classes_).astype(np.int64), n_classes, missing=0.0, name=CLASS_MAP_LAYER)

    def apply(x: Any) -> Any:
        if is_chain:
            for lyr in chain:
                x = lyr(x)
        else:
            x = head(x)
        return cmap(x) if cmap is not None else x

    return apply


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


class ImagePredictor:
    """Runs a model on raw RGB images of any sizes, batching images of equal shape.

    The model is traced once for every input shape (``(None, None, None, 3)``), so images of
    many sizes cost one trace, not one per size.

    Parameters
    ----------
    model
        A model from :func:`rebuild_model` or a loaded ``model.keras`` (it resizes inside).
    batch_size
        Images per forward pass.
    """

    def __init__(self, model: Any, *, batch_size: int = 32) -> None:
        import tensorflow as tf

        self.batch_size = max(1, int(batch_size))
        self.output_shape = tuple(int(d) for d in model.output_shape[1:])
        self._fn = tf.function(
            lambda x: model(x, training=False),
            input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32)],
        )

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Outputs for ``images`` (``uint8`` or float ``(H, W, 3)`` in [0, 255]), float64, in order."""
        out = np.zeros((len(images), *self.output_shape), dtype=np.float64)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(tuple(np.shape(img)), []).append(i)
        for rows in by_shape.values():
            for b in range(0, len(rows), self.batch_size):
                chunk = rows[b : b + self.batch_size]
                x = np.stack([np.asarray(images[i], dtype=np.float32) for i in chunk])
                out[chunk] = np.asarray(self._fn(x))
        return out


def _load_images(split: Any, rows: Sequence[int], *, pool: ThreadPoolExecutor | None = None) -> list[np.ndarray]:
    def load(i: int) -> np.ndarray:
        try:
            return split.load(int(i))
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"{split.name}/{split.ids[int(i)]}: {exc}; fix or remove the image") from None

    if pool is None:
        return [load(i) for i in rows]
    return list(pool.map(load, rows))


# --------------------------------------------------------------------------------------------
# Data of a run
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunData:
    """The images behind a run: the dataset and the rows of each role.

    Attributes
    ----------
    dataset
        The loaded ``featurecache.data.Dataset``.
    val_split
        Split holding the run's validation images (``val``, or ``train`` for a hold-out).
    val_rows
        Rows of ``val_split``, in the order of ``predictions.npz`` ``val_ids``.
    train_rows
        Rows of ``train`` used for training (the hold-out removed).
    labels
        Maps dataset label indices to model class indices.
    """

    dataset: Any = field(repr=False)
    val_split: str
    val_rows: np.ndarray
    train_rows: np.ndarray
    labels: np.ndarray


def load_run_data(
    config: Mapping[str, Any],
    predictions: Mapping[str, np.ndarray],
    *,
    data: str | None = None,
    limit: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> RunData:
    """Load the images of a run: the same dataset, subset and validation hold-out.

    Parameters
    ----------
    config
        The run's ``config.json``.
    predictions
        Its ``predictions.npz`` (``val_ids``).
    data
        Another location of the same dataset (default the run's ``dataset_source``).
    limit
        Images per split (default the ``--limit`` extraction used).
    cache_dir
        Cache root, for the file-digest memo.

    Returns
    -------
    RunData

    Raises
    ------
    RunError
        The run records no dataset source, or the dataset lacks the run's validation images.
    DatasetError
        The dataset cannot be loaded.
    """
    from featurecache.cache import store
    from featurecache.data import load_dataset

    features = config["features"]
    source = data or features.get("dataset_source")
    if not source:
        raise RunError("the run does not record its dataset source; pass --data SOURCE with the images the features were extracted from")
    if limit is None:
        limit = features.get("dataset_limit")
    seed = int(features["spec"].get("seed", 0))
    dataset = load_dataset(str(source), memo_dir=store.memo_dir(store.resolve_cache_dir(cache_dir)), limit=limit, seed=seed)
    labels = _label_map(dataset.classes, tuple(str(c) for c in config["classes"]), where=str(source))
    if "train" not in dataset.splits:
        raise RunError(f"dataset {source!r} has no train split; pass --data with the run's images")
    held_out = not str(config.get("validation", "")).startswith("cached val")
    val_split = "train" if held_out or "val" not in dataset.splits else "val"
    split = dataset.splits[val_split]
    index = {sid: i for i, sid in enumerate(split.ids)}
    val_ids = [str(v) for v in predictions["val_ids"]]
    missing = [v for v in val_ids if v not in index]
    if missing:
        raise RunError(
            f"{len(missing)} of the run's {len(val_ids)} validation images (e.g. {missing[0]!r}) are not in the {val_split} split of {source!r}; "
            "pass --data (and --limit) for the dataset the features were extracted from"
        )
    val_rows = np.array([index[v] for v in val_ids], dtype=np.int64)
    n_train = len(dataset.splits["train"])
    train_rows = np.setdiff1d(np.arange(n_train), val_rows) if val_split == "train" else np.arange(n_train)
    return RunData(dataset=dataset, val_split=val_split, val_rows=val_rows, train_rows=train_rows.astype(np.int64), labels=labels)


def _label_map(dataset_classes: Sequence[str], model_classes: Sequence[str], *, where: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(model_classes)}
    unknown = [c for c in dataset_classes if c not in index]
    if unknown:
        raise UsageError(
            f"dataset {where!r} has classes the model does not know ({choices(unknown[:10])}); the model predicts {choices(model_classes)}"
        )
    return np.array([index[c] for c in dataset_classes], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EquivalenceReport:
    """How closely the rebuilt model reproduces the head's cached-feature predictions."""

    n: int
    max_abs_diff: float
    worst_id: str
    n_over: int
    tolerance: float
    top1_agreement: float

    @property
    def passed(self) -> bool:
        """Whether every probability is within ``tolerance``."""
        return self.n_over == 0

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values."""
        return {
            "n": self.n,
            "max_abs_diff": self.max_abs_diff,
            "worst_id": self.worst_id,
            "n_over": self.n_over,
            "tolerance": self.tolerance,
            "top1_agreement": self.top1_agreement,
            "passed": self.passed,
        }


def check_equivalence(
    rebuilt: Rebuilt,
    run_data: RunData,
    predictions: Mapping[str, np.ndarray],
    *,
    tolerance: float = 1e-4,
    max_samples: int | None = 512,
    batch_size: int = 32,
    cache_dir: str | os.PathLike[str] | None = None,
) -> EquivalenceReport:
    """Check the rebuilt model against the run's cached-feature predictions.

    Parameters
    ----------
    rebuilt
        From :func:`rebuild_model`.
    run_data
        From :func:`load_run_data`.
    predictions
        The run's ``predictions.npz`` (``val_ids``, ``val_proba``).
    tolerance
        Largest allowed absolute difference of any probability.
    max_samples
        Check at most this many validation images (evenly spaced); ``None`` checks all.
    batch_size
        Images per forward pass.
    cache_dir
        Cache root: when the run's feature set is still cached, a mismatch is diagnosed by
        comparing the rebuilt features with the cached ones.

    Returns
    -------
    EquivalenceReport
        A passing report.

    Raises
    ------
    EquivalenceError
        Some probability differs by more than ``tolerance``; the message says by how much, where,
        and the likely cause.
    """
    if not tolerance > 0:
        raise UsageError(f"--tolerance must be > 0, got {tolerance!r}")
    expected_all = np.asarray(predictions["val_proba"], dtype=np.float64)
    ids_all = np.asarray(predictions["val_ids"]).astype(str)
    pick = np.arange(len(ids_all))
    if max_samples is not None and len(pick) > max_samples:
        pick = np.unique(np.linspace(0, len(pick) - 1, int(max_samples)).round().astype(np.int64))
    split = run_data.dataset.splits[run_data.val_split]
    rows = run_data.val_rows[pick]
    images = _load_images(split, rows)
    got = ImagePredictor(rebuilt.model, batch_size=batch_size)(images)
    expected = expected_all[pick]
    if got.shape != expected.shape:
        raise EquivalenceError(
            f"the rebuilt model gives {got.shape[1]} probabilities per image but the run's predictions have {expected.shape[1]}; "
            "the run's head and config disagree -- retrain the head"
        )
    diff = np.abs(got - expected)
    per_sample = diff.max(axis=1) if len(diff) else np.zeros(0)
    worst = int(np.argmax(per_sample)) if len(per_sample) else 0
    report = EquivalenceReport(
        n=len(pick),
        max_abs_diff=float(per_sample.max()) if len(per_sample) else 0.0,
        worst_id=str(ids_all[pick][worst]) if len(pick) else "",
        n_over=int((per_sample > tolerance).sum()),
        tolerance=float(tolerance),
        top1_agreement=float((got.argmax(1) == expected.argmax(1)).mean()) if len(pick) else 1.0,
    )
    if report.passed:
        return report
    cause = _diagnose(rebuilt, run_data, images, ids_all[pick], cache_dir=cache_dir, batch_size=batch_size)
    raise EquivalenceError(
        f"the rebuilt model does not reproduce the head's cached-feature predictions: max |dp| = {report.max_abs_diff:.3g} "
        f"at validation image {report.worst_id!r} ({report.n_over} of {report.n} images over tolerance {tolerance:g}, "
        f"top-1 agreement {report.top1_agreement:.0%}); likely cause: {cause}"
    )


def _diagnose(rebuilt: Rebuilt, run_data: RunData, images: list[np.ndarray], ids: np.ndarray, *, cache_dir: Any, batch_size: int) -> str:
    """The most likely reason for a mismatch, in words (one line)."""
    from featurecache.cache import store

    spec = rebuilt.spec
    bspec = rebuilt.backbone_spec
    recipe = (
        f"resize {spec['resize']!r} to {spec['input_size']} px, preprocessing {spec['preprocess']!r}, weights {spec['weights']}, "
        f"layer {spec['layer']!r}, pooling {spec['pooling']!r}"
    )
    causes = []
    registry_pre = f"{bspec.module}:{bspec.preprocess}"
    if str(spec["preprocess"]) != registry_pre:
        causes.append(f"the run's preprocessing {spec['preprocess']!r} is not {bspec.name}'s {registry_pre!r}")
    fs = store.find_by_key(store.resolve_cache_dir(cache_dir), str(rebuilt.config["features"].get("key", "")))
    if fs is not None and fs.complete and run_data.val_split in fs.splits:
        index = {str(s): i for i, s in enumerate(fs.ids(run_data.val_split))}
        if all(str(i) in index for i in ids):
            cached = fs.features(run_data.val_split)[[index[str(i)] for i in ids]].astype(np.float64)
            got = ImagePredictor(rebuilt.features, batch_size=batch_size)(images)
            if got.shape == cached.shape:
                delta = float(np.abs(got - cached).max())
                rel = delta / max(float(np.abs(cached).max()), 1e-12)
                if rel > 1e-4:
                    causes.append(f"the rebuilt backbone's features differ from the cached ones (max |dx| {delta:.3g}, relative {rel:.2g}), so {recipe} do not reproduce the extraction")
                else:
                    causes.append("the features match the cache, so the head's Keras conversion differs from its scikit-learn predictions")
            else:
                causes.append(f"the rebuilt backbone gives features of shape {got.shape[1:]} but the cache holds {cached.shape[1:]} ({recipe})")
    if str(spec.get("dtype", "float32")) == "float16":
        causes.append("the features were cached as float16, whose rounding alone moves probabilities by ~1e-3 (pass --tolerance 1e-2)")
    if not causes:
        causes.append(f"different resize, preprocessing or weights than the cached features ({recipe}), or images changed since extraction")
    return "; ".join(causes)


# --------------------------------------------------------------------------------------------
# Unfreezing
# --------------------------------------------------------------------------------------------


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
                raise UsageError(f"--unfreeze {item!r}: N must be an integer from 1 to {len(blocks)} (the model has {len(blocks)} blocks); valid: {valid}")
            chosen.update(blocks[-n:])
        elif item in blocks:
            chosen.add(item)
        elif item in cut_away:
            raise UsageError(f"--unfreeze block {item!r} comes after the run's feature layer, so the model does not contain it; valid: {valid}")
        else:
            raise UsageError(f"--unfreeze got unknown block {item!r}; valid: {valid}")
    return tuple(b for b in blocks if b in chosen)


def unfreeze_blocks(rebuilt: Rebuilt, unfreeze: str) -> dict[str, dict[str, Any]]:
    """Make the chosen backbone blocks and the head trainable, everything else frozen.

    BatchNormalization layers of the backbone always stay frozen (and in inference mode).

    Parameters
    ----------
    rebuilt
        From :func:`rebuild_model`.
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


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _make_trainer(features: Any, head: Any) -> Any:
    """The training-only wrapper: features in inference mode, head in the caller's mode."""
    import keras

    class _Trainer(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="fc_trainer")
            self.fc_features = features
            self.fc_head = head

        def call(self, x: Any, training: bool | None = None) -> Any:
            return self.fc_head(self.fc_features(x, training=False), training=training)

    return _Trainer()


def _image_batches(
    split: Any,
    rows: np.ndarray,
    labels: np.ndarray,
    *,
    size: int,
    resize: str,
    batch_size: int,
    augment: Any,
    seed: int,
    shuffle: bool,
    pool: ThreadPoolExecutor,
) -> Any:
    """A ``PyDataset`` of resized (and, when training, augmented) image batches.

    Images are resized to the model's input size here so that images of any size can share a
    batch; the model's own Resizing layer is then the identity. Undecodable images get sample
    weight 0 instead of failing the epoch.
    """
    import keras

    from featurecache.data import augment_batch, resize_image

    class _Batches(keras.utils.PyDataset):
        def __init__(self) -> None:
            # One worker: per-epoch state (order, augmentation view) must not race ahead.
            super().__init__(workers=1, use_multiprocessing=False)
            self._epoch = 0
            self._order = self._draw()

        def _draw(self) -> np.ndarray:
            if not shuffle:
                return np.arange(len(rows))
            return np.random.default_rng([seed, self._epoch]).permutation(len(rows))

        def __len__(self) -> int:
            return -(-len(rows) // batch_size)

        def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            pos = self._order[idx * batch_size : (idx + 1) * batch_size]
            batch_rows = rows[pos]

            def load(i: int) -> np.ndarray | None:
                try:
                    return resize_image(split.load(int(i)), size, method=resize)
                except ImageDecodeError:
                    return None

            loaded = list(pool.map(load, batch_rows))
            x = np.zeros((len(pos), size, size, 3), dtype=np.float32)
            w = np.ones(len(pos), dtype=np.float32)
            for j, img in enumerate(loaded):
                if img is None:
                    w[j] = 0.0
                else:
                    x[j] = img
            if augment is not None:
                x = augment_batch(x, augment, seed=seed, view=self._epoch + 1, indices=[int(r) for r in batch_rows])
            y = labels[split.labels[batch_rows]].astype(np.int32)
            return x, y, w

        def on_epoch_end(self) -> None:
            self._epoch += 1
            self._order = self._draw()

    return _Batches()


def _make_optimizer(name: str, lr: float) -> Any:
    import keras

    if name == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=lr)
    return keras.optimizers.SGD(learning_rate=lr, momentum=0.9)


def _epoch_printer(stream: Any) -> Any:
    import keras

    class _Printer(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            text = " ".join(f"{k}={v:.4g}" for k, v in (logs or {}).items() if isinstance(v, (int, float)))
            print(f"epoch {epoch + 1}: {text}", file=stream, flush=True)

    return _Printer()


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` produced."""

    out: Path
    model_path: Path
    equivalence: EquivalenceReport
    trainable: dict[str, dict[str, Any]]
    history: dict[str, list[float]]
    metrics: dict[str, Any]
    seconds: float
    savedmodel: Path | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document (metrics without per-class tables)."""
        return {
            "out": str(self.out),
            "model": str(self.model_path),
            "savedmodel": str(self.savedmodel) if self.savedmodel else None,
            "equivalence": self.equivalence.to_json(),
            "trainable": {k: {"layers": len(v["layers"]), "params": v["params"], "batchnorm_frozen": v["batchnorm_frozen"]} for k, v in self.trainable.items()},
            "epochs": len(self.history.get("loss", [])),
            "metrics": {s: _short_metrics(m) for s, m in self.metrics.items()},
            "seconds": round(self.seconds, 3),
        }


def _short_metrics(m: Mapping[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in ("n", "accuracy", "log_loss", "macro_f1", "cohen_kappa", "top_k_accuracy") if k in m}


def finetune(
    run: str | os.PathLike[str],
    *,
    unfreeze: str = "top:1",
    epochs: int = 10,
    out: str | os.PathLike[str] | None = None,
    lr: float = 1e-5,
    optimizer: str = "adam",
    batch_size: int = 32,
    augment: str | None = None,
    patience: int = 3,
    tolerance: float = 1e-4,
    check_samples: int | None = 512,
    data: str | None = None,
    limit: int | None = None,
    weights: str | None = None,
    seed: int = 0,
    savedmodel: bool = False,
    plots: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Rebuild a run as one model, check it reproduces the head, fine-tune it and export it.

    Parameters
    ----------
    run
        A ``train-head`` run directory.
    unfreeze
        Backbone blocks to train: names from the registry (``featurecache backbones --blocks
        NAME``), ``top:N`` (the last N), ``all`` or ``none``; comma-separated. The head always
        trains; BatchNormalization layers never do.
    epochs
        Maximum epochs (early stopping on ``val_loss`` restores the best weights); ``0`` only
        rebuilds, checks and exports.
    out
        Output directory; default ``<run>-ft``.
    lr
        Initial learning rate (reduced on plateau).
    optimizer
        ``adam``, ``rmsprop`` or ``sgd`` (momentum 0.9).
    batch_size
        Images per step.
    augment
        On-the-fly augmentation of training images, extract's syntax (``flip,rotation=10``),
        drawn anew each epoch.
    patience
        Epochs without ``val_loss`` improvement before stopping (0 disables early stopping).
    tolerance
        Equivalence tolerance on probabilities.
    check_samples
        Validation images used by the equivalence check (``None`` = all).
    data
        The run's dataset at another location (default the recorded source).
    limit
        Images per split (default the extraction's ``--limit``).
    weights
        Backbone weights if the run's cannot be found (must have the recorded identity).
    seed
        Seeds the batch order, augmentation and dropout.
    savedmodel
        Also write a TensorFlow SavedModel to ``<out>/savedmodel`` (``model.export``).
    plots
        Write training-curve and confusion-matrix PNGs.
    cache_dir
        Cache root (weights and file-digest memos; diagnosis of a mismatch).
    progress
        Print the check, the trainable layers and one line per epoch on stderr.

    Returns
    -------
    FinetuneResult

    Raises
    ------
    RunError
        The run directory or its head is missing, or the images are not found.
    EquivalenceError
        The rebuilt model does not reproduce the head's predictions (before any training).
    UsageError
        Bad options (unknown block, optimizer, ...) or a head Keras cannot express.
    """
    import keras

    from featurecache.data import AugmentSpec
    from featurecache.train import _jsonable, _write_json

    started = time.perf_counter()
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"--optimizer {optimizer!r} is not one of {choices(OPTIMIZERS)}")
    for name, value, low in (("--epochs", epochs, 0), ("--batch-size", batch_size, 1), ("--patience", patience, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
    if not lr > 0:
        raise UsageError(f"--lr must be > 0, got {lr!r}")
    aug = AugmentSpec.parse(augment)
    log = sys.stderr if progress else None

    rebuilt = rebuild_model(run, weights=weights, cache_dir=cache_dir)
    # Fail on a bad --unfreeze before the (slower) image loading and check.
    trainable = unfreeze_blocks(rebuilt, unfreeze)
    predictions = _read_predictions(rebuilt.run_dir)
    run_data = load_run_data(rebuilt.config, predictions, data=data, limit=limit, cache_dir=cache_dir)
    report = check_equivalence(rebuilt, run_data, predictions, tolerance=tolerance, max_samples=check_samples, batch_size=batch_size, cache_dir=cache_dir)
    if log:
        print(
            f"equivalence: {report.n} validation images, max |dp| {report.max_abs_diff:.2g} <= {tolerance:g}",
            file=log,
        )
        print(_trainable_text(trainable, rebuilt), file=log)

    out_dir = Path(out) if out is not None else rebuilt.run_dir.with_name(rebuilt.run_dir.name + "-ft")
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = rebuilt.spec
    size, resize = int(spec["input_size"]), str(spec["resize"])
    history: dict[str, list[float]] = {}
    best_epoch = None
    ds = run_data.dataset
    train_split, val_split = ds.splits["train"], ds.splits[run_data.val_split]
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1)), thread_name_prefix="fc-ft") as pool:
        if epochs > 0:
            if len(run_data.train_rows) == 0:
                raise UsageError("no training images are left after the validation hold-out; pass --epochs 0 to only rebuild and export, or use more images")
            keras.utils.set_random_seed(int(seed))
            trainer = _make_trainer(rebuilt.features, rebuilt.head)
            trainer.compile(optimizer=_make_optimizer(optimizer, lr), loss="sparse_categorical_crossentropy", weighted_metrics=["accuracy"])
            common = dict(size=size, resize=resize, batch_size=batch_size, seed=int(seed), pool=pool)
            train_data = _image_batches(train_split, run_data.train_rows, run_data.labels, augment=None if aug.is_identity() else aug, shuffle=True, **common)
            val_data = _image_batches(val_split, run_data.val_rows, run_data.labels, augment=None, shuffle=False, **common)
            callbacks: list[Any] = [keras.callbacks.CSVLogger(str(out_dir / "history.csv"))]
            stopper = None
            if patience > 0:
                stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
                callbacks.append(stopper)
                callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.2, patience=max(1, patience // 2), min_lr=lr / 100))
            if log:
                callbacks.append(_epoch_printer(log))
            fitted = trainer.fit(train_data, validation_data=val_data, epochs=epochs, callbacks=callbacks, verbose=0)
            history = {k: [float(v) for v in vals] for k, vals in fitted.history.items()}
            best_epoch = getattr(stopper, "best_epoch", None) if stopper is not None else None

        metrics, preds = _evaluate_run_splits(rebuilt, run_data, batch_size=batch_size, pool=pool)
    model_path = export_model(rebuilt.model, out_dir, savedmodel=savedmodel)
    seconds = time.perf_counter() - started
    _write_json(out_dir / "metrics.json", metrics)
    np.savez(out_dir / "predictions.npz", **preds)
    config = {
        "format": FINETUNE_FORMAT,
        "kind": "finetune",
        "base_run": str(rebuilt.run_dir.absolute()),
        "head": rebuilt.config.get("head"),
        "params": rebuilt.config.get("params"),
        "features": rebuilt.config["features"],
        "classes": list(rebuilt.classes),
        "dataset": {
            "source": data or rebuilt.config["features"].get("dataset_source"),
            "limit": limit if limit is not None else rebuilt.config["features"].get("dataset_limit"),
            "seed": int(spec.get("seed", 0)),
            "validation": run_data.val_split,
            "n_train": len(run_data.train_rows),
            "n_val": len(run_data.val_rows),
        },
        "model": {"file": MODEL_FILE, "input": "RGB uint8/float in [0, 255], any size (resized inside)", "input_size": size, "resize": resize, "preprocess": spec["preprocess"]},
        "equivalence": report.to_json(),
        "unfreeze": unfreeze,
        "trainable": {k: {"layers": len(v["layers"]), "params": v["params"], "batchnorm_frozen": v["batchnorm_frozen"]} for k, v in trainable.items()},
        "trainable_layers": {k: v["layers"] for k, v in trainable.items()},
        "training": {"epochs": epochs, "lr": lr, "optimizer": optimizer, "batch_size": batch_size, "augment": str(aug), "patience": patience, "seed": seed},
        "history": _history_summary(history, best_epoch),
        "metrics": {s: _short_metrics(m) for s, m in metrics.items()},
        "seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
    }
    _write_json(out_dir / "config.json", _jsonable(config))
    if plots:
        from featurecache.report import plot_confusion_matrix, plot_training_curves

        if history.get("loss"):
            plot_training_curves(history, out_dir / "training_curves.png", title=f"fine-tune {rebuilt.backbone_spec.name} ({unfreeze})")
        for split, m in metrics.items():
            plot_confusion_matrix(m["confusion_matrix"], rebuilt.classes, out_dir / f"confusion_{split}.png", title=f"fine-tuned on {split}")
    return FinetuneResult(
        out=out_dir,
        model_path=model_path,
        equivalence=report,
        trainable=trainable,
        history=history,
        metrics=metrics,
        seconds=seconds,
        savedmodel=out_dir / "savedmodel" if savedmodel else None,
    )


def _read_predictions(run_dir: Path) -> dict[str, np.ndarray]:
    path = run_dir / "predictions.npz"
    if not path.is_file():
        raise RunError(f"run {run_dir} has no predictions.npz, which the equivalence check needs; re-run `featurecache train-head --out {run_dir}`")
    with np.load(path, allow_pickle=False) as npz:
        preds = {k: npz[k] for k in npz.files}
    if "val_ids" not in preds or "val_proba" not in preds:
        raise RunError(f"{path} lacks val_ids / val_proba; re-run `featurecache train-head --out {run_dir}`")
    return preds


def _evaluate_run_splits(rebuilt: Rebuilt, run_data: RunData, *, batch_size: int, pool: ThreadPoolExecutor) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from featurecache.metrics import classification_metrics

    ds = run_data.dataset
    predictor = ImagePredictor(rebuilt.model, batch_size=batch_size)
    todo = [("val", ds.splits[run_data.val_split], run_data.val_rows)]
    if "test" in ds.splits:
        todo.append(("test", ds.splits["test"], np.arange(len(ds.splits["test"]))))
    metrics: dict[str, Any] = {}
    preds: dict[str, np.ndarray] = {}
    for name, split, rows in todo:
        proba, ok = predict_rows(predictor, split, rows, pool=pool)
        y = run_data.labels[split.labels[rows]][ok]
        if len(y):
            metrics[name] = classification_metrics(y, proba[ok], classes=rebuilt.classes)
        preds[f"{name}_ids"] = np.asarray([split.ids[int(r)] for r in rows], dtype=str)[ok]
        preds[f"{name}_y"], preds[f"{name}_proba"] = y, proba[ok]
    return metrics, preds


def predict_rows(predictor: ImagePredictor, split: Any, rows: np.ndarray, *, pool: ThreadPoolExecutor) -> tuple[np.ndarray, np.ndarray]:
    """Outputs for ``rows`` of a dataset split, decoded in chunks (memory stays flat).

    Returns
    -------
    tuple of numpy.ndarray
        ``(outputs, ok)``; rows whose image cannot be decoded have ``ok`` False and zero outputs.
    """
    proba = np.zeros((len(rows), *predictor.output_shape))
    ok = np.ones(len(rows), dtype=bool)
    step = predictor.batch_size * 8
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]

        def load(i: int) -> np.ndarray | None:
            try:
                return split.load(int(i))
            except ImageDecodeError:
                return None

        images = list(pool.map(load, chunk))
        good = [j for j, img in enumerate(images) if img is not None]
        ok[start + np.arange(len(chunk))] = [img is not None for img in images]
        if good:
            proba[start + np.asarray(good)] = predictor([images[j] for j in good])
    return proba, ok


def export_model(model: Any, out_dir: Path, *, savedmodel: bool = False) -> Path:
    """Save ``model`` as ``<out_dir>/model.keras`` (uncompiled) and optionally a SavedModel.

    Parameters
    ----------
    model
        The rebuilt (and fine-tuned) model.
    out_dir
        Output directory.
    savedmodel
        Also ``model.export(<out_dir>/savedmodel)`` for TF Serving / TFLite.

    Returns
    -------
    pathlib.Path
        The ``.keras`` file.
    """
    import keras

    path = out_dir / MODEL_FILE
    tmp = out_dir / f".{MODEL_FILE}.{os.getpid()}.tmp.keras"
    try:
        keras.saving.save_model(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if savedmodel:
        model.export(str(out_dir / "savedmodel"), verbose=False)
    return path


def _history_summary(history: Mapping[str, Sequence[float]], best_epoch: int | None) -> dict[str, Any]:
    losses = list(history.get("val_loss", []))
    best = int(best_epoch) if best_epoch is not None else (int(np.argmin(losses)) if losses else None)
    return {
        "epochs_run": len(history.get("loss", [])),
        "best_epoch": None if best is None else best + 1,
        "best_val_loss": float(losses[best]) if losses and best is not None and best < len(losses) else None,
        "final_lr": float(history["learning_rate"][-1]) if history.get("learning_rate") else None,
        "file": "history.csv" if history else None,
    }


def _trainable_text(trainable: Mapping[str, Mapping[str, Any]], rebuilt: Rebuilt) -> str:
    parts = []
    for block, info in trainable.items():
        bn = f", {info['batchnorm_frozen']} BatchNorm frozen" if info["batchnorm_frozen"] else ""
        parts.append(f"{block}: {len(info['layers'])} layers, {info['params']:,} params{bn}")
    total = sum(int(np.prod(w.shape)) for w in rebuilt.model.weights)
    n_train = sum(info["params"] for info in trainable.values())
    return f"trainable ({n_train:,} of {total:,} parameters): " + "; ".join(parts)


def _versions() -> dict[str, str]:
    from featurecache.extract import library_versions

    return library_versions()

