"""evaluate / predict on runs and exported models, and their one-line CLI errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import featurecache as fc
from featurecache.cli.main import app
from featurecache.errors import ImageDecodeError, RunError

REPO = Path(fc.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pred_env(tmp_path_factory: pytest.TempPathFactory, digits_features_20) -> dict[str, Path]:
    """A logreg run on digits features, its export (epochs=0: the rebuilt model), and images."""
    from PIL import Image

    from featurecache.training.train import train_head

    root = tmp_path_factory.mktemp("pred")
    cache, res = digits_features_20.cache, digits_features_20.result  # the session's: read only
    run = train_head(res.key, head="logreg", out=root / "run", cache_dir=cache, plots=False).run_dir
    exported = fc.finetune(run, epochs=0, out=root / "exported", cache_dir=cache, plots=False, progress=False).out
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate(((8, 8), (33, 20), (8, 8))):
        images.append(root / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(images[-1])
    bad = root / "bad.jpg"
    bad.write_text("not an image")
    return {"root": root, "cache": cache, "run": run, "exported": exported, "images": images, "bad": bad}


def test_predict_run_and_export_agree(pred_env: dict) -> None:
    from_run = fc.predict(pred_env["run"], pred_env["images"], top_k=3, cache_dir=pred_env["cache"])
    from_file = fc.predict(pred_env["exported"] / "model.keras", pred_env["images"], top_k=3)
    assert [p.image for p in from_file] == [str(p) for p in pred_env["images"]]
    for a, b in zip(from_run, from_file, strict=True):
        assert len(a.top) == 3 and [c for c, _ in a.top] == [c for c, _ in b.top]
        np.testing.assert_allclose([p for _, p in a.top], [p for _, p in b.top], atol=1e-6)
        assert all(c in [str(d) for d in range(10)] for c, _ in a.top)
        assert a.top[0][1] >= a.top[1][1] >= a.top[2][1]


def test_evaluate_reproduces_the_head_metrics(pred_env: dict) -> None:
    head_metrics = json.loads((pred_env["run"] / "metrics.json").read_text())
    on_val = fc.evaluate(pred_env["run"], split="val", cache_dir=pred_env["cache"], out=pred_env["root"] / "eval-run")
    assert on_val.metrics["accuracy"] == head_metrics["val"]["accuracy"]
    assert on_val.metrics["confusion_matrix"] == head_metrics["val"]["confusion_matrix"]
    assert on_val.metrics["log_loss"] == pytest.approx(head_metrics["val"]["log_loss"], abs=1e-4)
    on_test = fc.evaluate(pred_env["exported"], split="test", cache_dir=pred_env["cache"])
    assert on_test.metrics["accuracy"] == head_metrics["test"]["accuracy"]
    assert on_test.out == pred_env["exported"] / "eval-digits-test"
    assert json.loads((on_test.out / "metrics.json").read_text())["test"]["n"] == 20
    assert (on_test.out / "confusion_test.png").is_file()


def test_api_errors(pred_env: dict) -> None:
    with pytest.raises(ImageDecodeError, match=r"bad\.jpg.*not an image"):
        fc.predict(pred_env["exported"], [pred_env["images"][0], pred_env["bad"]])
    with pytest.raises(RunError, match="does not exist"):
        fc.predict(pred_env["root"] / "nowhere", pred_env["images"])


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _one_line_error(output: str, *fragments: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.slow  # three real processes, each importing TensorFlow
def test_cli_predict_and_evaluate(pred_env: dict) -> None:
    code, out = _cli("predict", str(pred_env["exported"]), *map(str, pred_env["images"]), "--top-k", "2", "--json")
    assert code == 0, out
    rows = json.loads(out)
    assert len(rows) == 3 and all(len(r["top"]) == 2 for r in rows)
    code, out = _cli("predict", str(pred_env["exported"] / "model.keras"), str(pred_env["images"][0]))
    assert code == 0 and out.startswith(f"{pred_env['images'][0]}: "), out
    code, out = _cli(
        "evaluate",
        str(pred_env["exported"]),
        "--split",
        "val",
        "--json",
        "--no-plots",
        "--cache",
        str(pred_env["cache"]),
    )
    assert code == 0, out
    assert json.loads(out)["metrics"]["n"] == 20


def test_cli_bad_image(pred_env: dict) -> None:
    code, out = _cli("predict", str(pred_env["exported"]), str(pred_env["images"][0]), str(pred_env["bad"]))
    assert code != 0
    _one_line_error(out, str(pred_env["bad"]), "not an image")
    code, out = _cli("predict", str(pred_env["exported"]), str(pred_env["root"] / "missing.png"))
    assert code != 0
    _one_line_error(out, "missing.png", "No such file")


def test_cli_run_without_head(pred_env: dict) -> None:
    broken = pred_env["root"] / "broken-run"
    shutil.copytree(pred_env["run"], broken)
    (broken / "head.json").unlink()
    code, out = _cli("predict", str(broken), str(pred_env["images"][0]), "--cache", str(pred_env["cache"]))
    assert code != 0
    _one_line_error(out, "no saved head", str(broken))


def test_cli_unknown_unfreeze_block_lists_valid_ones(pred_env: dict) -> None:
    code, out = _cli(
        "finetune",
        "--run",
        str(pred_env["run"]),
        "--unfreeze",
        "block99",
        "--epochs",
        "0",
        "--out",
        str(pred_env["root"] / "x"),
        "--cache",
        str(pred_env["cache"]),
    )
    assert code == 2
    _one_line_error(out, "unknown block 'block99'", "'block_16'", "'top'", "'all'", "'top:N'")
    assert not (pred_env["root"] / "x").exists()


def test_cli_error_in_a_real_process(pred_env: dict) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "featurecache", "predict", str(pred_env["exported"]), str(pred_env["bad"])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stdout == ""
    _one_line_error(proc.stderr, "bad.jpg")


# ------------------------------------------------------- run directories never run code


class _Payload:
    """Unpickling this creates a file: the proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


def _crafted_run(env: dict, name: str) -> tuple[Path, Path]:
    """A copy of the run whose head is a format-1 pickle that would create ``marker`` if loaded."""
    import joblib

    run = env["root"] / name
    shutil.copytree(env["run"], run)
    for f in ("head.skops", "head.keras"):
        (run / f).unlink(missing_ok=True)
    marker = env["root"] / f"{name}-pwned"
    joblib.dump(_Payload(marker), run / "head.joblib")
    (run / "head.json").write_text('{"format": 1, "kind": "sklearn", "files": ["head.joblib"]}')
    return run, marker


@pytest.mark.parametrize("command", ["finetune", "evaluate", "predict"])
def test_crafted_pickle_head_is_refused_in_every_command(pred_env: dict, command: str) -> None:
    run, marker = _crafted_run(pred_env, f"crafted-{command}")
    args = {
        "finetune": ["finetune", "--run", str(run), "--epochs", "0", "--out", str(pred_env["root"] / f"ft-{command}")],
        "evaluate": ["evaluate", str(run), "--split", "val"],
        "predict": ["predict", str(run), str(pred_env["images"][0])],
    }[command]
    code, out = _cli(*args, "--cache", str(pred_env["cache"]))
    assert code != 0
    _one_line_error(out, str(run), "head.joblib", f"featurecache convert-run {run} --trust")
    assert not marker.exists()


def test_cli_convert_run_then_predict(pred_env: dict) -> None:
    import joblib

    from featurecache.training.train import load_run

    run = pred_env["root"] / "legacy-run"
    shutil.copytree(pred_env["run"], run)
    _, estimator = load_run(run)
    (run / "head.skops").unlink()
    joblib.dump(estimator, run / "head.joblib")  # a run directory as format 1 wrote it
    (run / "head.json").write_text('{"format": 1, "kind": "sklearn", "files": ["head.joblib"]}')
    code, out = _cli("convert-run", str(run))
    assert code == 2
    _one_line_error(out, "--trust", "runs any code")
    code, out = _cli("convert-run", str(run), "--trust")
    assert code == 0, out
    expected = fc.predict(pred_env["run"], pred_env["images"], cache_dir=pred_env["cache"])
    assert fc.predict(run, pred_env["images"], cache_dir=pred_env["cache"]) == expected


def test_truncated_predictions_npz_is_a_one_line_error(pred_env: dict) -> None:
    run = pred_env["root"] / "truncated-preds"
    shutil.copytree(pred_env["run"], run)
    data = (run / "predictions.npz").read_bytes()
    (run / "predictions.npz").write_bytes(data[: len(data) // 2])
    code, out = _cli(
        "finetune",
        "--run",
        str(run),
        "--epochs",
        "0",
        "--out",
        str(pred_env["root"] / "ft-trunc"),
        "--cache",
        str(pred_env["cache"]),
    )
    assert code != 0
    _one_line_error(out, str(run / "predictions.npz"), "train-head")


# ------------------------------------------------------------------ what an export carries


def _tiny_image_model():  # noqa: ANN202
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(None, None, 3), dtype="float32", name="image")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255.0)(inputs))
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))


def test_a_copied_model_keras_names_its_classes(pred_env: dict, tmp_path: Path) -> None:
    from featurecache.finetuning.export import export_model, model_class_names

    assert model_class_names(pred_env["exported"] / "model.keras") == tuple(str(i) for i in range(10))
    export_model(_tiny_image_model(), tmp_path, classes=("cat", "dog"))
    copy = tmp_path / "elsewhere" / "pets.keras"  # no config.json beside it
    copy.parent.mkdir()
    shutil.copy(tmp_path / "model.keras", copy)
    script = (
        "import json, sys, zipfile, keras\n"
        "m = keras.saving.load_model(sys.argv[1], safe_mode=True)\n"
        "names = json.loads(zipfile.ZipFile(sys.argv[1]).read('metadata.json'))['featurecache']['class_names']\n"
        "assert len(names) == m.output_shape[-1]\n"
        "print(','.join(names))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(copy)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "cat,dog", proc.stderr[-2000:]
    (pred,) = fc.predict(copy, [pred_env["images"][0]], top_k=2)
    assert {c for c, _ in pred.top} == {"cat", "dog"}


def test_savedmodel_takes_uint8_images_and_names_classes(tmp_path: Path) -> None:
    import tensorflow as tf

    from featurecache.finetuning.export import export_model

    model = _tiny_image_model()
    export_model(model, tmp_path, savedmodel=True, classes=("cat", "dog"))
    loaded = tf.saved_model.load(str(tmp_path / "savedmodel"))
    images = np.random.default_rng(0).integers(0, 256, size=(2, 9, 7, 3), dtype=np.uint8)
    expected = model(images.astype(np.float32)).numpy()
    np.testing.assert_allclose(loaded.serve(tf.constant(images)).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(loaded.serve_float32(tf.constant(images, tf.float32)).numpy(), expected, atol=1e-6)
    assert [c.decode() for c in loaded.class_names().numpy()] == ["cat", "dog"]
    sig = loaded.signatures["serving_default"]
    assert sig.structured_input_signature[1]["image"].dtype == tf.uint8


# ------------------------------------------------------------------ folders and hold-outs


def test_predict_a_folder_recursively_with_a_csv(pred_env: dict, image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "notes.txt").write_text("not an image, skipped")
    csv_file = tmp_path / "out" / "predictions.csv"
    result = CliRunner().invoke(
        app, ["predict", str(pred_env["exported"]), str(image_folder), "--top-k", "2", "--csv", str(csv_file)]
    )
    assert result.exit_code == 0, result.output
    expected = sorted(str(p) for p in image_folder.rglob("*_*.*"))
    rows = csv_file.read_text().splitlines()
    assert rows[0] == "image,class_1,probability_1,class_2,probability_2"
    assert sorted(r.split(",")[0] for r in rows[1:]) == expected and len(expected) == 8
    assert sum(line.startswith(str(image_folder)) for line in result.stdout.splitlines()) == 8
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = _cli("predict", str(pred_env["exported"]), str(empty))
    assert code == 2
    _one_line_error(out, f"folder {empty} has no images")


def test_evaluate_val_of_a_run_that_held_out_part_of_train(image_folder: Path, tmp_path: Path) -> None:
    from featurecache.training.train import train_head

    cache = tmp_path / "cache"
    res = fc.extract(
        str(image_folder), backbone="mobilenetv2", weights="random", size=32, cache_dir=cache, progress=False
    )
    run = train_head(
        res.key, head="logreg", out=tmp_path / "run", cache_dir=cache, plots=False, val_fraction=0.25
    ).run_dir
    head_val = json.loads((run / "metrics.json").read_text())["val"]
    result = fc.evaluate(run, split="val", cache_dir=cache, plots=False)
    assert result.metrics["n"] == head_val["n"] == 2
    assert result.metrics["confusion_matrix"] == head_val["confusion_matrix"]
    with np.load(run / "predictions.npz") as npz, np.load(result.out / "predictions_val.npz") as got:
        assert sorted(got["ids"].tolist()) == sorted(npz["val_ids"].tolist())
