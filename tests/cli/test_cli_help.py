"""Every command's --help reads whole on an 80-column terminal: wrapped, never cut to an ellipsis."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from featurecache.cli.main import app

_ROOT = get_command(app)
_COMMANDS = [[name] for name in _ROOT.commands if name != "cache"] + [
    ["cache", name]
    for name in _ROOT.commands["cache"].commands  # type: ignore[attr-defined]
]


@pytest.mark.parametrize("command", [[], ["cache"], *_COMMANDS], ids=lambda c: " ".join(c) or "featurecache")
def test_help_fits_80_columns_without_cutting_anything(command: list[str]) -> None:
    res = CliRunner().invoke(app, [*command, "--help"], terminal_width=80)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("Usage: ")
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert "…" not in res.output
    if not command:  # the command list keeps each command's whole first sentence
        text = " ".join(res.output.split())
        assert (
            "extract Run a frozen backbone once over a dataset and cache its features (a repeat is a cache hit)."
            in text
        )


def test_long_examples_in_option_help_survive_whole() -> None:
    text = " ".join(CliRunner().invoke(app, ["extract", "--help"], terminal_width=80).output.split())
    assert "(path,label[,split])" in text
    assert "keras:cifar10|cifar100|mnist|fashion_mnist" in text


def test_augment_example_is_never_split_inside_a_token() -> None:
    words = CliRunner().invoke(app, ["extract", "--help"], terminal_width=80).output.split()
    assert "flip,rotation=15,zoom=0.1." in words


def _whole_at_80(text: str, names: list[str]) -> None:
    assert all(len(line) <= 80 for line in text.splitlines()), [line for line in text.splitlines() if len(line) > 80]
    assert "…" not in text
    missing = {token for name in names for token in name.split()} - set(text.split())
    assert not missing, (missing, text)


def test_backbones_table_keeps_every_name_whole_at_80_columns() -> None:
    from featurecache.backbones import list_backbones

    names = [s.name for s in list_backbones()]
    res = CliRunner().invoke(app, ["backbones"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    _whole_at_80(res.stdout, names)
    assert "inceptionresnetv2" in res.stdout.split()
    # And in a real process, where rich reads the width from $COLUMNS itself.
    env = {**os.environ, "COLUMNS": "80"}
    out = subprocess.run(
        [sys.executable, "-m", "featurecache", "backbones"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    ).stdout
    _whole_at_80(out, names)


def test_heads_tables_keep_every_word_whole_with_one_border_style_at_80_columns() -> None:
    from featurecache.training.heads import HEAD_NAMES, get_head_spec

    res = CliRunner().invoke(app, ["heads"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    words = [w for n in HEAD_NAMES for p in get_head_spec(n).params for w in (p.name, p.help) if w]
    _whole_at_80(res.stdout, words)
    assert "BatchNormalization" in res.stdout.split()
    # No half frame: the header row used to have inner separators but no left border.
    assert not any(c in res.stdout for c in "┃│┏┗")
