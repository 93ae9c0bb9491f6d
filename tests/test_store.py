"""The Zarr store: layout, units and markers, lookup, leases (no backbone involved)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featurecache.cache import store
from featurecache.errors import AmbiguousEntryError, CacheCorruptError, EntryNotFoundError, IncompleteEntryError
from tests.test_keys import BASE


def _entry(cache_dir: Path, spec=BASE, n: int = 10, chunk_rows: int = 4) -> store.FeatureSet:
    labels = np.arange(n) % 3
    ids = [f"img{i}.png" for i in range(n)]
    return store.create_entry(
        cache_dir, spec, classes=["a", "b", "c"], splits={"train": (labels, ids), "test": (labels[:5], ids[:5])},
        feature_shape=(8,), chunk_rows=chunk_rows,
    )


def test_layout_matches_design(cache_dir: Path) -> None:
    fs = _entry(cache_dir)
    assert fs.name == BASE.entry_name() and fs.key == BASE.key
    assert fs.splits == ["train", "test"]
    assert fs.feature_array("train").shape == (3, 10, 8)  # views = 1 clean + 2 augmented for train
    assert fs.feature_array("test").shape == (1, 5, 8)  # no augmented views outside train
    assert fs.feature_array("train").chunks == (1, 4, 8)
    assert list(fs.labels("train")) == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert list(fs.ids("test")) == [f"img{i}.png" for i in range(5)]
    assert fs.spec["backbone"] == "vgg19" and fs.classes == ["a", "b", "c"]
    assert not fs.complete and len(fs.units()) == 3 * 3 + 2
    assert not list((cache_dir / store.TMP_DIR).iterdir())  # built aside, renamed into place


def test_units_write_data_then_marker_and_seal(cache_dir: Path) -> None:
    fs = _entry(cache_dir)
    with pytest.raises(IncompleteEntryError):
        store.seal(fs)
    for u in fs.units():
        feats = np.full((u.stop - u.start, 8), u.view * 100 + u.chunk, np.float32)
        valid = np.array([r != 3 for r in range(u.start, u.stop)]) if u.view == 0 else None
        failures = [("img3.png", "truncated")] if (u.view == 0 and u.start <= 3 < u.stop and u.split == "train") else []
        store.write_unit(fs, u, feats, valid=valid, failures=failures)
    store.seal(fs)
    assert fs.complete and not fs.missing_units()
    assert fs.features("train", view=2)[5, 0] == 201
    assert fs.features("train", view=None).shape == (3, 10, 8)
    assert not fs.valid("train")[3] and fs.valid("train")[4]
    assert fs.failures() == [{"split": "train", "id": "img3.png", "reason": "truncated"}]


def test_find_entry_by_key_prefix_and_name(cache_dir: Path) -> None:
    fs = _entry(cache_dir)
    for ref in (fs.key, fs.key[:12], fs.name, str(fs.path)):
        assert store.find_entry(ref, cache_dir=cache_dir).key == fs.key
    with pytest.raises(EntryNotFoundError, match="cache ls"):
        store.find_entry("0123456789ab", cache_dir=cache_dir)
    with pytest.raises(EntryNotFoundError, match="at least 6"):
        store.find_entry(fs.key[:3], cache_dir=cache_dir)
    with pytest.raises(IncompleteEntryError, match="run the same"):
        store.open_features(fs.key, cache_dir=cache_dir)


def test_ambiguous_prefix(cache_dir: Path) -> None:
    import shutil

    fs = _entry(cache_dir)
    twin_key = fs.key[:8] + "f" * 56
    twin = cache_dir / f"twin--{twin_key[:12]}"
    shutil.copytree(fs.path, twin)
    meta = json.loads((twin / "zarr.json").read_text())
    meta["attributes"]["featurecache"]["key"] = twin_key
    (twin / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(AmbiguousEntryError, match="give more digits"):
        store.find_entry(fs.key[:8], cache_dir=cache_dir)
    assert store.find_entry(fs.key[:12], cache_dir=cache_dir).key == fs.key


def test_corrupted_chunk_fails_loudly(cache_dir: Path) -> None:
    fs = _entry(cache_dir)
    u = fs.units()[0]
    store.write_unit(fs, u, np.ones((4, 8), np.float32), valid=np.ones(4, bool))
    chunk = fs.path / "train" / "features" / "c" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(Exception):  # noqa: B017 - zarr raises its own checksum error type
        store.FeatureSet(fs.path).features("train")


def test_not_an_entry(tmp_path: Path) -> None:
    with pytest.raises(EntryNotFoundError):
        store.FeatureSet(tmp_path)
    (tmp_path / "zarr.json").write_text("{not json")
    with pytest.raises(CacheCorruptError):
        store.FeatureSet(tmp_path)


def test_lease_is_exclusive_and_released(cache_dir: Path) -> None:
    a = store.Lease(cache_dir, BASE.key)
    b = store.Lease(cache_dir, BASE.key)
    assert a.try_acquire()
    assert not b.try_acquire() and not b.is_stale()
    a.release()
    assert b.try_acquire()
    b.release()
    assert not b.path.exists()


def test_lease_of_dead_process_is_stale(cache_dir: Path) -> None:
    lease = store.Lease(cache_dir, BASE.key)
    proc = subprocess.run(
        [sys.executable, "-c", "import os,sys;from pathlib import Path;from featurecache.cache import store;"
         f"l=store.Lease(Path({str(cache_dir)!r}), {BASE.key!r}); assert l.try_acquire(); os._exit(0)"],
        check=True,
    )
    assert proc.returncode == 0 and lease.path.exists()
    assert lease.is_stale()
    assert lease.break_stale() and lease.try_acquire()
    lease.release()


def test_silent_lease_goes_stale_after_timeout(cache_dir: Path) -> None:
    lease = store.Lease(cache_dir, BASE.key, stale_after=0.5)
    lease.path.parent.mkdir(parents=True, exist_ok=True)
    lease.path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "x"}))
    assert not lease.is_stale()
    old = time.time() - 5
    os.utime(lease.path, (old, old))
    assert lease.is_stale()
