"""Reports: top-loss grids (losses recomputed here), most-confused pairs, report.html in a real
headless Chromium, ``featurecache report``, and TensorBoard logs read back with TensorBoard's
own reader.

Features: MobileNetV2, random weights, 32 px, 80 digits per split, extracted once per session
(``digits_features_for`` in tests/conftest.py).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm
from typer.testing import CliRunner

import featurecache as fc
from featurecache.cache import store
from featurecache.cli.main import app
from featurecache.data import load_dataset
from featurecache.errors import RunError
from featurecache.report import most_confused, top_losses, write_report
from featurecache.training.metrics import wilson_interval
from featurecache.training.sweeps.sweep import SweepResult, sweep
from featurecache.training.train import TrainResult, train_head

DIGITS = {"backbone": "mobilenetv2", "weights": "random", "size": 32, "limit": 80}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture(scope="module")
def digits_80(digits_features_for) -> store.FeatureSet:
    """``DIGITS``' feature set, extracted once per session (tests/conftest.py)."""
    return digits_features_for(**DIGITS).open()


@pytest.fixture(scope="module")
def digits_80_cache(digits_80: store.FeatureSet) -> Path:
    """The session's cache holding ``digits_80``: read it, never write to it."""
    return digits_80.path.parents[1]


@pytest.fixture(scope="module")
def logreg_run_80(digits_80: store.FeatureSet, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return train_head(digits_80, head="logreg", params={"C": "1"}, out=tmp_path_factory.mktemp("runs") / "logreg")


# A 6-trial sweep with TensorBoard logs: 3 logreg, 3 dense trials (trained together).
GRID = ["logreg:C=0.1,1,10", "dense:hidden=16,32,64;epochs=2"]


@pytest.fixture(scope="module")
def tb_sweep(digits_80: store.FeatureSet, tmp_path_factory: pytest.TempPathFactory) -> tuple[SweepResult, Path]:
    root = tmp_path_factory.mktemp("sweeps")
    result = sweep(digits_80, grid=GRID, n_jobs=1, out=root / "sweep", progress=False, tensorboard=root / "tb")
    return result, root / "tb"


# ----------------------------------------------------------------------------- top losses


def test_top_losses_are_the_highest_recomputed_losses(logreg_run_80: TrainResult, digits_80: store.FeatureSet) -> None:
    # Independently: the head's probabilities on the cached val features, per-sample log loss.
    ok = digits_80.valid("val")
    X, y, ids = digits_80.features("val", view=0)[ok], digits_80.labels("val")[ok], digits_80.ids("val")[ok]
    proba = np.asarray(logreg_run_80.estimator.predict_proba(X), dtype=np.float64)
    proba /= proba.sum(axis=1, keepdims=True)
    losses = np.array([skm.log_loss([t], [p], labels=range(10)) for t, p in zip(y, proba, strict=True)])
    expected = [str(ids[i]) for i in np.argsort(-losses, kind="stable")[:12]]

    worst = top_losses(logreg_run_80.run_dir, split="val", n=12)
    assert worst.ids == expected
    np.testing.assert_allclose([r["loss"] for r in worst.rows], np.sort(losses)[::-1][:12], rtol=1e-6)
    assert [r["true"] for r in worst.rows] == [str(y[list(ids).index(i)]) for i in expected]

    # The images are those of the dataset for these ids, and the grid labels each with its id.
    split = load_dataset("builtin:digits", limit=80).splits["val"]
    for image, sid in zip(worst.images, expected, strict=True):
        np.testing.assert_array_equal(image, split.load(split.ids.index(sid)))
    fig = worst.figure(columns=4)
    assert [ax.get_xlabel() for ax in fig.axes[:12]] == expected

    # The run directory got the same rows, the grid PNG and the confused pairs (CSV and JSON).
    doc = json.loads((logreg_run_80.run_dir / "top_losses.json").read_text())
    assert [r["id"] for r in doc["val"]["top_losses"][:12]] == expected
    assert (logreg_run_80.run_dir / "top_losses_val.png").stat().st_size > 10_000
    cm = json.loads((logreg_run_80.run_dir / "metrics.json").read_text())["val"]["confusion_matrix"]
    pairs = doc["val"]["most_confused"]
    assert pairs == most_confused(cm, [str(c) for c in range(10)])
    off = np.array(cm) - np.diag(np.diag(cm))
    assert pairs[0]["count"] == off.max() and sum(p["count"] for p in pairs) == off.sum()
    with open(logreg_run_80.run_dir / "most_confused.csv") as fh:
        assert len([r for r in csv.DictReader(fh) if r["split"] == "val"]) == len(pairs)


def test_most_confused_orders_pairs_and_rates() -> None:
    cm = [[5, 0, 3], [1, 4, 0], [0, 6, 2]]
    pairs = most_confused(cm, ["a", "b", "c"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [("c", "b", 6), ("a", "c", 3), ("b", "a", 1)]
    assert pairs[0]["rate"] == pytest.approx(6 / 8)
    assert most_confused(cm, ["a", "b", "c"], min_count=2, top=1) == pairs[:1]


def test_top_losses_refuses_a_different_dataset(logreg_run_80: TrainResult, tmp_path: Path) -> None:
    from tests.conftest import make_image_folder

    other = make_image_folder(tmp_path / "other", classes=tuple(str(c) for c in range(10)), per_class=2)
    with pytest.raises(RunError, match="are not in the (val|train) split"):
        top_losses(logreg_run_80.run_dir, split="val", data=str(other))
    with pytest.raises(RunError, match="no predictions for split 'train'"):
        top_losses(logreg_run_80.run_dir, split="train")


def _sources(root: Path) -> dict[str, Path]:
    """The same 2-class images as a folder, a CSV manifest and an npz; class names need escaping."""
    from PIL import Image

    rng = np.random.default_rng(3)
    classes = ("a<b>", "c&d")
    folder = root / "folder"
    rows, xs, ys = [], [], []
    for ci, c in enumerate(classes):
        (folder / c).mkdir(parents=True)
        for i in range(6):
            arr = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / c / f"{i}.png")
            rows.append((f"folder/{c}/{i}.png", c))
            xs.append(arr)
            ys.append(ci)
    manifest = root / "data.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows(rows)
    npz = root / "data.npz"
    np.savez(npz, x=np.stack(xs), y=np.array(ys), classes=np.array(classes))
    return {"folder": folder, "csv": manifest, "npz": npz}


@pytest.mark.slow
def test_top_losses_read_images_back_from_folder_csv_and_npz(tmp_path: Path, cache_dir: Path) -> None:
    for kind, source in _sources(tmp_path).items():
        res = fc.extract(
            str(source), backbone="mobilenetv2", weights="random", size=32, cache_dir=cache_dir, progress=False
        )
        run = train_head(res.key, head="logreg", out=tmp_path / f"run-{kind}", cache_dir=cache_dir, val_fraction=0.5)
        worst = top_losses(run.run_dir, split="val", n=3, cache_dir=cache_dir)
        dataset = load_dataset(str(source))
        split = dataset.splits["train"]  # no val split: the run held out half of train
        assert len(worst.rows) == 3, kind
        for row, image in zip(worst.rows, worst.images, strict=True):
            i = split.ids.index(row["id"])
            np.testing.assert_array_equal(image, split.load(i))
            assert row["true"] == dataset.classes[split.labels[i]]
        page = (run.run_dir / "report.html").read_text()
        assert "a&lt;b&gt;" in page and "c&amp;d" in page and "a<b>" not in page, kind


# ----------------------------------------------------------------------------- HTML


def _chromium(page: Path, tmp_path: Path, fragment: str = "") -> tuple[str, list[str]]:
    """The DOM after scripts ran, and the console messages, from a real headless Chromium."""
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
        page.resolve().as_uri() + fragment,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Chromium logs every console message (errors, CSP violations, uncaught exceptions) as CONSOLE.
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


def _body(dom: str) -> dict[str, str]:
    tag = re.search(r"<body([^>]*)>", dom)
    assert tag, dom[:500]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', tag.group(1)))


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium); .ci/run installs it"
)


@needs_chromium
def test_run_report_in_headless_chromium(logreg_run_80: TrainResult, tmp_path: Path) -> None:
    page = logreg_run_80.run_dir / "report.html"
    dom, console = _chromium(page, tmp_path)
    assert console == []
    body = _body(dom)
    assert body["data-ready"] == "1"
    # Confusion matrices (val, test) and top-loss grids (val, test), all inline.
    assert body["data-images"] == "4"
    assert len(re.findall(r'<img src="data:image/png;base64,', dom)) == 4
    assert "<h2>Metrics</h2>" in dom and "Confusion matrix" in dom and "Top losses" in dom
    accuracy = json.loads((logreg_run_80.run_dir / "metrics.json").read_text())["val"]["accuracy"]
    assert f"{accuracy:.4f}" in dom
    # The top-loss table lists the highest-loss ids first, as the recomputation in the test above.
    worst = json.loads((logreg_run_80.run_dir / "top_losses.json").read_text())["val"]["top_losses"]
    assert dom.index(f">{worst[0]['id']}<") < dom.index(f">{worst[1]['id']}<")
    assert json.loads((logreg_run_80.run_dir / "config.json").read_text())["features"]["key"] in dom
    assert "http://" not in page.read_text().replace("http://www.w3.org", "") and "https://" not in page.read_text()


@needs_chromium
def test_sweep_report_in_headless_chromium(tb_sweep: tuple[SweepResult, Path], tmp_path: Path) -> None:
    result, _ = tb_sweep
    dom, console = _chromium(result.out_dir / "report.html", tmp_path)
    assert console == []
    body = _body(dom)
    assert body["data-ready"] == "1" and body["data-leaderboard-rows"] == "6"
    # leaderboard.png + the best run's 2 confusion matrices and 2 top-loss grids.
    assert body["data-images"] == "5"
    table = dom[dom.index('id="leaderboard"') : dom.index("</table>", dom.index('id="leaderboard"'))]
    assert table.count("<tr>") == 7  # header + 6 trials
    for trial in (r["trial"][:8] for r in result.leaderboard):
        assert f">{trial}<" in table
    assert ">logreg.C<" in table and ">dense.hidden<" in table

    # The page's script sorts the table: by val_log_loss, ascending, then descending.
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", table)
    col = headers.index("val_log_loss")
    for fragment, reverse in ((f"#sort={col}", False), (f"#sort={col}-desc", True)):
        dom, console = _chromium(result.out_dir / "report.html", tmp_path, fragment)
        assert console == []
        board = dom[dom.index('id="leaderboard"') : dom.index("</table>", dom.index('id="leaderboard"'))]
        shown = [float(re.findall(r'data-v="([^"]*)"', row)[col]) for row in board.split("<tr>")[2:]]
        assert shown == sorted((r["val_log_loss"] for r in result.leaderboard), reverse=reverse)


# ----------------------------------------------------------------------------- CLI


def test_report_command_rerenders_with_options(logreg_run_80: TrainResult, tmp_path: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(logreg_run_80.run_dir, run)
    (run / "report.html").unlink()
    (run / "top_losses_test.png").unlink()
    result = CliRunner().invoke(app, ["report", str(run), "--top", "5", "--split", "val", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["report"] == str(run / "report.html")
    doc = json.loads((run / "top_losses.json").read_text())
    assert list(doc) == ["val"] and len(doc["val"]["top_losses"]) == 5
    assert not (run / "top_losses_test.png").exists() and (run / "report.html").is_file()

    # Images gone: the page still renders and says why; --strict makes it an error.
    result = CliRunner().invoke(app, ["report", str(run), "--data", str(tmp_path / "missing")])
    assert result.exit_code == 0, result.output
    assert "Images not shown" in (run / "report.html").read_text()
    assert not (run / "top_losses_val.png").exists()
    result = CliRunner().invoke(app, ["report", str(run), "--data", str(tmp_path / "missing"), "--strict"])
    assert result.exit_code != 0 and "not found" in result.output
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code != 0 and "is not a directory" in result.output


def test_pages_are_titled_with_the_directory_name_not_the_temporary_one(
    logreg_run_80: TrainResult, tb_sweep: tuple[SweepResult, Path]
) -> None:
    # Both pages were written while their directory was still .<name>.tmp-<pid>-<hex>.
    page = (logreg_run_80.run_dir / "report.html").read_text()
    assert re.search(r"<h1>([^<]*)</h1>", page).group(1) == "run logreg - logreg"
    best = (tb_sweep[0].out_dir / "best" / "report.html").read_text()
    assert re.search(r"<h1>([^<]*)</h1>", best).group(1).startswith("run sweep/best - ")
    assert ".tmp-" not in page and ".tmp-" not in best


def test_sweep_page_shows_scores_first_and_only_the_parameters_that_vary(tb_sweep: tuple[SweepResult, Path]) -> None:
    result, _ = tb_sweep
    page = (result.out_dir / "report.html").read_text()
    table = page[page.index('id="leaderboard"') : page.index("</table>", page.index('id="leaderboard"'))]
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", table)
    assert headers[:5] == ["rank", "trial", "val_accuracy", "val_accuracy 95% CI", "tied with best"]
    first_param = min(i for i, h in enumerate(headers) if "." in h)
    assert all(i < first_param for i, h in enumerate(headers) if h.startswith(("val_", "test_")))
    # GRID varies logreg.C and dense.hidden; the rest is the same in every trial: no column for it.
    assert [h for h in headers if "." in h] == ["dense.hidden", "logreg.C"]
    assert "dense.epochs=2" in page and "logreg.max_iter=" in page
    n = result.leaderboard[0]["val_n"]
    for r in result.leaderboard:
        low, high = wilson_interval(r["val_accuracy"], n)
        assert f">{low:.4f}-{high:.4f}<" in table
    # "tied with best" is overlapping intervals with the best trial's.
    best = wilson_interval(result.leaderboard[0]["val_accuracy"], n)
    ties = [wilson_interval(r["val_accuracy"], n)[1] >= best[0] for r in result.leaderboard]
    assert table.count(">yes<") == sum(ties) >= 1


def test_top_loss_captions_cut_long_ids_in_the_middle() -> None:
    from featurecache.report import top_losses_from_arrays

    ids = [f"photos/2024/holiday/camera-roll/IMG_20240101_{i:06d}.jpg" for i in range(4)]
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    fig = top_losses_from_arrays(ids, np.array([1, 0, 1, 0]), proba, ["cat", "dog"], n=4).figure()
    captions = [ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()]
    assert len(captions) == 4
    # The end tells the images apart: it is kept, and the start, the middle is elided.
    assert sorted(c[-10:] for c in captions) == sorted(i[-10:] for i in ids)
    assert all(c.startswith("photos/2024") and "…" in c and len(c) <= 26 for c in captions)


def test_write_report_of_a_sweep_embeds_the_leaderboard(tb_sweep: tuple[SweepResult, Path]) -> None:
    result, _ = tb_sweep
    path = write_report(result.out_dir, top=4)
    page = path.read_text()
    assert page.count("<tr>") > 6 and 'id="leaderboard"' in page
    assert len(json.loads((result.out_dir / "best" / "top_losses.json").read_text())["val"]["top_losses"]) == 4


# ----------------------------------------------------------------------------- TensorBoard


def _tensorboard_sessions(log_dir: Path) -> tuple[dict[str, dict], dict[str, dict], object]:
    """HParams sessions (run -> hparams), final metrics per run and the experiment, via TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2
    from tensorboard.util import tensor_util

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(log_dir))
    mux.Reload()
    sessions, metrics, experiment = {}, {}, None
    for run, tags in mux.PluginRunToTagToContent(metadata.PLUGIN_NAME).items():
        for content in tags.values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("experiment"):
                experiment = data.experiment
            if data.HasField("session_start_info"):
                hps = data.session_start_info.hparams
                sessions[run] = {k: getattr(v, v.WhichOneof("kind")) for k, v in hps.items()}
                metrics[run] = {
                    tag: float(tensor_util.make_ndarray(mux.Tensors(run, tag)[-1].tensor_proto))
                    for tag in mux.GetAccumulator(run).Tags()["tensors"]
                    if tag.startswith(("val_", "test_"))
                }
    return sessions, metrics, experiment


def _epochs(log_dir: Path, run: str, tag: str) -> int:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir / run))
    acc.Reload()
    return len(acc.Tensors(tag)) if tag in acc.Tags()["tensors"] else 0


def test_sweep_tensorboard_has_one_hparams_run_per_trial(tb_sweep: tuple[SweepResult, Path]) -> None:
    result, log_dir = tb_sweep
    sessions, metrics, experiment = _tensorboard_sessions(log_dir)
    assert len(sessions) == 6
    by_trial = {r["trial"][:8]: r for r in result.leaderboard}
    for run, hps in sessions.items():
        row = by_trial[run[:8]]
        assert hps["head"] == row["head"]
        if row["head"] == "logreg":
            assert hps["C"] == pytest.approx(row["params"]["C"])
        else:
            assert hps["hidden"] == "-".join(str(h) for h in row["params"]["hidden"]) and hps["epochs"] == 2
        assert metrics[run]["val_accuracy"] == pytest.approx(row["val_accuracy"])
        assert metrics[run]["val_log_loss"] == pytest.approx(row["val_log_loss"])
    assert experiment is not None
    assert experiment.metric_infos[0].name.tag == "val_accuracy"
    assert {"head", "C", "hidden", "dropout"} <= {h.name for h in experiment.hparam_infos}
    # Dense trials also have their curves under Keras's tags, one point per epoch.
    dense_runs = [run for run in sessions if by_trial[run[:8]]["head"] == "dense"]
    assert len(dense_runs) == 3
    for run in dense_runs:
        assert _epochs(log_dir, f"{run}/train", "epoch_loss") == 2
        assert _epochs(log_dir, f"{run}/validation", "epoch_accuracy") == 2


def test_train_head_dense_tensorboard_uses_keras_callback(digits_80: store.FeatureSet, tmp_path: Path) -> None:
    log_dir = tmp_path / "tb"
    for _ in range(2):  # a run written again replaces its curves instead of adding to them
        run = train_head(
            digits_80,
            head="dense",
            params={"hidden": "16", "epochs": "3", "patience": "0"},
            out=tmp_path / "dense",
            plots=False,
            tensorboard=log_dir,
        )
    assert _epochs(log_dir, "dense/train", "epoch_loss") == 3
    assert _epochs(log_dir, "dense/validation", "epoch_loss") == 3
    sessions, metrics, _ = _tensorboard_sessions(log_dir)
    assert sessions["dense"]["head"] == "dense" and sessions["dense"]["hidden"] == "16"
    assert metrics["dense"]["val_accuracy"] == pytest.approx(run.metrics["val"]["accuracy"])


def test_evaluate_writes_top_losses_and_report(
    logreg_run_80: TrainResult, tmp_path: Path, digits_80_cache: Path
) -> None:
    from featurecache.finetuning.predict import evaluate

    res = evaluate(logreg_run_80.run_dir, split="test", out=tmp_path / "eval", cache_dir=digits_80_cache)
    with np.load(tmp_path / "eval" / "predictions_test.npz") as npz:
        ids, y, proba = npz["ids"], npz["y"], npz["proba"]
    losses = -np.log(np.clip(proba[np.arange(len(y)), y], np.finfo(np.float64).eps, 1))
    expected = [str(ids[i]) for i in np.argsort(-losses, kind="stable")[:16]]
    doc = json.loads((res.out / "top_losses.json").read_text())
    assert [r["id"] for r in doc["test"]["top_losses"]] == expected
    assert (res.out / "top_losses_test.png").is_file()
    page = (res.out / "report.html").read_text()
    assert "Top losses" in page and page.count('src="data:image/png;base64,') == 2
    # An evaluate directory has no config: the subtitle starts with the classes, not a separator,
    # and top-1 accuracy is the accuracy column, listed once.
    subtitle = re.search(r'<p class="muted">([^<]*)</p>', page).group(1)
    assert subtitle.startswith("10 classes: 0, 1, 2"), subtitle
    assert "top-1 accuracy" not in page and "<th>top-3 accuracy</th>" in page
    assert "<th>accuracy 95% CI</th>" in page


@pytest.mark.slow
def test_finetune_tensorboard_and_report(logreg_run_80: TrainResult, tmp_path: Path, digits_80_cache: Path) -> None:
    from featurecache.finetuning.finetune import finetune

    log_dir = tmp_path / "tb"
    res = finetune(
        logreg_run_80.run_dir,
        unfreeze="top:1",
        epochs=2,
        patience=0,
        out=tmp_path / "ft",
        cache_dir=digits_80_cache,
        progress=False,
        tensorboard=log_dir,
    )
    assert _epochs(log_dir, "ft/train", "epoch_loss") == 2
    assert _epochs(log_dir, "ft/validation", "epoch_accuracy") == 2
    sessions, metrics, _ = _tensorboard_sessions(log_dir)
    assert sessions["ft"]["unfreeze"] == "top:1" and sessions["ft"]["optimizer"] == "adam"
    assert metrics["ft"]["val_accuracy"] == pytest.approx(res.metrics["val"]["accuracy"])
    # The fine-tuned model's own top losses, from its predictions.
    with np.load(res.out / "predictions.npz") as npz:
        ids, y, proba = npz["val_ids"], npz["val_y"], npz["val_proba"]
    losses = -np.log(np.clip(proba[np.arange(len(y)), y], np.finfo(np.float64).eps, 1))
    doc = json.loads((res.out / "top_losses.json").read_text())
    assert [r["id"] for r in doc["val"]["top_losses"]] == [str(ids[i]) for i in np.argsort(-losses, kind="stable")[:16]]
    page = (res.out / "report.html").read_text()
    assert "fine-tune ft" in page and "Training curves" in page
