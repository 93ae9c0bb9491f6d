"""Pipelines and the demo: every shipped pipeline runs end to end, small, offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from featurecache.cli.main import app
from featurecache.errors import PipelineError
from featurecache.pipelines.demo import DEMO_PIPELINE
from featurecache.pipelines.run import load_pipeline, run_pipeline
from tests.conftest import make_image_folder

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
SMALL = ["extract.weights=random", "extract.size=32", "extract.batch_size=16", "finetune.epochs=1", "sweep.n_jobs=1"]


def test_demo_pipeline_matches_the_shipped_file() -> None:
    assert load_pipeline(PIPELINES / "digits_demo.toml") == load_pipeline(DEMO_PIPELINE)


def _cifar_like_npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 4)
    x = (rng.integers(0, 60, size=(40, 32, 32, 3)) + (y * 19)[:, None, None, None]).astype(np.uint8)
    np.savez(path, x_train=x, y_train=y, x_test=x[::2], y_test=y[::2])
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["cifar10_resnet50", "cifar10_resnet50_flatten", "animals_vgg19", "efficientnet_folder"]
)
def test_shipped_pipeline_runs_small_and_offline(name: str, tmp_path: Path) -> None:
    # The real pipelines read keras:cifar10 or a user's folder at 224 px with ImageNet
    # weights; here the same stages run on generated data of the same shape, small.
    if name.startswith("cifar10_"):
        data = _cifar_like_npz(tmp_path / "cifar_like.npz")
    else:
        data = make_image_folder(tmp_path / "images", classes=("cat", "dog", "fox"), per_class=6, size=24)
    overrides = [*SMALL, f"extract.data={json.dumps(str(data))}"]
    if name == "animals_vgg19":
        overrides.append("extract.views=1")
    res = run_pipeline(
        PIPELINES / f"{name}.toml",
        overrides=overrides,
        cache_dir=tmp_path / "cache",
        runs_dir=tmp_path / "runs",
        progress=False,
    )
    assert set(res.stages) == {"extract", "sweep", "finetune"}
    assert res.stages["sweep"]["trials"] >= 1
    ft = res.stages["finetune"]
    assert ft["equivalence"]["max_abs_diff"] <= 1e-4
    assert Path(ft["model"]).is_file()
    doc = load_pipeline(PIPELINES / f"{name}.toml")
    assert doc["extract"]["weights"] == "imagenet"  # the shipped file is the real experiment
    if name == "cifar10_resnet50_flatten":  # the seed experiment's head, as trained and exported
        import keras

        run = json.loads((Path(ft["model"]).parent / "config.json").read_text())
        assert run["features"]["spec"]["pooling"] == "flatten" and run["params"]["hidden"] == [256, 128, 64]
        layers = [layer.name for layer in keras.saving.load_model(ft["model"]).layers]
        assert [n for n in layers if n.startswith(("head_dense", "head_bn", "head_dropout"))] == [
            f"head_{kind}_{i}" for i in range(3) for kind in ("dense", "bn", "dropout")
        ]
        assert layers[-1] == "predictions"


@pytest.mark.slow
def test_demo_cli_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(
        app,
        [
            "demo",
            "--limit",
            "20",
            "--cache",
            str(tmp_path / "cache"),
            "--json",
            "--set",
            "finetune.epochs=1",
            "--set",
            "finetune.unfreeze=top:2",
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout[res.stdout.index("{") :])
    stages = [r["stage"] for r in doc["summary"]]
    assert stages == ["extract", "sweep", "finetune"]
    assert doc["summary"][2]["what"] == "unfreeze top:2"  # the override, not the file's top:1
    sweep_row = doc["summary"][1]
    assert sweep_row["val_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert all(Path(p).is_file() for p in doc["plots"]) and any(p.endswith("leaderboard.png") for p in doc["plots"])
    # ImageNet weights when Keras has them, else random ones: the features say which, and the
    # demo prints its note exactly when it fell back (offline CI without cached weights does).
    name = doc["stages"]["extract"]["name"]
    fell_back = (
        "ImageNet weights are not available offline" in res.stderr and "using random weights instead" in res.stderr
    )
    assert name.startswith("mobilenetv2-random-" if fell_back else "mobilenetv2-imagenet-"), (name, res.stderr)

    # The summary at 80 columns: nothing cut to an ellipsis, the feature set's name whole on its line.
    args = [
        "demo",
        "--limit",
        "20",
        "--cache",
        str(tmp_path / "cache"),
        "--set",
        "finetune.epochs=1",
        "--set",
        "finetune.unfreeze=top:2",
    ]
    shown = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert f"features: {name}" in lines and "…" not in shown.stdout, shown.stdout
    assert all(len(line) <= 80 for line in lines if not line.startswith(("features: ", "plot: "))), shown.stdout


def test_overrides_are_typed_and_checked(tmp_path: Path) -> None:
    doc = load_pipeline(
        PIPELINES / "digits_demo.toml",
        overrides=["finetune.epochs=2", "extract.weights=random", "sweep.n_jobs=1"],
        limit=7,
    )
    assert doc["finetune"]["epochs"] == 2 and doc["extract"]["weights"] == "random" and doc["extract"]["limit"] == 7
    with pytest.raises(PipelineError, match="STAGE.KEY=VALUE"):
        load_pipeline(PIPELINES / "digits_demo.toml", overrides=["epochs=2"])
    with pytest.raises(PipelineError, match="unknown key"):
        load_pipeline(PIPELINES / "digits_demo.toml", overrides=["extract.backbon=vgg19"])
    with pytest.raises(PipelineError, match="does not exist"):
        load_pipeline(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[extract\n")
    with pytest.raises(PipelineError, match="not valid TOML"):
        load_pipeline(bad)


def test_run_cli_error_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["run", str(tmp_path / "missing.toml")])
    assert res.exit_code != 0
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error:")
