"""train_head on real cached features: accuracy, metrics vs scikit-learn, run directories,
augmented views, and the ``train-head`` / ``heads`` CLI.

Features are extracted once per session (tests/conftest.py; random weights, 32 px): MobileNetV2 as the main
set, VGG19 for the dense head (see ``test_dense_head_on_mobilenetv2_features`` for why).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm
from typer.testing import CliRunner

import featurecache as fc
from featurecache.cache import views
from featurecache.cli.main import app
from featurecache.errors import CacheCorruptError
from featurecache.training.heads import DenseHead, make_head
from featurecache.training.train import (
    TrainResult,
    fit_head,
    load_run,
    load_training_data,
    predict_full_proba,
    train_head,
)
from tests.conftest import DIGITS

N_CLASSES = 10


# In-process lbfgs fits need one BLAS thread on the shared 2-core box (see conftest).
pytestmark = pytest.mark.usefixtures("one_blas_thread")


# ``digits`` (MobileNetV2) and ``digits_cache`` are the session's (tests/conftest.py).
@pytest.fixture(scope="module")
def vgg_digits(digits_features_for) -> views.FeatureSet:
    return digits_features_for(backbone="vgg19").open()


@pytest.fixture(scope="module")
def logreg_run(digits: views.FeatureSet, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return train_head(digits, head="logreg", params={"C": "1"}, out=tmp_path_factory.mktemp("runs") / "logreg")


@pytest.fixture(scope="module")
def dense_run(vgg_digits: views.FeatureSet, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    # No hidden layer and a higher rate: these random-weight features are small (std ~0.01)
    # and the head does not standardise its inputs.
    params = {"hidden": "", "lr": "1e-2", "epochs": "12", "patience": "4"}
    return train_head(vgg_digits, head="dense", params=params, out=tmp_path_factory.mktemp("runs") / "dense")


# ----------------------------------------------------------------------------- accuracy


def test_logreg_is_well_above_chance(logreg_run) -> None:
    # Observed 0.93 val / 0.92 test on random-weight MobileNetV2 at 32 px; chance is 0.1.
    assert logreg_run.metrics["val"]["accuracy"] > 0.8
    assert logreg_run.metrics["test"]["accuracy"] > 0.8
    assert logreg_run.metrics["val"]["cohen_kappa"] > 0.75


def test_dense_head_is_above_chance(dense_run) -> None:
    # Observed ~0.85 on random-weight VGG19 features (0.1 is chance).
    assert dense_run.metrics["val"]["accuracy"] > 0.6
    assert dense_run.metrics["test"]["accuracy"] > 0.6


def test_dense_head_on_mobilenetv2_features(digits: views.FeatureSet, tmp_path: Path) -> None:
    # Random-weight MobileNetV2 features are ~1e-12: only the head's input standardisation
    # (normalize=True, the default) lets it learn; without it the head stays at chance.
    res = train_head(digits, head="dense", params={"epochs": "4", "patience": "0"}, out=tmp_path / "dense", plots=False)
    assert res.metrics["val"]["accuracy"] > 0.5
    raw = train_head(
        digits,
        head="dense",
        params={"epochs": "4", "patience": "0", "normalize": "false"},
        out=tmp_path / "raw",
        plots=False,
    )
    assert raw.metrics["val"]["accuracy"] < 0.3


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. sklearn's "y_prob values do not sum to one"
@pytest.mark.parametrize("which", ["logreg_run", "dense_run"])
def test_metrics_json_agrees_with_sklearn(which: str, request: pytest.FixtureRequest) -> None:
    run = request.getfixturevalue(which)
    saved = json.loads((run.run_dir / "metrics.json").read_text())
    preds = np.load(run.run_dir / "predictions.npz")
    labels = np.arange(N_CLASSES)
    for split in ("val", "test"):
        y, proba = preds[f"{split}_y"], preds[f"{split}_proba"]
        pred = proba.argmax(axis=1)
        m = saved[split]
        assert m["n"] == len(y) == 270
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
        assert m["log_loss"] == pytest.approx(skm.log_loss(y, proba, labels=labels))
        assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
        assert m["cohen_kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred))
        for k in (3, 5):
            assert m["top_k_accuracy"][str(k)] == pytest.approx(skm.top_k_accuracy_score(y, proba, k=k, labels=labels))
        assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    assert saved == run.metrics


# ----------------------------------------------------------------------------- run directory


@pytest.mark.parametrize("which,fs_name", [("logreg_run", "digits"), ("dense_run", "vgg_digits")])
def test_run_directory(which: str, fs_name: str, request: pytest.FixtureRequest) -> None:
    run = request.getfixturevalue(which)
    fs = request.getfixturevalue(fs_name)
    files = {p.name for p in run.run_dir.iterdir()}
    expected = {
        "config.json",
        "metrics.json",
        "predictions.npz",
        "head.json",
        "confusion_val.png",
        "confusion_test.png",
    }
    if run.head == "dense":
        expected |= {"head.keras", "training_curves.png"}
    else:
        expected |= {"head.skops"}
    assert expected <= files, files
    assert not any(f.endswith(".joblib") for f in files)  # no pickles in a run directory
    # The plots are the figures they are named after: a confusion matrix's size grows with the
    # number of classes (one more inch wide for its colour bar), the curves have two panels.
    from PIL import Image

    from featurecache.report.figures import DPI

    side = max(4.0, 0.45 * N_CLASSES + 2.5)
    inches = {
        "confusion_val.png": (side + 1, side),
        "confusion_test.png": (side + 1, side),
        "training_curves.png": (10.0, 3.8),
    }
    for png in (f for f in files if f.endswith(".png")):
        with Image.open(run.run_dir / png) as im:
            assert im.format == "PNG" and im.convert("RGB").getcolors(20) is None, png  # not a blank canvas
            if png in inches:
                assert im.size == (round(inches[png][0] * DPI), round(inches[png][1] * DPI)), png

    config, head = load_run(run.run_dir)
    assert config["features"]["key"] == fs.key
    assert config["features"]["name"] == fs.name
    assert config["classes"] == fs.classes == [str(i) for i in range(N_CLASSES)]
    assert config["head"] == run.head
    assert config["validation"] == "cached val split"
    assert config["params"] == json.loads(json.dumps(run.params))

    # The reloaded head reproduces the saved predictions exactly, on features read afresh.
    preds = np.load(run.run_dir / "predictions.npz")
    for split in ("val", "test"):
        ok = fs.valid(split)
        assert list(preds[f"{split}_ids"]) == [str(i) for i in fs.ids(split)[ok]]
        np.testing.assert_array_equal(
            predict_full_proba(head, fs.features(split)[ok], N_CLASSES), preds[f"{split}_proba"]
        )
        np.testing.assert_array_equal(head.predict(fs.features(split)[ok]), preds[f"{split}_proba"].argmax(axis=1))


def test_rewriting_a_run_directory_drops_stale_plots(vgg_digits: views.FeatureSet, dense_run, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(dense_run.run_dir, out)
    train_head(vgg_digits, head="knn", params={"n_neighbors": "3"}, out=out)
    assert not (out / "training_curves.png").exists()
    assert not (out / "head.keras").exists()
    assert load_run(out)[0]["head"] == "knn"


_KILL_AT_CONFIG = """
import os, signal, sys
import featurecache.training.rundir as rundir
import featurecache.training.train as train

real = rundir.write_json
def write_json(path, obj):
    if path.name == "config.json":  # the head is saved, its config not yet written
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, obj)
rundir.write_json = write_json
train.train_head(sys.argv[1], head="knn", params={"n_neighbors": 3}, out=sys.argv[2], cache_dir=sys.argv[3], plots=False)
"""


def test_sigkill_while_rewriting_a_run_leaves_the_old_run_whole(
    digits: views.FeatureSet, logreg_run, digits_cache: Path, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    shutil.copytree(logreg_run.run_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    env = {**os.environ, "PYTHONPATH": str(Path(fc.__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_AT_CONFIG, digits.key, str(out), str(digits_cache)],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    # The old run is untouched: same files, same bytes, and its config matches its head.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    config, head = load_run(out)
    assert config["head"] == "logreg" and type(head.steps[-1][1]).__name__ == "LogisticRegression"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")]
    assert leftovers  # the killed writer's temp dir: a dot-directory no reader looks at...
    train_head(digits, head="knn", params={"n_neighbors": "3"}, out=out, plots=False)
    assert load_run(out)[0]["head"] == "knn"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")]  # ...removed by the next write


def test_default_run_name_is_stable(digits: views.FeatureSet, tmp_path: Path) -> None:
    a = train_head(digits, head="knn", params={"n_neighbors": "3"}, runs_dir=tmp_path, plots=False)
    b = train_head(digits, head="knn", params={"n_neighbors": 3}, runs_dir=tmp_path, plots=False)
    assert a.run_dir == b.run_dir
    assert a.run_dir.name.startswith(f"knn-{digits.key[:8]}-")


# ----------------------------------------------------------------------------- augmented views


@pytest.fixture(scope="module")
def views_digits(digits_features_for) -> views.FeatureSet:
    return digits_features_for(views=2, augment="rotation=15,zoom=0.1", limit=120).open()


def test_views_stack_for_sklearn_and_validation_uses_view_0(views_digits: views.FeatureSet, tmp_path: Path) -> None:
    fs = views_digits
    assert fs.layout("train").views == 3 and fs.layout("val").views == 1
    data = load_training_data(fs)
    n = fs.layout("train").n
    assert data.X_train_views.shape == (3, n, *fs.feature_shape)
    np.testing.assert_array_equal(data.X_train_views[0], data.X_train)
    assert not np.array_equal(data.X_train_views[1], data.X_train)  # the augmentation changed something
    np.testing.assert_array_equal(data.X_val, fs.features("val", view=0))

    head = fit_head(make_head("logreg"), data)
    assert head.named_steps["scale"].n_samples_seen_ == 3 * n  # all views stacked

    res = train_head(fs, head="logreg", out=tmp_path / "views", plots=False)
    assert res.metrics["val"]["n"] == fs.layout("val").n


def test_dense_head_draws_views(views_digits: views.FeatureSet) -> None:
    data = load_training_data(views_digits)
    params = {"hidden": "16", "epochs": "3", "patience": "0", "seed": "3"}

    def kernel(d) -> np.ndarray:
        est = fit_head(make_head("dense", params), d)
        assert isinstance(est, DenseHead)
        return est.model_.get_layer("head_dense_0").get_weights()[0]

    with_views = kernel(data)
    np.testing.assert_array_equal(with_views, kernel(data))  # draws depend on (seed, epoch) only
    from dataclasses import replace

    clean_only = kernel(replace(data, X_train_views=None))
    assert not np.array_equal(with_views, clean_only)  # the augmented views were trained on


def test_holdout_without_val_split_uses_view_0(cache_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 10)
    x = rng.integers(0, 256, size=(20, 16, 16, 3), dtype=np.uint8)
    x[y == 1] //= 4  # two visibly different classes
    np.savez(tmp_path / "tiny.npz", x=x, y=y)
    res = fc.extract(str(tmp_path / "tiny.npz"), **DIGITS, views=1, augment="flip", cache_dir=cache_dir, progress=False)
    fs = fc.open_features(res.key, cache_dir=cache_dir)
    assert fs.splits == ["train"]
    data = load_training_data(fs, val_fraction=0.25, seed=1)
    assert data.validation == "stratified 0.25 of train (seed 1)"
    assert len(data.X_val) == 5 and len(data.X_train) == 15
    assert data.X_train_views.shape[:2] == (2, 15)
    val_rows = [int(i) for i in data.ids_val]
    np.testing.assert_array_equal(data.X_val, fs.features("train", view=0)[val_rows])
    train_rows = sorted(set(range(20)) - set(val_rows))
    np.testing.assert_array_equal(data.X_train_views, fs.features("train", view=None)[:, train_rows])


# ----------------------------------------------------------------------------- CLI


def _error_line(result) -> str:
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_cli_train_head_json(digits: views.FeatureSet, digits_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-run"
    res = CliRunner().invoke(
        app,
        [
            "train-head",
            "--features",
            digits.key[:12],
            "--head",
            "logreg",
            "--param",
            "C=0.5",
            "--out",
            str(out),
            "--cache",
            str(digits_cache),
            "--json",
            "--no-plots",
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["run_dir"] == str(out) and doc["head"] == "logreg" and doc["params"]["C"] == 0.5
    assert doc["metrics"]["val"]["accuracy"] > 0.8
    assert (out / "head.json").is_file()


def test_cli_train_head_text_by_extract_options(digits: views.FeatureSet, digits_cache: Path, tmp_path: Path) -> None:
    args = [
        "train-head",
        "--data",
        "builtin:digits",
        "--backbone",
        "mobilenetv2",
        "--weights",
        "random",
        "--size",
        "32",
    ]
    res = CliRunner().invoke(
        app, [*args, "--head", "knn", "-p", "n_neighbors=3", "--out", str(tmp_path / "r"), "--cache", str(digits_cache)]
    )
    assert res.exit_code == 0, res.output
    assert (
        "val: accuracy" in res.stdout
        and "test: accuracy" in res.stdout
        and "kappa" in res.stdout
        and "macro F1" in res.stdout
    )
    assert f"run {tmp_path / 'r'}" in res.stdout
    assert json.loads((tmp_path / "r" / "config.json").read_text())["features"]["key"] == digits.key


def test_cli_heads_lists_params() -> None:
    res = CliRunner().invoke(app, ["heads", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert {"logreg", "dense", "knn"} <= set(doc)
    assert doc["dense"]["params"]["hidden"]["default"] == "256"
    assert doc["logreg"]["params"]["C"]["type"] == "float > 0"
    text = CliRunner().invoke(app, ["heads", "dense"])
    assert text.exit_code == 0 and "dropout" in text.stdout


@pytest.mark.parametrize(
    "args,needle,code",
    [
        (["--head", "forest"], "unknown head 'forest'", 2),
        (["--head", "logreg", "-p", "C=abc"], "C='abc' is not a valid float", 2),
        (["--head", "logreg", "-p", "gamma=1"], "has no parameter 'gamma'", 2),
        (["--head", "logreg", "-p", "C"], "is not NAME=VALUE", 2),
    ],
)
def test_cli_train_head_bad_head_or_param(
    digits: views.FeatureSet, digits_cache: Path, args: list[str], needle: str, code: int
) -> None:
    res = CliRunner().invoke(app, ["train-head", "--features", digits.key[:12], "--cache", str(digits_cache), *args])
    assert res.exit_code == code
    assert needle in _error_line(res)


def test_cli_train_head_missing_features(digits_cache: Path) -> None:
    res = CliRunner().invoke(app, ["train-head", "--features", "0123456789ab", "--cache", str(digits_cache)])
    assert res.exit_code == 1
    assert "no feature set '0123456789ab'" in _error_line(res)

    # Named by extract options that were never extracted: the fix is the exact command.
    opts = ["--data", "builtin:digits", "--backbone", "mobilenetv2", "--weights", "random", "--size", "40"]
    res = CliRunner().invoke(app, ["train-head", *opts, "--cache", str(digits_cache)])
    assert res.exit_code == 1
    line = _error_line(res)
    assert f"extract them first: featurecache extract {' '.join(opts)} --cache {digits_cache}" in line

    res = CliRunner().invoke(app, ["train-head", "--cache", str(digits_cache)])
    assert res.exit_code == 2 and "pass --features KEY" in _error_line(res)


def test_cli_train_head_torn_entry(digits: views.FeatureSet, tmp_path: Path) -> None:
    other = tmp_path / "cache2"
    shutil.copytree(digits.path.parent.parent, other)
    (other / "views" / digits.name / "zarr.json").write_text(
        '{"zarr_format": 3, "node_ty'
    )  # torn by a crash or a bad disk
    with pytest.raises(CacheCorruptError, match="cache rm"):
        train_head(digits.name, cache_dir=other)
    res = CliRunner().invoke(app, ["train-head", "--features", digits.name, "--cache", str(other)])
    assert res.exit_code != 0
    assert f"featurecache cache rm {digits.name} --yes" in _error_line(res)


def test_sklearn_heads_fit_with_one_blas_thread(
    digits: views.FeatureSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A BLAS thread per core made one train-head logreg fit 17.6 s instead of 0.6 s on a loaded box.
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_info, threadpool_limits

    seen: list[int] = []
    real_fit = LogisticRegression.fit

    def fit(self, *args, **kwargs):  # noqa: ANN001, ANN202
        seen.extend(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(LogisticRegression, "fit", fit)
    with threadpool_limits(limits=2, user_api="blas"):  # what the CLI starts with on 2 cores
        train_head(digits, head="logreg", params={"max_iter": "50"}, out=tmp_path / "r", plots=False)
        assert seen and set(seen) == {1}
        monkeypatch.setenv("FEATURECACHE_BLAS_THREADS", "2")
        seen.clear()
        train_head(digits, head="logreg", params={"max_iter": "50"}, out=tmp_path / "r", plots=False)
        assert set(seen) == {2}


def test_damaged_features_are_a_one_line_error_naming_the_entry(digits_features_20_copy, tmp_path: Path) -> None:
    cache, res = digits_features_20_copy.cache, digits_features_20_copy.result
    fs = fc.open_features(res.key, cache_dir=cache)
    chunk = next(p for p in (fs.store.path / "v0" / "features").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit: the chunk's CRC32C no longer matches
    chunk.write_bytes(bytes(data))
    result = CliRunner().invoke(
        app, ["train-head", "-f", res.key[:12], "--cache", str(cache), "--out", str(tmp_path / "r")]
    )
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "unexpected" not in lines[0], result.output
    assert fs.name in lines[0] and f"featurecache cache verify {res.key[:12]} --cache {cache}" in lines[0]


def test_unreadable_features_name_the_cache_root_and_every_part_of_a_concatenation(tmp_path: Path) -> None:
    # A torn array document makes Zarr raise a bare ValueError on read. The fix used to name
    # ROOT/views as the cache, and a concatenation (whose path is text) crashed with a traceback.
    cache = tmp_path / "cache"
    keys = [
        fc.extract("builtin:digits", **DIGITS, pooling=p, limit=20, cache_dir=cache, progress=False).key
        for p in ("avg", "max")
    ]
    store_dir = fc.open_features(keys[0], cache_dir=cache).store.path
    (store_dir / "v0" / "features" / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    for ref, named in ((keys[0][:12], keys[:1]), (f"{keys[0]},{keys[1]}", keys)):
        result = CliRunner().invoke(app, ["train-head", "-f", ref, "--cache", str(cache), "--out", str(tmp_path / "r")])
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
        for key in named:
            assert f"`featurecache cache verify {key[:12]} --cache {cache}`" in lines[0], lines[0]


def test_a_class_with_one_image_is_kept_for_training(tmp_path: Path) -> None:
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=6)
    make_image_folder(root, classes=("c",), per_class=1, seed=1)
    res = fc.extract(str(root), **DIGITS, cache_dir=tmp_path / "cache", progress=False)
    fs = fc.open_features(res.key, cache_dir=tmp_path / "cache")
    for seed in range(10):  # held out at random, the single image of c left training 15% of the time
        data = load_training_data(fs, seed=seed)
        assert 2 in data.y_train.tolist() and data.untrained_classes == ()
        assert sorted(set(data.y_val.tolist())) == [0, 1]  # validation stays stratified
    result = CliRunner().invoke(
        app,
        [
            "train-head",
            "-f",
            res.key[:12],
            "--cache",
            str(tmp_path / "cache"),
            "-p",
            "n_neighbors=100000",
            "--head",
            "knn",
            "--out",
            str(tmp_path / "k"),
        ],
    )
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "n_neighbors=100000 exceeds the" in lines[0] and "-p n_neighbors=N" in lines[0]


def test_cli_warns_about_classes_without_training_images(tmp_path: Path) -> None:
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=4, splits=("train", "val"))
    make_image_folder(root, classes=("c",), per_class=2, splits=("val",), seed=2)  # c only in val
    res = fc.extract(str(root), **DIGITS, cache_dir=tmp_path / "cache", progress=False)
    result = CliRunner().invoke(
        app,
        [
            "train-head",
            "-f",
            res.key[:12],
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "r"),
            "--no-plots",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "warning: 1 classes have no valid training image, so the head never predicts them: c" in result.stderr
    assert json.loads((tmp_path / "r" / "config.json").read_text())["untrained_classes"] == ["c"]
