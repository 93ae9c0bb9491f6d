"""rundir: directories replaced whole, by exchange or by the two-rename fallback; leftovers cleaned."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from featurecache.training import rundir


def _fill(d: Path, text: str) -> None:
    (d / "a.txt").write_text(text)
    (d / "sub").mkdir()
    (d / "sub" / "b.txt").write_text(text)


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_dir_swaps_in_a_whole_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:  # a platform or filesystem without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(rundir, "_renameat2", lambda: None)
    dest = tmp_path / "run"
    with rundir.replace_dir(dest) as tmp:
        _fill(tmp, "old")
    with rundir.replace_dir(dest) as tmp:
        _fill(tmp, "new")
        assert (dest / "a.txt").read_text() == "old"  # untouched until the swap
    assert (dest / "a.txt").read_text() == (dest / "sub" / "b.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing left aside


def test_a_failed_write_leaves_the_old_directory(tmp_path: Path) -> None:
    dest = tmp_path / "run"
    with rundir.replace_dir(dest) as tmp:
        _fill(tmp, "old")
    with pytest.raises(RuntimeError), rundir.replace_dir(dest) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed halfway")
    assert (dest / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_clean_leftovers_spares_live_writers(tmp_path: Path) -> None:
    dest = tmp_path / "run"
    dead = tmp_path / ".run.tmp-999999999-abcdef"  # beyond pid_max: that process is gone
    live = tmp_path / f".run.tmp-{os.getppid()}-abcdef"  # our parent: alive
    legacy = tmp_path / ".best-999999999-123456"
    for d in (dead, live, legacy):
        d.mkdir()
    removed = rundir.clean_leftovers(dest, also=(".best-",))
    assert sorted(removed) == sorted([dead, legacy]) and live.is_dir()
