"""The storage interface: one set of functions for local folders and object stores.

Nothing above it branches on which kind a location is. The object-store side of each function
runs against a real S3 endpoint in ``test_s3.py``; here the local side, and the rule that only
the storage layer tells the two apart.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import featurecache as fc
from featurecache.cache import storage

PACKAGE = Path(fc.__file__).resolve().parent
#: The storage layer: the interface, local file writes, and the lease on conditional writes.
STORAGE_LAYER = {"cache/storage.py", "cache/fsio.py", "cache/objlease.py"}


def test_only_the_storage_layer_tells_local_from_remote() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in STORAGE_LAYER:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\bRemotePath\b|\bis_remote\b", line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert offenders == [], "ask featurecache.cache.storage (e.g. supports_rename) instead:\n" + "\n".join(offenders)


def test_roots_say_whether_they_can_rename(tmp_path: Path) -> None:
    assert storage.supports_rename(storage.as_location(tmp_path))
    assert not storage.supports_rename(storage.as_location("s3://bucket/cache"))
    assert storage.as_location("rel/dir", resolve=False) == Path("rel/dir")
    assert storage.as_location("rel/dir") == Path("rel/dir").absolute()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``root/`` with nested files, a temp file of a killed writer, and a link to a folder outside."""
    root = tmp_path / "root"
    (root / "v0" / "u1").mkdir(parents=True)
    (root / "v0" / "u1" / "zarr.json").write_text("{}")
    (root / "v0" / "u1" / ".zarr.json.abcd.partial").write_text("{")
    (root / "top.json").write_text("[]")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "kept.partial").write_text("x")
    (root / "link").symlink_to(outside, target_is_directory=True)
    return root


def test_find_lists_files_relative_and_follows_no_link(tree: Path) -> None:
    assert storage.find(tree) == ["top.json", "v0/u1/.zarr.json.abcd.partial", "v0/u1/zarr.json"]
    assert storage.find(tree / "absent") == []


def test_read_many_maps_a_missing_file_to_its_error(tree: Path) -> None:
    got = storage.read_many([tree / "top.json", tree / "nope.json"])
    assert got[tree / "top.json"] == b"[]" and isinstance(got[tree / "nope.json"], FileNotFoundError)


def test_temp_files_are_the_partials_under_a_folder_never_through_a_link(tree: Path) -> None:
    assert storage.temp_files(tree) == [tree / "v0" / "u1" / ".zarr.json.abcd.partial"]
    assert storage.temp_files(tree / "link") == []
    assert storage.temp_files(storage.as_location("s3://bucket/cache")) == []


def test_newest_mtime_covers_everything_under_a_folder(tree: Path) -> None:
    unit = tree / "v0" / "u1"
    paths = [tree, tree / "top.json", tree / "link", tree / "v0", unit, *sorted(unit.iterdir())]
    for i, path in enumerate(paths):
        os.utime(path, (1_000_000 + i, 1_000_000 + i), follow_symlinks=False)
    os.utime(unit / "zarr.json", (2_000_000, 2_000_000))
    assert storage.newest_mtime(tree) == 2_000_000
    assert storage.newest_mtime(tree / "top.json") == 1_000_001  # a file: its own time
    assert storage.newest_mtime(tree / "absent") == 0.0


def test_remove_group_says_whether_one_was_there(tree: Path) -> None:
    assert storage.remove_group(tree / "v0" / "u1") is True
    assert not (tree / "v0" / "u1").exists()
    assert storage.remove_group(tree / "v0" / "u1") is False
    assert storage.remove_group(tree / "link") is False and (tree / "link").is_dir(), "a link is not a group"


def test_discard_moves_aside_then_deletes_and_unlinks_a_link(tree: Path, tmp_path: Path) -> None:
    trash = tmp_path / ".tmp"
    storage.discard(tree / "link", trash_dir=trash)
    assert not (tree / "link").is_symlink()
    assert (tmp_path / "outside" / "kept.partial").exists(), "a link is never followed"
    storage.discard(tree, trash_dir=trash)
    assert not tree.exists() and list(trash.iterdir()) == []
