"""The documentation site: it builds without a warning, and it holds the README's examples exactly.

The README is short (the pitch, the two commands, an example per stage) and links into the site,
whose pages are the examples' home (some are run by other tests, which read them from the pages).
Every README example is also in a page of ``docs/``, character for character, so the two cannot
drift.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _blocks(text: str) -> list[str]:
    """Fenced code blocks, and 4-space indented ones (dedented), as their exact contents."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    outside = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    indented = re.findall(r"(?:^|\n\n)((?:    [^\n]*\n(?:\n(?=    ))?)+)", outside)
    return fenced + ["".join(line[4:] + "\n" for line in b.rstrip("\n").split("\n")) for b in indented]


def _pages() -> list[Path]:
    return list(DOCS.rglob("*.md"))


def test_every_readme_example_is_in_the_docs() -> None:
    # The README's short examples are lines picked from the pages' longer ones: each line of a
    # README example must stand, character for character, in an example of some page.
    docs = "\n".join(b for page in _pages() for b in _blocks(page.read_text(encoding="utf-8")))
    readme = _blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(readme) >= 5  # the parser found the README's examples
    lines = [line for block in readme for line in block.splitlines() if line.strip()]
    missing = [line for line in lines if line not in docs]
    assert not missing, (
        "README example lines missing from docs/ (add them to the page of their section):\n" + "\n".join(missing)
    )


def test_tested_snippets_keep_their_markers_in_the_docs() -> None:
    # tests/extraction/test_incremental.py and tests/extraction/test_reproduce_features.py read
    # their snippets from these pages.
    cache = (DOCS / "guide" / "cache.md").read_text(encoding="utf-8")
    assert cache.count("<!-- plain-zarr -->") == 2
    recipe = (DOCS / "guide" / "reproducing.md").read_text(encoding="utf-8")
    assert recipe.startswith("# Reproducing cached features outside featurecache\n")


def test_readme_is_short_and_its_links_resolve() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert local and all(link.startswith("docs/") for link in local), local
    broken = [link for link in local if not (REPO / link).is_file()]
    assert not broken, broken
    # CI runs the README's test command (after installing from the same lock).
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "uv sync --locked --extra dev" in text and "uv sync --locked --extra dev" in ci
    assert "uv run pytest -q\n" in text and "python -m pytest -q\n" in ci


@pytest.mark.slow
def test_site_builds_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "WARNING" not in out.stderr, out.stderr[-4000:]
    api = (tmp_path / "site" / "reference" / "index.html").read_text(encoding="utf-8")
    # The API reference is generated: fc.extract's signature lists the ExtractOptions fields.
    assert "features_for" in api and "augment_splits" in api and ":class:" not in api
