"""Keras dense "top model" as a scikit-learn estimator.

``DenseHead`` follows the scikit-learn contract (``__init__`` only stores keyword-only
params, validation in ``fit``, learned attributes end in ``_``, ``fit`` returns ``self``)
so sweeps, ``clone`` and joblib treat it like any sklearn head.

Training is :func:`featurecache.heads.dense_group.fit_dense_heads` with a group of one: a
head trained alone and the heads a sweep trains together share one loop (batches drawing one
view per sample per epoch, early stopping, class weights, callbacks).

The Keras model built here uses only built-in layers with stable names (``head_pool``,
``head_dense_0``, ``head_bn_0``, ``head_act_0``, ``head_dropout_0``, ..., ``predictions``)
so ``finetune`` can splice it onto a backbone and load it with no custom objects.

Keras is imported inside methods: importing this module costs only scikit-learn.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from featurecache.errors import UsageError
from featurecache.training.heads.dense_batches import pooled_moments
from featurecache.training.heads.dense_group import FitInputs, fit_dense_heads
from featurecache.training.heads.dense_params import DENSE_DEFAULTS, DENSE_PARAMS
from featurecache.training.heads.params import ParamSpec, coerce_params

if TYPE_CHECKING:
    import keras

__all__ = [
    "DenseHead",
    "FitInputs",
    "build_dense_model",
    "inference_copy",
    "keras_model_bytes",
    "load_keras_model_bytes",
]


def build_dense_model(
    *,
    input_shape: tuple[int, ...],
    n_classes: int,
    pool: str,
    hidden: tuple[int, ...],
    batchnorm: bool,
    dropout: float,
    activation: str,
    l2: float,
    input_norm: tuple[np.ndarray, np.ndarray] | None = None,
) -> keras.Model:
    """Build the (uncompiled, float32) functional head model.

    Parameters
    ----------
    input_shape
        Feature shape without the batch axis: ``(d,)`` or ``(h, w, c)``.
    n_classes
        Width of the softmax layer ``predictions``.
    pool
        Resolved pooling: ``"avg"`` (GlobalAveragePooling2D), ``"flatten"`` or ``"none"``.
    hidden, batchnorm, dropout, activation, l2
        See ``DenseHead``.
    input_norm
        ``(mean, variance)`` of the pooled training features: standardises them with a frozen
        ``head_input_norm`` BatchNormalization (see ``DenseHead(normalize=...)``).

    Returns
    -------
    keras.Model
        ``head_input -> [head_pool] -> [head_dense_i -> head_bn_i? -> head_act_i ->
        head_dropout_i?]* -> predictions``, model name ``featurecache_head``.
    """
    import keras

    def reg() -> Any:
        return keras.regularizers.L2(l2) if l2 > 0 else None

    inputs = keras.Input(shape=tuple(input_shape), dtype="float32", name="head_input")
    x = inputs
    if pool == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="head_pool", dtype="float32")(x)
    elif pool == "flatten":
        x = keras.layers.Flatten(name="head_pool", dtype="float32")(x)
    if input_norm is not None:
        x = _input_norm_layer(*input_norm)(x)
    for i, width in enumerate(hidden):
        # With BatchNorm right after, a Dense bias is redundant (BN's beta replaces it).
        x = keras.layers.Dense(
            width,
            use_bias=not batchnorm,
            kernel_regularizer=reg(),
            name=f"head_dense_{i}",
            dtype="float32",
        )(x)
        if batchnorm:
            x = keras.layers.BatchNormalization(name=f"head_bn_{i}", dtype="float32")(x)
        x = keras.layers.Activation(activation, name=f"head_act_{i}", dtype="float32")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"head_dropout_{i}", dtype="float32")(x)
    outputs = keras.layers.Dense(
        n_classes,
        activation="softmax",
        kernel_regularizer=reg(),
        name="predictions",
        dtype="float32",
    )(x)
    return keras.Model(inputs, outputs, name="featurecache_head")


def _input_norm_layer(mean: np.ndarray, variance: np.ndarray) -> Any:
    """A frozen BatchNormalization computing ``(x - mean) / sqrt(variance + eps)``.

    Keras's ``Normalization`` layer floors the standard deviation at 1e-7, which leaves
    features of scale 1e-12 (random-weight backbones with many un-normalised layers) at
    scale 1e-5 and the head at chance; here epsilon scales with the data instead. Being a
    non-trainable BatchNormalization it always runs in inference mode, also while the
    whole model is fine-tuned, and it is a built-in layer, so ``head.keras`` still loads in
    plain Keras.
    """
    import keras

    positive = variance[variance > 0]
    eps = float(max(np.median(positive) * 1e-6, 1e-30)) if positive.size else 1e-6
    layer = keras.layers.BatchNormalization(
        center=False, scale=False, epsilon=eps, trainable=False, name="head_input_norm", dtype="float32"
    )
    layer.build((None, int(mean.shape[0])))
    layer.set_weights([mean.astype(np.float32), variance.astype(np.float32)])
    return layer


def keras_model_bytes(model: keras.Model) -> bytes:
    """Serialise a model to the bytes of a ``.keras`` archive (architecture + weights).

    Parameters
    ----------
    model
        Any Keras model built from serialisable layers.

    Returns
    -------
    bytes
        Content of the ``.keras`` zip file; optimizer state is not included.
    """
    import keras

    # keras.saving's public API takes paths only; a private temp dir keeps this
    # safe when several processes (a joblib sweep) serialise at once.
    with tempfile.TemporaryDirectory(prefix="featurecache-head-") as tmp:
        path = os.path.join(tmp, "head.keras")
        keras.saving.save_model(inference_copy(model), path)
        with open(path, "rb") as fh:
            return fh.read()


def load_keras_model_bytes(data: bytes) -> keras.Model:
    """Inverse of ``keras_model_bytes``.

    Parameters
    ----------
    data
        Bytes of a ``.keras`` archive.

    Returns
    -------
    keras.Model
        The model, uncompiled.
    """
    import keras

    with tempfile.TemporaryDirectory(prefix="featurecache-head-") as tmp:
        path = os.path.join(tmp, "head.keras")
        with open(path, "wb") as fh:
            fh.write(data)
        return keras.saving.load_model(path, compile=False)


def inference_copy(model: keras.Model) -> keras.Model:
    """Uncompiled copy with the same layers, names and weights (no optimizer state)."""
    if not getattr(model, "compiled", False):
        return model
    # from_config(get_config()) rather than clone_model: clone_model re-compiles the copy,
    # and a saved compile config would make load_model rebuild an optimizer we never use.
    copy = type(model).from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


@dataclass(frozen=True)
class _SerializedModel:
    """Pickle-time stand-in for ``DenseHead.model_`` (bytes of a ``.keras`` archive)."""

    data: bytes


@dataclass(frozen=True)
class _ShapeOnly:
    """The shape of features ``fit`` does not read (they come through ``X_views``)."""

    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _is_on_disk(X: Any) -> bool:
    """Whether ``X`` is an array-like read on demand (zarr, h5py, streamed features), not NumPy."""
    return not isinstance(X, np.ndarray) and hasattr(X, "shape") and hasattr(X, "dtype")


def _features(X: Any, *, name: str) -> np.ndarray:
    """Validate features as a finite float32 array of rank >= 2."""
    from sklearn.utils.validation import check_array

    try:
        arr = check_array(X, dtype=np.float32, allow_nd=True, ensure_2d=True)
    except ValueError as exc:
        first = str(exc).splitlines()[0].rstrip(":.")
        # scikit-learn's own advice starts "Reshape your data" (its estimator checks look for it).
        fix = (
            "Reshape your data to (n_samples, *feature_shape), e.g. X[None] for one sample"
            if "array, got" in first
            else "pass finite features shaped (n_samples, *feature_shape)"
        )
        raise UsageError(f"{name}: {first}; {fix}") from None
    return arr


def _encode_labels(y: Any, *, x_shape: tuple[int, ...]) -> tuple[Any, np.ndarray]:
    """Check ``y`` holds one class label per row (at least two classes); return the fitted ``LabelEncoder`` and int32 codes."""
    from sklearn.preprocessing import LabelEncoder
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import column_or_1d

    if y is None:  # worded as scikit-learn's check_requires_y_none expects
        raise UsageError("DenseHead requires y to be passed, but the target y is None; pass one class label per sample")
    # A (n, 1) column is accepted with sklearn's DataConversionWarning, like sklearn.
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = column_or_1d(y, warn=True)
    if y.ndim != 1 or y.shape[0] != x_shape[0]:
        raise UsageError(
            f"y must have shape ({x_shape[0]},) to match X {x_shape}, got {y.shape}; pass one label per sample"
        )
    try:
        check_classification_targets(y)
    except ValueError as exc:
        raise UsageError(f"y: {exc}; a head needs class labels (ints or strings), not regression targets") from None
    encoder = LabelEncoder().fit(y)
    y_enc = encoder.transform(y).astype(np.int32)
    if len(encoder.classes_) < 2:
        raise UsageError(
            f"y has only one class {encoder.classes_.tolist()!r}; a classifier head needs at least 2 classes"
        )
    return encoder, y_enc


def _training_views(X: Any, X_views: Any) -> Any:
    """The ``(V, n, *feat)`` array training draws from: ``X_views`` checked against ``X``, else ``X[None]``."""
    if X_views is None:
        return X[None]
    vshape = tuple(getattr(X_views, "shape", ()))
    if len(vshape) != X.ndim + 1 or vshape[1:] != X.shape:
        raise UsageError(
            f"X_views must have shape (V, {', '.join(map(str, X.shape))}), got "
            f"{vshape}; pass views of the same samples as X, view 0 = clean"
        )
    return X_views


def _validation_pair(
    X_val: Any, y_val: Any, *, feature_shape: tuple[int, ...], encoder: Any
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(X_val, encoded y_val)`` checked against the training features and classes, or ``None``."""
    if X_val is None and y_val is None:
        return None
    if X_val is None or y_val is None:
        raise UsageError("pass both X_val and y_val, or neither")
    Xv = _features(X_val, name="X_val")
    if Xv.shape[1:] != feature_shape:
        raise UsageError(
            f"X_val features have shape {Xv.shape[1:]}, X has {feature_shape}; "
            "use features from the same backbone/layer/pooling"
        )
    yv = np.asarray(y_val)
    unseen = sorted(set(yv.tolist()) - set(encoder.classes_.tolist()), key=str)
    if yv.shape != (Xv.shape[0],) or unseen:
        raise UsageError(
            f"y_val must hold one label per X_val row from the training classes; "
            f"got shape {yv.shape}, unseen labels {unseen[:10]!r}"
        )
    return Xv, encoder.transform(yv).astype(np.int32)


def _sample_weights(class_weight: Any, classes: np.ndarray, y_enc: np.ndarray) -> np.ndarray | None:
    """Per-sample weights for ``class_weight`` (``None``, ``"balanced"`` or ``{label: weight}``)."""
    from sklearn.utils.class_weight import compute_class_weight

    if class_weight == "balanced":
        weights = compute_class_weight("balanced", classes=np.arange(len(classes)), y=y_enc).astype(np.float32)
        return weights[y_enc]
    if isinstance(class_weight, dict):
        return _class_weight_dict(class_weight, classes)[y_enc]
    return None


class DenseHead(ClassifierMixin, BaseEstimator):
    """Keras dense top model with the scikit-learn classifier API.

    Parameters
    ----------
    pool : {"auto", "avg", "flatten", "none"}
        How spatial ``(n, h, w, c)`` features are reduced: ``avg`` = GlobalAveragePooling2D,
        ``flatten``; ``auto`` = ``avg`` for 4-D input and ``none`` for 2-D input.
    hidden : tuple of int or str
        Hidden widths, e.g. ``(256, 128)`` or ``"256-128"``; ``()`` / ``""`` = softmax only.
    batchnorm : bool
        BatchNormalization after each hidden Dense.
    dropout : float
        Dropout after each hidden block, in ``[0, 1)``.
    activation : str
        Hidden activation (``relu``, ``gelu``, ...).
    l2 : float
        L2 penalty on every Dense kernel.
    optimizer : {"adam", "rmsprop", "sgd"}
        ``sgd`` uses Nesterov momentum 0.9.
    lr : float
        Learning rate.
    batch_size, epochs : int
        Mini-batch size and maximum number of epochs.
    patience : int
        Early stopping on ``val_loss`` with best weights restored; active only when
        ``patience > 0`` and ``fit`` gets ``X_val``.
    class_weight : None, "balanced" or dict
        ``balanced`` weights samples inversely to class frequency; ``{label: weight}`` weighs
        each class as given (labels not in it weigh 1), as in scikit-learn.
    normalize : bool
        Standardise the pooled input features with the training set's per-feature mean and
        variance (a frozen ``head_input_norm`` layer inside the model, so the saved head and
        the fine-tuned model apply it too). Backbone features differ in scale by orders of
        magnitude between backbones and weights; without it a dense head can sit at chance
        where a scaled logistic regression learns.
    seed : int
        Seeds weight init, dropout (``keras.utils.set_random_seed``) and the batch order /
        view draw.
    verbose : int
        Keras ``fit`` verbosity.

    Attributes
    ----------
    classes_ : ndarray
        Label values, sorted (``LabelEncoder``); ``predict`` returns these.
    model_ : keras.Model
        The trained functional model (input = feature shape, output = softmax).
    history_ : dict[str, list[float]]
        Per-epoch ``loss``, ``accuracy`` and, with validation, ``val_loss``,
        ``val_accuracy``.
    best_epoch_ : int
        Index of the epoch whose weights were kept (the last one without early stopping).
    input_shape_ : tuple[int, ...]
        Feature shape seen in ``fit``.
    n_features_in_ : int
        ``prod(input_shape_)``.
    """

    #: Type, bounds, default and search range of each parameter (read by the head registry);
    #: ``fit`` validates the parameters against them, as scikit-learn's ``_parameter_constraints``.
    param_specs: ClassVar[tuple[ParamSpec, ...]] = DENSE_PARAMS

    def __init__(
        self,
        *,
        pool: str = DENSE_DEFAULTS["pool"],
        hidden: tuple[int, ...] | str = DENSE_DEFAULTS["hidden"],
        batchnorm: bool = DENSE_DEFAULTS["batchnorm"],
        dropout: float = DENSE_DEFAULTS["dropout"],
        activation: str = DENSE_DEFAULTS["activation"],
        l2: float = DENSE_DEFAULTS["l2"],
        optimizer: str = DENSE_DEFAULTS["optimizer"],
        lr: float = DENSE_DEFAULTS["lr"],
        batch_size: int = DENSE_DEFAULTS["batch_size"],
        epochs: int = DENSE_DEFAULTS["epochs"],
        patience: int = DENSE_DEFAULTS["patience"],
        class_weight: str | None = DENSE_DEFAULTS["class_weight"],
        normalize: bool = DENSE_DEFAULTS["normalize"],
        seed: int = DENSE_DEFAULTS["seed"],
        verbose: int = DENSE_DEFAULTS["verbose"],
    ) -> None:
        self.normalize = normalize
        self.pool = pool
        self.hidden = hidden
        self.batchnorm = batchnorm
        self.dropout = dropout
        self.activation = activation
        self.l2 = l2
        self.optimizer = optimizer
        self.lr = lr
        self.batch_size = batch_size
        self.epochs = epochs
        self.patience = patience
        self.class_weight = class_weight
        self.seed = seed
        self.verbose = verbose

    # ------------------------------------------------------------------ fitting

    def fit(
        self,
        X: Any,
        y: Any,
        *,
        X_val: Any = None,
        y_val: Any = None,
        X_views: Any = None,
        callbacks: Sequence[Any] = (),
    ) -> DenseHead:
        """Train the head.

        Parameters
        ----------
        X : array-like of shape (n, *feat)
            Clean features (view 0).
        y : array-like of shape (n,)
            Labels of any hashable type.
        X_val, y_val : array-like, optional
            Validation features/labels (used as given, never augmented); enable early
            stopping when ``patience > 0``.
        X_views : array-like of shape (V, n, *feat), optional
            Views of the same samples (view 0 = clean).  When given, each epoch trains on
            one randomly drawn view per sample instead of on ``X``.  A NumPy array, or an
            on-disk array with ``.shape`` and ``oindex`` / ``[int, sorted int array]``
            indexing (zarr, h5py); it is read one batch at a time and never copied whole.
        callbacks : sequence of keras.callbacks.Callback, optional
            Extra Keras callbacks (e.g. ``keras.callbacks.TensorBoard``), called as
            ``Model.fit`` calls them; they observe training, they are not hyperparameters.

        Returns
        -------
        DenseHead
            ``self``.

        Raises
        ------
        HeadParamError
            When a hyperparameter is invalid.
        UsageError
            When shapes or labels are inconsistent.
        """
        fit_dense_heads([self], X, y, X_val=X_val, y_val=y_val, X_views=X_views, callbacks=[callbacks])
        return self

    def prepare_fit(self, X: Any, y: Any, *, X_val: Any, y_val: Any, X_views: Any) -> FitInputs:
        """Validate ``fit``'s arguments and derive everything training needs (no Keras work).

        The trainer (:func:`featurecache.heads.dense_group.fit_dense_heads`, which ``fit`` calls
        with this head alone) runs it first, then :meth:`build_model`, trains, and calls
        :meth:`set_fitted`.
        """
        cfg = coerce_params("dense", self.param_specs, self.get_params(deep=False))
        if X_views is not None and _is_on_disk(X):
            # Training reads only X_views, batch by batch; X is consulted for its shape alone,
            # so on-disk features larger than memory are never loaded whole (train.py streams so).
            X = _ShapeOnly(tuple(int(d) for d in X.shape))
        else:
            X = _features(X, name="X")
        encoder, y_enc = _encode_labels(y, x_shape=X.shape)
        pool = _resolve_pool(cfg["pool"], X.ndim)
        views = _training_views(X, X_views)
        validation = _validation_pair(X_val, y_val, feature_shape=X.shape[1:], encoder=encoder)
        return FitInputs(
            cfg=cfg,
            input_shape=tuple(int(d) for d in X.shape[1:]),
            pool=pool,
            views=views,
            y_enc=y_enc,
            classes=encoder.classes_,
            validation=validation,
            sample_weight=_sample_weights(cfg["class_weight"], encoder.classes_, y_enc),
        )

    def build_model(self, prep: FitInputs, input_norm: tuple[np.ndarray, np.ndarray] | None = None) -> keras.Model:
        """Seed Keras with ``seed`` and build the untrained model (``input_norm``: precomputed moments)."""
        import keras

        cfg = prep.cfg
        keras.utils.set_random_seed(cfg["seed"])
        if cfg["normalize"] and input_norm is None:
            input_norm = pooled_moments(prep.views, prep.pool)
        return build_dense_model(
            input_shape=prep.input_shape,
            n_classes=len(prep.classes),
            pool=prep.pool,
            hidden=cfg["hidden"],
            batchnorm=cfg["batchnorm"],
            dropout=cfg["dropout"],
            activation=cfg["activation"],
            l2=cfg["l2"],
            input_norm=input_norm if cfg["normalize"] else None,
        )

    def set_fitted(
        self, prep: FitInputs, model: keras.Model, history: dict[str, list[float]], best_epoch: int
    ) -> DenseHead:
        """Store the learned attributes; returns ``self``."""
        self.classes_ = prep.classes
        self.model_ = model
        self.history_ = history
        self.best_epoch_ = int(best_epoch)
        self.input_shape_ = prep.input_shape
        self.n_features_in_ = int(np.prod(self.input_shape_))
        return self

    # ------------------------------------------------------------------ inference

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities.

        Parameters
        ----------
        X : array-like of shape (n, *input_shape_)

        Returns
        -------
        numpy.ndarray
            ``(n, n_classes)`` float64, rows sum to 1, columns ordered as ``classes_``.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            Before ``fit``.
        UsageError
            When the feature shape differs from the one seen in ``fit``.
        """
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "model_")
        X = _features(X, name="X")
        if X.shape[1:] != self.input_shape_:
            # Worded as scikit-learn words it (its estimator checks match "X has N features").
            raise UsageError(
                f"X has {int(np.prod(X.shape[1:]))} features, but DenseHead is expecting {self.n_features_in_} "
                f"features as input (shape {X.shape[1:]}, trained on {self.input_shape_}); "
                "use features from the same backbone/layer/pooling"
            )
        if X.shape[0] == 0:
            return np.zeros((0, len(self.classes_)))
        proba = np.asarray(
            self.model_.predict(X, batch_size=max(int(self.batch_size), 256), verbose=0),
            dtype=np.float64,
        )
        # float32 softmax rows sum to 1 only within ~1e-7; renormalise in float64 so
        # sklearn's log_loss (which checks the sums) accepts them.
        return proba / proba.sum(axis=1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:
        """Most probable label per row (values from ``classes_``).

        Parameters
        ----------
        X : array-like of shape (n, *input_shape_)

        Returns
        -------
        numpy.ndarray
            ``(n,)`` labels.
        """
        proba = self.predict_proba(X)  # first: it raises NotFittedError before classes_ exists
        return self.classes_[np.argmax(proba, axis=1)]

    # ------------------------------------------------------------------ pickling

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        model = state.get("model_")
        if model is not None and not isinstance(model, _SerializedModel):
            state = dict(state)
            state["model_"] = _SerializedModel(keras_model_bytes(model))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        model = state.get("model_")
        if isinstance(model, _SerializedModel):
            state = dict(state)
            state["model_"] = load_keras_model_bytes(model.data)
        super().__setstate__(state)


def _class_weight_dict(weights: dict[Any, float], classes: np.ndarray) -> np.ndarray:
    """Per encoded class, the weight of a ``{label: weight}`` dict (absent labels weigh 1, as in scikit-learn)."""
    known = {c: i for i, c in enumerate(classes.tolist())}
    by_text = {str(c): i for c, i in known.items()}
    out = np.ones(len(classes), dtype=np.float32)
    for label, w in weights.items():
        i = known.get(label, by_text.get(str(label)))  # "3" (from JSON) names label 3
        if i is None:
            raise UsageError(
                f"class_weight names label {label!r}, which is not among the training labels "
                f"{classes.tolist()[:20]!r}; use those labels as keys"
            )
        out[i] = float(w)
    return out


def _resolve_pool(pool: str, ndim: int) -> str:
    """Turn ``pool`` into ``avg``/``flatten``/``none`` for features of rank ``ndim``."""
    if pool == "auto":
        return "avg" if ndim == 4 else ("none" if ndim == 2 else "flatten")
    if pool == "avg" and ndim != 4:
        raise UsageError(
            f"pool='avg' needs spatial features (n, h, w, c), got rank-{ndim} features; use pool=auto, flatten or none"
        )
    if pool == "none" and ndim != 2:
        raise UsageError(
            f"pool='none' needs 2-D features (n, d), got rank-{ndim} features; use pool=avg or pool=flatten"
        )
    return pool
