"""The one training loop of dense heads: a group of them trained in one pass over the features.

``DenseHead.fit`` is :func:`fit_dense_heads` with a group of one, so a head trained alone and
a head trained in a group run the same code. A sweep over dense heads usually varies what
happens *inside* the head (widths, dropout, learning rate, optimizer, L2, ...) while the data
the heads see is the same. Trained one after another, each configuration would pay for its
own pass over the features (reading and gathering every batch) and for its own
``tf.function`` tracing; here every batch is gathered once and fed to all heads in one traced
step, each head with its own optimizer, early stopping, epoch count and Keras callbacks.

What "together" preserves. A head of the group gets exactly what it gets alone: the same
initial weights and dropout seeds (Keras is seeded with the head's ``seed`` just before its
model is built), the same batches in the same order (the batch order and view draw depend
only on ``seed`` and the epoch), the same loss (the summed loss's gradient with respect to
one head's weights is that head's own gradient), the same validation loss and the rule of
Keras's ``EarlyStopping(patience, restore_best_weights=True)``. The tests check that a group
agrees with its heads trained alone, and a head with Keras's own ``Model.fit``, to float32
round-off.

Which heads can share a pass: those with the same ``batch_size``, ``seed``, ``class_weight``
and ``pool`` (see :func:`group_key`) fitted on the same data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from featurecache.errors import UsageError
from featurecache.training.heads.dense_batches import make_view_batches, pooled_moments
from featurecache.training.heads.params import ParamSpec, coerce_params

if TYPE_CHECKING:
    import keras

__all__ = ["GROUP_PARAMS", "FitInputs", "GroupHead", "fit_dense_heads", "group_key", "group_key_of", "make_optimizer"]


@dataclass(frozen=True)
class FitInputs:
    """What a head's ``prepare_fit`` derives from ``fit``'s arguments before any Keras work."""

    cfg: dict[str, Any]  # coerced hyperparameters
    input_shape: tuple[int, ...]
    pool: str  # resolved: avg, flatten or none
    views: Any  # (V, n, *input_shape), NumPy or on-disk
    y_enc: np.ndarray  # int32 codes into classes
    classes: np.ndarray
    validation: tuple[np.ndarray, np.ndarray] | None  # (X_val, encoded y_val)
    sample_weight: np.ndarray | None


@runtime_checkable
class GroupHead(Protocol):
    """What the trainer needs of a head (``DenseHead`` is one); the trainer never imports the class."""

    param_specs: tuple[ParamSpec, ...]

    def get_params(self, deep: bool = True) -> dict[str, Any]: ...

    def prepare_fit(self, X: Any, y: Any, *, X_val: Any, y_val: Any, X_views: Any) -> FitInputs: ...

    def build_model(self, prep: FitInputs, input_norm: tuple[np.ndarray, np.ndarray] | None = None) -> keras.Model: ...

    def set_fitted(
        self, prep: FitInputs, model: keras.Model, history: dict[str, list[float]], best_epoch: int
    ) -> Any: ...


def _coerced(head: GroupHead) -> dict[str, Any]:
    """The head's parameters checked against its own schema (``param_specs``)."""
    return coerce_params("dense", head.param_specs, head.get_params(deep=False))


def group_key(head: GroupHead) -> tuple[Any, ...]:
    """The parameters that must be equal for heads to train in one pass over the data.

    Parameters
    ----------
    head
        An unfitted (or fitted) ``DenseHead``.

    Returns
    -------
    tuple
        ``(batch_size, seed, class_weight, pool)`` after coercion: they decide the batches
        (order, size, sample weights) and the input the heads are fed.

    Raises
    ------
    HeadParamError
        When one of the head's parameters is invalid.
    """
    return group_key_of(_coerced(head))


#: The dense parameters that decide the batches and the input, so must match within a group.
GROUP_PARAMS: tuple[str, ...] = ("batch_size", "seed", "class_weight", "pool")


def group_key_of(params: Any) -> tuple[Any, ...]:
    """:func:`group_key` from already coerced dense parameters (e.g. a sweep trial's)."""
    # A class_weight dict becomes sorted items: the key must be hashable (sweeps group by it).
    return tuple(
        tuple(sorted(params[k].items(), key=str)) if isinstance(params[k], dict) else params[k] for k in GROUP_PARAMS
    )


def fit_dense_heads(
    heads: Sequence[GroupHead],
    X: Any,
    y: Any,
    *,
    X_val: Any = None,
    y_val: Any = None,
    X_views: Any = None,
    callbacks: Sequence[Sequence[Any]] | None = None,
) -> list[Any]:
    """Fit every head of ``heads`` on the same data in one shared training loop.

    Parameters
    ----------
    heads
        ``DenseHead`` estimators with equal :func:`group_key`; their other parameters
        (hidden, dropout, batchnorm, activation, l2, optimizer, lr, epochs, patience,
        normalize, verbose) may all differ.
    X, y, X_val, y_val, X_views
        As for :meth:`DenseHead.fit`.
    callbacks
        One sequence of extra Keras callbacks per head (``keras.callbacks.TensorBoard``, ...),
        called as ``Model.fit`` calls them; a callback setting ``model.stop_training`` stops
        its head. ``None``: none.

    Returns
    -------
    list of DenseHead
        The same objects, fitted: each with ``model_``, ``history_``, ``best_epoch_`` as if it
        had been fitted alone.

    Raises
    ------
    UsageError
        ``heads`` is empty, holds something other than ``DenseHead``, or heads whose
        :func:`group_key` differ; ``callbacks`` does not have one entry per head; or the data
        are invalid (as in ``DenseHead.fit``).
    HeadParamError
        When a head's parameter is invalid.
    """
    heads = list(heads)
    extra = [[] for _ in heads] if callbacks is None else [list(c) for c in callbacks]
    if len(extra) != len(heads):
        raise UsageError(
            f"callbacks has {len(extra)} entries for {len(heads)} heads; pass one sequence of Keras callbacks per head"
        )
    first, preps = _prepare_group(heads, X, y, X_val=X_val, y_val=y_val, X_views=X_views)
    moments = pooled_moments(first.views, first.pool) if any(p.cfg["normalize"] for p in preps) else None
    models = [h.build_model(p, input_norm=moments) for h, p in zip(heads, preps, strict=True)]
    optimizers = [make_optimizer(p.cfg["optimizer"], p.cfg["lr"]) for p in preps]
    for opt, model in zip(optimizers, models, strict=True):
        opt.build(model.trainable_variables)
        # Compiled before training, as Model.fit has it: callbacks read model.optimizer, and the
        # fitted head behaves like one Keras trained.
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        model.stop_training = False
    data = make_view_batches(
        first.views, first.y_enc, first.sample_weight, batch_size=first.cfg["batch_size"], seed=first.cfg["seed"]
    )
    hooks = _callback_lists(models, preps, extra, steps=len(data))
    histories, kept = _train_group(models, optimizers, preps, data, hooks)
    for head, prep, model, hist, best in zip(heads, preps, models, histories, kept, strict=True):
        head.set_fitted(prep, model, hist, best)
    return heads


def _prepare_group(
    heads: list[GroupHead], X: Any, y: Any, *, X_val: Any, y_val: Any, X_views: Any
) -> tuple[FitInputs, list[FitInputs]]:
    """Check the group and its data once; return the shared inputs and each head's (its own hyperparameters)."""
    if not heads:
        raise UsageError("fit_dense_heads needs at least one DenseHead")
    if not all(isinstance(h, GroupHead) for h in heads):
        raise UsageError("fit_dense_heads trains DenseHead estimators only; fit other heads one by one")
    cfgs = [_coerced(h) for h in heads]
    keys = {group_key_of(c) for c in cfgs}
    if len(keys) > 1:
        raise UsageError(
            f"heads trained together need the same batch_size, seed, class_weight and pool, got {sorted(keys, key=str)}; "
            "group them with featurecache.training.heads.dense_group.group_key"
        )
    # The data checks, label encoding and class weights depend only on the group key: do them
    # once, then give every head its own hyperparameters.
    first = heads[0].prepare_fit(X, y, X_val=X_val, y_val=y_val, X_views=X_views)
    return first, [replace(first, cfg=c) for c in cfgs]


def make_optimizer(name: str, lr: float, *, nesterov: bool = True) -> Any:
    """The Keras optimizer named ``name`` (``adam``, ``rmsprop``, else SGD with momentum 0.9, Nesterov's by default).

    Fine-tuning uses it too, with ``nesterov=False`` (plain momentum, as it always has).
    """
    import keras

    if name == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=lr)
    return keras.optimizers.SGD(learning_rate=lr, momentum=0.9, nesterov=nesterov)


def _callback_lists(
    models: Sequence[Any], preps: Sequence[FitInputs], extra: Sequence[list[Any]], *, steps: int
) -> list[Any]:
    """Per head, a ``keras.callbacks.CallbackList`` of its callbacks plus a progress bar when ``verbose`` (as ``Model.fit`` builds it), or ``None``."""
    import keras

    out: list[Any] = []
    for model, prep, cbs in zip(models, preps, extra, strict=True):
        verbose = prep.cfg["verbose"]
        if not cbs and not verbose:
            out.append(None)  # nothing observes this head: skip the per-batch hook calls
            continue
        out.append(
            keras.callbacks.CallbackList(
                cbs, add_progbar=verbose != 0, model=model, verbose=verbose, epochs=prep.cfg["epochs"], steps=steps
            )
        )
    return out


def _train_group(
    models: Sequence[Any], optimizers: Sequence[Any], preps: Sequence[FitInputs], data: Any, hooks: Sequence[Any]
) -> tuple[list[dict[str, list[float]]], list[int]]:
    """Train until every head has run its epochs or stopped; return each head's history and kept epoch."""
    first = preps[0]
    head_loss = _head_loss()
    train_step, val_step = _train_steps(models, optimizers, head_loss), _val_step(models, head_loss)
    validation = first.validation
    val_batches = _val_batches(validation, max(first.cfg["batch_size"], 256))
    ones = np.ones(first.cfg["batch_size"], dtype=np.float32)  # sample weights when there are none
    stoppers = [_EarlyStop(p.cfg["patience"] if validation is not None else 0) for p in preps]
    history: list[dict[str, list[float]]] = [{} for _ in models]
    observed = [i for i, h in enumerate(hooks) if h is not None]
    for i in observed:
        hooks[i].on_train_begin()
    # Keras's fit calls on_epoch_end once before the first epoch (EpochIterator.reset), so a
    # head trained by Model.fit starts on the draw of epoch counter 1: do the same to match it.
    data.on_epoch_end()
    epoch = 0
    while True:
        active = tuple(
            i
            for i, p in enumerate(preps)
            if epoch < p.cfg["epochs"] and not stoppers[i].stopped and not models[i].stop_training
        )
        if not active:
            break
        watching = [(j, hooks[i]) for j, i in enumerate(active) if hooks[i] is not None]
        for _, h in watching:
            h.on_epoch_begin(epoch)
        loss, acc = _train_epoch(train_step(active), data, ones, len(active), watching)
        for j, i in enumerate(active):
            _record(history[i], accuracy=acc[j], loss=loss[j])
        if validation is not None:
            vloss, vacc = _val_epoch(val_step, val_batches, n_heads=len(models), n_val=len(validation[1]))
            for i in active:
                _record(history[i], val_accuracy=vacc[i], val_loss=vloss[i])
                stoppers[i].update(epoch, float(vloss[i]), models[i])
                if hooks[i] is not None:  # Model.fit validates through evaluate, which calls these
                    hooks[i].on_test_begin()
                    hooks[i].on_test_end({"accuracy": float(vacc[i]), "loss": float(vloss[i])})
        for i in active:
            if hooks[i] is not None:
                hooks[i].on_epoch_end(epoch, {k: v[-1] for k, v in history[i].items()})
        epoch += 1
    kept = [s.restore(m, n_epochs=len(h.get("loss", []))) for s, m, h in zip(stoppers, models, history, strict=True)]
    for i in observed:
        hooks[i].on_train_end({k: v[-1] for k, v in history[i].items()})
    return history, kept


def _record(history: dict[str, list[float]], **values: float) -> None:
    """Append one epoch's values to a head's history (keys in ``values`` order, as Keras's)."""
    for k, v in values.items():
        history.setdefault(k, []).append(float(v))


def _head_loss() -> Callable[[Any, Any, Any, Any], Any]:
    """``head_loss(model, y_true, proba, weight)``: the weighted cross-entropy plus the model's L2 losses."""
    import keras
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    def head_loss(model: Any, y_true: Any, proba: Any, weight: Any) -> Any:
        loss = loss_fn(y_true, proba, sample_weight=weight)
        return loss + tf.add_n(model.losses) if model.losses else loss  # L2, as Model.compute_loss adds

    return head_loss


def _train_steps(
    models: Sequence[Any], optimizers: Sequence[Any], head_loss: Callable[..., Any]
) -> Callable[[tuple[int, ...]], Any]:
    """``train_step(active)``: the traced step that trains the heads ``active`` on one batch."""
    import tensorflow as tf

    steps: dict[tuple[int, ...], Any] = {}

    def train_step(active: tuple[int, ...]) -> Any:
        # One traced step per set of still-training heads (it changes only when one stops).
        if active not in steps:
            ms, opts = [models[i] for i in active], [optimizers[i] for i in active]

            @tf.function(reduce_retracing=True)
            def step(x: Any, y_true: Any, weight: Any) -> Any:
                with tf.GradientTape() as tape:
                    probas = [m(x, training=True) for m in ms]
                    losses = [head_loss(m, y_true, p, weight) for m, p in zip(ms, probas, strict=True)]
                    total = tf.add_n(losses)
                variables = [m.trainable_variables for m in ms]
                grads = tape.gradient(total, [v for vs in variables for v in vs])
                at = 0
                for opt, vs in zip(opts, variables, strict=True):
                    opt.apply_gradients(zip(grads[at : at + len(vs)], vs, strict=True))
                    at += len(vs)
                correct = [
                    tf.cast(tf.equal(tf.argmax(p, axis=-1, output_type=tf.int32), y_true), tf.float32) for p in probas
                ]
                # Unweighted, like the accuracy Keras's fit reports with sample weights.
                return tf.stack(losses), tf.stack([tf.reduce_mean(c) for c in correct])

            steps[active] = step
        return steps[active]

    return train_step


def _val_step(models: Sequence[Any], head_loss: Callable[..., Any]) -> Any:
    """The traced step giving every head's validation loss and accuracy on one batch."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def val_step(x: Any, y_true: Any) -> Any:
        probas = [m(x, training=False) for m in models]
        ones = tf.ones_like(y_true, dtype=tf.float32)
        losses = [head_loss(m, y_true, p, ones) for m, p in zip(models, probas, strict=True)]
        correct = [
            tf.reduce_mean(tf.cast(tf.equal(tf.argmax(p, axis=-1, output_type=tf.int32), y_true), tf.float32))
            for p in probas
        ]
        return tf.stack(losses), tf.stack(correct)

    return val_step


def _val_batches(validation: tuple[np.ndarray, np.ndarray] | None, val_batch: int) -> list[tuple[Any, Any]]:
    """Validation batches as tensors once, not once per epoch."""
    import tensorflow as tf

    if validation is None:
        return []
    return [
        (
            tf.convert_to_tensor(validation[0][b : b + val_batch], tf.float32),
            tf.convert_to_tensor(validation[1][b : b + val_batch], tf.int32),
        )
        for b in range(0, len(validation[1]), val_batch)
    ]


def _train_epoch(
    step: Any, data: Any, ones: np.ndarray, n_active: int, watching: Sequence[tuple[int, Any]] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """One epoch of ``step`` over ``data``: each active head's mean loss and accuracy.

    ``watching``: ``(position among the active heads, CallbackList)`` of the heads whose
    callbacks see every batch, with the epoch's running means as Keras's fit logs them.
    """
    import tensorflow as tf

    sums, accs, seen = np.zeros(n_active), np.zeros(n_active), 0
    for b in range(len(data)):
        for _, hook in watching:
            hook.on_train_batch_begin(b)
        batch = data[b]
        xb, yb = batch[0], batch[1]
        wb = batch[2] if len(batch) > 2 else ones[: len(yb)]
        losses, acc = step(
            tf.convert_to_tensor(xb, tf.float32),
            tf.convert_to_tensor(yb, tf.int32),
            tf.convert_to_tensor(wb, tf.float32),
        )
        # Keras's fit averages batch losses and accuracies weighted by batch size.
        sums += losses.numpy() * len(yb)
        accs += acc.numpy() * len(yb)
        seen += len(yb)
        for j, hook in watching:
            hook.on_train_batch_end(b, {"accuracy": float(accs[j] / seen), "loss": float(sums[j] / seen)})
    data.on_epoch_end()
    return sums / max(seen, 1), accs / max(seen, 1)


def _val_epoch(
    val_step: Any, val_batches: Sequence[tuple[Any, Any]], *, n_heads: int, n_val: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every head's validation loss and accuracy, averaged over the rows."""
    vsums, vaccs = np.zeros(n_heads), np.zeros(n_heads)
    for xt, yt in val_batches:
        vl, va = val_step(xt, yt)
        m = int(yt.shape[0])
        vsums += vl.numpy() * m
        vaccs += va.numpy() * m
    return vsums / max(n_val, 1), vaccs / max(n_val, 1)


@dataclass
class _EarlyStop:
    """``EarlyStopping(monitor="val_loss", restore_best_weights=True)`` of one head, as in Keras 3 (``patience`` 0: off)."""

    patience: int
    best: float | None = None
    best_epoch: int = 0
    best_weights: list[np.ndarray] | None = None
    wait: int = 0
    stopped: bool = False

    def update(self, epoch: int, current: float, model: Any) -> None:
        """Record epoch ``epoch``'s validation loss; stop after ``patience`` epochs without a better one."""
        if self.patience <= 0:
            return
        if self.best_weights is None:
            self.best_weights, self.best_epoch = model.get_weights(), epoch
        self.wait += 1
        if self.best is None or current < self.best:
            self.best, self.best_epoch, self.best_weights, self.wait = current, epoch, model.get_weights(), 0
        elif self.wait >= self.patience and epoch > 0:
            self.stopped = True

    def restore(self, model: Any, *, n_epochs: int) -> int:
        """Put the best weights back in ``model``; return the index of the epoch kept."""
        if self.patience > 0 and self.best_weights is not None:
            model.set_weights(self.best_weights)
            return self.best_epoch
        return n_epochs - 1
