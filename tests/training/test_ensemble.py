"""Heads on concatenated feature sets, ensembles of runs, and one exported model for an ensemble."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import plain_keras_proba
from typer.testing import CliRunner

import featurecache as fc
from featurecache.cli.main import app
from featurecache.errors import UsageError

LIMIT = 60  # images per split of builtin:digits (where the top 3 of the sweep below beat its best head)
SIZE = 32
# Two random-weight backbones with different feature sizes (1280 and 576) and preprocessing.
BACKBONES = ("mobilenetv2", "mobilenetv3small")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, one_blas_thread: None) -> dict:
    """Digits features of two backbones, one more of the second on other images, and a few runs."""
    from featurecache.training.train import train_head

    root = tmp_path_factory.mktemp("ens")
    cache = root / "cache"
    keys = [
        fc.extract(
            "builtin:digits", backbone=b, weights="random", size=SIZE, limit=LIMIT, cache_dir=cache, progress=False
        ).key
        for b in BACKBONES
    ]
    other = fc.extract(
        "builtin:digits",
        backbone=BACKBONES[1],
        weights="random",
        size=SIZE,
        limit=LIMIT - 10,
        cache_dir=cache,
        progress=False,
    ).key
    runs = root / "runs"
    logreg_a = train_head(keys[0], head="logreg", out=runs / "logreg-a", cache_dir=cache, plots=False).run_dir
    logreg_other = train_head(other, head="logreg", out=runs / "logreg-other", cache_dir=cache, plots=False).run_dir
    return {
        "root": root,
        "cache": cache,
        "keys": keys,
        "other": other,
        "logreg_a": logreg_a,
        "logreg_other": logreg_other,
    }


def _invoke(args: list[str]) -> object:
    return CliRunner().invoke(app, args)


def _error_line(result: object) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


# ------------------------------------------------------------------------------------- concat


def test_concatenated_features_of_two_backbones_train_a_head_in_one_command(env: dict) -> None:
    from featurecache.training.train import load_run

    out = env["root"] / "runs" / "concat-cli"
    k1, k2 = env["keys"]
    result = _invoke(
        [
            "train-head",
            "--features",
            f"{k1[:12]},{k2[:12]}",
            "--head",
            "logreg",
            "--out",
            str(out),
            "--cache",
            str(env["cache"]),
            "--no-plots",
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    config, estimator = load_run(out)
    # The run records every part, in column order, and the head reads both feature vectors.
    assert [p["key"] for p in config["features"]["spec"]["parts"]] == [k1, k2]
    assert [p["spec"]["backbone"] for p in config["features"]["spec"]["parts"]] == list(BACKBONES)
    assert estimator.steps[-1][1].coef_.shape[1] == 1280 + 576
    assert json.loads(result.stdout)["metrics"]["val"]["n"] == LIMIT


def test_concatenation_is_the_parts_side_by_side_in_memory_and_streamed(env: dict) -> None:
    from featurecache.cache.concat import ConcatFeatures, open_concat
    from featurecache.training.train import LazyFeatures, load_training_data

    k1, k2 = env["keys"]
    cat = open_concat([k1, k2], cache_dir=env["cache"])
    assert isinstance(cat, ConcatFeatures)
    a, b = fc.open_features(k1, cache_dir=env["cache"]), fc.open_features(k2, cache_dir=env["cache"])
    np.testing.assert_array_equal(cat.features("val"), np.concatenate([a.features("val"), b.features("val")], axis=1))
    in_memory = load_training_data(cat)
    streamed = load_training_data(cat, max_memory=1)  # over budget: rows read from both Zarr arrays on demand
    assert isinstance(streamed.X_train, LazyFeatures)
    np.testing.assert_array_equal(streamed.X_train.read(), in_memory.X_train)
    np.testing.assert_array_equal(streamed.X_train[np.array([3, 1])], in_memory.X_train[[3, 1]])
    assert cat.key != open_concat([k2, k1], cache_dir=env["cache"]).key  # other column order, other features


def test_augmented_views_are_joined_only_when_every_part_made_them_alike(env: dict) -> None:
    from featurecache.cache.concat import open_concat
    from featurecache.training.train import load_training_data

    flipped = [
        fc.extract(
            "builtin:digits",
            backbone=b,
            weights="random",
            size=SIZE,
            limit=20,
            views=1,
            augment="flip",
            cache_dir=env["cache"],
            progress=False,
        ).key
        for b in BACKBONES
    ]
    aligned = open_concat(flipped, cache_dir=env["cache"])
    parts = [fc.open_features(k, cache_dir=env["cache"]) for k in flipped]
    assert aligned.layout("train").views == 2 and aligned.spec["views"] == "aligned"
    views = load_training_data(aligned).X_train_views
    np.testing.assert_array_equal(views, np.concatenate([p.features("train", view=None) for p in parts], axis=2))
    plain = fc.extract(
        "builtin:digits",
        backbone=BACKBONES[1],
        weights="random",
        size=SIZE,
        limit=20,
        cache_dir=env["cache"],
        progress=False,
    ).key
    mixed = open_concat([flipped[0], plain], cache_dir=env["cache"])
    assert mixed.layout("train").views == 1 and mixed.spec["views"].startswith("clean view only")
    assert load_training_data(mixed).X_train_views is None  # trains on the clean view of each part


def test_mismatched_feature_sets_give_one_clear_line(env: dict) -> None:
    k1 = env["keys"][0]
    result = _invoke(
        [
            "train-head",
            "--features",
            f"{k1},{env['other']}",
            "--head",
            "logreg",
            "--cache",
            str(env["cache"]),
            "--out",
            str(env["root"] / "never"),
        ]
    )
    assert result.exit_code == 2
    line = _error_line(result)
    assert "differ in their train split" in line and "--limit" in line
    assert not (env["root"] / "never").exists()
    with pytest.raises(UsageError, match="given twice"):
        fc.train_head(f"{k1},{k1[:12]}", cache_dir=env["cache"])


# ------------------------------------------------------------------------------------- combination rules


@pytest.mark.parametrize("method", ["mean", "weighted", "vote"])
def test_combination_layers_equal_the_numpy_rule_and_load_in_safe_mode(method: str, tmp_path: Path) -> None:
    import keras

    from featurecache.training.combine import combine, fit_weights, keras_combine

    rng = np.random.default_rng(0)
    probas = []
    for _ in range(3):
        p = np.exp(3 * rng.normal(size=(300, 5)))
        probas.append((p / p.sum(1, keepdims=True)).astype(np.float32))
    probas[0][:4] = 0.2  # a member with tied classes votes for the lowest index, in both
    y = rng.integers(0, 5, 300)
    weights = fit_weights(probas, y) if method == "weighted" else None
    inputs = [keras.Input((5,)) for _ in probas]
    keras.Model(inputs, keras_combine(inputs, method, weights)).save(tmp_path / "c.keras")
    got = keras.saving.load_model(tmp_path / "c.keras").predict(probas, verbose=0)
    expected = combine(probas, method, weights)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(expected.sum(1), 1.0, atol=1e-9)
    if method == "vote":
        votes = np.stack([np.argmax(p, 1) for p in probas])
        majority = [np.bincount(v, minlength=5).max() for v in votes.T]
        winner_votes = [np.sum(votes[:, i] == expected[i].argmax()) for i in range(300)]
        assert winner_votes == majority  # the reported argmax is always a most-voted class


def test_weights_favour_the_member_that_predicts_the_validation_labels() -> None:
    from featurecache.training.combine import fit_weights

    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 200)
    good = np.full((200, 4), 0.05)
    good[np.arange(200), y] = 0.85
    noise = rng.dirichlet(np.ones(4), 200)
    w = fit_weights([noise, good], y)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all() and w[1] > 0.9


# ------------------------------------------------------------------------------------- ensembles


@pytest.mark.slow
def test_ensemble_of_a_sweeps_top3_is_at_least_as_accurate_on_test(env: dict) -> None:
    """A sweep on the two backbones' concatenated features; its top 3 combined, by each method."""
    k1, k2 = env["keys"]
    sweep = fc.sweep(
        f"{k1},{k2}",
        grid=["logreg:C=0.1,1", "ridge:alpha=1,10"],
        out=env["root"] / "sweep",
        cache_dir=env["cache"],
        progress=False,
    )
    best_single = sweep.best["test_accuracy"]
    for method in ("mean", "vote", "weighted"):
        result = _invoke(
            [
                "ensemble",
                "--from-sweep",
                str(sweep.out_dir),
                "--top",
                "3",
                "--method",
                method,
                "--cache",
                str(env["cache"]),
                "--json",
            ]
        )
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        assert doc["notes"] == []  # every refitted trial reproduced its sweep score
        run = Path(doc["run_dir"])
        assert run == sweep.out_dir / f"ensemble-{method}-top3"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["test"]["accuracy"] >= best_single, (method, metrics["test"]["accuracy"], best_single)
        config = json.loads((run / "config.json").read_text())
        assert config["kind"] == "ensemble" and len(config["members"]) == 3
        assert [m["source"].rsplit("#", 1)[1] for m in config["members"]] == [r["trial"] for r in sweep.leaderboard[:3]]
        board = json.loads((run / "leaderboard.json").read_text())["rows"]
        assert [r["kind"] for r in board] == ["ensemble", "member", "member", "member"]
        assert board[1]["val_accuracy"] == sweep.leaderboard[0]["val_accuracy"]
        for name in ("predictions.npz", "confusion_val.png", "confusion_test.png", "leaderboard.csv"):
            assert (run / name).is_file(), name


def test_ensemble_refuses_runs_validated_on_other_images_and_fine_tuning(env: dict) -> None:
    result = _invoke(
        [
            "ensemble",
            str(env["logreg_a"]),
            str(env["logreg_other"]),
            "--out",
            str(env["root"] / "bad"),
            "--cache",
            str(env["cache"]),
        ]
    )
    assert result.exit_code == 2
    assert "different val images" in _error_line(result)
    assert not (env["root"] / "bad").exists() and not list(env["root"].glob(".bad*"))
    one = _invoke(["ensemble", str(env["logreg_a"]), "--cache", str(env["cache"])])
    assert one.exit_code == 2 and "at least two members" in _error_line(one)

    copy = env["root"] / "runs" / "logreg-a-copy"
    shutil.copytree(env["logreg_a"], copy)
    ens = fc.ensemble([env["logreg_a"], copy], out=env["root"] / "two", plots=False).run_dir
    with pytest.raises(UsageError, match="--epochs 0"):
        fc.finetune(ens, epochs=1, cache_dir=env["cache"], progress=False)
    nested = _invoke(["ensemble", str(ens), str(env["logreg_a"]), "--cache", str(env["cache"])])
    assert nested.exit_code == 2 and "itself an ensemble" in _error_line(nested)


@pytest.mark.parametrize("member", ["../outside", "/tmp", "members/0-a/../../../outside", 3])
def test_an_ensembles_member_directories_stay_inside_it(tmp_path: Path, member: object) -> None:
    """The member directories an ensemble's config.json names are checked before they are joined (issue 20)."""
    from featurecache.errors import RunError
    from featurecache.finetuning.assemble import load_members

    ens = tmp_path / "ens"
    (tmp_path / "outside").mkdir()  # what a path out of the ensemble would reach
    ens.mkdir()
    (ens / "config.json").write_text(json.dumps({"kind": "ensemble", "members": [{"dir": member}]}))
    with pytest.raises(RunError) as err:
        load_members(ens)
    assert str(err.value) == (
        f"{ens / 'config.json'} names member directory {member!r}, but a member directory is members/<i>-<name>; "
        "make the ensemble again with `featurecache ensemble`"
    )


def _whole_at_80(text: str, names: list[str]) -> None:
    assert all(len(line) <= 80 for line in text.splitlines()), [line for line in text.splitlines() if len(line) > 80]
    assert "…" not in text
    missing = {token for name in names for token in name.split()} - set(text.split())
    assert not missing, (missing, text)


def test_ensemble_table_and_report_at_80_columns(env: dict) -> None:
    import re

    other = fc.train_head(
        env["keys"][1],
        head="logreg",
        params={"class_weight": "balanced"},
        out=env["root"] / "runs" / "logreg-b-balanced",
        cache_dir=env["cache"],
        plots=False,
    ).run_dir
    out = env["root"] / "ens80"
    made = CliRunner().invoke(
        app,
        ["ensemble", str(env["logreg_a"]), str(other), "--out", str(out), "--cache", str(env["cache"])],
        env={"COLUMNS": "80"},
    )
    assert made.exit_code == 0, made.output
    board = json.loads((out / "leaderboard.json").read_text())["rows"]
    table = made.stdout[: made.stdout.index("run " + str(out))]  # the path after it is as long as it is
    _whole_at_80(table, [r["name"] for r in board])
    assert next(line for line in table.splitlines() if "val acc" in line).split()[-1] == "run"  # names go last

    # Its report is written like a run's, titled with its name, with the members beside it.
    page = (out / "report.html").read_text()
    assert re.search(r"<h1>([^<]*)</h1>", page).group(1) == "ensemble ens80" and ".tmp-" not in page
    assert "<h2>Ensemble and members</h2>" in page and "val_accuracy 95% CI" in page
    (out / "report.html").unlink()
    again = CliRunner().invoke(
        app, ["report", str(out), "--cache", str(env["cache"])]
    )  # was: unexpected KeyError: 'trial'
    assert again.exit_code == 0, again.output
    assert (out / "report.html").is_file() and (out / "top_losses_val.png").is_file()

    # `cache ls` keeps each feature set's name whole, in-process and in a real process.
    names = [fc.open_features(k, cache_dir=env["cache"]).name for k in (*env["keys"], env["other"])]
    listed = CliRunner().invoke(app, ["cache", "ls", "--cache", str(env["cache"])], env={"COLUMNS": "80"})
    assert listed.exit_code == 0, listed.output
    _whole_at_80(listed.stdout, names)
    real = subprocess.run(
        [sys.executable, "-m", "featurecache", "cache", "ls", "--cache", str(env["cache"])],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "80"},
        timeout=300,
        check=True,
    )
    _whole_at_80(real.stdout, names)


@pytest.fixture(scope="module")
def ens(env: dict) -> Path:
    """A weighted ensemble of members on backbone A, on backbone B, and on A+B side by side."""
    k1, k2 = env["keys"]
    runs = env["root"] / "runs"
    dense_b = fc.train_head(
        k2,
        head="dense",
        params={"hidden": "16", "epochs": 3, "dropout": 0.0},
        out=runs / "dense-b",
        cache_dir=env["cache"],
        plots=False,
    ).run_dir
    both = fc.train_head(f"{k1},{k2}", head="sgd", out=runs / "sgd-ab", cache_dir=env["cache"], plots=False).run_dir
    made = _invoke(
        [
            "ensemble",
            str(env["logreg_a"]),
            str(dense_b),
            str(both),
            "--method",
            "weighted",
            "--out",
            str(env["root"] / "ens"),
            "--cache",
            str(env["cache"]),
        ]
    )
    assert made.exit_code == 0, made.output
    return env["root"] / "ens"


@pytest.mark.slow
def test_two_backbone_ensemble_exports_one_plain_keras_model_matching_predict(
    env: dict, ens: Path, tmp_path: Path
) -> None:
    """Three heads on two backbones: one model, each backbone built once, loadable without featurecache."""
    import keras
    from PIL import Image

    from featurecache.finetuning.predict import evaluate

    exported = fc.finetune(ens, epochs=0, out=env["root"] / "ens-export", cache_dir=env["cache"], progress=False)
    assert exported.equivalence.passed and exported.equivalence.max_abs_diff < 1e-4
    model = keras.saving.load_model(exported.model_path)
    nested = sorted(
        layer.name for layer in model.layers if isinstance(layer, keras.Model) and not layer.name.startswith("fc_head_")
    )
    assert nested == sorted(BACKBONES)  # three heads, two backbones
    assert sum(layer.name.startswith("fc_head_") for layer in model.layers) == 3

    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in ((8, 8), (40, 24), (32, 32))]
    files = []
    for i, img in enumerate(images):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(img).save(files[-1])
    proba = plain_keras_proba(exported.model_path, images, tmp_path)

    # `featurecache predict` on the ensemble run directory rebuilds it from its members.
    result = _invoke(["predict", str(ens), *map(str, files), "--top-k", "10", "--json", "--cache", str(env["cache"])])
    assert result.exit_code == 0, result.output
    for row, expected in zip(json.loads(result.stdout), proba, strict=True):
        got = {int(t["class"]): t["probability"] for t in row["top"]}
        np.testing.assert_allclose([got[c] for c in range(10)], expected, atol=1e-5)

    ev = evaluate(ens, split="test", cache_dir=env["cache"], plots=False)
    cached = json.loads((ens / "metrics.json").read_text())["test"]
    assert ev.metrics["n"] == cached["n"] and ev.metrics["accuracy"] == pytest.approx(
        cached["accuracy"], abs=1.5 / cached["n"]
    )


@pytest.mark.slow
def test_equivalence_check_of_an_ensemble_names_the_feature_set_that_differs(
    env: dict, ens: Path, tmp_path: Path
) -> None:
    from featurecache.errors import EquivalenceError

    tampered = tmp_path / "tampered"
    shutil.copytree(ens, tampered)
    member = next((tampered / "members").glob("0-*"))  # logreg on backbone A
    config = json.loads((member / "config.json").read_text())
    config["features"]["spec"]["resize"] = "nearest"  # not how its features were extracted
    (member / "config.json").write_text(json.dumps(config))
    with pytest.raises(EquivalenceError) as err:
        fc.finetune(tampered, epochs=0, out=tmp_path / "never", cache_dir=env["cache"], progress=False)
    message = str(err.value)
    assert "\n" not in message and "does not reproduce" in message
    assert f"{config['features']['name']}: the rebuilt backbone's features differ from the cached ones" in message
    assert "resize 'nearest'" in message
    assert not (tmp_path / "never" / "model.keras").exists()
