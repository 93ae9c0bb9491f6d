"""The progress bar stays readable on an 80-column terminal."""

from __future__ import annotations

import pytest

from featurecache._runtime.progress import ProgressBar, fit_label


def test_fit_label_cuts_in_the_middle_and_keeps_short_labels() -> None:
    name = "extract mobilenetv3small-random-64-avg--photos--ed6db005e030"
    assert fit_label("extract x", 30) == "extract x"
    cut = fit_label(name, 30)
    assert len(cut) == 30 and cut.startswith("extract mobilenet") and cut.endswith("db005e030") and "…" in cut
    assert len(fit_label(name, 2)) == 2


@pytest.mark.parametrize("columns", [80, 120])
def test_the_bar_and_its_counts_fit_the_terminal(
    columns: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    label = "extract [photos] mobilenetv3small-random-64-avg--photos--ed6db005e030"
    with ProgressBar(True, 12345, label) as bar:
        bar(12345, status="123,456 img/s")  # as wide as a rate gets
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines, "the bar printed nothing"
    last = lines[-1]
    assert len(last) <= columns
    assert "12345/12345" in last and "img/s" in last  # nothing squeezed to an ellipsis but the label
    assert last.startswith("extract [photos] ") and "e030" in last  # a bracket in a label is text, not markup
