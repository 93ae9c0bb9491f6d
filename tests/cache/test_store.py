"""Store version 2 without a backbone: feature stores, units and markers, views, lookup, leases."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featurecache.cache import lease as lease_mod
from featurecache.cache import store, views
from featurecache.cache.keys import FORMAT_VERSION, manifest_digest, view_key
from featurecache.cache.lease import Lease, holder_is_dead, process_identity
from featurecache.errors import AmbiguousEntryError, CacheCorruptError, DiskFullError, EntryNotFoundError, LeaseError
from tests.cache.test_keys import BASE

CLASSES = ["a", "b", "c"]
SHAPE = (8,)


def _digest(i: int) -> str:
    return hashlib.sha256(f"image {i}".encode()).hexdigest()


def _value(view: int, i: int) -> float:
    """The feature value of image ``i`` in ``view``: distinct per image and view."""
    return view * 100 + i + 0.5


def _fill(st: store.FeatureStore, digests: list[str], *, bad: int | None = 3) -> None:
    """Write every view's features of ``digests`` (image ``i`` is ``_digest(i)``), image ``bad`` undecodable."""
    number = {_digest(i): i for i in range(1000)}
    for view in range(st.views):
        todo = [d for d in digests if d not in st.index(view)]
        for unit in store.allocate_units(st, view, todo):
            idx = [number[d] for d in unit.digests]
            feats = np.stack([np.full(SHAPE, 0.0 if i == bad else _value(view, i), np.float32) for i in idx])
            valid = np.asarray([i != bad for i in idx]) if view == 0 else None
            failures = [(_digest(bad), "truncated")] if view == 0 and bad in idx else []
            store.write_unit(st, unit, feats, valid=valid, failures=failures)


def _view(
    cache_dir: Path, st: store.FeatureStore, *, n: int = 10, labels_shift: int = 0, name: str = "toy"
) -> views.FeatureSet:
    """A view of train = images 0..n-1, test = images 0..4, over ``st`` (which must hold them)."""
    ids = [f"img{i}.png" for i in range(n)]
    digests = [_digest(i) for i in range(n)]
    labels = (np.arange(n) + labels_shift) % 3
    split_items = {"train": (ids, labels, digests), "test": (ids[:5], labels[:5], digests[:5])}
    dd = manifest_digest(CLASSES, [(s, i, d, lab) for s, (i, lab, d) in split_items.items()])
    splits = {}
    for s, (i, lab, d) in split_items.items():
        nviews = BASE.views_for(s)
        rows = np.asarray([[st.index(v)[x] for x in d] for v in range(nviews)], dtype=np.int64)
        splits[s] = (i, lab, d, rows)
    failed = st.failures()
    failures = [
        (s, i_, d_, failed[d_])
        for s, (i, _lab, d) in split_items.items()
        for i_, d_ in zip(i, d, strict=True)
        if d_ in failed
    ]
    return views.write_view(
        cache_dir,
        st,
        name=BASE.view_name(name, dd),
        key=view_key(st.key, dd),
        dataset_digest=dd,
        classes=CLASSES,
        splits=splits,
        failures=failures,
        extra={"dataset_name": name},
    )


@pytest.fixture
def st(cache_dir: Path) -> store.FeatureStore:
    s = store.create_store(cache_dir, BASE, feature_shape=SHAPE, chunk_rows=4)
    _fill(s, [_digest(i) for i in range(10)])
    return s


@pytest.fixture
def fs(cache_dir: Path, st: store.FeatureStore) -> views.FeatureSet:
    return _view(cache_dir, st)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _chunk(st: store.FeatureStore, view: int, slot: int, name: str = "features") -> Path:
    return st.path / f"v{view}" / name / "c" / str(slot) / ("0" if name == "features" else "")


# -- feature stores ------------------------------------------------------------------------
def test_store_layout_matches_design(cache_dir: Path, st: store.FeatureStore) -> None:
    import zarr

    assert st.path == cache_dir / store.STORES_DIR / BASE.store_name()
    assert st.name == BASE.store_name() and st.key == BASE.key
    assert st.views == 3  # 1 clean + 2 augmented
    attrs = json.loads((st.path / "zarr.json").read_text())["attributes"]["featurecache"]
    assert attrs["kind"] == "feature-store" and attrs["format_version"] == FORMAT_VERSION == 2
    assert attrs["key"] == BASE.key and attrs["chunk_rows"] == 4 and attrs["feature_shape"] == [8]
    assert attrs["spec"] == {**BASE.key_fields(), "weights_label": ""}
    # Plain zarr reads it: one features/digests array per view, valid only for view 0.
    root = zarr.open_group(str(st.path), mode="r")
    for view in range(3):
        arr = root[f"v{view}/features"]
        assert arr.shape == (12, 8) and arr.chunks == (4, 8)  # 10 rows in 3 units of 4 slots
        assert list(root[f"v{view}/digests"][:10]) == [_digest(i) for i in range(10)]
    assert "valid" in root["v0"] and "valid" not in root["v1"]
    # Markers are Zarr groups recording the sha256 of exactly the bytes they vouch for.
    for view in range(3):
        for slot in range(3):
            marker = zarr.open_group(str(st.path / "units" / f"v{view}" / f"u{slot}"), mode="r").attrs["featurecache"]
            m = len(marker["digests"])
            assert m == (4 if slot < 2 else 2) and marker["slot"] == slot and marker["view"] == view
            block = root[f"v{view}/features"][slot * 4 : slot * 4 + m]
            assert marker["sha256"] == hashlib.sha256(np.ascontiguousarray(block).tobytes()).hexdigest()
    assert store.find_store(BASE.key, cache_dir=cache_dir).path == st.path


def test_units_index_rows_and_failures(st: store.FeatureStore) -> None:
    assert st.rows(0) == st.rows(1) == st.rows(2) == 10
    assert st.index(1) == {_digest(i): i for i in range(10)}
    assert st.failures() == {_digest(3): "truncated"}
    assert list(st.read_unit(2, 1)[:, 0]) == [_value(2, i) for i in range(4, 8)]
    assert list(st.gather(1, np.array([9, 0, 5]))[:, 0]) == [_value(1, 9), _value(1, 0), _value(1, 5)]
    assert store.FeatureStore(st.path).rows(0) == 10, "markers are read back from disk"
    # Already stored images are not allocated again; new ones go to fresh slots past the old.
    assert not [d for d in [_digest(i) for i in range(10)] if d not in st.index(0)]
    units = store.allocate_units(st, 0, [_digest(i) for i in range(10, 15)])
    assert [(u.slot, len(u.digests)) for u in units] == [(3, 4), (4, 1)]
    assert st.array(0).shape == (20, 8) and st.rows(0) == 10, "allocated is not finished"
    assert units[0].marker == "units/v0/u3"


def test_unit_is_not_counted_until_its_marker_is_written(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = store.create_store(cache_dir, BASE, feature_shape=SHAPE, chunk_rows=4)
    (unit,) = store.allocate_units(st, 0, [_digest(i) for i in range(4)])

    def full(name: str) -> None:
        if name == "marker_tmp_written":
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "checkpoint", full)
    with pytest.raises(DiskFullError):
        store.write_unit(st, unit, np.ones((4, 8), np.float32), valid=np.ones(4, bool))
    monkeypatch.undo()
    again = store.FeatureStore(st.path)
    assert again.rows(0) == 0 and not again.index(0), "data without a marker vouches for nothing"
    assert not (st.path / unit.marker / "zarr.json").exists()
    with pytest.raises(CacheCorruptError, match="no completion marker"):
        again.read_unit(0, unit.slot)
    # The unit is simply planned again, on a fresh slot, and then counts.
    (redo,) = store.allocate_units(again, 0, [_digest(i) for i in range(4)])
    store.write_unit(again, redo, np.ones((4, 8), np.float32), valid=np.ones(4, bool))
    assert store.FeatureStore(st.path).rows(0) == 4


def test_write_unit_checks_the_shape(st: store.FeatureStore) -> None:
    from featurecache.errors import UsageError

    (unit,) = store.allocate_units(st, 0, [_digest(20)])
    with pytest.raises(UsageError, match="shape"):
        store.write_unit(st, unit, np.ones((2, 8), np.float32))


@pytest.mark.parametrize("damage", ["flip", "delete", "swap", "alter", "torn marker"])
def test_damaged_unit_fails_on_read_not_as_zeros(st: store.FeatureStore, damage: str) -> None:
    import zarr

    a, b = _chunk(st, 1, 0), _chunk(st, 1, 1)
    if damage == "flip":
        _flip(a)  # CRC32C fails
    elif damage == "delete":
        a.unlink()  # zarr alone would read fill values (zeros)
    elif damage == "swap":
        tmp = a.with_name("swap")
        a.rename(tmp)
        b.rename(a)
        tmp.rename(b)  # both keep valid CRCs
    elif damage == "alter":
        arr = zarr.open_array(str(st.path / "v1" / "features"), mode="r+")
        arr[1, 3] = 42.0  # a valid chunk with a valid CRC, other bytes than the marker's
    else:
        (st.path / "units" / "v1" / "u0" / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    fresh = store.FeatureStore(st.path)
    with pytest.raises(
        CacheCorruptError, match=r"unit v1/u0 of feature store .*(cache verify|no completion marker)"
    ) as info:
        fresh.gather(1, np.arange(10))
    assert "featurecache cache verify" in str(info.value) and "\n" not in str(info.value)
    assert list(fresh.gather(0, np.arange(4))[:, 0]) == [_value(0, i) if i != 3 else 0.0 for i in range(4)], (
        "other views still read"
    )


def test_remove_units_drops_marker_then_chunks(st: store.FeatureStore) -> None:
    assert store.remove_units(st, 0, [1]) == 1
    assert not (st.path / "units" / "v0" / "u1").exists()
    assert not _chunk(st, 0, 1).exists() and not (st.path / "v0" / "digests" / "c" / "1").exists()
    assert not (st.path / "v0" / "valid" / "c" / "1").exists()
    fresh = store.FeatureStore(st.path)
    assert fresh.rows(0) == 6 and _digest(5) not in fresh.index(0) and _digest(9) in fresh.index(0)
    assert fresh.rows(1) == 10, "other views keep their rows"


def test_not_a_store_or_view(tmp_path: Path) -> None:
    for cls in (store.FeatureStore, views.FeatureSet):
        d = tmp_path / cls.__name__
        d.mkdir()
        with pytest.raises(EntryNotFoundError):
            cls(d)
        (d / "zarr.json").write_text("{not json")
        with pytest.raises(CacheCorruptError):
            cls(d)


def test_create_store_completes_a_torn_one(cache_dir: Path) -> None:
    st = store.create_store(cache_dir, BASE, feature_shape=SHAPE, chunk_rows=4)
    (st.path / "zarr.json").write_text("{torn")
    assert [p for p in store.iter_stores(cache_dir)] == [st.path], "a torn store is listed as its path"
    again = store.create_store(cache_dir, BASE, feature_shape=SHAPE, chunk_rows=4)
    assert again.key == BASE.key and store.open_store(cache_dir, BASE.key).path == st.path


# -- views -----------------------------------------------------------------------------------
def test_view_layout_and_reads(cache_dir: Path, st: store.FeatureStore, fs: views.FeatureSet) -> None:
    assert fs.path.parent == cache_dir / store.VIEWS_DIR
    assert fs.name == BASE.view_name("toy", fs.attrs["dataset_digest"]) and fs.name.endswith(fs.key[:12])
    assert fs.key == view_key(BASE.key, fs.attrs["dataset_digest"])
    assert fs.attrs["store"] == st.name and fs.attrs["store_key"] == st.key and fs.store.path == st.path
    assert fs.splits == ["train", "test"] and fs.classes == CLASSES and fs.complete
    assert fs.feature_array("train").shape == (3, 10, 8)  # 1 clean + 2 augmented views for train
    assert fs.feature_array("test").shape == (1, 5, 8)  # no augmented views outside train
    assert list(fs.labels("train")) == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert list(fs.ids("test")) == [f"img{i}.png" for i in range(5)]
    assert list(fs.digests("test")) == [_digest(i) for i in range(5)]
    assert fs.spec["backbone"] == "vgg19" and fs.spec["dataset_name"] == "toy"
    assert fs.features("train", view=2)[5, 0] == _value(2, 5)
    assert fs.features("train", view=None).shape == (3, 10, 8)
    assert list(fs.feature_array("train")[1, 4:6][:, 0]) == [_value(1, 4), _value(1, 5)]
    assert list(fs.feature_array("train").oindex[2, np.array([9, 0])][:, 0]) == [_value(2, 9), _value(2, 0)]
    assert not fs.valid("train")[3] and fs.valid("train")[4] and not fs.valid("test")[3]
    assert fs.features("train")[3].tolist() == [0.0] * 8, "an undecodable image has zero features"
    assert fs.failures() == [
        {"split": "train", "id": "img3.png", "reason": "truncated"},
        {"split": "test", "id": "img3.png", "reason": "truncated"},
    ]
    assert not any((cache_dir / store.TMP_DIR).iterdir()), "built aside, renamed into place"
    fs.check_manifest()


def test_two_views_share_the_rows(cache_dir: Path, st: store.FeatureStore, fs: views.FeatureSet) -> None:
    before = st.size_bytes()
    relabelled = _view(cache_dir, st, labels_shift=1)
    assert relabelled.key != fs.key and relabelled.store.path == st.path
    assert np.array_equal(relabelled.features("train", view=None), fs.features("train", view=None))
    assert store.FeatureStore(st.path).size_bytes() == before, "a relabelled view adds no rows"
    views.remove_view(fs)
    assert not fs.path.exists() and st.path.exists()
    assert np.array_equal(views.FeatureSet(relabelled.path).features("train"), relabelled.features("train"))


@pytest.mark.parametrize("array", ["labels", "ids", "digests"])
def test_altered_view_array_is_refused(fs: views.FeatureSet, array: str) -> None:
    import zarr

    arr = zarr.open_array(str(fs.path / "train" / array), mode="r+")
    values = arr[:]
    values[0] = 2 if array == "labels" else "other"  # valid checksum, wrong content
    arr[:] = values
    with pytest.raises(CacheCorruptError, match="altered") as info:
        views.FeatureSet(fs.path).labels("train")
    assert "cache verify" in str(info.value) and f"cache rm {fs.name}" in str(info.value)


@pytest.mark.parametrize("array", ["labels", "ids", "rows"])
def test_flipped_byte_in_view_array_is_refused(fs: views.FeatureSet, array: str) -> None:
    chunk = fs.path / "train" / array / "c" / "0"
    _flip(chunk / "0" if chunk.is_dir() else chunk)
    with pytest.raises(CacheCorruptError) as info:
        views.FeatureSet(fs.path).features("train")
    assert "cache verify" in str(info.value) and "cache rm" in str(info.value)


def test_find_entry_by_key_prefix_name_and_path(cache_dir: Path, fs: views.FeatureSet) -> None:
    for ref in (fs.key, fs.key[:12], fs.key[:6], fs.name, str(fs.path)):
        assert views.find_entry(ref, cache_dir=cache_dir).key == fs.key
        assert views.open_features(ref, cache_dir=cache_dir).key == fs.key
    assert views.find_by_key(cache_dir, fs.key).path == fs.path
    assert views.find_by_key(cache_dir, "0" * 64) is None
    with pytest.raises(EntryNotFoundError, match="cache ls"):
        views.find_entry("0123456789ab", cache_dir=cache_dir)
    with pytest.raises(EntryNotFoundError, match="at least 6"):
        views.find_entry(fs.key[:3], cache_dir=cache_dir)
    # A store is not a feature set, but it is found as a store.
    with pytest.raises(EntryNotFoundError):
        views.find_entry(BASE.store_name(), cache_dir=cache_dir)
    for ref in (BASE.store_name(), BASE.key, BASE.key[:12], BASE.key[:6]):
        assert store.find_store(ref, cache_dir=cache_dir).key == BASE.key
    assert store.find_store("0123456789ab", cache_dir=cache_dir) is None
    assert store.find_store(BASE.key[:3], cache_dir=cache_dir) is None


def test_torn_view_is_reported_with_its_rm_command(cache_dir: Path, fs: views.FeatureSet) -> None:
    (fs.path / "zarr.json").write_text('{"zarr_format": 3, "attr')
    with pytest.raises(CacheCorruptError, match=f"cache rm {fs.name} --yes"):
        views.find_entry(fs.name, cache_dir=cache_dir)
    assert views.damaged_entries(cache_dir) == [fs.path]
    assert not list(views.iter_entries(cache_dir))


def test_ambiguous_prefix(cache_dir: Path, fs: views.FeatureSet) -> None:
    twin_key = fs.key[:8] + "f" * 56
    twin = cache_dir / store.VIEWS_DIR / f"twin--{twin_key[:12]}"
    shutil.copytree(fs.path, twin)
    meta = json.loads((twin / "zarr.json").read_text())
    meta["attributes"]["featurecache"]["key"] = twin_key
    (twin / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(AmbiguousEntryError, match="give more digits"):
        views.find_entry(fs.key[:8], cache_dir=cache_dir)
    assert views.find_entry(fs.key[:12], cache_dir=cache_dir).key == fs.key
    # The twin's key does not hash from its contents: refused on read.
    with pytest.raises(CacheCorruptError, match="does not hash to its key"):
        views.FeatureSet(twin).labels("train")


def test_view_of_a_removed_store_says_so(cache_dir: Path, st: store.FeatureStore, fs: views.FeatureSet) -> None:
    shutil.rmtree(st.path)
    with pytest.raises(CacheCorruptError, match="which is gone"):
        views.FeatureSet(fs.path).features("train")


# -- leftovers ---------------------------------------------------------------------------------
def test_remove_leftovers_takes_only_this_stores_debris_and_follows_no_link(
    cache_dir: Path, st: store.FeatureStore, tmp_path: Path
) -> None:
    mine = cache_dir / store.TMP_DIR / f"{st.key[:12]}-0123456789ab-abcd"
    (mine / "train").mkdir(parents=True)
    theirs = cache_dir / store.TMP_DIR / "0123456789ab-0123456789ab-abcd"
    theirs.mkdir()
    partial = _chunk(st, 0, 0).with_name("0.tmp123.partial")
    partial.write_bytes(b"x")
    aside = cache_dir / lease_mod.LOCKS_DIR / f"{st.key}.lease.stale-abcdef12"
    aside.parent.mkdir(parents=True, exist_ok=True)
    aside.write_text("{}")
    removed = set(store.remove_leftovers(cache_dir, st.key))
    assert removed == {mine, partial, aside}
    assert not any(p.exists() for p in removed) and theirs.exists()
    assert store.FeatureStore(st.path).rows(0) == 10
    # A symlinked .tmp is never followed.
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / f"{st.key[:12]}-precious").write_text("keep")
    shutil.rmtree(cache_dir / store.TMP_DIR)
    (cache_dir / store.TMP_DIR).symlink_to(target)
    store.remove_leftovers(cache_dir, st.key)
    assert (target / f"{st.key[:12]}-precious").read_text() == "keep"


# -- leases --------------------------------------------------------------------------------------
def _free_pid() -> int:
    """A pid that no process has here (a reaped child's)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    try:
        os.kill(proc.pid, 0)
    except ProcessLookupError:
        return proc.pid
    pytest.skip("the reaped child's pid was reused at once")


def test_lease_is_exclusive_and_released(cache_dir: Path) -> None:
    a = Lease(cache_dir, BASE.key)
    b = Lease(cache_dir, BASE.key)
    assert a.try_acquire()
    assert not b.try_acquire() and not b.is_stale()
    rec = b.holder()
    assert (
        rec["pid"] == os.getpid()
        and rec["host"] == socket.gethostname()
        and rec["pidns"] == process_identity()["pidns"]
    )
    with pytest.raises(LeaseError, match="still holds"):
        b.wait(timeout=0.3)
    a.release()
    assert not a.path.exists()
    assert b.try_acquire()
    a.release()  # not ours any more: a no-op
    assert b.path.exists()
    b.release()
    assert not b.path.exists()


def test_lease_of_a_dead_process_in_our_pid_namespace_is_stale_at_once(cache_dir: Path) -> None:
    lease = Lease(cache_dir, BASE.key, stale_after=3600)
    env = {**os.environ}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os;from pathlib import Path;from featurecache.cache.lease import Lease;"
            f"l=Lease(Path({str(cache_dir)!r}), {BASE.key!r}); assert l.try_acquire(); os._exit(0)",
        ],
        check=True,
        env=env,
    )
    assert proc.returncode == 0 and lease.path.exists()
    assert lease.holder()["pidns"] == process_identity()["pidns"]
    assert holder_is_dead(lease.holder())
    assert lease.is_stale(), "a dead holder in our own pid namespace is stale without waiting for stale_after"
    assert lease.break_stale() and lease.try_acquire()
    lease.release()


def test_lease_of_another_pid_namespace_waits_for_its_heartbeat(cache_dir: Path) -> None:
    me = process_identity()
    assert me["pidns"] is not None and me["pidns"] != 1
    pid = _free_pid()
    record = {
        "token": "other-container",
        "host": me["host"],
        "pid": pid,
        "boot": me["boot"],
        "pidns": 1,
        "start": 12345,
        "since": time.time(),
    }
    lease = Lease(cache_dir, BASE.key, stale_after=60)
    lease.path.parent.mkdir(parents=True, exist_ok=True)
    lease.path.write_text(json.dumps(record))
    # Same host and boot, pid gone *here*, but another pid namespace: that pid means nothing to us.
    assert not holder_is_dead(record)
    assert not lease.is_stale()
    assert not lease.try_acquire()
    # The same record in our namespace would be provably dead: the namespace is what protects it.
    assert holder_is_dead({**record, "pidns": me["pidns"]})
    # Once its heartbeat is older than stale_after, it is stale after all.
    old = time.time() - 61
    os.utime(lease.path, (old, old))
    assert lease.is_stale()
    assert lease.break_stale() and lease.try_acquire()
    lease.release()


def test_lease_holder_from_another_boot_or_host_is_not_judged_by_pid(cache_dir: Path) -> None:
    me = process_identity()
    pid = _free_pid()
    base = {"host": me["host"], "pid": pid, "boot": me["boot"], "pidns": me["pidns"], "start": None}
    assert holder_is_dead(base)
    assert not holder_is_dead({**base, "boot": "another-boot"})
    assert not holder_is_dead({**base, "boot": None})
    assert not holder_is_dead({**base, "host": "elsewhere"})
    assert not holder_is_dead({**base, "pidns": None})
    # A pid now used by another process (other start time) is dead too; the same start time is alive.
    alive = {**base, "pid": os.getpid(), "start": me["start"]}
    assert not holder_is_dead(alive)
    if me["start"] is not None:
        assert holder_is_dead({**alive, "start": me["start"] + 1})


def test_silent_lease_goes_stale_after_timeout(cache_dir: Path) -> None:
    lease = Lease(cache_dir, BASE.key, stale_after=0.5)
    lease.path.parent.mkdir(parents=True, exist_ok=True)
    lease.path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "x"}))
    assert not lease.is_stale()
    old = time.time() - 5
    os.utime(lease.path, (old, old))
    assert lease.is_stale()


def test_heartbeat_keeps_a_live_lease_fresh(cache_dir: Path) -> None:
    held = Lease(cache_dir, BASE.key, heartbeat=0.05)
    assert held.try_acquire()
    try:
        old = time.time() - 100
        os.utime(held.path, (old, old))
        deadline = time.monotonic() + 60
        while held.path.stat().st_mtime <= old + 1 and held._thread.is_alive() and time.monotonic() < deadline:
            held._thread.join(0.05)  # until the heartbeat touches the lease (or its thread ends)
        assert time.time() - held.path.stat().st_mtime < 5
        assert not Lease(cache_dir, BASE.key, stale_after=10).is_stale()
    finally:
        held.release()


def test_break_stale_puts_back_a_lease_taken_meanwhile(cache_dir: Path) -> None:
    waiter = Lease(cache_dir, BASE.key)
    fresh = Lease(cache_dir, BASE.key)
    assert fresh.try_acquire()
    judged = {"token": "the-stale-one", "host": "elsewhere", "pid": 1}
    assert not waiter.break_stale(judged), "another token than the one judged stale: put back"
    assert fresh.holder()["token"] == fresh._token and fresh.path.exists()
    fresh.release()


def test_gc_respects_a_live_lease_from_another_container(cache_dir: Path, st: store.FeatureStore) -> None:
    """Issue 9 item 8: `cache gc` from one container deleted the live entry of another (same host name)."""
    from featurecache.cache import maintenance

    me = process_identity()
    record = {
        "token": "other-container",
        "host": me["host"],
        "pid": _free_pid(),
        "boot": me["boot"],
        "pidns": 1,
        "start": 1,
        "since": time.time(),
    }
    lease = Lease(cache_dir, st.key)
    lease.path.parent.mkdir(parents=True, exist_ok=True)
    lease.path.write_text(json.dumps(record))
    # No view reads the store's rows (the other container has not written its view yet).
    dry = maintenance.gc(older_than=0, cache_dir=cache_dir)
    assert not dry.items, dry.items
    maintenance.gc(older_than=0, dry_run=False, cache_dir=cache_dir)
    assert lease.path.exists() and store.FeatureStore(st.path).rows(0) == 10
    # Silent for longer than stale_after (60 s): now it is a stale lease, and the rows are unused.
    old = time.time() - 120
    os.utime(lease.path, (old, old))
    found = {(i.kind, i.path) for i in maintenance.gc(older_than=0, cache_dir=cache_dir).items}
    assert found == {("stale lease", lease.path), ("unused rows", st.path)}, found
