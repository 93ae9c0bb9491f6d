"""Stage 3: rebuild equals the head, tampering is caught, only the unfrozen block trains, the export stands alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import plain_keras_proba

import featurecache as fc
from featurecache.errors import EquivalenceError, FeatureCacheWarning, UsageError
from featurecache.finetuning.finetune import (
    EquivalenceReport,
    _make_trainer,
    check_equivalence,
    load_run_data,
    preprocess_layers,
    rebuild_model,
    resolve_unfreeze,
)

LIMIT = 20  # images per split of builtin:digits: 10 classes x 2
SIZE = 32


@pytest.fixture(scope="module")
def ft_env(tmp_path_factory: pytest.TempPathFactory, digits_features_for) -> dict[str, Path | str]:
    """One cached digits feature set (MobileNetV2 has BatchNorm) and a few heads trained on it."""
    from featurecache.training.train import train_head

    root = tmp_path_factory.mktemp("ft")
    features = digits_features_for(backbone="mobilenetv2", size=SIZE, limit=LIMIT)  # the session's: read only
    cache, res = features.cache, features.result
    runs = {}
    for head, params in (
        ("logreg", {}),
        ("dense", {"hidden": "16", "epochs": 2, "dropout": 0.0}),
        ("sgd", {}),
        ("ridge", {"cv": 2}),
    ):
        runs[head] = train_head(
            res.key, head=head, params=params, out=root / "runs" / head, cache_dir=cache, plots=False
        ).run_dir
    return {"root": root, "cache": cache, "key": res.key, **{f"run_{h}": p for h, p in runs.items()}}


def _predictions(run: Path) -> dict[str, np.ndarray]:
    with np.load(run / "predictions.npz") as npz:
        return {k: npz[k] for k in npz.files}


def _check(run: Path, cache: Path, **kw: object) -> EquivalenceReport:
    rebuilt = rebuild_model(run, cache_dir=cache)
    preds = _predictions(run)
    data = load_run_data(rebuilt.config, preds, cache_dir=cache)
    return check_equivalence(rebuilt, data, preds, cache_dir=cache, **kw)


# ------------------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    "mode,module,exact",
    [
        ("tf", "mobilenet_v2", False),
        ("torch", "densenet", False),
        ("caffe", "vgg16", True),
        ("none", "efficientnet", True),
    ],
)
def test_preprocess_layers_equal_keras_preprocess_input(mode: str, module: str, exact: bool) -> None:
    import keras

    x = np.random.default_rng(0).uniform(0, 255, size=(2, 9, 7, 3)).astype(np.float32)
    expected = getattr(keras.applications, module).preprocess_input(x.copy())
    got = x
    for layer in preprocess_layers(mode):
        got = layer(got)
    got = np.asarray(got)
    if exact:
        assert np.array_equal(got, expected)  # caffe: a 0/1 permutation kernel and a bias add
    else:
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_resolve_unfreeze() -> None:
    blocks = ["stem", "block_1", "block_2", "top"]
    assert resolve_unfreeze("top:2", blocks) == ("block_2", "top")
    assert resolve_unfreeze("top, block_1", blocks) == ("block_1", "top")
    assert resolve_unfreeze("all", blocks) == ("all",)
    assert resolve_unfreeze("none", blocks) == ()
    with pytest.raises(UsageError, match=r"unknown block 'block9'.*'block_1'.*'top:N' \(N = 1\.\.4\)"):
        resolve_unfreeze("block_1,block9", blocks)
    with pytest.raises(UsageError, match="comes after the run's feature layer"):
        resolve_unfreeze("block_3", blocks, cut_away=["block_3"])
    with pytest.raises(UsageError, match="from 1 to 4"):
        resolve_unfreeze("top:5", blocks)


# ------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("head", ["dense", "logreg", "sgd", "ridge"])
def test_rebuilt_model_reproduces_head_predictions(ft_env: dict, head: str) -> None:
    report = _check(ft_env[f"run_{head}"], ft_env["cache"])
    assert report.passed and report.n == LIMIT
    assert report.max_abs_diff <= 1e-4
    assert report.top1_agreement == 1.0


def test_rebuilt_model_layout(ft_env: dict) -> None:
    rebuilt = rebuild_model(ft_env["run_logreg"], cache_dir=ft_env["cache"])
    names = [layer.name for layer in rebuilt.model.layers]
    assert names == ["image", "fc_resize", "fc_preprocess", "mobilenetv2", "fc_pool", "head_logits", "predictions"]
    assert rebuilt.model.input_shape == (None, None, None, 3)
    # Any input size: the model resizes itself.
    assert rebuilt.model(np.zeros((1, 50, 17, 3), np.float32)).shape == (1, 10)


def _tampered(env: dict, name: str, **spec: object) -> Path:
    run = env["root"] / "tampered" / name
    shutil.copytree(env["run_logreg"], run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["features"]["spec"].update(spec)
    (run / "config.json").write_text(json.dumps(cfg))
    return run


def test_equivalence_fails_loudly_on_other_preprocessing(ft_env: dict) -> None:
    run = _tampered(ft_env, "preprocess", preprocess="mobilenet_v2:torch")
    with pytest.raises(EquivalenceError) as info:
        _check(run, ft_env["cache"])
    msg = str(info.value)
    assert "\n" not in msg
    assert "max |dp| =" in msg and "at validation image" in msg
    assert "preprocessing 'mobilenet_v2:torch' is not mobilenetv2's 'mobilenet_v2:tf'" in msg


def test_equivalence_fails_loudly_on_features_cached_at_another_size(ft_env: dict) -> None:
    run = _tampered(ft_env, "size", input_size=40)
    with pytest.raises(EquivalenceError, match=r"features differ from the cached ones .*to 40 px") as info:
        _check(run, ft_env["cache"])
    assert "\n" not in str(info.value)


def test_non_keras_head_is_refused(ft_env: dict) -> None:
    from featurecache.training.train import train_head

    run = train_head(
        ft_env["key"],
        head="knn",
        params={"n_neighbors": 1},
        out=ft_env["root"] / "runs" / "knn",
        cache_dir=ft_env["cache"],
        plots=False,
    ).run_dir
    with pytest.raises(UsageError, match=r"Keras can express.*KNeighborsClassifier.*dense, logreg"):
        rebuild_model(run, cache_dir=ft_env["cache"])


def test_training_wrapper_keeps_backbone_in_inference_mode(ft_env: dict) -> None:
    rebuilt = rebuild_model(ft_env["run_logreg"], cache_dir=ft_env["cache"])
    bn = next(layer for layer in rebuilt.backbone.layers if type(layer).__name__ == "BatchNormalization")
    bn.trainable = True  # in training mode it would now normalise with batch statistics
    x = np.random.default_rng(1).uniform(0, 255, size=(4, 8, 8, 3)).astype(np.float32)
    inference = np.asarray(rebuilt.model(x, training=False))
    stats = [np.array(w) for w in bn.get_weights()]
    # Keras 3 overrides the functional training=False with the caller's flag (and the BN then
    # updates its moving statistics, which we put back) ...
    assert not np.allclose(np.asarray(rebuilt.model(x, training=True)), inference, atol=1e-6)
    bn.set_weights(stats)
    # ... which the fine-tuning wrapper never passes to the backbone.
    trainer = _make_trainer(rebuilt.features, rebuilt.head)
    np.testing.assert_allclose(np.asarray(trainer(x, training=True)), inference, atol=1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(bn.get_weights(), stats, strict=True))


# ------------------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def tuned(ft_env: dict) -> dict:
    """Fine-tune the dense run with only block_16 unfrozen; keep the weights from before."""
    before = rebuild_model(ft_env["run_dense"], cache_dir=ft_env["cache"])
    weights = {layer.name: [np.array(w) for w in layer.get_weights()] for layer in before.backbone.layers}
    head_before = {layer.name: [np.array(w) for w in layer.get_weights()] for layer in before.head.layers}
    result = fc.finetune(
        ft_env["run_dense"],
        unfreeze="block_16",
        epochs=2,
        # Random MobileNetV2 activations at 32 px are ~1e-11, and so are the gradients: Adam's
        # normalised steps still move every trainable weight visibly.
        lr=1e-2,
        optimizer="adam",
        batch_size=8,
        augment="flip,rotation=10",
        patience=0,
        out=ft_env["root"] / "tuned",
        cache_dir=ft_env["cache"],
        progress=False,
    )
    return {"result": result, "before": weights, "head_before": head_before, "spec": before.backbone_spec}


@pytest.mark.slow  # end to end: a real fine-tune (the `tuned` fixture)
def test_finetune_changes_only_the_unfrozen_block_and_the_head(tuned: dict) -> None:
    import keras

    from featurecache import backbones

    result = tuned["result"]
    model = keras.saving.load_model(result.model_path)
    backbone = model.get_layer("mobilenetv2")
    in_block = set(backbones.block_layers(backbone, tuned["spec"])["block_16"])
    changed_block = []
    for layer in backbone.layers:
        after = layer.get_weights()
        same = all(np.array_equal(a, b) for a, b in zip(after, tuned["before"][layer.name], strict=True))
        if isinstance(layer, keras.layers.BatchNormalization) or layer.name not in in_block:
            # Frozen layers, and every BatchNorm (gamma, beta and moving statistics), are bit-identical.
            assert same, f"{layer.name} changed but is frozen"
        elif after:
            changed_block.append(not same)
    assert changed_block and all(changed_block), "every weighted non-BN layer of block_16 should have trained"
    for name in ("head_dense_0", "predictions"):
        after = model.get_layer(name).get_weights()
        assert not all(np.array_equal(a, b) for a, b in zip(after, tuned["head_before"][name], strict=True))
    cfg = json.loads((result.out / "config.json").read_text())
    assert cfg["trainable"]["block_16"]["layers"] == 3 and cfg["trainable"]["block_16"]["batchnorm_frozen"] == 3
    assert sorted(cfg["trainable_layers"]) == ["block_16", "head"]
    assert cfg["history"]["epochs_run"] == 2 and cfg["equivalence"]["passed"]
    for name in ("metrics.json", "history.csv", "training_curves.png", "confusion_val.png", "confusion_test.png"):
        assert (result.out / name).is_file(), name


@pytest.mark.slow  # end to end: fine-tune, export, load in a bare process
def test_export_loads_without_featurecache_and_matches_predict_cli(tuned: dict, tmp_path: Path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from featurecache.cli.main import app

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in ((8, 8), (40, 24), (8, 8))]
    files = []
    for i, img in enumerate(images):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(img).save(files[-1])
    proba = plain_keras_proba(tuned["result"].model_path, images, tmp_path)

    result = CliRunner().invoke(app, ["predict", str(tuned["result"].out), *map(str, files), "--top-k", "10", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    for row, expected in zip(rows, proba, strict=True):
        got = {int(t["class"]): t["probability"] for t in row["top"]}
        np.testing.assert_allclose([got[c] for c in range(10)], expected, atol=1e-6)
        assert [t["probability"] for t in row["top"]] == sorted((t["probability"] for t in row["top"]), reverse=True)


def test_folder_with_holdout_binary_head_and_caffe_preprocessing(image_folder: Path, tmp_path: Path) -> None:
    """Images of varied sizes, no val split (the run holds out part of train), a 2-class head, VGG16."""
    from featurecache.training.train import train_head

    cache = tmp_path / "cache"
    res = fc.extract(str(image_folder), backbone="vgg16", weights="random", size=SIZE, cache_dir=cache, progress=False)
    run = train_head(
        res.key, head="logreg", out=tmp_path / "run", cache_dir=cache, plots=False, val_fraction=0.25
    ).run_dir
    result = fc.finetune(
        run,
        unfreeze="block5",
        epochs=1,
        lr=1e-4,
        batch_size=4,
        out=tmp_path / "ft",
        cache_dir=cache,
        plots=False,
        progress=False,
    )
    assert result.equivalence.passed and result.equivalence.n == 2
    cfg = json.loads((result.out / "config.json").read_text())
    assert cfg["dataset"]["validation"] == "train" and (cfg["dataset"]["n_train"], cfg["dataset"]["n_val"]) == (6, 2)
    with np.load(run / "predictions.npz") as npz:
        held_out = set(npz["val_ids"].tolist())
    with np.load(result.out / "predictions.npz") as npz:
        assert set(npz["val_ids"].tolist()) == held_out
    preds = fc.predict(result.out, [image_folder / "cat" / "cat_1.jpg"], top_k=5)
    assert sorted(c for c, _ in preds[0].top) == ["cat", "dog"]


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("head,params", [("logreg", {}), ("sgd", {}), ("linear-svm", {"cv": 2}), ("ridge", {"cv": 2})])
def test_linear_heads_convert_to_keras_exactly(head: str, params: dict, n_classes: int) -> None:
    """Every linear head, binary and multi-class, becomes Keras layers with the same probabilities."""
    import keras

    from featurecache.finetuning.convert import keras_head
    from featurecache.training.heads import make_head

    rng = np.random.default_rng(n_classes)
    y = np.arange(90) % n_classes
    X = (rng.normal(0, 1, (90, 6)) + y[:, None]).astype(np.float32)
    est = make_head(head, params).fit(X, y)
    inp = keras.Input((6,))
    model = keras.Model(inp, keras_head(est, feature_shape=(6,), n_classes=n_classes)(inp))
    got = np.asarray(model.predict(X, verbose=0), dtype=np.float64)
    np.testing.assert_allclose(got, est.predict_proba(X), atol=1e-5)


@pytest.mark.slow  # two real fine-tunes
def test_two_identical_finetunes_give_identical_weights_and_metrics(ft_env: dict, tmp_path: Path) -> None:
    """The seed fixes the batch order, augmentation and the head's dropout (random-weight backbone)."""
    import keras

    from featurecache.training.train import train_head

    run = train_head(
        ft_env["key"],
        head="dense",
        params={"hidden": "16", "epochs": 1, "dropout": 0.5},
        out=tmp_path / "run",
        cache_dir=ft_env["cache"],
        plots=False,
    ).run_dir
    results = [
        fc.finetune(
            run,
            unfreeze="top:1",
            epochs=2,
            lr=1e-2,
            batch_size=8,
            augment="flip",
            patience=0,
            seed=7,
            out=tmp_path / f"ft{i}",
            cache_dir=ft_env["cache"],
            plots=False,
            progress=False,
        )
        for i in range(2)
    ]
    assert results[0].history == results[1].history
    assert results[0].metrics["val"]["log_loss"] == results[1].metrics["val"]["log_loss"]
    a, b = (keras.saving.load_model(r.model_path).get_weights() for r in results)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_epoch_lines_fit_80_columns() -> None:
    from featurecache.finetuning.training import epoch_line

    logs = {"accuracy": 0.875, "loss": 123.456789, "val_accuracy": 0.8333, "val_loss": 10.5, "learning_rate": 1e-5}
    line = epoch_line(10, 10, logs)
    assert line == "epoch 10/10  loss 123.5  acc 0.875  val_loss 10.5  val_acc 0.833  lr 1e-05"
    assert len(line) <= 80
    assert epoch_line(0, 10, {"val_loss": 10.5, "val_accuracy": 0.8333}) == "epoch 0/10  val_loss 10.5  val_acc 0.833"


def test_training_curves_draw_the_head_as_epoch_0() -> None:
    from featurecache.report.plots import training_curves_figure

    history = {"loss": [1.0, 0.5], "val_loss": [0.9, 0.7], "accuracy": [0.5, 0.7], "val_accuracy": [0.6, 0.65]}
    fig = training_curves_figure(history, before={"val_loss": 0.8, "val_accuracy": 0.62})
    lines = {
        (ax.get_ylabel(), ln.get_label()): ln
        for ax in fig.axes
        for ln in ax.get_lines()
        if not ln.get_label().startswith("best")
    }
    assert list(lines["loss", "validation"].get_xdata()) == [0, 1, 2]
    assert list(lines["loss", "validation"].get_ydata()) == [0.8, 0.9, 0.7]
    assert list(lines["accuracy", "validation"].get_ydata())[0] == 0.62
    assert list(lines["loss", "training"].get_xdata()) == [1, 2]  # no training loss is known before


@pytest.mark.slow  # a real fine-tune through the CLI
def test_finetune_cli_shows_epochs_from_the_head_and_warns_when_worse(ft_env: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from featurecache.cli.main import app

    run = tmp_path / "run"
    shutil.copytree(ft_env["run_dense"], run)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["val"].update(accuracy=1.0, log_loss=0.01)  # a head no fine-tune can beat
    (run / "metrics.json").write_text(json.dumps(metrics))
    # pytest records warnings itself; outside it the command prints this one as a "warning: ..." line.
    with pytest.warns(FeatureCacheWarning, match=r"fine-tuning ended worse than the head \(val accuracy 1\.000 -> "):
        res = CliRunner().invoke(
            app,
            [
                "finetune",
                "--run",
                str(run),
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--patience",
                "0",
                "--out",
                str(tmp_path / "ft"),
                "--cache",
                str(ft_env["cache"]),
            ],
        )
    assert res.exit_code == 0, res.output
    err = res.stderr.splitlines()
    assert "epoch 0/1  val_loss 0.01  val_acc 1.000 (the head)" in err, res.stderr
    assert any(ln.startswith("epoch 1/1  loss ") and len(ln) <= 80 for ln in err), res.stderr
    after = json.loads((tmp_path / "ft" / "metrics.json").read_text())["val"]["accuracy"]
    assert f"val accuracy 1.000 -> {after:.3f}" in res.stdout
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["before"]["val"]["accuracy"] == 1.0
