"""Dense heads trained together (one shared pass) give exactly what each gives trained alone."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from featurecache.errors import UsageError
from featurecache.heads import DenseHead
from featurecache.heads.dense_group import fit_dense_heads, group_key
from featurecache.sweep import TrialSpec, parse_grid, plan_work


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, ...]:
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    return X[:1200], y[:1200], X[1200:], y[1200:]


# Configurations that differ in everything a group allows to differ (widths, dropout,
# optimizer, learning rate, L2, BatchNorm, activation, normalize, epochs, patience),
# including one that stops early and so leaves the group before the others.
CONFIGS = [
    dict(hidden="64", dropout=0.2, lr=1e-3, epochs=5, patience=2),
    dict(hidden="128-32", dropout=0.5, lr=3e-3, optimizer="rmsprop", batchnorm=True, epochs=3, patience=0, activation="gelu"),
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
def test_heads_trained_together_equal_heads_trained_alone(digits: tuple[np.ndarray, ...], class_weight: str | None) -> None:
    Xtr, ytr, Xva, yva = digits
    configs = [{**c, "class_weight": class_weight} for c in CONFIGS]
    alone = [DenseHead(**c).fit(Xtr, ytr, X_val=Xva, y_val=yva) for c in configs]
    together = fit_dense_heads([DenseHead(**c) for c in configs], Xtr, ytr, X_val=Xva, y_val=yva)
    assert len(alone[3].history_["loss"]) < 12, "the early-stopping case must actually stop early"
    for a, t in zip(alone, together):
        _assert_same(a, t, Xva)


def test_together_with_augmented_views_and_no_validation(digits: tuple[np.ndarray, ...]) -> None:
    Xtr, ytr, Xva, _ = digits
    rng = np.random.default_rng(0)
    views = np.stack([Xtr, Xtr + rng.normal(0, 1, Xtr.shape).astype(np.float32), Xtr[:, ::-1].copy()])
    configs = [dict(hidden="32", epochs=3), dict(hidden="", lr=1e-2, epochs=2)]
    alone = [DenseHead(**c).fit(Xtr, ytr, X_views=views) for c in configs]
    together = fit_dense_heads([DenseHead(**c) for c in configs], Xtr, ytr, X_views=views)
    for a, t in zip(alone, together):
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
