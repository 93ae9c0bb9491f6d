"""The dataset digest is hashed row by row; it must equal the digest of the whole manifest document."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from featurecache.data import load_dataset
from featurecache.data.dataset import ArrayItems, Dataset, Split, file_digests
from tests.conftest import make_image_folder


def _whole(ds: Dataset) -> str:
    text = json.dumps(ds.manifest(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def test_streamed_digest_equals_the_manifest_digest_for_files_and_arrays(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "ds", classes=("cät", 'd"og', "e"), per_class=3, splits=("train", "val"))
    ds = load_dataset(str(folder))
    assert ds.digest() == _whole(ds)
    arr = np.arange(4 * 5 * 5 * 3, dtype=np.uint8).reshape(4, 5, 5, 3)
    one = Split("train", ("0", "1", "2", "3"), np.array([0, 1, 0, 1]), ArrayItems(arr))
    arrays = Dataset("a", "x.npz", ("x", "y"), {"train": one, "test": one.renamed("test")})
    assert Dataset("a", "x.npz", ("x", "y"), {"train": one, "test": one.renamed("test")}).digest() == _whole(arrays)
    empty = Dataset(
        "e", "e", ("x",), {"train": Split("train", (), np.zeros(0), ArrayItems(np.zeros((0, 2, 2, 3), np.uint8)))}
    )
    assert empty.digest() == _whole(empty)


def test_file_digests_are_sha256_of_the_bytes_larger_than_the_read_buffer(tmp_path: Path) -> None:
    blobs = [b"", b"x" * 10, bytes(range(256)) * 1000]  # the last spans several 64 KiB reads
    paths = []
    for i, blob in enumerate(blobs):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(blob)
        paths.append(p)
    assert file_digests(paths) == [hashlib.sha256(b).hexdigest() for b in blobs]
    memo = tmp_path / "memo.json"
    assert file_digests(paths, memo_path=memo) == file_digests(paths, memo_path=memo)


def _put(memo: Path, entries: dict, order: list | None = None) -> None:
    from featurecache.data.dataset import _update_memo

    keys = order if order is not None else list(entries)
    _update_memo(memo, keys, range(len(keys)), lambda j: entries[keys[j]])


def test_memo_file_keeps_its_json_format_and_reads_back_as_entries(tmp_path: Path) -> None:
    from featurecache.data.dataset import _MEMO_FORMAT, _read_memo

    memo = tmp_path / "memo.json"
    entries = {"/a/ü.jpg": (3, 1_700_000_000_000_000_000, "ab" * 32), "/a/b.png": (0, 5, "cd" * 32)}
    _put(memo, entries)
    as_dicts = {k: {"size": s, "mtime_ns": m, "sha256": d} for k, (s, m, d) in entries.items()}
    # Byte for byte what json.dump wrote before entries were kept as tuples.
    assert memo.read_text() == json.dumps(
        {"format": _MEMO_FORMAT, "files": as_dicts}, sort_keys=True, separators=(",", ":")
    )
    assert _read_memo(memo) == entries
    _put(memo, {"/a/c.jpg": (1, 2, "ef" * 32)})  # merged with what is there
    assert set(_read_memo(memo)) == {*entries, "/a/c.jpg"}
    doc = json.loads(memo.read_text())
    doc["files"]["/bad"] = {"size": "3", "mtime_ns": 1, "sha256": "x"}  # malformed entries are dropped
    memo.write_text(json.dumps(doc))
    assert "/bad" not in _read_memo(memo) and "/a/c.jpg" in _read_memo(memo)


def test_memo_update_replaces_old_entries_and_writes_a_file_listed_twice_once(tmp_path: Path) -> None:
    from featurecache.data.dataset import _MEMO_FORMAT, _read_memo

    memo = tmp_path / "memo.json"
    old = {"/a/1.jpg": (1, 1, "11" * 32), "/a/3.jpg": (3, 3, "33" * 32), "/a/5.jpg": (5, 5, "55" * 32)}
    _put(memo, old)
    fresh = {"/a/3.jpg": (30, 30, "3f" * 32), "/a/0.jpg": (0, 0, "00" * 32), "/a/9.jpg": (9, 9, "99" * 32)}
    _put(memo, fresh, order=["/a/9.jpg", "/a/3.jpg", "/a/0.jpg", "/a/9.jpg"])  # unsorted, one path twice
    merged = {**old, **fresh}
    assert _read_memo(memo) == merged
    as_dicts = {k: {"size": s, "mtime_ns": m, "sha256": d} for k, (s, m, d) in merged.items()}
    assert memo.read_text() == json.dumps(
        {"format": _MEMO_FORMAT, "files": as_dicts}, sort_keys=True, separators=(",", ":")
    )


def test_folder_paths_are_joined_from_the_ids_and_equal_the_files(tmp_path: Path) -> None:
    import pickle

    from featurecache.data import load_dataset
    from featurecache.data.dataset import JoinedPaths
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "ds", per_class=3)
    split = load_dataset(str(root)).splits["train"]
    paths = split.items.paths  # type: ignore[attr-defined]
    assert isinstance(paths, JoinedPaths) and paths.names is split.ids  # no second string, nor tuple, per file
    expected = [str((root / i).resolve()) for i in split.ids]
    assert list(paths) == expected and [paths[i] for i in range(len(paths))] == expected and paths[1:3] == expected[1:3]
    sub = split.items.subset(np.array([2, 0]))  # type: ignore[attr-defined]
    assert list(sub.paths) == [expected[2], expected[0]]
    assert list(pickle.loads(pickle.dumps(sub)).paths) == [expected[2], expected[0]]
    assert JoinedPaths.of(["/x/a", "/y/b"], "/x/", ["a", "b"]) == ("/x/a", "/y/b")  # not a common prefix: kept as is
