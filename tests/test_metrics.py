"""Metrics agree with sklearn.metrics; plots write real PNGs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from featurecache.errors import UsageError
from featurecache.metrics import classification_metrics
from featurecache.report import plot_confusion_matrix, plot_leaderboard, plot_training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _random_predictions(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.5  # better than chance, still plenty of errors
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba


@pytest.mark.parametrize(("n", "k", "seed"), [(300, 7, 0), (50, 3, 1), (500, 12, 2)])
def test_metrics_agree_with_sklearn(n, k, seed):
    y, proba = _random_predictions(n, k, seed)
    classes = [f"class_{i}" for i in range(k)]
    m = classification_metrics(y, proba, classes=classes)
    pred = proba.argmax(axis=1)
    labels = list(range(k))

    assert m["n"] == n
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, proba, labels=labels))
    assert m["cohen_kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    expected_k = [kk for kk in (1, 3, 5) if kk < k]
    assert list(m["top_k_accuracy"]) == [str(kk) for kk in expected_k]
    for kk in expected_k:
        assert m["top_k_accuracy"][str(kk)] == pytest.approx(
            skm.top_k_accuracy_score(y, proba, k=kk, labels=labels)
        )
    assert m["top_k_accuracy"]["1"] == pytest.approx(m["accuracy"])

    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=0
    )
    assert list(m["per_class"]) == classes
    for i, name in enumerate(classes):
        row = m["per_class"][name]
        assert row["precision"] == pytest.approx(precision[i])
        assert row["recall"] == pytest.approx(recall[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["support"] == support[i]


def test_metrics_are_plain_json_and_round_trip():
    y, proba = _random_predictions(100, 6, 3)
    m = classification_metrics(y, proba.astype(np.float32), classes=list("abcdef"))
    assert json.loads(json.dumps(m, allow_nan=False)) == m

    def walk(value):
        if isinstance(value, dict):
            for key, item in value.items():
                assert type(key) is str
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        else:
            assert value is None or type(value) in (int, float, str), type(value)

    walk(m)


def test_metrics_keep_absent_classes():
    # Class 3 never occurs in y or predictions; it still gets a row and a column.
    y = np.array([0, 1, 2, 0, 1, 2])
    proba = np.eye(4)[[0, 1, 2, 0, 2, 2]] * 0.9 + 0.025
    m = classification_metrics(y, proba, classes=["a", "b", "c", "d"], top_k=(1, 2, 5))
    assert len(m["confusion_matrix"]) == 4 and len(m["confusion_matrix"][0]) == 4
    assert m["per_class"]["d"]["support"] == 0
    assert set(m["top_k_accuracy"]) == {"1", "2"}
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, proba, labels=[0, 1, 2, 3]))


def test_metrics_kappa_undefined_is_none():
    y = np.zeros(5, dtype=int)
    proba = np.tile([0.9, 0.1], (5, 1))
    assert classification_metrics(y, proba, classes=["a", "b"])["cohen_kappa"] is None


@pytest.mark.parametrize(
    ("y", "proba", "classes", "match"),
    [
        (np.array([0, 1]), np.full((2, 3), 1 / 3), ["a", "b"], "proba must have shape"),
        (np.array([0, 1, 1]), np.full((2, 2), 0.5), ["a", "b"], "y_true must have shape"),
        (np.array([0, 2]), np.full((2, 2), 0.5), ["a", "b"], "class indices"),
        (np.array([0.0, 1.0]), np.full((2, 2), 0.5), ["a", "b"], "class indices"),
        (np.array([0, 1]), np.array([[2.0, -1.0], [0.3, 0.3]]), ["a", "b"], "summing to 1"),
        (np.array([0, 1]), np.full((2, 2), 0.5), ["a", "a"], "distinct class names"),
    ],
)
def test_metrics_reject_bad_input(y, proba, classes, match):
    with pytest.raises(UsageError, match=match):
        classification_metrics(y, proba, classes=classes)


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion_matrix(tmp_path, normalize):
    y, proba = _random_predictions(200, 5, 4)
    m = classification_metrics(y, proba, classes=list("vwxyz"))
    out = plot_confusion_matrix(
        m["confusion_matrix"], list("vwxyz"), tmp_path / "sub" / "cm.png",
        title="val", normalize=normalize,
    )  # fmt: skip
    assert out == tmp_path / "sub" / "cm.png"
    _assert_png(out)
    with pytest.raises(UsageError, match="cm must have shape"):
        plot_confusion_matrix(m["confusion_matrix"], list("vwx"), tmp_path / "bad.png")


def test_plot_confusion_matrix_many_classes(tmp_path):
    cm = np.random.default_rng(0).integers(0, 5, size=(80, 80))
    _assert_png(plot_confusion_matrix(cm, [f"c{i}" for i in range(80)], tmp_path / "cm.png"))


def test_plot_training_curves(tmp_path):
    history = {
        "loss": [1.2, 0.8, 0.6, 0.5],
        "val_loss": [1.1, 0.9, 0.95, 1.0],
        "accuracy": [0.5, 0.7, 0.8, 0.85],
        "val_accuracy": [0.55, 0.65, 0.66, 0.64],
    }
    _assert_png(plot_training_curves(history, tmp_path / "curves.png", title="dense"))
    _assert_png(plot_training_curves({"loss": [1.0, 0.5]}, tmp_path / "loss_only.png"))
    with pytest.raises(UsageError, match="no loss/accuracy"):
        plot_training_curves({"lr": [0.1]}, tmp_path / "none.png")


def test_plot_leaderboard(tmp_path):
    rng = np.random.default_rng(0)
    heads = ["logreg", "dense", "knn", "linear-svm"]
    rows = [
        {
            "trial": f"t{i:03d}",
            "head": heads[i % 4],
            "val_accuracy": float(rng.uniform(0.6, 0.95)),
            "val_log_loss": float(rng.uniform(0.2, 1.0)),
        }
        for i in range(45)
    ]
    rows.append({"trial": "failed", "head": "dense", "val_accuracy": None})
    _assert_png(plot_leaderboard(rows, tmp_path / "lb.png", top=30))
    _assert_png(plot_leaderboard(rows, tmp_path / "lb_loss.png", metric="val_log_loss", top=5))
    with pytest.raises(UsageError, match="no row has a finite 'test_accuracy'"):
        plot_leaderboard(rows, tmp_path / "x.png", metric="test_accuracy")


def test_leaderboard_plot_of_random_trials_is_readable(tmp_path):
    # What `sweep --trials` labels look like: every drawn parameter, close accuracies near 0.93.
    from featurecache.report.plots import leaderboard_figure

    rng = np.random.default_rng(0)
    rows = [
        {
            "name": f"dense hidden=512-256 batchnorm=true dropout=0.3 l2={rng.uniform(1e-6, 1e-2):.3g} lr={rng.uniform(1e-4, 1e-2):.3g} batch_size=64 class_weight=balanced",
            "head": ("dense", "logreg")[i % 2],
            "val_accuracy": float(rng.uniform(0.92, 0.96)),
        }
        for i in range(20)
    ]
    fig = leaderboard_figure(rows, metric="val_accuracy", top=30)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    assert ax.get_xlim()[0] == 0.0  # not zoomed in on 0.92..0.96
    figure_box = fig.bbox
    title = fig._suptitle.get_window_extent(renderer)
    assert figure_box.x0 <= title.x0 and title.x1 <= figure_box.x1 and title.y1 <= figure_box.y1  # not cut
    labels = [t.get_window_extent(renderer) for t in ax.get_yticklabels()]
    assert all(lb.x0 >= figure_box.x0 for lb in labels)
    assert not any(a.overlaps(b) for a, b in zip(labels, labels[1:]))  # no overlapping labels
    legend = fig.legends[0].get_window_extent(renderer)
    assert not any(legend.overlaps(bar.get_window_extent(renderer)) for bar in ax.patches)
    assert not any(legend.overlaps(lb) for lb in labels)
