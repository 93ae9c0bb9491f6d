"""What CI relies on: nothing skipped for a missing component, and no figures that go stale."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run_pytest(tmp_path: Path, require_all: bool) -> subprocess.CompletedProcess[str]:
    test = tmp_path / "test_optional.py"
    test.write_text('import pytest\n\n\ndef test_needs_it():\n    pytest.importorskip("no_such_module_featurecache")\n')
    env = {k: v for k, v in os.environ.items() if k != "FEATURECACHE_REQUIRE_ALL"}
    env["PYTHONPATH"] = str(REPO / "tests")
    if require_all:
        env["FEATURECACHE_REQUIRE_ALL"] = "1"
    # -p conftest loads the suite's tests/conftest.py (its hooks) into a run of this one file.
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "conftest",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        str(test),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_a_skip_for_a_missing_component_fails_where_ci_installs_everything(tmp_path: Path) -> None:
    here = _run_pytest(tmp_path, require_all=False)
    assert here.returncode == 0 and "1 skipped" in here.stdout, here.stdout
    ci = _run_pytest(tmp_path, require_all=True)
    assert ci.returncode == 1 and "1 failed" in ci.stdout, ci.stdout
    assert "FEATURECACHE_REQUIRE_ALL=1 but an optional component is missing" in ci.stdout
    assert "FEATURECACHE_REQUIRE_ALL=1 python -m pytest -q" in (REPO / ".ci" / "run").read_text()


def test_the_docs_state_no_test_counts_or_suite_times() -> None:
    # They went stale three times: the count and the time belong to a CI run, not to the docs
    # (the benchmarks pages time benchmarks, which is their subject).
    stale = re.compile(r"\b\d[\d,]* tests\b|\b\d+ min \d+ s\b")
    pages = [REPO / "README.md", *(REPO / "docs").rglob("*.md")]
    found = [(p.name, m.group(0)) for p in pages if "benchmarks" not in p.name for m in stale.finditer(p.read_text())]
    assert not found, found
