"""Turn a fitted head into Keras layers over the features.

How it works
------------
A ``DenseHead`` is already a plain Keras model (``head.keras``); its layers are spliced in.
Linear scikit-learn heads are converted: the ``StandardScaler`` is folded into the weights
(``W/scale``, ``b - W.mean/scale``) and each probability rule becomes layers --

* multinomial logistic regression is ``softmax(z)``;
* one-vs-rest sigmoids normalised to sum 1 (``SGDClassifier(log_loss)``, Platt-calibrated
  margins) are ``softmax(log_sigmoid(z))``, since
  ``exp(log sigmoid(z_i)) / sum_j exp(log sigmoid(z_j)) = sigmoid(z_i) / sum_j sigmoid(z_j)``
  (``-log sigmoid`` is capped where scikit-learn's sigmoid underflows to 0 in the features'
  dtype, reproducing its uniform fallback when every class underflows);
* a binary decision ``z`` is ``softmax([0, z])``;
* ``CalibratedClassifierCV`` averages one such branch per fold (``Average``).

Classes unseen in training get a frozen class-map ``Dense`` (0/1 kernel, ``-1e30`` bias in logit
space), so the output always has one column per run class. Only built-in layers are used, so
the exported model loads with ``safe_mode`` on and without featurecache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from featurecache.errors import RunError, UsageError

__all__ = ["CLASS_MAP_LAYER", "KERAS_EXPRESSIBLE_HEADS", "check_expressible", "keras_head"]

#: Heads that can be turned into Keras layers (and so fine-tuned end to end).
KERAS_EXPRESSIBLE_HEADS: tuple[str, ...] = (
    "dense",
    "logreg",
    "sgd",
    "linear-svm (calibration=sigmoid)",
    "ridge (calibration=sigmoid)",
)

CLASS_MAP_LAYER = "fc_class_map"

# exp(-1e30 - max) underflows to exactly 0 in float32, so a missing class gets probability 0.
_MISSING_LOGIT = -1e30


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
    if coef.ndim == 1:  # a binary RidgeClassifier keeps its one weight vector 1-D
        coef = coef[None]
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
        if len(classes) == 2:
            return [_binary_branch(coef[0], icpt[0], classes)]
        return [_Branch(coef.T, icpt, classes, False)]
    if isinstance(clf, SGDClassifier):
        if clf.loss != "log_loss":
            raise _not_expressible(f"SGDClassifier(loss={clf.loss!r})")
        coef, icpt = _linear(clf)
        if len(classes) == 2:
            return [_binary_branch(coef[0], icpt[0], classes)]
        return [_Branch(coef.T, icpt, classes, True, _underflow(clf.decision_function, coef.shape[1], dtype))]
    if isinstance(clf, CalibratedClassifierCV):
        if clf.method != "sigmoid":
            raise _not_expressible(f"a head calibrated with method={clf.method!r} (only 'sigmoid' is)")
        return [_calibrated_branch(cc, classes, dtype) for cc in clf.calibrated_classifiers_]
    raise _not_expressible(f"a {type(clf).__name__} head")


def _binary_branch(w: np.ndarray, b: float, classes: np.ndarray) -> _Branch:
    """A binary head ``sigmoid(w.x + b)`` as a softmax branch: ``sigmoid(z) = softmax([0, z])[1]``."""
    return _Branch(np.stack([np.zeros_like(w), w], axis=1), np.array([0.0, b]), classes, False)


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
        return _binary_branch(u_w, u_b, classes)
    if coef.shape[0] != len(est_classes) or len(cc.calibrators) != len(est_classes):
        raise _not_expressible("a calibrated head whose folds do not score every class they saw")
    kernel = (-a[:, None] * coef).T
    bias = -(a * icpt + b)
    calibrator = cc.calibrators[0]
    underflow = _underflow(
        lambda x: calibrator.predict(np.asarray(est.decision_function(x)).reshape(len(x), -1)[:, 0]),
        coef.shape[1],
        dtype,
    )
    return _Branch(kernel, bias, est_classes, True, underflow)


def _unpack_pipeline(estimator: Any) -> tuple[bool, Any, Any]:
    """``(flatten, scaler or None, classifier)`` of a head pipeline."""
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    from featurecache.training.heads.sklearn_heads import flatten_features

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


def check_expressible(estimator: Any) -> None:
    """Fail fast, before any backbone is built, if ``estimator`` cannot become Keras layers.

    Parameters
    ----------
    estimator
        A head from a run (``DenseHead`` or a scikit-learn pipeline).

    Raises
    ------
    RunError
        The head is not fitted.
    UsageError
        The head is not Keras-expressible (the message names the heads that are).
    """
    from featurecache.training.heads.dense import DenseHead

    if isinstance(estimator, DenseHead):
        return
    if not hasattr(estimator, "classes_"):
        raise RunError("the run's head is not fitted; re-run `featurecache train-head`")
    _, _, clf = _unpack_pipeline(estimator)
    _sklearn_branches(clf, np.dtype(np.float32))


def keras_head(
    estimator: Any, *, feature_shape: Sequence[int], n_classes: int, feature_dtype: str = "float32"
) -> Callable[[Any], Any]:
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

    from featurecache.training.heads.dense import DenseHead

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
            raise RunError(
                f"the head expects {kernel.shape[0]} features but the rebuilt backbone gives {d}; the run config does not match its head"
            )
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
        chain.append(
            keras.layers.Activation("softmax", name="predictions" if len(branches) == 1 else f"head_proba{suffix}")
        )
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
        raise RunError(
            f"the head predicts class indices {present.tolist()} but the run has {n_classes} classes; retrain the head"
        )
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
        for prev, lyr in zip(head.layers[:-1], chain, strict=True)
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
