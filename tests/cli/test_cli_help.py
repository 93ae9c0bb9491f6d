"""Every command's --help reads whole on an 80-column terminal: wrapped, never cut to an ellipsis."""

from __future__ import annotations

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from featurecache.cli.main import app

_ROOT = get_command(app)
_COMMANDS = [[name] for name in _ROOT.commands if name != "cache"] + [
    ["cache", name] for name in _ROOT.commands["cache"].commands  # type: ignore[attr-defined]
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
        assert "extract Run a frozen backbone once over a dataset and cache its features (a repeat is a cache hit)." in text


def test_long_examples_in_option_help_survive_whole() -> None:
    text = " ".join(CliRunner().invoke(app, ["extract", "--help"], terminal_width=80).output.split())
    assert "(path,label[,split])" in text
    assert "keras:cifar10|cifar100|mnist|fashion_mnist" in text
