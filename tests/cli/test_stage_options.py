"""One options dataclass per stage: ``train-head``, ``sweep`` and ``finetune`` build their options from it.

The defaults of ``train_head``, ``sweep`` and ``finetune`` used to be written twice, in the
function and in the command; these tests pin that the dataclass is the one source: each
command's flag, short flag, help and default come from the field, every value the dataclass
holds goes through the command line and back unchanged, and a bad value is one line naming the
flag, from the API and the CLI alike.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import featurecache as fc
from featurecache._runtime.options import Options
from featurecache.cli.main import app
from featurecache.cli.options import cli_name, to_options
from featurecache.finetuning.options import FinetuneOptions
from featurecache.training.options import SweepOptions, TrainOptions

COMMANDS: list[tuple[type[Options], str, list[str]]] = [
    (TrainOptions, "train-head", []),
    (SweepOptions, "sweep", []),
    (FinetuneOptions, "finetune", ["--run", "some-run"]),  # --run is required; it is not an option of the object
]


def _command(name: str) -> Any:
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def _parse(cls: type[Options], name: str, words: list[str], required: list[str]) -> Options:
    """Parse ``featurecache NAME WORDS`` as the app does, without running it; the options it builds."""
    ctx = _command(name).make_context(name, [*required, *words])
    return to_options(cls, ctx.params)


@pytest.mark.parametrize(
    ("cls", "name", "field"),
    [(cls, name, f) for cls, name, _ in COMMANDS for f in dataclasses.fields(cls)],
    ids=lambda v: getattr(v, "name", v if isinstance(v, str) else ""),
)
def test_command_option_is_the_dataclass_field(cls: type[Options], name: str, field: dataclasses.Field) -> None:
    params = {p.name: p for p in _command(name).params}
    param = params[cli_name(field)]
    assert param.help == field.metadata["help"]
    assert field.metadata["flag"].split("/")[0] in param.opts
    if field.metadata["short"]:
        assert field.metadata["short"] in param.opts
    # The command's default, as the dataclass reads it, is the field's default.
    assert getattr(to_options(cls, {cli_name(field): param.default}), field.name) == getattr(cls(), field.name)


def test_each_command_offers_its_fields_and_nothing_else_of_them() -> None:
    # What each command adds beside the object: the features, the cache, the executor, rendering.
    extra = {
        "train-head": {"features", "data", "limit", "cache", "json_out"},
        "sweep": {
            "features",
            "data",
            "limit",
            "cache",
            "json_out",
            "quiet",
            "verbose",
            "backend",
            "cluster",
            "scheduler",
            "scheduler_file",
            "top",
        },
        "finetune": {"run", "cache", "json_out", "quiet"},
    }
    from featurecache.extraction.options import KEYED_FIELDS

    for cls, name, _ in COMMANDS:
        params = {p.name for p in _command(name).params} - {"help"}
        lookup = set(KEYED_FIELDS) if name != "finetune" else set()
        assert params - lookup - extra[name] == {cli_name(f) for f in dataclasses.fields(cls)}, name


ROUND_TRIP = [
    TrainOptions(),
    TrainOptions(
        head="dense",
        params={"hidden": "256-128", "dropout": "0.5"},
        out="runs/my run",
        runs_dir="elsewhere",
        val_fraction=0.3,
        seed=7,
        plots=False,
        tensorboard="tb",
    ),
    SweepOptions(),
    SweepOptions(
        grid=["logreg:C=0.1,1", "dense:hidden=64;dropout=0.2,0.5"],
        trials=3,
        heads="knn, ridge",
        n_jobs=-1,
        together=False,
        metric="val_log_loss",
        out="sw",
        runs_dir="r",
        val_fraction=0.2,
        seed=5,
        plots=False,
        tensorboard="tb",
    ),
    FinetuneOptions(),
    FinetuneOptions(
        unfreeze="top:2",
        epochs=0,
        out="ft",
        lr=3e-4,
        optimizer="sgd",
        batch_size=8,
        augment="flip,rotation=10",
        patience=0,
        tolerance=1e-3,
        check_samples=0,
        data="other/place",
        limit=5,
        weights="w.weights.h5",
        seed=3,
        savedmodel=True,
        plots=False,
        tensorboard="tb",
    ),
]


@pytest.mark.parametrize("options", ROUND_TRIP, ids=lambda o: f"{type(o).__name__}-{len(o.changed())}")
def test_options_go_through_the_command_line_unchanged(options: Options) -> None:
    cls, name, required = next(c for c in COMMANDS if c[0] is type(options))
    assert _parse(cls, name, options.to_args(), required) == options
    # Only what differs from the default is written.
    assert (options.to_args() == []) == (options == cls())


@pytest.mark.parametrize(
    ("cls", "kwargs", "needle"),
    [
        (TrainOptions, dict(val_fraction=0), "--val-fraction must be a number > 0 and < 1, got 0"),
        (TrainOptions, dict(val_fraction=1.5), "--val-fraction must be a number > 0 and < 1, got 1.5"),
        (TrainOptions, dict(seed=-1), "--val-seed must be an integer from 0 to 4294967295, got -1"),
        (TrainOptions, dict(head=""), "--head must be a non-empty string"),
        (TrainOptions, dict(params=["C=1"]), "--param ['C=1'] is not NAME=VALUE pairs"),
        (SweepOptions, dict(n_jobs=0), "--jobs must be a positive number of workers or -1 for all cores, got 0"),
        (SweepOptions, dict(metric="test_accuracy"), "--metric 'test_accuracy' is not a validation metric"),
        (SweepOptions, dict(trials=-2), "--trials must be an integer >= 0, got -2"),
        (SweepOptions, dict(seed=2**32), "--sweep-seed must be an integer from 0 to 4294967295"),
        (SweepOptions, dict(heads=("logreg", 3)), "--heads ('logreg', 3) must be strings"),
        (SweepOptions, dict(val_fraction=-0.1), "--val-fraction must be a number > 0 and < 1"),
        (FinetuneOptions, dict(optimizer="adamw"), "--optimizer 'adamw' is not one of"),
        (FinetuneOptions, dict(epochs=-1), "--epochs must be an integer >= 0, got -1"),
        (FinetuneOptions, dict(batch_size=0), "--batch-size must be an integer >= 1, got 0"),
        (FinetuneOptions, dict(patience=1.5), "--patience must be an integer >= 0, got 1.5"),
        (FinetuneOptions, dict(lr=0.0), "--lr must be a number > 0, got 0.0"),
        (FinetuneOptions, dict(tolerance=-1e-4), "--tolerance must be a number >= 0"),
        (FinetuneOptions, dict(check_samples=-3), "--check-samples must be an integer >= 1, got -3 (0: all)"),
        (FinetuneOptions, dict(limit=0), "--limit must be an integer >= 1, got 0"),
        (FinetuneOptions, dict(seed=-1), "--seed must be an integer from 0 to 4294967295"),
        (FinetuneOptions, dict(unfreeze=" "), "--unfreeze must name blocks"),
    ],
)
def test_a_bad_value_fails_at_construction_naming_the_flag(cls: type[Options], kwargs: dict, needle: str) -> None:
    with pytest.raises(fc.FeatureCacheError) as info:
        cls(**kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_bad_augmentation_fails_at_construction() -> None:
    from featurecache.errors import AugmentSpecError

    with pytest.raises(AugmentSpecError):
        FinetuneOptions(augment="spin=3")


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["train-head", "--features", "0123456789ab", "--val-fraction", "0"],
            "error: --val-fraction must be a number > 0 and < 1, got 0.0",
        ),
        (
            ["sweep", "--features", "0123456789ab", "--jobs", "0"],
            "error: --jobs must be a positive number of workers or -1 for all cores, got 0",
        ),
        (["finetune", "--run", "no-such-run", "--lr", "0"], "error: --lr must be a number > 0, got 0.0"),
        (
            ["finetune", "--run", "no-such-run", "--optimizer", "adamw"],
            "error: --optimizer 'adamw' is not one of 'adam', 'rmsprop', 'sgd'",
        ),
    ],
)
def test_the_cli_rejects_a_bad_value_in_the_same_one_line_before_any_work(
    args: list[str], line: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    res = CliRunner().invoke(app, [*args, "--cache", str(cache)])
    assert res.exit_code == 2, res.output
    assert [ln for ln in res.stderr.splitlines() if ln.strip()] == [line]
    assert not cache.exists()  # nothing looked up, nothing written


def test_keywords_win_over_options_and_unknown_keywords_are_refused(tmp_path: Path) -> None:
    merged = TrainOptions.merge(TrainOptions(head="dense", seed=3), {"seed": 4}, caller="train_head")
    assert (merged.head, merged.seed) == ("dense", 4)
    with pytest.raises(
        TypeError, match=r"train_head\(\) got unexpected keyword argument\(s\) bogus; its options are head, params"
    ):
        fc.train_head("0123456789ab", bogus=1, cache_dir=tmp_path)
    with pytest.raises(TypeError, match=r"sweep\(\) takes options=SweepOptions\(\.\.\.\), got TrainOptions"):
        fc.sweep("0123456789ab", TrainOptions(), cache_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(fc.FeatureCacheError, match="--epochs must be an integer >= 0"):
        fc.finetune(tmp_path / "no-run", FinetuneOptions(), epochs=-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        FinetuneOptions().epochs = 3  # type: ignore[misc]


def test_the_verbs_show_their_options_in_their_signatures() -> None:
    import inspect

    for verb, cls in ((fc.train_head, TrainOptions), (fc.sweep, SweepOptions), (fc.finetune, FinetuneOptions)):
        params = inspect.signature(verb).parameters
        assert "options" in params
        for f in dataclasses.fields(cls):
            assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY and params[f.name].default == f.default, (
                verb,
                f.name,
            )
