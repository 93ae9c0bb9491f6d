"""``train_head`` and ``sweep`` take their options as one object or as keywords: the same run either way.

Features are extracted once per module (random weights, 32 px, 20 digits per split).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import featurecache as fc
from featurecache.training.options import SweepOptions, TrainOptions

pytestmark = pytest.mark.usefixtures("one_blas_thread")

#: What differs between two runs of the same configuration: the time it took and when.
_TIMING = {"seconds", "train_seconds", "created", "versions"}


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    cache = tmp_path_factory.mktemp("cache")
    res = fc.extract(
        "builtin:digits", backbone="mobilenetv2", weights="random", size=32, limit=20, cache_dir=cache, progress=False
    )
    return res.key, cache


def _config(run_dir: Path) -> dict[str, Any]:
    config = json.loads((run_dir / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in _TIMING}


def test_train_head_options_and_keywords_give_the_same_run(features: tuple[str, Path], tmp_path: Path) -> None:
    key, cache = features
    kwargs = dict(head="logreg", params={"C": "0.5"}, val_fraction=0.3, seed=2, plots=False)
    by_keywords = fc.train_head(key, **kwargs, out=tmp_path / "a", cache_dir=cache)
    by_object = fc.train_head(key, TrainOptions(**kwargs, out=tmp_path / "b"), cache_dir=cache)
    assert (by_object.head, by_object.params, by_object.metrics) == (
        by_keywords.head,
        by_keywords.params,
        by_keywords.metrics,
    )
    assert _config(by_object.run_dir) == _config(by_keywords.run_dir)
    assert _config(by_object.run_dir)["params"]["C"] == 0.5
    assert not list(by_object.run_dir.glob("*.png"))  # plots=False went through the object

    # Keywords win over the object.
    other = fc.train_head(key, TrainOptions(**kwargs, out=tmp_path / "c"), params={"C": "2"}, cache_dir=cache)
    assert _config(other.run_dir)["params"]["C"] == 2.0 and other.metrics != by_object.metrics
    # The default run directory comes from the object's runs_dir.
    default = fc.train_head(key, TrainOptions(runs_dir=tmp_path / "runs", plots=False), cache_dir=cache)
    assert default.run_dir.parent == tmp_path / "runs"


def test_sweep_options_and_keywords_give_the_same_leaderboard(features: tuple[str, Path], tmp_path: Path) -> None:
    key, cache = features
    kwargs = dict(grid=["logreg:C=0.1,1"], metric="val_log_loss", seed=1, plots=False)
    by_keywords = fc.sweep(key, **kwargs, out=tmp_path / "a", cache_dir=cache, progress=False)
    by_object = fc.sweep(key, SweepOptions(**kwargs, out=tmp_path / "b"), cache_dir=cache, progress=False)

    def ranked(result: Any) -> list[tuple[Any, ...]]:
        return [(r["trial"], r["status"], r["val_log_loss"], r["val_accuracy"]) for r in result.leaderboard]

    assert ranked(by_object) == ranked(by_keywords) and len(by_object.leaderboard) == 2
    assert (by_object.metric, by_object.key) == (by_keywords.metric, by_keywords.key) == ("val_log_loss", key)
    meta = [json.loads((r.out_dir / "sweep.json").read_text()) for r in (by_keywords, by_object)]
    assert meta[0]["request"] == meta[1]["request"]
    assert meta[1]["request"] == {
        "grid": ["logreg:C=0.1,1"],
        "trials": 0,
        "heads": ["logreg", "dense"],
        "seed": 1,
        "metric": "val_log_loss",
    }
    assert _config(by_object.best_run) == {
        **_config(by_keywords.best_run),
        "sweep": _config(by_object.best_run)["sweep"],
    }
