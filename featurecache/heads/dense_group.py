"""Train several ``DenseHead`` configurations together, in one pass over the features.

A sweep over dense heads usually varies what happens *inside* the head (widths, dropout,
learning rate, optimizer, L2, ...) while the data the heads see is the same. Trained one
after another, each configuration pays for its own pass over the features (reading and
gathering every batch, a Python loop of ``fit``) and for its own ``tf.function`` tracing.
:func:`fit_dense_heads` trains a group of them in a single loop instead: every batch is
gathered once and fed to all heads in one traced step, each head with its own optimizer,
its own early stopping and its own epoch count.

What "together" preserves. A head of the group gets exactly what ``DenseHead.fit`` would give
it alone: the same initial weights and dropout seeds (Keras is seeded with the head's
``seed`` just before its model is built), the same batches in the same order (the batch
order and view draw depend only on ``seed`` and the epoch), the same loss (the summed loss's
gradient with respect to one head's weights is that head's own gradient), the same
validation loss and ``EarlyStopping(patience, restore_best_weights=True)`` rule. The tests
check that predictions agree with one-at-a-time training to float32 round-off.

Which heads can share a pass: those with the same ``batch_size``, ``seed``, ``class_weight``
and ``pool`` (see :func:`group_key`) fitted on the same data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from featurecache.errors import UsageError
from featurecache.heads.dense import DenseHead, FitInputs, make_optimizer, make_view_batches, pooled_moments

__all__ = ["GROUP_PARAMS", "fit_dense_heads", "group_key", "group_key_of"]


def group_key(head: DenseHead) -> tuple[Any, ...]:
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
    """
    from featurecache.heads.registry import coerce_head_params

    return group_key_of(coerce_head_params("dense", head.get_params(deep=False)))


#: The dense parameters that decide the batches and the input, so must match within a group.
GROUP_PARAMS: tuple[str, ...] = ("batch_size", "seed", "class_weight", "pool")


def group_key_of(params: Any) -> tuple[Any, ...]:
    """:func:`group_key` from already coerced dense parameters (e.g. a sweep trial's)."""
    # A class_weight dict becomes sorted items: the key must be hashable (sweeps group by it).
    return tuple(tuple(sorted(params[k].items(), key=str)) if isinstance(params[k], dict) else params[k] for k in GROUP_PARAMS)


def fit_dense_heads(
    heads: Sequence[DenseHead],
    X: Any,
    y: Any,
    *,
    X_val: Any = None,
    y_val: Any = None,
    X_views: Any = None,
) -> list[DenseHead]:
    """Fit every head of ``heads`` on the same data in one shared training loop.

    Parameters
    ----------
    heads
        ``DenseHead`` estimators with equal :func:`group_key`; their other parameters
        (hidden, dropout, batchnorm, activation, l2, optimizer, lr, epochs, patience,
        normalize) may all differ.
    X, y, X_val, y_val, X_views
        As for :meth:`DenseHead.fit`.

    Returns
    -------
    list of DenseHead
        The same objects, fitted: each with ``model_``, ``history_``, ``best_epoch_`` as if it
        had been fitted alone.

    Raises
    ------
    UsageError
        ``heads`` is empty, holds something other than ``DenseHead``, or heads whose
        :func:`group_key` differ; or the data are invalid (as in ``DenseHead.fit``).
    """
    import keras

    heads = list(heads)
    first, preps = _prepare_group(heads, X, y, X_val=X_val, y_val=y_val, X_views=X_views)
    moments = pooled_moments(first.views, first.pool) if any(p.cfg["normalize"] for p in preps) else None
    models = [h.build_model(p, input_norm=moments) for h, p in zip(heads, preps)]
    optimizers = [make_optimizer(p.cfg["optimizer"], p.cfg["lr"]) for p in preps]
    for opt, model in zip(optimizers, models):
        opt.build(model.trainable_variables)
    batch_size, seed = first.cfg["batch_size"], first.cfg["seed"]
    data = make_view_batches(first.views, first.y_enc, first.sample_weight, batch_size=batch_size, seed=seed)
    head_loss = _head_loss()
    train_step = _train_steps(models, optimizers, head_loss)
    val_step = _val_step(models, head_loss)
    validation = first.validation
    val_batches = _val_batches(validation, max(batch_size, 256))
    ones = np.ones(batch_size, dtype=np.float32)  # sample weights when there are none
    epochs = [p.cfg["epochs"] for p in preps]
    stoppers = [_EarlyStop(p.cfg["patience"] if validation is not None else 0) for p in preps]
    history: list[dict[str, list[float]]] = [{} for _ in heads]

    # Keras's fit calls on_epoch_end once before the first epoch (EpochIterator.reset), so a
    # head fitted alone starts on the draw of epoch counter 1: do the same to match it.
    data.on_epoch_end()
    epoch = 0
    while True:
        active = tuple(i for i in range(len(heads)) if not stoppers[i].stopped and epoch < epochs[i])
        if not active:
            break
        loss, acc = _train_epoch(train_step(active), data, ones, len(active))
        for j, i in enumerate(active):
            history[i].setdefault("accuracy", []).append(float(acc[j]))
            history[i].setdefault("loss", []).append(float(loss[j]))
        if validation is not None:
            vloss, vacc = _val_epoch(val_step, val_batches, n_heads=len(heads), n_val=len(validation[1]))
            for i in active:
                history[i].setdefault("val_accuracy", []).append(float(vacc[i]))
                history[i].setdefault("val_loss", []).append(float(vloss[i]))
                stoppers[i].update(epoch, float(vloss[i]), models[i])
        epoch += 1

    for i, (head, prep) in enumerate(zip(heads, preps)):
        kept = stoppers[i].restore(models[i], n_epochs=len(history[i].get("loss", [])))
        # Compiled like DenseHead.fit leaves it, so the fitted head behaves the same afterwards.
        models[i].compile(optimizer=optimizers[i], loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        head.set_fitted(prep, models[i], history[i], kept)
    return heads


def _prepare_group(heads: list[DenseHead], X: Any, y: Any, *, X_val: Any, y_val: Any, X_views: Any) -> tuple[FitInputs, list[FitInputs]]:
    """Check the group and its data once; return the shared inputs and each head's (its own hyperparameters)."""
    if not heads:
        raise UsageError("fit_dense_heads needs at least one DenseHead")
    if not all(isinstance(h, DenseHead) for h in heads):
        raise UsageError("fit_dense_heads trains DenseHead estimators only; fit other heads one by one")
    from featurecache.heads.registry import coerce_head_params

    cfgs = [coerce_head_params("dense", h.get_params(deep=False)) for h in heads]
    keys = {group_key_of(c) for c in cfgs}
    if len(keys) > 1:
        raise UsageError(
            f"heads trained together need the same batch_size, seed, class_weight and pool, got {sorted(keys, key=str)}; "
            "group them with featurecache.heads.dense_group.group_key"
        )
    # The data checks, label encoding and class weights depend only on the group key: do them
    # once, then give every head its own hyperparameters.
    first = heads[0].prepare_fit(X, y, X_val=X_val, y_val=y_val, X_views=X_views)
    return first, [replace(first, cfg=c) for c in cfgs]


def _head_loss() -> Callable[[Any, Any, Any, Any], Any]:
    """``head_loss(model, y_true, proba, weight)``: the weighted cross-entropy plus the model's L2 losses."""
    import keras
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    def head_loss(model: Any, y_true: Any, proba: Any, weight: Any) -> Any:
        loss = loss_fn(y_true, proba, sample_weight=weight)
        return loss + tf.add_n(model.losses) if model.losses else loss  # L2, as Model.compute_loss adds

    return head_loss


def _train_steps(models: Sequence[Any], optimizers: Sequence[Any], head_loss: Callable[..., Any]) -> Callable[[tuple[int, ...]], Any]:
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
                    losses = [head_loss(m, y_true, p, weight) for m, p in zip(ms, probas)]
                    total = tf.add_n(losses)
                variables = [m.trainable_variables for m in ms]
                grads = tape.gradient(total, [v for vs in variables for v in vs])
                at = 0
                for opt, vs in zip(opts, variables):
                    opt.apply_gradients(zip(grads[at : at + len(vs)], vs))
                    at += len(vs)
                correct = [tf.cast(tf.equal(tf.argmax(p, axis=-1, output_type=tf.int32), y_true), tf.float32) for p in probas]
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
        losses = [head_loss(m, y_true, p, ones) for m, p in zip(models, probas)]
        correct = [tf.reduce_mean(tf.cast(tf.equal(tf.argmax(p, axis=-1, output_type=tf.int32), y_true), tf.float32)) for p in probas]
        return tf.stack(losses), tf.stack(correct)

    return val_step


def _val_batches(validation: tuple[np.ndarray, np.ndarray] | None, val_batch: int) -> list[tuple[Any, Any]]:
    """Validation batches as tensors once, not once per epoch."""
    import tensorflow as tf

    if validation is None:
        return []
    return [
        (tf.convert_to_tensor(validation[0][b : b + val_batch], tf.float32), tf.convert_to_tensor(validation[1][b : b + val_batch], tf.int32))
        for b in range(0, len(validation[1]), val_batch)
    ]


def _train_epoch(step: Any, data: Any, ones: np.ndarray, n_active: int) -> tuple[np.ndarray, np.ndarray]:
    """One epoch of ``step`` over ``data``: each active head's mean loss and accuracy."""
    import tensorflow as tf

    sums, accs, seen = np.zeros(n_active), np.zeros(n_active), 0
    for b in range(len(data)):
        batch = data[b]
        xb, yb = batch[0], batch[1]
        wb = batch[2] if len(batch) > 2 else ones[: len(yb)]
        losses, acc = step(tf.convert_to_tensor(xb, tf.float32), tf.convert_to_tensor(yb, tf.int32), tf.convert_to_tensor(wb, tf.float32))
        # Keras's fit averages batch losses and accuracies weighted by batch size.
        sums += losses.numpy() * len(yb)
        accs += acc.numpy() * len(yb)
        seen += len(yb)
    data.on_epoch_end()
    return sums / max(seen, 1), accs / max(seen, 1)


def _val_epoch(val_step: Any, val_batches: Sequence[tuple[Any, Any]], *, n_heads: int, n_val: int) -> tuple[np.ndarray, np.ndarray]:
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
