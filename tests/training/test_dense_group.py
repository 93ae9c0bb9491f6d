"""Dense heads trained together (one shared pass) give exactly what each gives trained alone."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from featurecache.errors import UsageError
from featurecache.training.heads import DenseHead
from featurecache.training.heads.dense_group import fit_dense_heads, group_key
from featurecache.training.sweeps.sweep import TrialSpec, parse_grid, plan_work


@pytest.fixture(scope="module")
def raw_digits() -> tuple[np.ndarray, ...]:
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    return X[:1200], y[:1200], X[1200:], y[1200:]


# Configurations that differ in everything a group allows to differ (widths, dropout,
# optimizer, learning rate, L2, BatchNorm, activation, normalize, epochs, patience),
# including one that stops early and so leaves the group before the others.
CONFIGS = [
    dict(hidden="64", dropout=0.2, lr=1e-3, epochs=5, patience=2),
    dict(
        hidden="128-32",
        dropout=0.5,
        lr=3e-3,
        optimizer="rmsprop",
        batchnorm=True,
        epochs=3,
        patience=0,
        activation="gelu",
    ),
    dict(hidden="", dropout=0.0, lr=0.3, optimizer="sgd", l2=1e-3, epochs=4, patience=0, normalize=False),
    dict(hidden="256", dropout=0.0, lr=1e-2, epochs=12, patience=1),  # overfits: stops early
]


def _assert_same(alone: DenseHead, together: DenseHead, X: np.ndarray) -> None:
    np.testing.assert_allclose(together.predict_proba(X), alone.predict_proba(X), rtol=0, atol=1e-6)
    assert together.best_epoch_ == alone.best_epoch_
    assert set(together.history_) == set(alone.history_)
    for k, v in alone.history_.items():
        assert len(together.history_[k]) == len(v), k
        np.testing.assert_allclose(together.history_[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert together.classes_.tolist() == alone.classes_.tolist()


@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_heads_trained_together_equal_heads_trained_alone(
    raw_digits: tuple[np.ndarray, ...], class_weight: str | None
) -> None:
    Xtr, ytr, Xva, yva = raw_digits
    configs = [{**c, "class_weight": class_weight} for c in CONFIGS]
    alone = [DenseHead(**c).fit(Xtr, ytr, X_val=Xva, y_val=yva) for c in configs]
    together = fit_dense_heads([DenseHead(**c) for c in configs], Xtr, ytr, X_val=Xva, y_val=yva)
    assert len(alone[3].history_["loss"]) < 12, "the early-stopping case must actually stop early"
    for a, t in zip(alone, together, strict=True):
        _assert_same(a, t, Xva)


def test_together_with_augmented_views_and_no_validation(raw_digits: tuple[np.ndarray, ...]) -> None:
    Xtr, ytr, Xva, _ = raw_digits
    rng = np.random.default_rng(0)
    views = np.stack([Xtr, Xtr + rng.normal(0, 1, Xtr.shape).astype(np.float32), Xtr[:, ::-1].copy()])
    configs = [dict(hidden="32", epochs=3), dict(hidden="", lr=1e-2, epochs=2)]
    alone = [DenseHead(**c).fit(Xtr, ytr, X_views=views) for c in configs]
    together = fit_dense_heads([DenseHead(**c) for c in configs], Xtr, ytr, X_views=views)
    for a, t in zip(alone, together, strict=True):
        _assert_same(a, t, Xva)
        assert "val_loss" not in t.history_


def test_group_needs_matching_batches() -> None:
    with pytest.raises(UsageError, match="same batch_size, seed"):
        fit_dense_heads([DenseHead(batch_size=32), DenseHead(batch_size=64)], np.zeros((4, 2)), [0, 1, 0, 1])
    with pytest.raises(UsageError, match="DenseHead"):
        fit_dense_heads([object()], np.zeros((4, 2)), [0, 1, 0, 1])  # type: ignore[list-item]
    assert group_key(DenseHead(lr=1, hidden="8")) == group_key(DenseHead(lr=2, dropout=0.1))
    assert group_key(DenseHead(seed=1)) != group_key(DenseHead(seed=2))


def test_plan_work_groups_compatible_dense_trials_only() -> None:
    trials: list[TrialSpec] = [
        *parse_grid("dense:hidden=8,16,32;lr=1e-3,1e-2"),  # 6, one group
        *parse_grid("dense:hidden=8;batch_size=32,128"),  # other batch sizes: their own groups
        *parse_grid("logreg:C=0.1,1"),
    ]
    items = plan_work(trials, workers=1)
    assert sorted(len(i) for i in items) == [1, 1, 1, 1, 6]
    assert all(len(i) == 1 for i in items if i[0].head == "logreg")
    assert sorted(t.id for i in items for t in i) == sorted(t.id for t in trials)
    # With 2 workers the big group is split so both get a share; one-by-one keeps every trial alone.
    assert sorted(len(i) for i in plan_work(trials, workers=2)) == [1, 1, 1, 1, 3, 3]
    assert all(len(i) == 1 for i in plan_work(trials, workers=2, together=False))


def _keras_model_fit(
    head: DenseHead, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray
) -> tuple[np.ndarray, dict, int]:
    """The head trained by Keras's own ``Model.fit`` (what ``DenseHead.fit`` did before it became the group trainer)."""
    import keras

    from featurecache.training.heads.dense_batches import make_view_batches
    from featurecache.training.heads.dense_group import make_optimizer

    prep = head.prepare_fit(X, y, X_val=X_val, y_val=y_val, X_views=None)
    cfg = prep.cfg
    model = head.build_model(prep)
    model.compile(
        optimizer=make_optimizer(cfg["optimizer"], cfg["lr"]),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    stopper = (
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg["patience"], restore_best_weights=True)
        if cfg["patience"]
        else None
    )
    data = make_view_batches(prep.views, prep.y_enc, prep.sample_weight, batch_size=cfg["batch_size"], seed=cfg["seed"])
    fitted = model.fit(
        data,
        epochs=cfg["epochs"],
        validation_data=prep.validation,
        validation_batch_size=max(cfg["batch_size"], 256),
        callbacks=[stopper] if stopper else [],
        verbose=0,
        shuffle=False,
    )
    best = stopper.best_epoch if stopper else len(fitted.history["loss"]) - 1
    return model.predict(X_val, verbose=0), fitted.history, best


@pytest.mark.parametrize(
    "config",
    [{**CONFIGS[1], "class_weight": "balanced"}, {**CONFIGS[3], "l2": 1e-4}],
    ids=["bn-rmsprop-balanced", "adam-l2-early-stop"],
)
def test_dense_fit_equals_keras_model_fit(raw_digits: tuple[np.ndarray, ...], config: dict) -> None:
    # The one loop (a group of one) reproduces Keras's fit to float32 round-off: weights, early
    # stopping, history. (Bit for bit with relu; gelu's kernels differ in the last bits.)
    Xtr, ytr, Xva, yva = raw_digits
    proba, history, best = _keras_model_fit(DenseHead(**config), Xtr, ytr, Xva, yva)
    head = DenseHead(**config).fit(Xtr, ytr, X_val=Xva, y_val=yva)
    np.testing.assert_allclose(head.predict_proba(Xva), proba, rtol=0, atol=1e-6)
    assert head.best_epoch_ == best
    assert set(head.history_) == set(history)
    for k, v in history.items():
        np.testing.assert_allclose(head.history_[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_callbacks_and_verbose_are_called_as_keras_fit_calls_them(
    raw_digits: tuple[np.ndarray, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    import keras

    class Recorder(keras.callbacks.Callback):
        def __init__(self, stop_after: int | None = None) -> None:
            super().__init__()
            self.calls: list[tuple[str, object]] = []
            self.stop_after = stop_after

        def on_train_begin(self, logs=None):
            self.calls.append(("train_begin", None))

        def on_train_batch_end(self, batch, logs=None):
            self.calls.append(("batch", sorted(logs)))

        def on_epoch_end(self, epoch, logs=None):
            self.calls.append(("epoch", (epoch, sorted(logs))))
            if self.stop_after is not None and epoch >= self.stop_after:
                self.model.stop_training = True

        def on_train_end(self, logs=None):
            self.calls.append(("train_end", None))

    Xtr, ytr, Xva, yva = raw_digits
    alone = Recorder(stop_after=1)
    head = DenseHead(hidden="16", epochs=5, patience=0, batch_size=512, verbose=2).fit(
        Xtr, ytr, X_val=Xva, y_val=yva, callbacks=[alone]
    )
    assert len(head.history_["loss"]) == 2, "a callback setting model.stop_training stops the head"
    assert alone.model is head.model_
    epochs = [c[1] for c in alone.calls if c[0] == "epoch"]
    assert epochs == [
        (0, ["accuracy", "loss", "val_accuracy", "val_loss"]),
        (1, ["accuracy", "loss", "val_accuracy", "val_loss"]),
    ]
    assert [c for c in alone.calls if c[0] == "batch"] == [
        ("batch", ["accuracy", "loss"])
    ] * 6  # 3 batches of 512 per epoch
    assert alone.calls[0][0] == "train_begin" and alone.calls[-1][0] == "train_end"
    out = capsys.readouterr().out
    assert out.count("val_loss:") == 2, out  # verbose=2: Keras's one line per epoch

    # In a group, each head's callbacks see that head only; stopping one leaves the other training.
    first, second = Recorder(stop_after=0), Recorder()
    heads = fit_dense_heads(
        [DenseHead(hidden="8", epochs=3, patience=0), DenseHead(hidden="", epochs=3, patience=0)],
        Xtr,
        ytr,
        callbacks=[[first], [second]],
    )
    assert first.model is heads[0].model_ and second.model is heads[1].model_
    assert [len(h.history_["loss"]) for h in heads] == [1, 3]
    with pytest.raises(UsageError, match="one sequence of Keras callbacks per head"):
        fit_dense_heads([DenseHead()], Xtr, ytr, callbacks=[[], []])
