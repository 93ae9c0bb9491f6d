"""``finetune`` takes its options as one object or as keywords: the same export and config either way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import featurecache as fc
from featurecache.finetuning.options import FinetuneOptions

_TIMING = {"seconds", "created", "versions"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ftopts")
    cache = root / "cache"
    res = fc.extract(
        "builtin:digits", backbone="mobilenetv2", weights="random", size=32, limit=20, cache_dir=cache, progress=False
    )
    return fc.train_head(res.key, head="logreg", out=root / "run", cache_dir=cache, plots=False).run_dir, cache


def _config(out: Path) -> dict[str, Any]:
    config = json.loads((out / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in _TIMING}


def test_finetune_options_and_keywords_give_the_same_export(run: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, cache = run
    # epochs=0: rebuilt, checked and exported; the training settings are still recorded.
    kwargs = dict(epochs=0, lr=3e-4, optimizer="sgd", batch_size=8, patience=1, seed=5, check_samples=0, plots=False)
    by_keywords = fc.finetune(run_dir, **kwargs, out=tmp_path / "a", cache_dir=cache, progress=False)
    by_object = fc.finetune(run_dir, FinetuneOptions(**kwargs, out=tmp_path / "b"), cache_dir=cache, progress=False)
    assert by_object.out == tmp_path / "b" and by_object.model_path.is_file()
    assert (by_object.metrics, by_object.equivalence.to_json()) == (
        by_keywords.metrics,
        by_keywords.equivalence.to_json(),
    )
    assert _config(by_object.out) == _config(by_keywords.out)
    training = _config(by_object.out)["training"]
    assert {k: training[k] for k in ("epochs", "lr", "optimizer", "batch_size", "patience", "seed")} == {
        "epochs": 0,
        "lr": 3e-4,
        "optimizer": "sgd",
        "batch_size": 8,
        "patience": 1,
        "seed": 5,
    }
    assert by_object.equivalence.n == 20  # check_samples=0: every validation image (20 digits per split)
    assert not list(by_object.out.glob("*.png"))

    # Keywords win over the object.
    other = fc.finetune(
        run_dir, FinetuneOptions(**kwargs, out=tmp_path / "c"), check_samples=4, cache_dir=cache, progress=False
    )
    assert other.equivalence.n == 4
