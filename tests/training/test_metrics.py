"""Metrics agree with sklearn.metrics; plots show what they claim (titles, labels, data) in PNGs of the right size."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from featurecache.errors import UsageError
from featurecache.report import plot_confusion_matrix, plot_leaderboard, plot_training_curves
from featurecache.training.metrics import classification_metrics, wilson_interval


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
        assert m["top_k_accuracy"][str(kk)] == pytest.approx(skm.top_k_accuracy_score(y, proba, k=kk, labels=labels))
    assert m["top_k_accuracy"]["1"] == pytest.approx(m["accuracy"])

    precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
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


def _assert_png(path, fig_size: tuple[float, float]) -> None:
    """``path`` is a PNG of ``fig_size`` inches at the report DPI, with more than a blank page in it."""
    from PIL import Image

    from featurecache.report.figures import DPI

    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (round(fig_size[0] * DPI), round(fig_size[1] * DPI))
        assert im.convert("RGB").getcolors(20) is None  # over 20 colours (text, colour maps, lines): not a blank canvas


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion_matrix(tmp_path, normalize):
    from featurecache.report.plots import confusion_figure

    y, proba = _random_predictions(200, 5, 4)
    m = classification_metrics(y, proba, classes=list("vwxyz"))
    cm = np.asarray(m["confusion_matrix"], dtype=float)
    out = plot_confusion_matrix(
        m["confusion_matrix"], list("vwxyz"), tmp_path / "sub" / "cm.png",
        title="val", normalize=normalize,
    )  # fmt: skip
    assert out == tmp_path / "sub" / "cm.png"
    _assert_png(out, (5.75, 4.75))  # 5 classes: 0.45 * 5 + 2.5 inches high, one more wide for the colour bar

    fig = confusion_figure(m["confusion_matrix"], list("vwxyz"), title="val", normalize=normalize)
    ax, _colourbar = fig.axes
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("val", "predicted", "true")
    assert [t.get_text() for t in ax.get_xticklabels()] == list("vwxyz") == [t.get_text() for t in ax.get_yticklabels()]
    shown = cm / cm.sum(axis=1, keepdims=True) if normalize else cm
    np.testing.assert_allclose(ax.images[0].get_array(), shown)
    expected = [f"{v:.2f}" if normalize else f"{int(v)}" for v in shown.ravel()]
    assert _texts(ax) == expected  # one annotation per cell, row by row
    untitled = confusion_figure(m["confusion_matrix"], list("vwxyz"), normalize=normalize).axes[0].get_title()
    assert untitled == ("confusion matrix (row-normalised)" if normalize else "confusion matrix")
    with pytest.raises(UsageError, match="cm must have shape"):
        plot_confusion_matrix(m["confusion_matrix"], list("vwx"), tmp_path / "bad.png")


def test_plot_confusion_matrix_many_classes(tmp_path):
    from featurecache.report.plots import confusion_figure

    cm = np.random.default_rng(0).integers(0, 5, size=(80, 80))
    names = [f"c{i}" for i in range(80)]
    _assert_png(plot_confusion_matrix(cm, names, tmp_path / "cm.png"), (31.0, 30.0))  # capped at 30 inches
    (ax, _) = confusion_figure(cm, names).axes
    # Beyond 60 classes names and numbers would overlap into noise: the heat map alone.
    assert _texts(ax) == [] and [t.get_text() for t in ax.get_xticklabels()] != names
    assert ax.images[0].get_array().shape == (80, 80)


def test_plot_training_curves(tmp_path):
    from featurecache.report.plots import training_curves_figure

    history = {
        "loss": [1.2, 0.8, 0.6, 0.5],
        "val_loss": [1.1, 0.9, 0.95, 1.0],
        "accuracy": [0.5, 0.7, 0.8, 0.85],
        "val_accuracy": [0.55, 0.65, 0.66, 0.64],
    }
    _assert_png(plot_training_curves(history, tmp_path / "curves.png", title="dense"), (10.0, 3.8))
    fig = training_curves_figure(history, title="dense")
    assert fig.get_suptitle() == "dense"
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes] == [("epoch", "loss"), ("epoch", "accuracy")]
    for ax, metric in zip(fig.axes, ("loss", "accuracy"), strict=True):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"training", "validation", "best epoch 2"}  # val_loss is lowest at epoch 2
        np.testing.assert_array_equal(lines["training"].get_xdata(), [1, 2, 3, 4])
        np.testing.assert_array_equal(lines["training"].get_ydata(), history[metric])
        np.testing.assert_array_equal(lines["validation"].get_ydata(), history[f"val_{metric}"])
        np.testing.assert_array_equal(lines["best epoch 2"].get_xdata(), [2, 2])
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["training", "validation", "best epoch 2"]

    _assert_png(plot_training_curves({"loss": [1.0, 0.5]}, tmp_path / "loss_only.png"), (5.0, 3.8))
    (ax,) = training_curves_figure({"loss": [1.0, 0.5]}).axes
    assert [line.get_label() for line in ax.get_lines()] == ["training"] and ax.get_ylabel() == "loss"
    with pytest.raises(UsageError, match="no loss/accuracy"):
        plot_training_curves({"lr": [0.1]}, tmp_path / "none.png")


def test_plot_leaderboard(tmp_path):
    from featurecache.report.plots import leaderboard_figure

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
    path = plot_leaderboard(rows, tmp_path / "lb.png", top=30)
    _assert_png(path, (10.0, 1.6 + 0.2 * 30 + 0.1 * 30))  # one line of label per trial
    for metric, top in (("val_accuracy", 30), ("val_log_loss", 5)):
        fig = leaderboard_figure(rows, metric=metric, top=top)
        (ax,) = fig.axes
        lower_is_better = metric == "val_log_loss"
        best = sorted(rows[:45], key=lambda r: r[metric], reverse=not lower_is_better)[:top]
        assert fig.get_suptitle() == f"top {top} of 45 trials by {metric}"  # the failed trial is left out
        left = ax.get_xlim()[0]
        assert (
            ax.get_xlabel()
            == metric + (" (lower is better)" if lower_is_better else "") + f" (axis starts at {left:.3g}, not 0)"
        )
        assert [t.get_text() for t in ax.get_yticklabels()] == [r["trial"] for r in best]
        np.testing.assert_allclose([bar.get_width() for bar in ax.patches], [r[metric] for r in best])
        assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == sorted({r["head"] for r in best})
    _assert_png(
        plot_leaderboard(rows, tmp_path / "lb_loss.png", metric="val_log_loss", top=5), (10.0, 1.6 + 0.2 * 5 + 0.1 * 5)
    )
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
    # Zoomed in on 0.92..0.96 (from 0 the differences vanished), and the axis label says so.
    assert 0.9 < ax.get_xlim()[0] < min(r["val_accuracy"] for r in rows) and "axis starts at" in ax.get_xlabel()
    figure_box = fig.bbox
    title = fig._suptitle.get_window_extent(renderer)
    assert figure_box.x0 <= title.x0 and title.x1 <= figure_box.x1 and title.y1 <= figure_box.y1  # not cut
    labels = [t.get_window_extent(renderer) for t in ax.get_yticklabels()]
    assert all(lb.x0 >= figure_box.x0 for lb in labels)
    assert not any(a.overlaps(b) for a, b in zip(labels, labels[1:], strict=False))  # no overlapping labels
    legend = fig.legends[0].get_window_extent(renderer)
    assert not any(legend.overlaps(bar.get_window_extent(renderer)) for bar in ax.patches)
    assert not any(legend.overlaps(lb) for lb in labels)


def test_wilson_interval_matches_the_textbook_values() -> None:
    # Wilson (1927) / Newcombe (1998) table: 5 of 10 -> 0.2366-0.7634; 0 of 20 -> 0-0.1611.
    assert wilson_interval(0.5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert wilson_interval(0.0, 20) == pytest.approx((0.0, 0.161125), abs=1e-6)
    # 48 of 48: not a point; one image is 0.02, and the interval is wider than that.
    low, high = wilson_interval(1.0, 48)
    assert high == 1.0 and low == pytest.approx(48 / (48 + 1.959963984540054**2))
    assert wilson_interval(47 / 48, 48)[1] > low  # 47/48 cannot be told apart from 48/48
    for bad in ((0.5, 0), (1.5, 10), (0.5, 2.5)):
        with pytest.raises(UsageError):
            wilson_interval(*bad)


def test_leaderboard_plot_shows_intervals_zoomed_with_even_bars(tmp_path):
    """48 validation images: five trials tie at 1.0; the plot shows why a ranking among them is noise."""
    from featurecache.report.plots import leaderboard_figure

    accs = [1.0] * 5 + [47 / 48, 46 / 48, 40 / 48]
    rows = [
        {
            "name": f"dense hidden=none dropout=0.{i} lr=0.001 epochs=30 patience=3 optimizer=adam batchnorm=false"
            if i % 2
            else f"logreg C={i}",
            "head": ("logreg", "dense")[i % 2],
            "trial": f"t{i}",
            "val_accuracy": a,
            "val_n": 48,
            "status": "ok",
        }
        for i, a in enumerate(accs)
    ]
    assert plot_leaderboard(rows, tmp_path / "lb.png").is_file()
    fig = leaderboard_figure(rows, metric="val_accuracy", top=30)
    (ax,) = fig.axes
    left, right = ax.get_xlim()
    assert (
        0.6 < left < 40 / 48 and right > 1.0 and "axis starts at" in ax.get_xlabel() and "48 images" in ax.get_xlabel()
    )
    bars = ax.patches
    assert len({round(bar.get_height(), 9) for bar in bars}) == 1  # one thickness, however many lines a label has
    assert [t.get_text().strip() for t in ax.texts] == [f"{a:.4f}" for a in accs]  # 1.0000 next to 0.9792
    assert not any(t.get_text().endswith("hidden=") or "hidden= " in t.get_text() for t in ax.get_yticklabels())
    # Error bars: one interval per trial, from the Wilson bounds.
    (bars_x,) = [c for c in ax.collections]
    segments = bars_x.get_segments()
    assert len(segments) == len(accs)
    assert segments[0][0][0] == pytest.approx(wilson_interval(1.0, 48)[0])
    # Faded: the trials whose interval misses the best one's (only 40/48 here).
    faded = [bar.get_facecolor()[3] < 1 for bar in bars]
    assert faded == [wilson_interval(a, 48)[1] < wilson_interval(1.0, 48)[0] for a in accs]
