"""The fine-tuning loop: input pipeline, training wrapper, optimizer and callbacks.

How it works
------------
Keras 3's ``fit`` passes ``training=True`` into every nested layer and overrides the
``training=False`` recorded in a functional graph (keras-team/keras#20285), so we train a small
wrapper (:func:`make_trainer`, never exported) whose ``call`` runs the image->features part with
``training=False`` and only the head with the outer flag: BatchNorm keeps its moving statistics
and backbone dropout stays off. What trains at all is set beforehand by
:mod:`featurecache.finetune.unfreeze`.

Images come from a ``keras.utils.PyDataset`` (:func:`image_batches`) that decodes on a thread
pool and resizes to the model's input size, so images of any size share a batch. Augmentation
runs in this input pipeline (per epoch ``e``, sample ``i`` is augmented from ``(seed, e+1, i)``),
never inside the exported model. Early stopping on ``val_loss`` restores the best weights and
the learning rate is reduced on plateau; ``history.csv`` logs every epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featurecache._runtime.progress import ProgressBar
from featurecache.errors import UsageError
from featurecache.finetuning.inference import draft_of, load_or_none
from featurecache.training.heads.dense_group import make_optimizer

if TYPE_CHECKING:
    from featurecache.finetuning.rebuild import Rebuilt
    from featurecache.finetuning.run_data import RunData

__all__ = ["OPTIMIZERS", "epoch_line", "fit_model", "history_summary", "image_batches", "make_trainer"]

OPTIMIZERS: tuple[str, ...] = ("adam", "rmsprop", "sgd")


def fit_model(
    rebuilt: Rebuilt,
    run_data: RunData,
    *,
    out_dir: Path,
    epochs: int,
    lr: float,
    optimizer: str,
    batch_size: int,
    augment: Any,
    patience: int,
    seed: int,
    pool: ThreadPoolExecutor,
    log: Any,
    callbacks: Sequence[Any] = (),
    before: Mapping[str, float] | None = None,
) -> tuple[dict[str, list[float]], int | None]:
    """Train the unfrozen part of ``rebuilt.model`` in place on the run's training images.

    Parameters
    ----------
    rebuilt
        From :func:`featurecache.finetune.rebuild_model`, after
        :func:`featurecache.finetune.unfreeze_blocks`.
    run_data
        From :func:`featurecache.finetune.load_run_data`: training and validation rows.
    out_dir
        Where ``history.csv`` is written.
    epochs
        Maximum epochs (at least 1).
    lr
        Initial learning rate.
    optimizer
        One of :data:`OPTIMIZERS`.
    batch_size
        Images per step.
    augment
        A ``featurecache.data.AugmentSpec`` for training images, or ``None``.
    patience
        Epochs without ``val_loss`` improvement before stopping; 0 disables early stopping
        and learning-rate reduction.
    seed
        Seeds Keras (weights of new layers, dropout), the batch order and augmentation.
    pool
        Threads that decode images.
    log
        Stream for a progress bar and one line per epoch, or ``None``.
    callbacks
        Extra Keras callbacks (e.g. ``keras.callbacks.TensorBoard``).
    before
        The head's validation metrics before training (``val_loss``, ``val_accuracy``), printed
        as epoch 0.

    Returns
    -------
    history : dict of str to list of float
        Keras' per-epoch logs.
    best_epoch : int or None
        Zero-based epoch whose weights early stopping restored, if it ran.

    Raises
    ------
    UsageError
        No training images are left after the validation hold-out.
    """
    import keras

    if len(run_data.train_rows) == 0:
        raise UsageError(
            "no training images are left after the validation hold-out; pass --epochs 0 to only rebuild and export, or use more images"
        )
    spec = rebuilt.spec
    size, resize = int(spec["input_size"]), str(spec["resize"])
    ds = run_data.dataset
    train_split, val_split = ds.splits["train"], ds.splits[run_data.val_split]
    keras.utils.set_random_seed(int(seed))
    trainer = make_trainer(rebuilt.features, rebuilt.head)
    trainer.compile(
        optimizer=make_optimizer(optimizer, lr, nesterov=False),
        loss="sparse_categorical_crossentropy",
        weighted_metrics=["accuracy"],
    )
    common: dict[str, Any] = dict(
        size=size,
        resize=resize,
        batch_size=batch_size,
        seed=int(seed),
        pool=pool,
        antialias=bool(spec.get("antialias", False)),
        draft=draft_of(spec),
    )
    train_data = image_batches(
        train_split, run_data.train_rows, run_data.labels, augment=augment, shuffle=True, **common
    )
    val_data = image_batches(val_split, run_data.val_rows, run_data.labels, augment=None, shuffle=False, **common)
    extra_callbacks = list(callbacks)
    callbacks = [keras.callbacks.CSVLogger(str(out_dir / "history.csv"))]
    stopper = None
    if patience > 0:
        stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
        callbacks.append(stopper)
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=0.2, patience=max(1, patience // 2), min_lr=lr / 100
            )
        )
    callbacks.extend(extra_callbacks)
    with ProgressBar(bool(log), epochs * len(train_data), "fine-tune") as bar:
        if log and before:
            bar.line(epoch_line(0, epochs, before) + " (the head)", log)
        if log:
            callbacks.append(_epoch_printer(bar, log, epochs))
        fitted = trainer.fit(train_data, validation_data=val_data, epochs=epochs, callbacks=callbacks, verbose=0)
    history = {k: [float(v) for v in vals] for k, vals in fitted.history.items()}
    best_epoch = getattr(stopper, "best_epoch", None) if stopper is not None else None
    return history, best_epoch


def make_trainer(features: Any, head: Any) -> Any:
    """The training-only wrapper: features in inference mode, head in the caller's mode.

    Parameters
    ----------
    features
        Images -> features (``Rebuilt.features``).
    head
        Features -> probabilities (``Rebuilt.head``); shares its layers with the exported model,
        so training the wrapper trains the model.

    Returns
    -------
    keras.Model
        Named ``fc_trainer``; compile and fit it, never export it.
    """
    import keras

    class _Trainer(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="fc_trainer")
            self.fc_features = features
            self.fc_head = head

        def call(self, x: Any, training: bool | None = None) -> Any:
            return self.fc_head(self.fc_features(x, training=False), training=training)

    return _Trainer()


def image_batches(
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
    antialias: bool = False,
    draft: int | None = None,
) -> Any:
    """A ``PyDataset`` of resized (and, when training, augmented) image batches.

    Images are resized to the model's input size here so that images of any size can share a
    batch; the model's own Resizing layer is then the identity. Undecodable images get sample
    weight 0 instead of failing the epoch. ``antialias`` and ``draft`` (the decode size under
    ``decode="fast"``) reproduce how the cached features were made.
    """
    import keras

    from featurecache.data import augment_batch, resize_image

    def load(i: int) -> np.ndarray | None:
        img = load_or_none(split, i, draft=draft)
        return None if img is None else resize_image(img, size, method=resize, antialias=antialias)

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


# Short names keep an epoch's line within 80 columns.
_SHORT = {"loss": "loss", "accuracy": "acc", "val_loss": "val_loss", "val_accuracy": "val_acc", "learning_rate": "lr"}


def epoch_line(epoch: int, epochs: int, logs: Mapping[str, Any]) -> str:
    """``epoch 2/10  loss 0.4312  acc 0.875  val_loss 0.512  val_acc 0.833  lr 1e-05`` (known keys only)."""
    parts = [f"epoch {epoch}/{epochs}"]
    for key, short in _SHORT.items():
        value = logs.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            text = (
                f"{value:.0e}"
                if key == "learning_rate"
                else f"{value:.3f}"
                if key.endswith("accuracy")
                else f"{value:.4g}"
            )
            parts.append(f"{short} {text}")
    return "  ".join(parts)


def _epoch_printer(bar: ProgressBar, stream: Any, epochs: int) -> Any:
    """Advance ``bar`` per step and print one :func:`epoch_line` per epoch above it."""
    import keras

    class _Printer(keras.callbacks.Callback):
        epoch = 0

        def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            self.epoch = epoch

        def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
            bar.advance(1, status=f"epoch {self.epoch + 1}/{epochs}")

        def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            bar.line(epoch_line(epoch + 1, epochs, logs or {}), stream)

    return _Printer()


def history_summary(history: Mapping[str, Sequence[float]], best_epoch: int | None) -> dict[str, Any]:
    """What ``config.json`` records of a training history.

    Parameters
    ----------
    history
        From :func:`fit_model` (empty when nothing was trained).
    best_epoch
        Zero-based epoch early stopping restored, or ``None`` (then the lowest ``val_loss``).

    Returns
    -------
    dict
        ``epochs_run``, ``best_epoch`` (one-based), ``best_val_loss``, ``final_lr``, ``file``.
    """
    losses = list(history.get("val_loss", []))
    best = int(best_epoch) if best_epoch is not None else (int(np.argmin(losses)) if losses else None)
    return {
        "epochs_run": len(history.get("loss", [])),
        "best_epoch": None if best is None else best + 1,
        "best_val_loss": float(losses[best]) if losses and best is not None and best < len(losses) else None,
        "final_lr": float(history["learning_rate"][-1]) if history.get("learning_rate") else None,
        "file": "history.csv" if history else None,
    }
