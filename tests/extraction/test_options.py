"""One ExtractOptions for every entry point: Python keywords, ``options=``, the CLI, printed commands.

The options used to be declared in five places (``precision`` eight times); these tests pin
that the dataclass is the one source: the CLI's flags and help come from it, the commands it
prints parse back to an equal object (so the same key), and the Python API finds features by
options as the CLI does.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import featurecache as fc
from featurecache.cache.keys import UNKEYED_DEFAULTS
from featurecache.cli.extract_opts import to_options
from featurecache.cli.main import app
from featurecache.errors import EntryNotFoundError, UsageError
from featurecache.extraction.options import FIELDS, KEYED_FIELDS, ExtractOptions

SMALL = dict(backbone="mobilenetv2", weights="random", size=32)


def _command(name: str) -> typer.main.click.Command:
    group = typer.main.get_command(app)
    for word in name.split():
        group = group.commands[word]  # type: ignore[attr-defined]
    return group


def _parse(words: list[str]) -> tuple[dict, ExtractOptions]:
    """Parse a pasted ``featurecache extract ...`` line as the app does, without running it."""
    assert words[:2] == ["featurecache", "extract"], words
    ctx = _command("extract").make_context("extract", list(words[2:]))
    return ctx.params, to_options({n: ctx.params[n] for n in FIELDS})


def test_defaults_are_the_unkeyed_defaults() -> None:
    # Fields added after entries existed must default to what the old entries were computed with.
    defaults = ExtractOptions()
    for name, value in UNKEYED_DEFAULTS.items():
        assert getattr(defaults, name) == value, name
    assert set(KEYED_FIELDS) >= {"augment_splits", "precision", "decode", "antialias"}
    assert not set(KEYED_FIELDS) & {"batch_size", "workers", "xla", "on_error"}


@pytest.mark.parametrize(
    "options",
    [
        ExtractOptions(),
        ExtractOptions(**SMALL),
        ExtractOptions(
            backbone="mobilenetv2",
            weights="random",
            size=40,
            layer="out_relu",
            pooling="max",
            resize="nearest",
            augment="flip,rotation=15,zoom=0.1",
            views=3,
            augment_splits=("train", "val"),
            seed=7,
            dtype="float16",
            precision="mixed",
            decode="fast",
            antialias=True,
            batch_size=8,
            workers=2,
            xla=False,
            on_error="fail",
        ),
        ExtractOptions(weights="/tmp/my weights.weights.h5", xla=True, augment_splits=["test"]),
    ],
)
def test_printed_command_parses_back_to_equal_options(options: ExtractOptions) -> None:
    words = shlex.split(options.to_command("my data/x.csv", limit=5, cache="/tmp/a cache"))
    params, parsed = _parse(words)
    assert parsed == options
    assert (params["data"], params["limit"], str(params["cache"])) == ("my data/x.csv", 5, "/tmp/a cache")
    # Only what differs from the default is printed (backbone and weights always, for the reader).
    assert (
        len([w for w in words if w.startswith("--")]) == 2 + len(set(options.changed()) - {"backbone", "weights"}) + 3
    )


def test_every_command_that_names_features_takes_the_same_options() -> None:
    by_field = {f.name: f for f in dataclasses.fields(ExtractOptions)}
    for name, fields_ in [
        ("extract", FIELDS),
        ("cache explain", KEYED_FIELDS),
        ("train-head", KEYED_FIELDS),
        ("sweep", KEYED_FIELDS),
    ]:
        params = {p.name: p for p in _command(name).params}
        for field in fields_:
            meta = by_field[field].metadata
            assert params[field].help == meta["help"], (name, field)
            assert meta["flag"].split("/")[0] in params[field].opts, (name, field)
        run_only = set(FIELDS) - set(fields_)
        assert not run_only & set(params), name  # looking features up takes no --batch-size


def test_keywords_options_and_overrides_give_the_same_plan(tmp_path: Path) -> None:
    opts = ExtractOptions(**SMALL, pooling="max")
    by_keywords = fc.plan("builtin:digits", **SMALL, pooling="max", limit=3, cache_dir=tmp_path)
    by_object = fc.plan("builtin:digits", opts, limit=3, cache_dir=tmp_path)
    assert by_keywords.key == by_object.key
    assert fc.plan("builtin:digits", opts, size=40, limit=3, cache_dir=tmp_path).spec.input_size == 40  # keywords win
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.size = 64  # type: ignore[misc]
    with pytest.raises(TypeError, match="plan\\(\\) got unexpected keyword argument\\(s\\) batch_size"):
        fc.plan("builtin:digits", batch_size=8, cache_dir=tmp_path)
    with pytest.raises(
        TypeError, match="extract\\(\\) got unexpected keyword argument\\(s\\) bogus; its options are backbone, weights"
    ):
        fc.extract("builtin:digits", bogus=1, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="takes options=ExtractOptions"):
        fc.plan("builtin:digits", {"size": 32}, cache_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(
        UsageError, match="pooling 'maximum' is not one of avg, max, flatten, none; pass e.g. --pooling avg"
    ):
        ExtractOptions(pooling="maximum")


def test_cli_rejects_a_bad_option_of_a_lookup_command_in_one_line(tmp_path: Path) -> None:
    for command in (["train-head"], ["sweep"], ["cache", "explain"]):
        res = CliRunner().invoke(
            app, [*command, "--data", "builtin:digits", "--precision", "half", "--cache", str(tmp_path)]
        )
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert lines == [
            "error: precision 'half' is not one of float32, mixed; pass --precision float32 or --precision mixed"
        ], (command, res.stderr)


def test_features_by_options_and_the_printed_command_when_missing(tmp_path: Path) -> None:
    """Missing features name the command; pasted, it makes exactly those features (same key)."""
    cache = tmp_path / "the cache"
    opts = ExtractOptions(
        **SMALL,
        pooling="max",
        resize="nearest",
        augment="flip",
        views=1,
        augment_splits=("train", "val"),
        seed=3,
        dtype="float16",
        decode="fast",
        antialias=True,
    )
    want = fc.plan("builtin:digits", opts, limit=2, cache_dir=cache).key
    with pytest.raises(EntryNotFoundError) as info:
        fc.features_for("builtin:digits", opts, limit=2, cache_dir=cache)
    message = str(info.value)
    assert f"(key {want[:12]}) are not in cache" in message and "\n" not in message
    command = re.search(r"extract them first: (featurecache extract .*)$", message).group(1)  # type: ignore[union-attr]
    res = CliRunner().invoke(app, [*shlex.split(command)[1:], "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["key"] == want

    fs = fc.features_for("builtin:digits", opts, limit=2, cache_dir=cache)  # a hit now, by options
    assert fs.key == want and fs.features("val").dtype == "float16"
    assert fc.features_for("builtin:digits", limit=2, cache_dir=cache, **{**dataclasses.asdict(opts)}).key == want
    assert fc.explain("builtin:digits", opts, limit=2, cache_dir=cache).status == "hit"
    # The printed options are accepted as they are by the other commands that name features.
    words = [w for w in shlex.split(command)[2:]]
    res = CliRunner().invoke(app, ["cache", "explain", *words, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["key"] == want, res.output

    # extract_missing: the same images relabelled are a new feature set over the same rows, so
    # it is written without building a model.
    from featurecache.data import Dataset, Split, load_dataset

    ds = load_dataset("builtin:digits", limit=2)
    relabelled = Dataset(
        ds.name,
        ds.source,
        ds.classes,
        {n: Split(n, s.ids, (s.labels + 1) % 10, s.items) for n, s in ds.splits.items()},
        ds.skipped,
    )
    with pytest.raises(EntryNotFoundError, match="featurecache extract --data builtin:digits --backbone mobilenetv2"):
        fc.features_for(relabelled, opts, limit=2, cache_dir=cache)
    made = fc.features_for(relabelled, opts, limit=2, cache_dir=cache, extract_missing=True, progress=False)
    assert made.key != want and made.attrs["computed"] == 0
    assert list(made.labels("train")) == list((fs.labels("train") + 1) % 10)
