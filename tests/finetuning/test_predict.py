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
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A logreg run on digits features, its export (epochs=0: the rebuilt model), and images."""
    from PIL import Image

    from featurecache.training.train import train_head

    root = tmp_path_factory.mktemp("pred")
    cache = root / "cache"
    res = fc.extract("builtin:digits", backbone="mobilenetv2", weights="random", size=32, limit=20, cache_dir=cache, progress=False)
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


def test_predict_run_and_export_agree(env: dict) -> None:
    from_run = fc.predict(env["run"], env["images"], top_k=3, cache_dir=env["cache"])
    from_file = fc.predict(env["exported"] / "model.keras", env["images"], top_k=3)
    assert [p.image for p in from_file] == [str(p) for p in env["images"]]
    for a, b in zip(from_run, from_file, strict=True):
        assert len(a.top) == 3 and [c for c, _ in a.top] == [c for c, _ in b.top]
        np.testing.assert_allclose([p for _, p in a.top], [p for _, p in b.top], atol=1e-6)
        assert all(c in [str(d) for d in range(10)] for c, _ in a.top)
        assert a.top[0][1] >= a.top[1][1] >= a.top[2][1]


def test_evaluate_reproduces_the_head_metrics(env: dict) -> None:
    head_metrics = json.loads((env["run"] / "metrics.json").read_text())
    on_val = fc.evaluate(env["run"], split="val", cache_dir=env["cache"], out=env["root"] / "eval-run")
    assert on_val.metrics["accuracy"] == head_metrics["val"]["accuracy"]
    assert on_val.metrics["confusion_matrix"] == head_metrics["val"]["confusion_matrix"]
    assert on_val.metrics["log_loss"] == pytest.approx(head_metrics["val"]["log_loss"], abs=1e-4)
    on_test = fc.evaluate(env["exported"], split="test", cache_dir=env["cache"])
    assert on_test.metrics["accuracy"] == head_metrics["test"]["accuracy"]
    assert on_test.out == env["exported"] / "eval-digits-test"
    assert json.loads((on_test.out / "metrics.json").read_text())["test"]["n"] == 20
    assert (on_test.out / "confusion_test.png").is_file()


def test_api_errors(env: dict) -> None:
    with pytest.raises(ImageDecodeError, match=r"bad\.jpg.*not an image"):
        fc.predict(env["exported"], [env["images"][0], env["bad"]])
    with pytest.raises(RunError, match="does not exist"):
        fc.predict(env["root"] / "nowhere", env["images"])


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
def test_cli_predict_and_evaluate(env: dict) -> None:
    code, out = _cli("predict", str(env["exported"]), *map(str, env["images"]), "--top-k", "2", "--json")
    assert code == 0, out
    rows = json.loads(out)
    assert len(rows) == 3 and all(len(r["top"]) == 2 for r in rows)
    code, out = _cli("predict", str(env["exported"] / "model.keras"), str(env["images"][0]))
    assert code == 0 and out.startswith(f"{env['images'][0]}: "), out
    code, out = _cli("evaluate", str(env["exported"]), "--split", "val", "--json", "--no-plots", "--cache", str(env["cache"]))
    assert code == 0, out
    assert json.loads(out)["metrics"]["n"] == 20


def test_cli_bad_image(env: dict) -> None:
    code, out = _cli("predict", str(env["exported"]), str(env["images"][0]), str(env["bad"]))
    assert code != 0
    _one_line_error(out, str(env["bad"]), "not an image")
    code, out = _cli("predict", str(env["exported"]), str(env["root"] / "missing.png"))
    assert code != 0
    _one_line_error(out, "missing.png", "No such file")


def test_cli_run_without_head(env: dict) -> None:
    broken = env["root"] / "broken-run"
    shutil.copytree(env["run"], broken)
    (broken / "head.json").unlink()
    code, out = _cli("predict", str(broken), str(env["images"][0]), "--cache", str(env["cache"]))
    assert code != 0
    _one_line_error(out, "no saved head", str(broken))


def test_cli_unknown_unfreeze_block_lists_valid_ones(env: dict) -> None:
    code, out = _cli("finetune", "--run", str(env["run"]), "--unfreeze", "block99", "--epochs", "0", "--out", str(env["root"] / "x"), "--cache", str(env["cache"]))
    assert code == 2
    _one_line_error(out, "unknown block 'block99'", "'block_16'", "'top'", "'all'", "'top:N'")
    assert not (env["root"] / "x").exists()


def test_cli_error_in_a_real_process(env: dict) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "featurecache", "predict", str(env["exported"]), str(env["bad"])],
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
def test_crafted_pickle_head_is_refused_in_every_command(env: dict, command: str) -> None:
    run, marker = _crafted_run(env, f"crafted-{command}")
    args = {
        "finetune": ["finetune", "--run", str(run), "--epochs", "0", "--out", str(env["root"] / f"ft-{command}")],
        "evaluate": ["evaluate", str(run), "--split", "val"],
        "predict": ["predict", str(run), str(env["images"][0])],
    }[command]
    code, out = _cli(*args, "--cache", str(env["cache"]))
    assert code != 0
    _one_line_error(out, str(run), "head.joblib", f"featurecache convert-run {run} --trust")
    assert not marker.exists()


def test_cli_convert_run_then_predict(env: dict) -> None:
    import joblib

    from featurecache.training.train import load_run

    run = env["root"] / "legacy-run"
    shutil.copytree(env["run"], run)
    _, estimator = load_run(run)
    (run / "head.skops").unlink()
    joblib.dump(estimator, run / "head.joblib")  # a run directory as format 1 wrote it
    (run / "head.json").write_text('{"format": 1, "kind": "sklearn", "files": ["head.joblib"]}')
    code, out = _cli("convert-run", str(run))
    assert code == 2
    _one_line_error(out, "--trust", "runs any code")
    code, out = _cli("convert-run", str(run), "--trust")
    assert code == 0, out
    expected = fc.predict(env["run"], env["images"], cache_dir=env["cache"])
    assert fc.predict(run, env["images"], cache_dir=env["cache"]) == expected


def test_truncated_predictions_npz_is_a_one_line_error(env: dict) -> None:
    run = env["root"] / "truncated-preds"
    shutil.copytree(env["run"], run)
    data = (run / "predictions.npz").read_bytes()
    (run / "predictions.npz").write_bytes(data[: len(data) // 2])
    code, out = _cli("finetune", "--run", str(run), "--epochs", "0", "--out", str(env["root"] / "ft-trunc"), "--cache", str(env["cache"]))
    assert code != 0
    _one_line_error(out, str(run / "predictions.npz"), "train-head")


# ------------------------------------------------------------------ what an export carries


def _tiny_image_model():  # noqa: ANN202
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(None, None, 3), dtype="float32", name="image")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255.0)(inputs))
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))


def test_a_copied_model_keras_names_its_classes(env: dict, tmp_path: Path) -> None:
    from featurecache.finetuning.export import export_model, model_class_names

    assert model_class_names(env["exported"] / "model.keras") == tuple(str(i) for i in range(10))
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
    (pred,) = fc.predict(copy, [env["images"][0]], top_k=2)
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
