"""Sweeps on real cached digits features: grid parsing, ranking, best run, resume, failures,
deterministic random search, process workers sharing memory-mapped features, and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import featurecache as fc
from featurecache.cache import views
from featurecache.cli.main import app
from featurecache.errors import HeadParamError, SweepError, UnknownHeadError, UsageError
from featurecache.training.sweeps.sweep import SweepResult, parse_grid, plan_trials, sweep
from featurecache.training.train import load_run

# 12 logreg + 8 dense = 20 configurations, plus one that fails (more neighbours than training samples).
GRID = (
    "logreg:C=0.001,0.01,0.1,1,10,100;class_weight=none,balanced;max_iter=300",
    "dense:hidden=,32;lr=1e-3,1e-2;dropout=0,0.2;epochs=2;patience=0;batch_size=128",
    "knn:n_neighbors=5000",
)


# In-process lbfgs fits need one BLAS thread on the shared 2-core box (see conftest).
pytestmark = pytest.mark.usefixtures("one_blas_thread")


# ``digits`` (MobileNetV2, random weights, 32 px, all 1797 images) and ``digits_cache`` are the
# session's (tests/conftest.py).
@pytest.fixture(scope="module")
def grid_sweep(digits: views.FeatureSet, tmp_path_factory: pytest.TempPathFactory) -> SweepResult:
    out = tmp_path_factory.mktemp("sweeps") / "grid"
    return sweep(digits.key, grid=GRID, n_jobs=2, out=out, cache_dir=digits.path.parents[1], progress=False)


# ----------------------------------------------------------------------------- planning


def test_parse_grid_products_and_types() -> None:
    trials = parse_grid("dense:hidden=256,512-128;dropout=0.2,0.5;lr=1e-3,1e-4")
    assert len(trials) == 8
    assert {t.params["hidden"] for t in trials} == {(256,), (512, 128)}
    assert {t.params["lr"] for t in trials} == {1e-3, 1e-4}
    assert all(t.params["epochs"] == 30 for t in trials)  # defaults filled in
    assert trials[0].label == "dense hidden=256 dropout=0.2 lr=0.001"
    assert len({t.id for t in trials}) == 8

    assert [t.params["C"] for t in parse_grid("logreg:C=0.01,0.1,1,10")] == [0.01, 0.1, 1.0, 10.0]
    # Ids depend on the coerced parameters only: spelling and defaults do not matter.
    assert [t.id for t in parse_grid("logreg:C=1,1.0,1e0")] == [parse_grid("logreg")[0].id]
    assert parse_grid("dense:hidden=none")[0].params["hidden"] == ()
    forest = parse_grid("sklearn.ensemble:RandomForestClassifier:n_estimators=10,20")
    assert [t.params["n_estimators"] for t in forest] == [10, 20]


@pytest.mark.parametrize(
    "text,error,needle",
    [
        ("C=0.1", UsageError, "names no head"),
        ("forest:n=1", UnknownHeadError, "unknown head 'forest'"),
        ("logreg:gamma=1", HeadParamError, "has no parameter 'gamma'"),
        ("logreg:C=0.1,x", HeadParamError, "C='x' is not a valid float"),
        ("logreg:C=0.1;C=1", UsageError, "gives parameter 'C' twice"),
        ("logreg:C", HeadParamError, "is not NAME=VALUE"),
    ],
)
def test_parse_grid_errors(text: str, error: type, needle: str) -> None:
    with pytest.raises(error, match=needle) as info:
        parse_grid(text)
    assert "\n" not in str(info.value)


def test_random_trials_are_deterministic() -> None:
    a = plan_trials(trials=6, heads=("logreg", "dense"), seed=0)
    b = plan_trials(trials=6, heads="logreg,dense", seed=0)
    assert [t.id for t in a] == [t.id for t in b]
    assert [t.head for t in a] == ["logreg"] * 6 + ["dense"] * 6
    assert [t.id for t in plan_trials(trials=6, heads=("logreg", "dense"), seed=1)] != [t.id for t in a]
    # A head's draws do not depend on which other heads are swept.
    assert [t.id for t in plan_trials(trials=6, heads=("dense",), seed=0)] == [t.id for t in a[6:]]
    for t in a:
        if t.head == "logreg":
            assert 1e-4 <= t.params["C"] <= 1e2 and set(t.given) == {"C", "class_weight"}
        else:
            assert 1e-4 <= t.params["lr"] <= 1e-2 and t.params["dropout"] in (0.0, 0.2, 0.3, 0.5)
    # No grid and no trials: one default trial per head.
    assert [(t.head, t.given) for t in plan_trials(heads=("logreg", "knn"))] == [("logreg", {}), ("knn", {})]


# ----------------------------------------------------------------------------- a full sweep


def test_sweep_ranks_every_trial(grid_sweep: SweepResult) -> None:
    rows = grid_sweep.leaderboard
    assert len(rows) == 21 and grid_sweep.skipped == 0 and grid_sweep.failed == 1
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["rank"] for r in ok] == list(range(1, 21))
    assert {r["head"] for r in ok} == {"logreg", "dense"}
    values = [r["val_accuracy"] for r in ok]
    assert values == sorted(values, reverse=True)
    assert ok[0]["head"] == "logreg" and ok[0]["val_accuracy"] > 0.8
    for r in ok:
        for col in (
            "val_accuracy",
            "val_log_loss",
            "val_macro_f1",
            "val_kappa",
            "val_top3_accuracy",
            "test_accuracy",
            "fit_seconds",
        ):
            assert isinstance(r[col], float), (col, r)


def test_failed_trial_is_recorded_and_the_sweep_goes_on(grid_sweep: SweepResult) -> None:
    failed = grid_sweep.leaderboard[-1]
    assert failed["head"] == "knn" and failed["status"] == "failed" and failed["rank"] is None
    assert failed["error"].startswith("HeadParamError: n_neighbors=5000 exceeds the")
    assert "\n" not in failed["error"]
    record = json.loads((grid_sweep.out_dir / "trials" / f"{failed['trial']}.json").read_text())
    assert record["status"] == "failed" and record["error"] == failed["error"]


def test_sweep_outputs(grid_sweep: SweepResult, digits: views.FeatureSet) -> None:
    out = grid_sweep.out_dir
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["features"]["key"] == digits.key and len(meta["trials"]) == 21
    with open(out / "leaderboard.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["trial"] for r in table] == [r["trial"] for r in grid_sweep.leaderboard]
    assert float(table[0]["val_accuracy"]) == pytest.approx(grid_sweep.best["val_accuracy"])
    doc = json.loads((out / "leaderboard.json").read_text())
    assert doc["metric"] == "val_accuracy" and doc["rows"][0]["trial"] == grid_sweep.best["trial"]
    from PIL import Image

    from featurecache.report.figures import DPI

    with Image.open(out / "leaderboard.png") as im:  # the leaderboard figure: 10 inches wide, a bar per trial
        assert im.format == "PNG" and im.size[0] == round(10 * DPI) and im.size[1] >= round((1.6 + 0.3 * 21) * DPI)
    assert sorted(p.stem for p in (out / "trials").glob("*.json")) == sorted(r["trial"] for r in grid_sweep.leaderboard)
    # Process workers received the features memory-mapped, not as a pickled copy per trial.
    workers = [json.loads(p.read_text())["worker"] for p in (out / "trials").glob("*.json")]
    assert {w["features"] for w in workers} == {"memmap"}
    assert len({w["pid"] for w in workers}) == 2


@pytest.mark.slow  # trains every dense trial twice
def test_dense_trials_trained_together_score_as_if_trained_alone(
    grid_sweep: SweepResult, digits: views.FeatureSet, tmp_path: Path
) -> None:
    # The fixture's 8 dense trials went through heads.dense_group (2 workers: 2 groups of 4).
    records = [json.loads(p.read_text()) for p in (grid_sweep.out_dir / "trials").glob("*.json")]
    dense = {r["trial"]: r for r in records if r["head"] == "dense"}
    assert len(dense) == 8 and all(r["trained_together"]["heads"] == 4 for r in dense.values())
    assert all("trained_together" not in r for r in records if r["head"] != "dense")
    alone = sweep(digits, grid=[GRID[1]], n_jobs=1, together=False, out=tmp_path / "alone", progress=False)
    assert len(alone.leaderboard) == 8
    for row in alone.leaderboard:
        grouped = dense[row["trial"]]["metrics"]["val"]
        assert row["val_accuracy"] == grouped["accuracy"]
        assert row["val_log_loss"] == pytest.approx(grouped["log_loss"], abs=1e-6)


def test_best_run_is_a_loadable_run(grid_sweep: SweepResult, digits: views.FeatureSet) -> None:
    assert grid_sweep.best_run == grid_sweep.out_dir / "best"
    config, head = load_run(grid_sweep.best_run)
    best = grid_sweep.best
    assert config["sweep"]["trial"] == best["trial"] and config["head"] == best["head"] == "logreg"
    assert config["features"]["key"] == digits.key
    assert config["params"] == best["params"]
    metrics = json.loads((grid_sweep.best_run / "metrics.json").read_text())
    assert metrics["val"]["accuracy"] == best["val_accuracy"]
    ok = digits.valid("val")
    accuracy = float((head.predict(digits.features("val")[ok]) == digits.labels("val")[ok]).mean())
    assert accuracy == pytest.approx(best["val_accuracy"])


def test_restart_reruns_nothing_that_finished(grid_sweep: SweepResult, digits: views.FeatureSet) -> None:
    out = grid_sweep.out_dir
    ok_ids = [r["trial"] for r in grid_sweep.leaderboard if r["status"] == "ok"]
    before = {i: (out / "trials" / f"{i}.json").stat().st_mtime_ns for i in ok_ids}
    best_before = (out / "best" / "config.json").stat().st_mtime_ns

    again = sweep(digits.name, grid=GRID, n_jobs=2, out=out, cache_dir=digits.path.parents[1], progress=False)
    assert again.skipped == 20 and again.failed == 1  # the failed trial is tried again
    assert {i: (out / "trials" / f"{i}.json").stat().st_mtime_ns for i in ok_ids} == before
    assert (out / "best" / "config.json").stat().st_mtime_ns == best_before  # not refitted
    assert [r["trial"] for r in again.leaderboard] == [r["trial"] for r in grid_sweep.leaderboard]

    # A larger grid into the same directory runs only the new trials.
    bigger = sweep(digits, grid=(*GRID, "logreg:C=1000;max_iter=300"), out=out, progress=False)
    assert bigger.skipped == 20 and len(bigger.leaderboard) == 22
    assert {i: (out / "trials" / f"{i}.json").stat().st_mtime_ns for i in ok_ids} == before


def test_interrupted_best_is_refitted(digits: views.FeatureSet, tmp_path: Path) -> None:
    out = tmp_path / "sw"
    first = sweep(digits, grid=["logreg:C=0.1,1;max_iter=300"], out=out, progress=False)
    best_dir = first.best_run
    import shutil

    shutil.rmtree(best_dir)  # as if the first call died after its trials, before saving the best
    again = sweep(digits, grid=["logreg:C=0.1,1;max_iter=300"], out=out, progress=False)
    assert again.skipped == 2
    config, _ = load_run(again.best_run)
    assert config["sweep"]["trial"] == first.best["trial"]
    assert json.loads((again.best_run / "metrics.json").read_text())["val"]["accuracy"] == first.best["val_accuracy"]


def test_a_sweep_with_another_grid_keeps_the_first_ones_results(digits: views.FeatureSet, tmp_path: Path) -> None:
    good, worse = ["logreg:C=0.1,1;max_iter=300"], ["logreg:C=0.0001;max_iter=300"]
    first = sweep(digits, grid=good, runs_dir=tmp_path, progress=False)
    second = sweep(digits, grid=worse, runs_dir=tmp_path, progress=False)
    # By default each grid gets its own directory; the same command resumes its own.
    assert first.out_dir != second.out_dir and first.out_dir.name.startswith(f"sweep-{digits.key[:8]}-")
    assert len(json.loads((first.out_dir / "leaderboard.json").read_text())["rows"]) == 2
    assert load_run(first.best_run)[0]["sweep"]["trial"] == first.best["trial"]
    assert sweep(digits, grid=good, runs_dir=tmp_path, progress=False).out_dir == first.out_dir

    # Into the same --out, another grid adds its trials: ranked together, the best stays best.
    out = tmp_path / "shared"
    a = sweep(digits, grid=good, out=out, progress=False)
    b = sweep(digits, grid=worse, out=out, progress=False)
    assert {r["trial"] for r in b.leaderboard} == {r["trial"] for r in a.leaderboard} | {second.best["trial"]}
    assert b.best["trial"] == a.best["trial"] and b.best["val_accuracy"] > second.best["val_accuracy"]
    assert load_run(b.best_run)[0]["sweep"]["trial"] == a.best["trial"]
    sweep(digits, grid=worse, out=out, progress=False)  # resuming repeats no request
    assert len(json.loads((out / "sweep.json").read_text())["requests"]) == 2


def test_a_relative_out_follows_the_callers_working_directory(
    digits: views.FeatureSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """joblib reuses its worker processes across calls, and they keep the directory they started
    in: the workers must get absolute trial paths, or a second call from another directory writes
    its records into the first one's (found when the demo test ran after a test that chdir'ed)."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        res = sweep(digits, grid=["logreg:C=0.1,1;max_iter=300"], out="rel", n_jobs=2, progress=False)
        assert len(list((tmp_path / name / "rel" / "trials").glob("*.json"))) == 2, name
        assert res.rounds == 1 and len(res.leaderboard) == 2


_KILL_WHILE_SAVING_BEST = """
import os, signal, sys
import featurecache.training.rundir as rundir
from featurecache.training.sweeps.sweep import sweep

real = rundir.write_json
def write_json(path, obj):
    if path.name == "config.json" and path.parent.name.startswith(".best"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, obj)
rundir.write_json = write_json
sweep(sys.argv[1], grid=["logreg:C=0.1;max_iter=300"], out=sys.argv[2], cache_dir=sys.argv[3], progress=False)
"""


def test_a_killed_sweep_leaves_nothing_behind_after_the_next_run(
    digits: views.FeatureSet, digits_cache: Path, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(fc.__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_WHILE_SAVING_BEST, digits.key, str(out), str(digits_cache)],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert [p.name for p in out.iterdir() if p.name.startswith(".best")]  # the killed writer's temp dir
    (out / ".best-999999999-abcdef").mkdir()  # what versions before this one left (pid long gone)
    again = sweep(digits, grid=["logreg:C=0.1;max_iter=300"], out=out, cache_dir=digits_cache, progress=False)
    assert again.skipped == 1 and load_run(again.best_run)[0]["head"] == "logreg"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_a_sweep_killed_before_sweep_json_is_resumed(digits: views.FeatureSet, tmp_path: Path) -> None:
    out = tmp_path / "early"
    (out / "trials").mkdir(parents=True)  # what a sweep killed right after creating trials/ left
    res = sweep(digits, grid=["logreg:C=0.1;max_iter=300"], out=out, progress=False)
    assert res.best_run.is_dir() and (out / "sweep.json").is_file()


def test_resume_refuses_other_features(digits: views.FeatureSet, digits_features_copy, grid_sweep: SweepResult) -> None:
    cache = digits_features_copy.cache  # extracting 40 per split adds a feature set: not to the session's cache
    other = fc.extract(
        "builtin:digits", backbone="mobilenetv2", weights="random", size=32, limit=40, cache_dir=cache, progress=False
    )
    with pytest.raises(UsageError, match="was made for features") as info:
        sweep(other.key, grid=["logreg"], out=grid_sweep.out_dir, cache_dir=cache, progress=False)
    assert "\n" not in str(info.value)


def test_all_trials_failing_is_an_error(digits: views.FeatureSet, tmp_path: Path) -> None:
    with pytest.raises(SweepError, match="all 1 trials failed"):
        sweep(digits, grid=["knn:n_neighbors=5000"], out=tmp_path / "bad", progress=False)
    assert (tmp_path / "bad" / "leaderboard.csv").is_file()


def test_loss_metric_ranks_ascending(digits: views.FeatureSet, tmp_path: Path) -> None:
    res = sweep(
        digits,
        grid=["logreg:C=0.001,1;max_iter=300", "knn:n_neighbors=1"],
        metric="val_log_loss",
        out=tmp_path / "ll",
        progress=False,
    )
    losses = [r["val_log_loss"] for r in res.leaderboard]
    assert losses == sorted(losses)
    with pytest.raises(UsageError, match="not a validation metric"):
        sweep(digits, grid=["logreg"], metric="test_accuracy", out=tmp_path / "x", progress=False)


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_ids_read_back_from_a_sweep_directory_never_reach_a_path(
    digits: views.FeatureSet, digits_cache: Path, tmp_path: Path
) -> None:
    """Trial ids come back from trials/, sweep.json and leaderboard.json: each is checked against
    the form a sweep writes before it names a file or a directory (issue 20)."""
    import shutil

    from featurecache.errors import RunError

    grid = ["logreg:C=0.1,1;max_iter=300"]
    first = sweep(digits, grid=grid, out=tmp_path / "sw", progress=False)
    ids = [r["trial"] for r in first.leaderboard]

    def copy(name: str) -> Path:
        shutil.copytree(first.out_dir, tmp_path / name)
        return tmp_path / name

    board = copy("board")
    _edit_json(board / "leaderboard.json", lambda d: d["rows"][0].update(trial="/../../../../x"))
    res = CliRunner().invoke(
        app,
        [
            "ensemble",
            "--from-sweep",
            str(board),
            "--top",
            "2",
            "--out",
            str(tmp_path / "ens"),
            "--cache",
            str(digits_cache),
        ],
    )
    assert res.exit_code == 1, res.output
    line = _error_line(res)
    assert f"{board / 'leaderboard.json'} names trial id '/../../../../x', but a trial id is 12 hex digits" in line
    assert not (tmp_path / "ens").exists() and not list(tmp_path.glob(".ens-*"))

    meta = copy("meta")
    _edit_json(meta / "sweep.json", lambda d: d["trials"].append("../../../x"))
    with pytest.raises(RunError, match=r"sweep\.json names trial id '\.\./\.\./\.\./x'"):
        sweep(digits, grid=["logreg:C=10;max_iter=300"], out=meta, progress=False)

    record = copy("record")
    _edit_json(record / "trials" / f"{ids[0]}.json", lambda d: d.update(trial="../../x"))
    with pytest.raises(
        RunError, match=f"{ids[0]}\\.json names trial id '\\.\\./\\.\\./x'.*remove .* to run that trial again"
    ) as err:
        sweep(digits, grid=grid, out=record, progress=False)
    assert "\n" not in str(err.value)

    # A well-formed id that is not its file's: not this trial's record, so the trial runs again.
    other = copy("other")
    _edit_json(other / "trials" / f"{ids[0]}.json", lambda d: d.update(trial=ids[1]))
    again = sweep(digits, grid=grid, out=other, progress=False)
    assert again.skipped == 1 and sorted(r["trial"] for r in again.leaderboard) == sorted(ids)
    assert json.loads((other / "trials" / f"{ids[0]}.json").read_text())["trial"] == ids[0]


# ----------------------------------------------------------------------------- CLI


def _error_line(result) -> str:
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_cli_sweep_json_random_trials(digits: views.FeatureSet, digits_cache: Path, tmp_path: Path) -> None:
    args = [
        "sweep",
        "-f",
        digits.key[:12],
        "--trials",
        "2",
        "--heads",
        "logreg",
        "--out",
        str(tmp_path / "cli"),
        "--cache",
        str(digits_cache),
        "--json",
    ]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    doc = json.loads(first.stdout)
    assert doc["trials"] == 2 and doc["skipped"] == 0 and Path(doc["best_run"]).is_dir()
    assert doc["best"]["rank"] == 1 and doc["best"]["head"] == "logreg"
    again = json.loads(CliRunner().invoke(app, args).stdout)
    assert again["skipped"] == 2
    assert [r["trial"] for r in again["leaderboard"]] == [r["trial"] for r in doc["leaderboard"]]


@pytest.mark.parametrize("flag,grouped", [("--together", True), ("--one-by-one", False)])
def test_cli_sweep_together_flag(
    digits: views.FeatureSet, digits_cache: Path, tmp_path: Path, flag: str, grouped: bool
) -> None:
    out = tmp_path / "cli-dense"
    args = [
        "sweep",
        "-f",
        digits.key[:12],
        "--grid",
        "dense:hidden=,16;epochs=1;patience=0;batch_size=256",
        flag,
        "--out",
        str(out),
        "--cache",
        str(digits_cache),
        "--json",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    records = [json.loads(p.read_text()) for p in (out / "trials").glob("*.json")]
    assert len(records) == 2
    assert all(("trained_together" in r) == grouped for r in records)


def test_cli_sweep_table(digits: views.FeatureSet, digits_cache: Path, tmp_path: Path) -> None:
    opts = ["--data", "builtin:digits", "--backbone", "mobilenetv2", "--weights", "random", "--size", "32"]
    res = CliRunner().invoke(
        app,
        ["sweep", *opts, "-g", "knn:n_neighbors=1,3", "--out", str(tmp_path / "t"), "--cache", str(digits_cache), "-q"],
    )
    assert res.exit_code == 0, res.output
    assert "knn n_neighbors=1" in res.stdout and "best:" in res.stdout and str(tmp_path / "t" / "best") in res.stdout


def _assert_whole_at_80(text: str, names: list[str]) -> None:
    """``text`` fits 80 columns, cuts nothing to an ellipsis, and holds every token of ``names`` whole."""
    assert all(len(line) <= 80 for line in text.splitlines()), [line for line in text.splitlines() if len(line) > 80]
    assert "…" not in text
    words = set(text.split())
    missing = {token for name in names for token in name.split()} - words
    assert not missing, (missing, text)


def test_cli_sweep_table_keeps_configurations_whole_at_80_columns(
    digits: views.FeatureSet, digits_cache: Path, tmp_path: Path
) -> None:
    grid = ["-g", "logreg:C=0.1,1;class_weight=none,balanced", "-g", "knn:n_neighbors=1,3;weights=uniform,distance"]
    res = CliRunner().invoke(
        app,
        ["sweep", "-f", digits.key[:12], *grid, "--out", str(tmp_path / "t"), "--cache", str(digits_cache), "-q"],
        env={"COLUMNS": "80"},
    )
    assert res.exit_code == 0, res.output
    board = json.loads((tmp_path / "t" / "leaderboard.json").read_text())["rows"]
    table = res.stdout[: res.stdout.index(f"{len(board)} trials in")]  # the summary after it names paths
    _assert_whole_at_80(table, [r["name"] for r in board])
    header = next(line for line in res.stdout.splitlines() if "configuration" in line)
    assert header.split()[-1] == "configuration"  # configuration goes last
    assert "95% Wilson interval of acc on" in " ".join(res.stdout.split())


def test_leaderboard_table_marks_trials_tied_with_the_best() -> None:
    from rich.console import Console

    from featurecache.training.sweeps.leaderboard import leaderboard_table, tied_with_best

    # 48 validation images: 1 image is 0.02; five trials at 1.0, and 47/48 is within noise of them.
    accs = [1.0] * 5 + [47 / 48, 40 / 48]
    rows = [
        {
            "rank": i + 1,
            "trial": f"{i:012x}",
            "name": f"dense hidden=none batchnorm=false dropout=0.{i} optimizer=adam",
            "head": "dense",
            "status": "ok",
            "val_accuracy": a,
            "val_n": 48,
            "val_log_loss": 0.1,
            "val_macro_f1": a,
            "val_kappa": a,
            "fit_seconds": 1.0,
        }
        for i, a in enumerate(accs)
    ]
    assert tied_with_best(rows) == [True] * 6 + [False]
    assert tied_with_best(rows, "val_log_loss") == [False] * 7  # a loss has no interval
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(leaderboard_table(rows, width=80))
    text = console.export_text()
    _assert_whole_at_80(text, [r["name"] for r in rows])
    marks = [line.split()[0] for line in text.splitlines() if line.strip()[:1].isdigit() and len(line.split()) > 3]
    assert marks == ["1*", "2*", "3*", "4*", "5*", "6*", "7"]
    assert "0.93-1.00" in text and "6 trial(s) whose interval overlaps the best's" in " ".join(text.split())


@pytest.mark.parametrize(
    "args,needle,code",
    [
        (["-g", "forest:n=1"], "unknown head 'forest'", 2),
        (["-g", "logreg:C=abc"], "C='abc' is not a valid float", 2),
        (["-g", "C=1"], "names no head", 2),
        (["--heads", "logreg,nope", "--trials", "2"], "unknown head 'nope'", 2),
        (["-g", "logreg", "--metric", "test_accuracy"], "not a validation metric", 2),
        (["-g", "knn:n_neighbors=5000"], "all 1 trials failed", 1),
    ],
)
def test_cli_sweep_errors(
    digits: views.FeatureSet, digits_cache: Path, tmp_path: Path, args: list[str], needle: str, code: int
) -> None:
    res = CliRunner().invoke(
        app, ["sweep", "-f", digits.key[:12], "--cache", str(digits_cache), "--out", str(tmp_path / "e"), "-q", *args]
    )
    assert res.exit_code == code, res.output
    assert needle in _error_line(res)


def test_cli_sweep_missing_or_incomplete_features(digits: views.FeatureSet, digits_cache: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["sweep", "-f", "feedfacecafe", "--cache", str(digits_cache)])
    assert res.exit_code == 1 and "no feature set 'feedfacecafe'" in _error_line(res)

    opts = ["--data", "builtin:digits", "--backbone", "mobilenetv2", "--weights", "random", "--size", "36"]
    res = CliRunner().invoke(app, ["sweep", *opts, "--cache", str(digits_cache)])
    assert res.exit_code == 1
    assert f"extract them first: featurecache extract {' '.join(opts)} --cache {digits_cache}" in _error_line(res)

    import shutil

    other = tmp_path / "cache2"
    shutil.copytree(digits.path.parent.parent, other)
    shutil.rmtree(other / "views" / digits.name)  # the rows stay in the store; the feature set is gone
    res = CliRunner().invoke(app, ["sweep", *opts[:-1], "32", "--cache", str(other)])
    assert res.exit_code == 1
    line = _error_line(res)
    assert (
        "are not in cache" in line
        and "extract them first: featurecache extract" in line
        and line.count("--size 32") == 1
    )


def test_cli_sweep_error_in_a_real_process(digits_cache: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "FEATURECACHE_DEBUG": ""}
    res = subprocess.run(
        [sys.executable, "-m", "featurecache", "sweep", "-f", "feedfacecafe", "--cache", str(digits_cache)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"error: no feature set 'feedfacecafe' in cache {digits_cache}; list them with `featurecache cache ls --cache {digits_cache}`"
    ]


@pytest.mark.slow
def test_a_worker_that_dies_mid_trial_is_replaced_in_the_same_call(
    digits: views.FeatureSet, digits_cache: Path, tmp_path: Path
) -> None:
    # A process worker ends itself (os._exit) in its first trial, before the trial's record is
    # written, once across all processes: the sweep reads back what the other worker finished
    # and runs the lost trial again, in the same call, with the same results as in-process.
    import os
    import subprocess
    import sys

    grid = "logreg:C=0.1,1;max_iter=300"
    once = tmp_path / "fault-fired"
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(fc.__file__).resolve().parents[1]),
        "FEATURECACHE_FAULT": "trial_fitted:exit",
        "FEATURECACHE_FAULT_ONCE": str(once),
    }
    out = tmp_path / "died"
    args = ["-f", digits.key, "--cache", str(digits_cache), "--out", str(out), "--jobs", "2", "--json", "-g", grid]
    proc = subprocess.run(
        [sys.executable, "-m", "featurecache", "sweep", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert once.exists(), "the injected fault never fired: the test proved nothing"
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "a sweep worker died" in proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["rounds"] == 2 and doc["lost_tasks"] >= 1 and doc["failed"] == 0
    here = sweep(digits, grid=[grid], out=tmp_path / "here", progress=False)
    rows = {r["trial"]: r for r in doc["leaderboard"]}
    assert len(rows) == len(here.leaderboard) == 2
    for row in here.leaderboard:
        assert (rows[row["trial"]]["val_accuracy"], rows[row["trial"]]["val_log_loss"]) == (
            row["val_accuracy"],
            row["val_log_loss"],
        )
    assert load_run(out / "best")[0]["head"] == "logreg"


@pytest.mark.slow
def test_jobs_do_not_change_results(digits: views.FeatureSet, digits_cache: Path, tmp_path: Path) -> None:
    # --jobs 1 fitted logreg in the calling process with a BLAS thread per core, --jobs 2 in
    # workers with one each: up to 4e-4 apart in validation log loss.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FEATURECACHE_TF_THREADS"}
    env["PYTHONPATH"] = str(Path(fc.__file__).resolve().parents[1])
    boards = {}
    for jobs in (1, 2):
        out = tmp_path / f"j{jobs}"
        args = ["-f", digits.key, "--cache", str(digits_cache), "--out", str(out), "--jobs", str(jobs), "--json"]
        grid = ["-g", "dense:hidden=64,128-32;lr=1e-3,1e-2;epochs=3;patience=1", "-g", "logreg:C=0.1;max_iter=300"]
        proc = subprocess.run(
            [sys.executable, "-m", "featurecache", "sweep", *args, *grid],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        boards[jobs] = {
            r["trial"]: {k: v for k, v in r.items() if k.startswith(("val_", "test_"))}
            for r in json.loads(proc.stdout)["leaderboard"]
        }
        records = [json.loads(p.read_text()) for p in (out / "trials").glob("*.json")]
        assert {r["worker"].get("tf_threads") for r in records if r["head"] == "dense"} == {1}
    assert boards[1] == boards[2]  # every metric of every trial, exactly
