"""``cache verify``, ``repair``, ``gc``, ``rm`` and ``explain`` on real store-v2 caches (and real damage)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import featurecache as fc
from featurecache.cache import maintenance, store, views
from featurecache.cache.lease import LOCKS_DIR, Lease
from featurecache.cli.main import app
from featurecache.data import Dataset, load_dataset
from featurecache.data.dataset import Split
from featurecache.errors import CacheCorruptError, UsageError

# Two views for train, chunks of 4 rows: several units per view, augmented ones included.
PLAN = dict(backbone="mobilenetv2", weights="random", size=32, limit=8, views=1, augment="flip,rotation=10")
OPTIONS = dict(PLAN, batch_size=4, chunk_rows=4)
CLI_PLAN = [
    "--backbone",
    "mobilenetv2",
    "--weights",
    "random",
    "--size",
    "32",
    "--limit",
    "8",
    "--views",
    "1",
    "--augment",
    "flip,rotation=10",
]


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> views.FeatureSet:
    """A clean cache made by one real extraction; tests only read it (damage goes to copies)."""
    root = tmp_path_factory.mktemp("clean")
    res = fc.extract("builtin:digits", cache_dir=root, progress=False, **OPTIONS)
    assert not res.cached and res.computed == 8 * 3 + 8  # 24 clean + 8 augmented train views
    return fc.open_features(res.key, cache_dir=root)


def _root(fs: views.FeatureSet) -> Path:
    return fs.path.parent.parent


def _copy(fs: views.FeatureSet, tmp_path: Path) -> views.FeatureSet:
    """The whole cache of ``fs`` copied (stores, views, memo), and ``fs`` in the copy."""
    root = tmp_path / "cache"
    shutil.copytree(_root(fs), root, symlinks=True)
    return views.FeatureSet(root / views.VIEWS_DIR / fs.name)


def _rows(fs: views.FeatureSet) -> int:
    return sum(fs.layout(s).n * fs.layout(s).views for s in fs.splits)


def _slots(fs: views.FeatureSet) -> set[tuple[int, int]]:
    """``(view, slot)`` of every store unit ``fs`` reads."""
    cr = fs.store.chunk_rows
    out = set()
    for s in fs.splits:
        rows = fs.feature_array(s).rows
        for v in range(rows.shape[0]):
            out |= {(v, int(r) // cr) for r in rows[v]}
    return out


def _chunk(st: store.FeatureStore, view: int, slot: int) -> Path:
    return st.path / f"v{view}" / "features" / "c" / str(slot) / "0"


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _all_features(fs: views.FeatureSet) -> dict[str, np.ndarray]:
    return {s: fs.features(s, view=None) for s in fs.splits}


def _relabelled(shift: int = 1, splits: tuple[str, ...] | None = None) -> Dataset:
    """builtin:digits (limit 8) with every label shifted, or only some of its splits: same images."""
    ds = load_dataset("builtin:digits", limit=8)
    out = {}
    for name, sp in ds.splits.items():
        if splits is None or name in splits:
            out[name] = Split(name, sp.ids, (sp.labels + shift) % len(ds.classes), sp.items)
    return Dataset(ds.name, ds.source, ds.classes, out, ds.skipped)


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    for p in [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]:
        os.utime(p, (then, then), follow_symlinks=False)


def _errors(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


# -- verify -----------------------------------------------------------------------------
def test_verify_passes_on_a_clean_view(clean: views.FeatureSet) -> None:
    root = _root(clean)
    assert len(_slots(clean)) == 6 + 2  # 24 clean rows and 8 augmented ones, 4 per unit
    report = fc.verify(clean.key[:12], sample=_rows(clean), cache_dir=root)
    assert report.ok, report.problems
    assert report.units_checked == len(_slots(clean)) and report.sampled == _rows(clean)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4 * np.abs(clean.features("train")).max()
    res = CliRunner().invoke(app, ["cache", "verify", clean.key[:12], "--sample", "4", "--cache", str(root)])
    assert res.exit_code == 0, res.output
    assert (
        f"ok {clean.name}" in res.stdout and "4 vectors recomputed" in res.stdout and "8 units read back" in res.stdout
    )
    # The whole store, by name: every unit, nothing to recompute.
    whole = fc.verify(clean.store.name, sample=0, cache_dir=root)
    assert whole.ok and whole.units_checked == 8 and whole.name == clean.store.name


def test_verify_detects_a_corrupted_chunk(clean: views.FeatureSet, tmp_path: Path) -> None:
    fs = _copy(clean, tmp_path)
    _flip(_chunk(fs.store, 1, 1))  # augmented view, train rows 4:8
    report = fc.verify(fs.name, sample=_rows(fs), cache_dir=_root(fs))
    assert not report.ok
    assert [p for p in report.problems if "unit v1/u1" in p and "is unreadable" in p], report.problems
    # Structural damage is reported before (instead of) recomputing from damaged bytes.
    assert report.sampled == 0 and report.units_checked == len(_slots(fs)) - 1
    res = CliRunner().invoke(app, ["cache", "verify", fs.name, "--cache", str(_root(fs))])
    assert res.exit_code == 1
    assert "problem: unit v1/u1 of feature store" in res.stderr and "is unreadable" in res.stderr
    (line,) = _errors(res.stderr)
    assert line.startswith(f"error: {fs.name} failed verification with 1 problem (listed above)") and "--repair" in line


def test_verify_detects_an_altered_feature_value(clean: views.FeatureSet, tmp_path: Path) -> None:
    import zarr

    fs = _copy(clean, tmp_path)
    st = fs.store
    row = int(fs.feature_array("train").rows[1][5])
    arr = zarr.open_array(str(st.path / "v1" / "features"), mode="r+")
    before = float(arr[row, 3])
    arr[row, 3] = before + 0.25  # a valid chunk with a valid checksum
    # The marker's sha256 catches it without recomputing anything.
    report = fc.verify(fs.name, sample=0, cache_dir=_root(fs))
    assert not report.ok
    assert [
        p
        for p in report.problems
        if f"unit v1/u{row // 4}" in p and "does not hold the bytes its marker vouches for" in p
    ], report.problems
    # A store whose marker was rewritten to vouch for the altered bytes (say, numerical drift):
    # only recomputation can tell, and it names the very vector.
    marker_path = st.path / "units" / "v1" / f"u{row // 4}" / "zarr.json"
    doc = json.loads(marker_path.read_text())
    marker = doc["attributes"]["featurecache"]
    block = np.ascontiguousarray(arr[(row // 4) * 4 : (row // 4) * 4 + len(marker["digests"])])
    marker["sha256"] = hashlib.sha256(block.tobytes()).hexdigest()
    marker_path.write_text(json.dumps(doc))
    report = fc.verify(fs.name, sample=_rows(fs), cache_dir=_root(fs))
    assert not report.ok and len(report.mismatches) == 1, report.problems
    m = report.mismatches[0]
    assert (m.split, m.view, m.index) == ("train", 1, 5) and m.id == str(fs.ids("train")[5])
    assert m.max_abs_diff == pytest.approx(0.25, rel=1e-3)
    assert any("max abs diff 0.25" in p and "stored values were altered" in p for p in report.problems), report.problems


def test_verify_detects_a_tampered_spec_and_a_missing_marker(clean: views.FeatureSet, tmp_path: Path) -> None:
    fs = _copy(clean, tmp_path)
    st = fs.store
    meta = json.loads((st.path / "zarr.json").read_text())
    meta["attributes"]["featurecache"]["spec"]["input_size"] = 48
    (st.path / "zarr.json").write_text(json.dumps(meta))
    (st.path / "units" / "v0" / "u2" / "zarr.json").unlink()
    report = fc.verify(fs.name, sample=0, cache_dir=_root(fs))
    assert any("hashes to" in p and f"not to its key {st.key[:12]}" in p for p in report.problems), report.problems
    assert any("unit v0/u2" in p and "has no completion marker" in p for p in report.problems), report.problems


def test_verify_rejects_bad_arguments(clean: views.FeatureSet) -> None:
    with pytest.raises(UsageError, match="sample"):
        fc.verify(clean.name, sample=-1, cache_dir=_root(clean))
    with pytest.raises(UsageError, match="rtol"):
        fc.verify(clean.name, rtol=0, cache_dir=_root(clean))


# -- integrity end to end (issue 9) ---------------------------------------------------------
def _damage(fs: views.FeatureSet, how: str) -> set[tuple[int, int]]:
    """Damage the copy ``fs`` as in issue 9; returns the store units it damaged."""
    st = fs.store
    if how in ("labels", "ids"):
        _flip(fs.path / "train" / how / "c" / "0")
        return set()
    if how == "rows":
        # Two rows chunks of one view moved into each other's place: each keeps a valid CRC
        # and the ids, labels and digests still hash to the key, but train would read val's rows.
        a, b = fs.path / "train" / "rows" / "c" / "0" / "0", fs.path / "val" / "rows" / "c" / "0" / "0"
        tmp = a.with_name("swap")
        a.rename(tmp)
        b.rename(a)
        tmp.rename(b)
        return set()
    if how == "delete":
        slot = int(fs.feature_array("val").rows[0][0]) // st.chunk_rows
        assert (st.path / "units" / "v0" / f"u{slot}" / "zarr.json").is_file()
        _chunk(st, 0, slot).unlink()  # its marker stays
        return {(0, slot)}
    assert how == "swap"
    a, b = _chunk(st, 0, 0), _chunk(st, 0, 1)
    assert (
        a.stat().st_size > 0 and len(st.markers(0)[0]["digests"]) == len(st.markers(0)[1]["digests"]) == st.chunk_rows
    )
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    return {(0, 0), (0, 1)}


@pytest.mark.parametrize("how", ["labels", "ids", "delete", "swap", "rows"])
def test_damage_fails_verify_and_training_refuses(clean: views.FeatureSet, tmp_path: Path, how: str) -> None:
    from featurecache.training.train import train_head

    fs = _copy(clean, tmp_path)
    root = _root(fs)
    _damage(fs, how)
    report = fc.verify(fs.key[:12], sample=0, cache_dir=root)
    assert not report.ok and report.problems
    run = tmp_path / "run"
    with pytest.raises(CacheCorruptError) as info:
        train_head(fs.key[:12], cache_dir=root, out=run, plots=False)
    message = str(info.value)
    assert "cache verify" in message or "cache rm" in message, message
    assert "\n" not in message
    assert not run.exists(), "nothing trains on damaged bytes"
    # The CLI refuses with one line naming the command that fixes it.
    res = CliRunner().invoke(
        app,
        ["train-head", "--features", fs.key[:12], "--cache", str(root), "--out", str(tmp_path / "run2"), "--no-plots"],
    )
    assert res.exit_code != 0
    (line,) = _errors(res.stderr)
    assert "cache verify" in line or "cache rm" in line, line
    assert not (tmp_path / "run2").exists()


@pytest.mark.parametrize("how", ["delete", "swap"])
def test_repair_then_extract_recomputes_only_the_damage(clean: views.FeatureSet, tmp_path: Path, how: str) -> None:
    fs = _copy(clean, tmp_path)
    root = _root(fs)
    st = fs.store
    damaged = _damage(fs, how)
    damaged_rows = sum(len(st.markers(v)[s]["digests"]) for v, s in damaged)
    assert damaged_rows == 4 * len(damaged)
    report = fc.verify(fs.key[:12], sample=0, repair=True, cache_dir=root)
    assert report.problems and report.ok and report.remaining == (), (
        "a repair that fixed everything leaves the cache correct"
    )
    assert any(f"removed view {fs.name}" in line for line in report.repaired), report.repaired
    assert any(f"removed {len(damaged)} damaged unit(s) of view 0" in line for line in report.repaired), report.repaired
    assert not fs.path.exists(), "the view reading damaged units is removed"
    after = store.FeatureStore(st.path)
    assert not set(after.markers(0)) & {s for _, s in damaged}
    assert after.rows(0) == 24 - damaged_rows and after.rows(1) == 8
    assert fc.verify(after.name, sample=0, cache_dir=root).ok, "what is left of the store is intact"
    # The same extract recomputes exactly the damaged images, bit for bit.
    res = fc.extract("builtin:digits", cache_dir=root, progress=False, **OPTIONS)
    assert not res.cached and res.key == clean.key
    assert res.computed == damaged_rows and res.reused == _rows(clean) - damaged_rows
    again = fc.open_features(res.key, cache_dir=root)
    want = _all_features(clean)
    for split, x in _all_features(again).items():
        assert np.array_equal(x, want[split]), split
        assert np.array_equal(again.labels(split), clean.labels(split))
    assert fc.verify(res.key, sample=0, cache_dir=root).ok


def test_repair_removes_a_view_whose_labels_are_damaged(clean: views.FeatureSet, tmp_path: Path) -> None:
    """Issue 9: the next extract after ``verify --repair`` must not be a hit on the damaged view."""
    from featurecache.training.train import train_head

    fs = _copy(clean, tmp_path)
    root = _root(fs)
    _damage(fs, "labels")
    report = fc.verify(fs.name, sample=0, repair=True, cache_dir=root)
    assert report.problems and report.ok
    assert not fs.path.exists(), (
        f"verify --repair left the view with damaged labels in place (repaired: {report.repaired})"
    )
    res = fc.extract("builtin:digits", cache_dir=root, progress=False, **OPTIONS)
    assert not res.cached and res.computed == 0 and res.reused == _rows(clean)
    assert np.array_equal(fc.open_features(res.key, cache_dir=root).labels("train"), clean.labels("train"))
    train_head(res.key, cache_dir=root, out=tmp_path / "run", plots=False)


def test_rm_of_a_view_with_damaged_labels_then_extract_rebuilds_it_from_the_rows(
    clean: views.FeatureSet, tmp_path: Path
) -> None:
    fs = _copy(clean, tmp_path)
    root = _root(fs)
    _damage(fs, "labels")
    res = CliRunner().invoke(app, ["cache", "rm", fs.name, "--yes", "--cache", str(root)])
    assert res.exit_code == 0, res.output
    res = fc.extract("builtin:digits", cache_dir=root, progress=False, **OPTIONS)
    assert not res.cached and res.computed == 0 and res.reused == _rows(clean)
    again = fc.open_features(res.key, cache_dir=root)
    assert np.array_equal(again.labels("train"), clean.labels("train"))
    assert fc.verify(res.key, sample=0, cache_dir=root).ok


def test_torn_store_zarr_json_is_rebuilt_without_serving_or_keeping_wrong_rows(
    clean: views.FeatureSet, tmp_path: Path
) -> None:
    """A store whose zarr.json is torn is rebuilt in place by the next extract (extract._store_readable)."""
    fs = _copy(clean, tmp_path)
    root = _root(fs)
    st = fs.store
    views.remove_view(fs)
    (st.path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gr')
    res = CliRunner().invoke(app, ["cache", "ls", "--json", "--cache", str(root)])
    assert json.loads(res.stdout)["damaged"] == [str(st.path)]
    res = fc.extract("builtin:digits", cache_dir=root, progress=False, **OPTIONS)
    assert not res.cached
    report = fc.verify(res.key, sample=0, cache_dir=root)
    assert report.ok, f"extract said done (computed {res.computed}) but the view is damaged: {report.problems[:1]}"
    want = _all_features(clean)
    for split, x in _all_features(fc.open_features(res.key, cache_dir=root)).items():
        assert np.array_equal(x, want[split]), split


# -- edited metadata (issue 20): what a reader relies on is covered by the key ----------------
def _edit_attrs(path: Path, edit) -> None:
    """Apply ``edit`` to the ``featurecache`` attributes in ``path/zarr.json``, as a hand edit would."""
    doc = json.loads((path / "zarr.json").read_text())
    edit(doc["attributes"]["featurecache"])
    (path / "zarr.json").write_text(json.dumps(doc))


def _refused(tmp_path: Path, root: Path, ref: str, *want: str) -> None:
    """train-head on ``ref`` fails (API and CLI) with one line naming ``want``, and writes no run."""
    from featurecache.training.train import train_head

    with pytest.raises(CacheCorruptError) as info:
        train_head(ref, cache_dir=root, out=tmp_path / "run", plots=False)
    assert all(w in str(info.value) for w in want) and "\n" not in str(info.value), str(info.value)
    res = CliRunner().invoke(
        app, ["train-head", "--features", ref, "--cache", str(root), "--out", str(tmp_path / "run"), "--no-plots"]
    )
    assert res.exit_code != 0
    (line,) = _errors(res.stderr)
    assert all(w in line for w in want), line
    assert not (tmp_path / "run").exists(), "nothing is trained on, or recorded from, an edited entry"


def _size(fs: views.FeatureSet) -> int:
    return int(json.loads((fs.path / "zarr.json").read_text())["attributes"]["featurecache"]["spec"]["input_size"])


def test_an_edited_view_spec_is_refused_named_by_verify_and_rewritten(clean: views.FeatureSet, tmp_path: Path) -> None:
    fs = _copy(clean, tmp_path)
    root = _root(fs)
    _edit_attrs(fs.path, lambda a: a["spec"].update(input_size=48))
    _refused(
        tmp_path, root, fs.key[:12], f"spec recorded in feature set {fs.name}", "zarr.json was edited", "cache verify"
    )
    report = fc.verify(fs.key[:12], sample=4, cache_dir=root)
    assert not report.ok and report.sampled == 0, "nothing is recomputed from an edited spec"
    assert [p for p in report.problems if f"spec recorded in feature set {fs.name} hashes to" in p], report.problems
    assert not [p for p in report.problems if "stored values were altered" in p], "the features are not blamed"
    res = CliRunner().invoke(app, ["cache", "verify", fs.name, "--repair", "--cache", str(root)])
    assert res.exit_code == 0, res.output
    assert f"ok {fs.name}: repaired 1 problem" in res.stdout and "run the same extract command" in res.stdout
    assert (
        f"repaired: removed feature set {fs.name}" in res.stderr and "rewrites it from the store's rows" in res.stderr
    )
    assert not _errors(res.stderr) and not fs.path.exists()
    res = fc.extract("builtin:digits", cache_dir=root, progress=False, **OPTIONS)
    assert not res.cached and res.computed == 0 and res.key == clean.key
    again = fc.open_features(res.key, cache_dir=root)
    assert _size(again) == 32 and fc.verify(res.key, sample=2, cache_dir=root).ok


def test_the_next_extract_is_no_hit_on_an_edited_view_and_rewrites_it(clean: views.FeatureSet, tmp_path: Path) -> None:
    fs = _copy(clean, tmp_path)
    root = _root(fs)
    _edit_attrs(fs.path, lambda a: a["spec"].update(input_size=48))
    assert fc.explain("builtin:digits", cache_dir=root, **PLAN).status == "reuse"
    res = fc.extract("builtin:digits", cache_dir=root, progress=False, **OPTIONS)
    assert not res.cached and res.computed == 0 and res.reused == _rows(clean)
    assert _size(fc.open_features(clean.key, cache_dir=root)) == 32


def test_an_edited_store_spec_is_refused_and_restored_by_repair(clean: views.FeatureSet, tmp_path: Path) -> None:
    fs = _copy(clean, tmp_path)
    root = _root(fs)
    st = fs.store
    _edit_attrs(st.path, lambda a: a["spec"].update(input_size=48))
    _refused(tmp_path, root, fs.name, f"spec recorded in feature store {st.name}", "cache verify")
    report = fc.verify(fs.name, sample=4, cache_dir=root)
    assert not report.ok and report.sampled == 0 and report.units_checked == len(_slots(clean))
    assert [
        p for p in report.problems if f"feature store {st.name} hashes to" in p and "--repair` to restore it" in p
    ], report.problems
    report = fc.verify(st.name, sample=0, repair=True, cache_dir=root)
    assert report.ok and report.remaining == () and fs.path.exists(), report
    assert [r for r in report.repaired if f"restored the spec of {st.name} from feature set {fs.name}" in r], (
        report.repaired
    )
    assert store.FeatureStore(st.path).spec == clean.store.spec
    assert fc.verify(fs.key, sample=2, cache_dir=root).ok
    assert fc.extract("builtin:digits", cache_dir=root, progress=False, **OPTIONS).cached


def test_an_edited_store_spec_without_views_is_left_to_the_extract_that_rewrites_it(
    clean: views.FeatureSet, tmp_path: Path
) -> None:
    fs = _copy(clean, tmp_path)
    root = _root(fs)
    st = fs.store
    views.remove_view(fs)
    _edit_attrs(st.path, lambda a: a["spec"].update(input_size=48))
    res = CliRunner().invoke(app, ["cache", "verify", st.name, "--repair", "--sample", "0", "--cache", str(root)])
    assert res.exit_code == 1, res.output
    assert "could not restore the spec" in res.stderr and "keeps its rows" in res.stderr
    (line,) = _errors(res.stderr)
    assert f"{st.name} failed verification with 1 problem" in line
    res = fc.extract("builtin:digits", cache_dir=root, progress=False, **OPTIONS)
    assert not res.cached and res.computed == 0, "the extract rewrites the spec and keeps every row"
    assert store.FeatureStore(st.path).spec == clean.store.spec
    assert fc.verify(res.key, sample=2, cache_dir=root).ok


def test_an_edited_failures_list_is_refused_before_validity_is_read(clean: views.FeatureSet, tmp_path: Path) -> None:
    fs = _copy(clean, tmp_path)
    root = _root(fs)
    first = (str(fs.ids("train")[0]), str(fs.digests("train")[0]))
    _edit_attrs(fs.path, lambda a: a["failures"].append(["train", *first, "undecodable"]))
    with pytest.raises(CacheCorruptError, match="failures list"):
        fc.open_features(fs.key, cache_dir=root)
    with pytest.raises(CacheCorruptError, match="failures list"):
        views.FeatureSet(fs.path).valid("train")
    _refused(tmp_path, root, fs.key, "failures list", "cache verify")
    report = fc.verify(fs.key, sample=0, repair=True, cache_dir=root)
    assert report.ok and [p for p in report.problems if f"failures list of feature set {fs.name}" in p], report
    res = fc.extract("builtin:digits", cache_dir=root, progress=False, **OPTIONS)
    assert not res.cached and res.computed == 0
    assert fc.open_features(res.key, cache_dir=root).valid("train").all()


def test_a_relabelled_view_with_a_recomputed_key_is_not_served_by_its_old_name(
    clean: views.FeatureSet, tmp_path: Path
) -> None:
    """Labels edited, dataset digest and key recomputed to match, the directory name kept."""
    import zarr

    from featurecache.cache.keys import manifest_digest, view_key

    fs = _copy(clean, tmp_path)
    root = _root(fs)
    labels = zarr.open_array(str(fs.path / "train" / "labels"), mode="r+")
    labels[:] = (np.asarray(labels[:]) + 1) % len(fs.classes)
    arrays = {
        s: (s, clean.ids(s), clean.digests(s), np.asarray(zarr.open_array(str(fs.path / s / "labels"), mode="r")[:]))
        for s in fs.splits
    }
    digest = manifest_digest(fs.classes, list(arrays.values()))
    key = view_key(fs.attrs["store_key"], digest)

    def forge(a: dict) -> None:
        a.update(dataset_digest=digest, key=key)
        a["spec"]["dataset_digest"] = digest

    _edit_attrs(fs.path, forge)
    assert views.FeatureSet(fs.path).arrays(), "the forged view is self-consistent: only its name gives it away"
    for ref in (fs.name, str(fs.path), clean.key[:12], clean.key):
        with pytest.raises(CacheCorruptError, match=f"name of feature set {fs.name}"):
            fc.open_features(ref, cache_dir=root)
    _refused(tmp_path, root, fs.name, f"name of feature set {fs.name}", key[:12])
    res = CliRunner().invoke(app, ["cache", "verify", clean.key[:12], "--repair", "--cache", str(root)])
    assert res.exit_code == 0 and f"ok {fs.name}: repaired" in res.stdout, res.output
    res = fc.extract("builtin:digits", cache_dir=root, progress=False, **OPTIONS)
    assert not res.cached and res.computed == 0 and res.key == clean.key
    assert np.array_equal(fc.open_features(clean.key, cache_dir=root).labels("train"), clean.labels("train"))


# -- gc ---------------------------------------------------------------------------------
def test_gc_removes_rows_no_view_uses_and_keeps_the_others(clean: views.FeatureSet, tmp_path: Path) -> None:
    fs = _copy(clean, tmp_path)
    root = _root(fs)
    st = fs.store
    train_only = fc.extract(_relabelled(0, ("train",)), cache_dir=root, progress=False, **OPTIONS)
    assert train_only.computed == 0 and train_only.key != fs.key
    other = fc.open_features(train_only.key, cache_dir=root)
    keep = _slots(other)
    assert not maintenance.gc(cache_dir=root).items, "every row is used"
    res = CliRunner().invoke(app, ["cache", "rm", fs.name, "--yes", "--cache", str(root)])
    assert res.exit_code == 0, res.output
    assert not fs.path.exists() and st.path.exists()
    all_units = {(v, s) for v in range(st.views) for s in store.FeatureStore(st.path).markers(v)}
    unused = all_units - keep
    assert unused and len(unused) == 4  # the val and test units

    dry = maintenance.gc(cache_dir=root)
    assert [(i.kind, i.path) for i in dry.items] == [("unused rows", st.path)]
    assert set(dry.items[0].units) == unused and dry.size_bytes > 0 and not dry.removed
    assert store.FeatureStore(st.path).rows(0) == 24, "a dry run removes nothing"
    res = CliRunner().invoke(app, ["cache", "gc", "--cache", str(root)])
    assert res.exit_code == 0 and "would remove unused rows" in res.stdout and "4 unit(s)" in res.stdout, res.output

    done = maintenance.gc(dry_run=False, cache_dir=root)
    assert done.removed and [i.kind for i in done.items] == ["unused rows"]
    after = store.FeatureStore(st.path)
    assert {(v, s) for v in range(after.views) for s in after.markers(v)} == keep
    assert after.rows(0) == 8 and after.rows(1) == 8
    assert not any(_chunk(after, v, s).exists() for v, s in unused)
    assert all(_chunk(after, v, s).exists() for v, s in keep)
    assert fc.verify(other.key, sample=0, cache_dir=root).ok
    assert np.array_equal(views.FeatureSet(other.path).features("train", view=None), clean.features("train", view=None))
    assert not maintenance.gc(cache_dir=root).items


def test_gc_collects_old_debris_and_nothing_under_a_live_lease(clean: views.FeatureSet, tmp_path: Path) -> None:
    fs = _copy(clean, tmp_path)
    root = _root(fs)
    day = 86400
    # A store being written right now by another process (its lease is live), with unused rows
    # and an old temp file, and a view it is building aside: none of it may be touched.
    busy_spec = fc.plan("builtin:digits", cache_dir=root, **{**PLAN, "size": 48}).spec
    busy = store.create_store(root, busy_spec, feature_shape=(1280,), chunk_rows=4)
    (unit,) = store.allocate_units(busy, 0, ["a" * 64])
    store.write_unit(busy, unit, np.ones((1, 1280), np.float32), valid=np.ones(1, bool))
    busy_partial = _chunk(busy, 0, 0).with_name("0.abc.partial")
    busy_partial.write_bytes(b"x" * 10)
    busy_aside = root / store.TMP_DIR / f"{busy_spec.key[:12]}-0123456789ab-abcd1234"
    busy_aside.mkdir(parents=True)
    for p in (busy.path, busy_aside):
        _age(p, 3 * day)
    held = Lease(root, busy_spec.key)
    assert held.try_acquire()
    # Debris: a silent lease, a lease moved aside, a view built aside and never renamed, a torn
    # chunk temp file, a store that never finished, a torn view, a memo temp file.
    dead = Lease(root, "cd" * 32)
    dead.path.write_text(json.dumps({"token": "t", "host": "elsewhere", "pid": 1}))
    _age(dead.path, 3600)
    moved = root / LOCKS_DIR / f"{'ef' * 32}.lease.stale-12345678"
    moved.write_text("{}")
    aside = root / store.TMP_DIR / "0123456789ab-deadbeefdead-abcd1234"
    (aside / "train").mkdir(parents=True)
    (aside / "train" / "zarr.json").write_text("{}")
    torn = _chunk(fs.store, 0, 0).with_name("0.abc.partial")
    torn.write_bytes(b"x" * 100)
    unfinished = root / store.STORES_DIR / "mobilenetv2-random-40-avg--0123456789ab"
    (unfinished / "v0").mkdir(parents=True)
    (unfinished / "v0" / "zarr.json").write_text("{}")
    torn_view = root / store.VIEWS_DIR / "mobilenetv2-random-32-avg--x--0123456789ab"
    torn_view.mkdir()
    (torn_view / "zarr.json").write_text('{"zarr_fo')
    memo_tmp = store.memo_dir(root) / ".file-digests.json.tmp"
    memo_tmp.parent.mkdir(exist_ok=True)
    memo_tmp.write_text("{")
    for p in (aside, torn, unfinished, torn_view, memo_tmp):
        _age(p, 3 * day)
    # Young debris is kept (an extract may be writing it right now).
    young_aside = root / store.TMP_DIR / "0123456789ab-feedfeedfeed-abcd1234"
    young_aside.mkdir()
    young_store = root / store.STORES_DIR / "mobilenetv2-random-40-avg--abcdef012345"
    young_store.mkdir()

    expected = {
        ("stale lease", dead.path),
        ("temporary", moved),
        ("temporary", aside),
        ("temporary", torn),
        ("damaged store", unfinished),
        ("damaged view", torn_view),
        ("temporary", memo_tmp),
    }
    dry = maintenance.gc(older_than="24h", cache_dir=root)
    found = {(i.kind, i.path) for i in dry.items}
    assert found == expected, found ^ expected
    assert not dry.removed and dry.size_bytes > 0 and all(p.exists() for _, p in found)

    res = CliRunner().invoke(app, ["cache", "gc", "--older-than", "1d", "--cache", str(root)])
    assert (
        res.exit_code == 0
        and res.stdout.count("would remove") == len(expected)
        and "pass --yes to remove" in res.stderr
    ), res.output
    res = CliRunner().invoke(app, ["cache", "gc", "--older-than", "1d", "--yes", "--cache", str(root)])
    assert res.exit_code == 0 and res.stdout.count("removed") == len(expected), res.output
    assert not any(p.exists() for _, p in expected)
    assert held.path.exists() and held.holder()["token"] == held._token, "a live lease is never broken"
    assert busy_partial.exists() and busy_aside.exists() and store.FeatureStore(busy.path).rows(0) == 1, (
        "nothing under a live lease is collected"
    )
    assert young_aside.exists() and young_store.exists()
    assert fc.verify(fs.name, sample=0, cache_dir=root).ok
    held.release()
    # Released: the busy store's unused rows and old temp files are debris now; younger ones are kept.
    later = {(i.kind, i.path) for i in maintenance.gc(older_than="1d", cache_dir=root).items}
    assert later == {("unused rows", busy.path), ("temporary", busy_partial), ("temporary", busy_aside)}, later
    assert {(i.kind, i.path) for i in maintenance.gc(older_than="5d", cache_dir=root).items} == {
        ("unused rows", busy.path)
    }


def test_gc_never_follows_symbolic_links(clean: views.FeatureSet, tmp_path: Path) -> None:
    fs = _copy(clean, tmp_path)
    root = _root(fs)
    key12 = fs.store.key[:12]
    target = tmp_path / "precious"
    names = [f"{key12}-0123456789ab-abcd", "rm-something-abc123", "0123456789ab-old", "notes.txt"]
    for name in names:
        (target / name).mkdir(parents=True)
        (target / name / "data.bin").write_bytes(b"keep me")
    (target / "zarr.json").write_text("{torn")  # looks like a torn view through the link below
    _age(target, 10 * 86400)
    shutil.rmtree(root / store.TMP_DIR, ignore_errors=True)
    (root / store.TMP_DIR).symlink_to(target)
    linked_view = root / store.VIEWS_DIR / "linked--0123456789ab"
    linked_view.symlink_to(target)
    linked_store = root / store.STORES_DIR / "linked--abcdef012345"
    linked_store.symlink_to(target)
    for link in (root / store.TMP_DIR, linked_view, linked_store):
        _age(link, 10 * 86400)

    dry = maintenance.gc(older_than="1d", cache_dir=root)
    assert ("left alone", root / store.TMP_DIR) in {(i.kind, i.path) for i in dry.items}
    maintenance.gc(older_than="1d", dry_run=False, cache_dir=root)
    for name in names:
        assert (target / name / "data.bin").read_bytes() == b"keep me", name
    assert (target / "zarr.json").read_text() == "{torn"
    assert (root / store.TMP_DIR).is_symlink()
    assert fc.verify(fs.name, sample=0, cache_dir=root).ok


@pytest.mark.parametrize(
    "text,seconds",
    [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800), ("1.5h", 5400), ("2w", 1209600), ("0", 0)],
)
def test_parse_age(text: str, seconds: float) -> None:
    assert maintenance.parse_age(text) == seconds


def test_parse_age_error_lists_the_units() -> None:
    with pytest.raises(UsageError, match="s, m, h, d or w"):
        maintenance.parse_age("yesterday")
    with pytest.raises(UsageError, match=">= 0"):
        maintenance.parse_age(-1)


# -- rm ---------------------------------------------------------------------------------
def test_rm_of_a_view_keeps_the_rows_another_view_reads(clean: views.FeatureSet, tmp_path: Path) -> None:
    fs = _copy(clean, tmp_path)
    root = _root(fs)
    st = fs.store
    relabelled = fc.extract(_relabelled(1), cache_dir=root, progress=False, **OPTIONS)
    assert relabelled.computed == 0 and relabelled.reused == _rows(clean) and not relabelled.cached
    size = st.size_bytes()
    res = CliRunner().invoke(app, ["cache", "rm", fs.name, "--dry-run", "--cache", str(root)])
    assert res.exit_code == 0 and f"would remove feature set {fs.name}" in res.stdout and fs.path.exists()
    res = CliRunner().invoke(app, ["cache", "rm", fs.key[:12], "--yes", "--cache", str(root)])
    assert res.exit_code == 0, res.output
    assert f"removed feature set {fs.name}" in res.stdout and f"its rows stay in feature store {st.name}" in res.stdout
    assert not fs.path.exists()
    assert store.FeatureStore(st.path).size_bytes() == size and store.FeatureStore(st.path).rows(0) == 24
    other = fc.open_features(relabelled.key, cache_dir=root)
    want = _all_features(clean)
    for split, x in _all_features(other).items():
        assert np.array_equal(x, want[split])
        assert np.array_equal(other.labels(split), (clean.labels(split) + 1) % len(clean.classes))
    assert fc.verify(other.key, sample=0, cache_dir=root).ok


def test_rm_of_a_torn_view_by_name(clean: views.FeatureSet, tmp_path: Path) -> None:
    fs = _copy(clean, tmp_path)
    root = _root(fs)
    (fs.path / "zarr.json").write_text("\x00garbage{")
    res = CliRunner().invoke(app, ["cache", "ls", "--cache", str(root)])
    assert res.exit_code == 0, res.output
    assert f"damaged: {fs.path} (remove it with `featurecache cache rm {fs.name} --yes --cache {root}`)" in " ".join(
        res.stdout.split()
    ), res.stdout
    doc = json.loads(CliRunner().invoke(app, ["cache", "ls", "--json", "--cache", str(root)]).stdout)
    assert (
        doc["damaged"] == [str(fs.path)]
        and doc["views"] == []
        and [s["name"] for s in doc["stores"]] == [fs.attrs["store"]]
    )
    res = CliRunner().invoke(
        app, ["train-head", "--features", fs.name, "--cache", str(root), "--out", str(tmp_path / "run"), "--no-plots"]
    )
    (line,) = _errors(res.stderr)
    assert res.exit_code != 0 and f"cache rm {fs.name} --yes" in line, line
    res = CliRunner().invoke(app, ["cache", "rm", fs.name, "--yes", "--cache", str(root)])
    assert res.exit_code == 0, res.output
    assert f"removed the damaged entry {fs.name}" in res.stdout
    assert not fs.path.exists()
    doc = json.loads(CliRunner().invoke(app, ["cache", "ls", "--json", "--cache", str(root)]).stdout)
    assert doc["damaged"] == [] and len(doc["stores"]) == 1


def test_rm_of_a_store_refuses_under_a_live_lease(clean: views.FeatureSet, tmp_path: Path) -> None:
    fs = _copy(clean, tmp_path)
    root = _root(fs)
    st = fs.store
    held = Lease(root, st.key)
    assert held.try_acquire()
    try:
        res = CliRunner().invoke(app, ["cache", "rm", st.name, "--yes", "--cache", str(root)])
        assert res.exit_code != 0
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        (line,) = _errors(res.stderr)
        assert st.name in line and "cache rm" in line and f"pid {os.getpid()}" in line, line
        assert st.path.exists() and fs.path.exists() and held.holder()["token"] == held._token
        assert fc.verify(fs.name, sample=0, cache_dir=root).ok
    finally:
        held.release()
    res = CliRunner().invoke(app, ["cache", "rm", st.key[:12], "--yes", "--cache", str(root)])
    assert res.exit_code == 0, res.output
    assert f"removed feature store {st.name} and its 1 feature set(s)" in res.stdout
    assert not st.path.exists() and not fs.path.exists()
    res = CliRunner().invoke(app, ["cache", "ls", "--cache", str(root)])
    assert "no feature sets" in res.stdout


# -- explain ------------------------------------------------------------------------------
def test_explain_hit_reuse_and_miss(clean: views.FeatureSet) -> None:
    root = _root(clean)
    hit = fc.explain("builtin:digits", cache_dir=root, **PLAN)
    assert hit.status == "hit" and hit.key == clean.key and hit.message == f"hit: {clean.name} is in the cache"
    reuse = fc.explain(_relabelled(1), cache_dir=root, **PLAN)
    assert reuse.status == "reuse" and reuse.key != clean.key
    assert (reuse.new, reuse.reused) == (0, _rows(clean))
    assert f"holds {_rows(clean)} of the image views it needs; 0 would be computed" in reuse.message, reuse.message
    grown = fc.explain("builtin:digits", cache_dir=root, **{**PLAN, "limit": 12})
    assert grown.status == "reuse" and grown.new > 0 and grown.reused > 0
    assert grown.new + grown.reused == 12 * 3 + 12, "clean views of every split plus augmented train views"
    miss = fc.explain("builtin:digits", cache_dir=root, **{**PLAN, "size": 48, "pooling": "max"})
    assert miss.status == "miss" and miss.nearest == clean.store.name and miss.new == _rows(clean)
    assert [d.field for d in miss.differences] == ["input_size", "pooling"]
    assert miss.message.endswith(f"differs from {clean.store.name}: input_size 32 -> 48, pooling avg -> max"), (
        miss.message
    )
    aug = fc.explain("builtin:digits", cache_dir=root, **{**PLAN, "augment": "flip"})
    assert [d.field for d in aug.differences] == ["augment"]
    assert "augment flip,rotation=10.0 -> flip" in aug.message, aug.message
    nothing = fc.explain("builtin:digits", cache_dir=root / "empty", **PLAN)
    assert (
        nothing.status == "miss" and nothing.nearest is None and "no feature store to compare with" in nothing.message
    )


def test_cli_explain(clean: views.FeatureSet) -> None:
    root = str(_root(clean))
    base = ["cache", "explain", "--data", "builtin:digits", *CLI_PLAN, "--cache", root]
    doc = json.loads(CliRunner().invoke(app, [*base, "--json"]).stdout)
    assert doc["status"] == "hit" and doc["key"] == clean.key
    res = CliRunner().invoke(app, [*base, "--size", "48"])
    assert res.exit_code == 0, res.output
    assert "input_size 32 -> 48" in res.stdout
    doc = json.loads(CliRunner().invoke(app, [*base, "--size", "48", "--json"]).stdout)
    assert doc["status"] == "miss" and doc["nearest"] == clean.store.name and doc["new"] == _rows(clean)
    assert [d["field"] for d in doc["differences"]] == ["input_size"]
    res = CliRunner().invoke(app, [*base, "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert "seed 0 -> 3" in res.stdout and "weights random:seed=0 -> random:seed=3" in res.stdout
    doc = json.loads(CliRunner().invoke(app, [*base, "--seed", "3", "--json"]).stdout)
    assert doc["status"] == "miss" and {d["field"] for d in doc["differences"]} == {"seed", "weights"}
    doc = json.loads(CliRunner().invoke(app, [*base[:-2], "--limit", "12", "--cache", root, "--json"]).stdout)
    assert doc["status"] == "reuse" and doc["new"] > 0 and doc["reused"] > 0


def test_cli_explain_relabelled_data_reuses_every_row(clean: views.FeatureSet, tmp_path: Path) -> None:
    """The same digits images under other labels, from an .npz: a new view, nothing to compute."""
    ds = _relabelled(1)
    arrays = {}
    for name, sp in ds.splits.items():
        arrays[f"x_{name}"] = np.asarray(sp.items.images)
        arrays[f"y_{name}"] = sp.labels
    npz = tmp_path / "digits.npz"
    np.savez(npz, classes=np.asarray(ds.classes), **arrays)
    base = ["cache", "explain", "--data", str(npz), *CLI_PLAN, "--cache", str(_root(clean))]
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(
        "reuse:"
    ) and f"holds {_rows(clean)} of the image views it needs; 0 would be computed" in " ".join(res.stdout.split())
    doc = json.loads(CliRunner().invoke(app, [*base, "--json"]).stdout)
    assert doc["status"] == "reuse" and (doc["new"], doc["reused"]) == (0, _rows(clean)) and doc["key"] != clean.key


# -- migrate ------------------------------------------------------------------------------
def _format1_entry(root: Path, clean: views.FeatureSet, *, views_: int, complete: bool = True) -> Path:
    """A format-1 entry as featurecache 0.1 (FORMAT_VERSION 1) wrote it, from ``clean``'s features.

    Layout (see featurecache.migrate): ``<cache>/<label>--<dataset>--<key12>/`` with
    ``<split>/features (views, n, *shape)``, ``labels``, ``ids``, ``valid``, one JSON marker per
    unit under ``_units/<split>/v<V>/c<C>`` and ``_complete`` once sealed.
    """
    import zarr

    from featurecache.cache.keys import digest_of

    opts = PLAN if views_ else {k: v for k, v in PLAN.items() if k not in ("views", "augment")}
    spec = fc.plan("builtin:digits", cache_dir=root, **opts).spec
    fields_ = {**spec.key_fields(), "format_version": 1, "dataset_digest": clean.attrs["dataset_digest"]}
    key = digest_of(fields_)
    entry = root / f"{spec.label()}--digits--{key[:12]}"
    g = zarr.open_group(str(entry), mode="w", zarr_format=3)
    layout = {}
    for split in clean.splits:
        n = clean.layout(split).n
        nviews = spec.views_for(split)
        sg = g.create_group(split)
        feats = sg.create_array(
            "features",
            shape=(nviews, n, 1280),
            chunks=(1, 4, 1280),
            dtype="float32",
            fill_value=0,
            **store.array_codecs(),
        )
        feats[:] = clean.features(split, view=None)[:nviews]
        sg.create_array("labels", shape=(n,), chunks=(4,), dtype="int64", fill_value=-1)[:] = clean.labels(split)
        sg.create_array("ids", shape=(n,), chunks=(4,), dtype=str)[:] = np.asarray(list(clean.ids(split)), dtype=str)
        sg.create_array("valid", shape=(n,), chunks=(4,), dtype=bool, fill_value=False)[:] = np.ones(n, bool)
        layout[split] = {"n": n, "views": nviews, "feature_shape": [1280], "chunk_rows": 4}
        for v in range(nviews):
            for c in range(-(-n // 4)):
                marker = entry / "_units" / split / f"v{v}" / f"c{c}"
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(json.dumps({"failures": [], "rows": [c * 4, min(n, c * 4 + 4)]}))
    g.attrs["featurecache"] = {
        "key": key,
        "spec": {**fields_, "dataset_name": "digits", "weights_label": "random"},
        "classes": clean.classes,
        "layout": layout,
        "feature_shape": [1280],
        "created": "2026-01-01T00:00:00Z",
        "versions": clean.attrs.get("versions", {}),
        "dataset_source": "builtin:digits",
        "dataset_limit": 8,
        "weights_source": "random",
        "skipped_files": [],
    }
    if complete:
        (entry / "_complete").write_text(json.dumps({"sealed": 0}))
    return entry


def test_migrate_converts_format1_entries_without_running_the_backbone(clean: views.FeatureSet, tmp_path: Path) -> None:
    from featurecache.cache.migrate import legacy_entries, migrate

    root = tmp_path / "cache"
    root.mkdir()
    plain = _format1_entry(root, clean, views_=0)
    augmented = _format1_entry(root, clean, views_=1)
    unfinished = _format1_entry(root / "x", clean, views_=0, complete=False)
    unfinished = unfinished.rename(root / (unfinished.name[:-12] + "0123456789ab"))
    assert set(legacy_entries(root)) == {plain, augmented, unfinished}
    res = CliRunner().invoke(app, ["cache", "ls", "--cache", str(root)])
    assert "3 entries in the old format 1: convert them with `featurecache cache migrate" in res.stdout, res.output
    res = CliRunner().invoke(app, ["cache", "migrate", "--dry-run", "--cache", str(root)])
    assert (
        res.exit_code == 0 and res.stdout.count("would convert") == 2 and "incomplete format-1 entry" in res.stdout
    ), res.output
    assert set(legacy_entries(root)) == {plain, augmented, unfinished}, "a dry run converts nothing"

    results = {r.entry: r for r in migrate(cache_dir=root)}
    plain_opts = {k: v for k, v in OPTIONS.items() if k not in ("views", "augment")}
    p = fc.plan(
        "builtin:digits",
        cache_dir=root,
        **{k: v for k, v in plain_opts.items() if k not in ("batch_size", "chunk_rows")},
    )
    assert results[plain].view == p.name and results[plain].rows == 24
    assert results[augmented].view is None and "not carried over" in results[augmented].note
    assert results[unfinished].view is None and "incomplete" in results[unfinished].note
    assert not plain.exists() and not augmented.exists() and unfinished.exists()
    # The converted view reads the old features, labels and ids, and they recompute the same.
    fs = fc.open_features(p.key, cache_dir=root)
    for split in clean.splits:
        assert np.array_equal(fs.features(split), clean.features(split))
        assert np.array_equal(fs.labels(split), clean.labels(split)) and list(fs.ids(split)) == list(clean.ids(split))
    report = fc.verify(fs.name, sample=4, cache_dir=root)
    assert report.ok and report.sampled == 4, report.problems
    # Never silently recomputed: the same extract is a hit; the augmented spec computes only its augmented views.
    hit = fc.extract("builtin:digits", cache_dir=root, progress=False, **plain_opts)
    assert hit.cached and hit.computed == 0
    aug = fc.extract("builtin:digits", cache_dir=root, progress=False, **OPTIONS)
    assert not aug.cached and aug.key == clean.key and aug.computed == 8 and aug.reused == 24
    again = fc.open_features(aug.key, cache_dir=root)
    want = _all_features(clean)
    for split, x in _all_features(again).items():
        assert np.array_equal(x, want[split]), split


def test_rm_of_a_linked_view_unlinks_it_and_frees_nothing(clean: views.FeatureSet, tmp_path: Path) -> None:
    fs = _copy(clean, tmp_path)
    root = _root(fs)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(fs.path), elsewhere)
    fs.path.symlink_to(elsewhere, target_is_directory=True)
    res = CliRunner().invoke(app, ["cache", "rm", fs.name, "--yes", "--cache", str(root)])
    assert res.exit_code == 0, res.output
    assert "(0 B freed)" in res.stdout and "nothing it points to was touched" in res.stdout, res.stdout
    assert not fs.path.is_symlink() and (elsewhere / "zarr.json").is_file(), "the link goes, what it pointed to stays"


def test_rm_across_filesystems_deletes_in_place(clean: views.FeatureSet, tmp_path: Path) -> None:
    """views/ on another filesystem than the cache's .tmp (EXDEV on the rename aside)."""
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temporary folder")
    fs = _copy(clean, tmp_path)
    root = _root(fs)
    other = Path(tempfile.mkdtemp(dir=shm))
    try:
        shutil.move(str(root / views.VIEWS_DIR), other / "views")
        (root / views.VIEWS_DIR).symlink_to(other / "views", target_is_directory=True)
        size = sum(p.stat().st_size for p in (other / "views" / fs.name).rglob("*") if p.is_file())
        res = CliRunner().invoke(app, ["cache", "rm", fs.name, "--yes", "--cache", str(root)])
        assert res.exit_code == 0, res.output
        assert not (other / "views" / fs.name).exists()
        assert f"removed feature set {fs.name}" in res.stdout and "unexpected" not in res.output
        assert size > 0 and "0 B freed" not in res.stdout
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_debris_of_a_removal_racing_an_extract_never_blocks_the_key(clean: views.FeatureSet, tmp_path: Path) -> None:
    """A `cache rm` that raced an extract once left the entry's directory half-recreated (a
    writer re-made its folders after the rename), and every later extract failed on it. Now
    neither a view directory without its zarr.json nor a store directory without one blocks
    the key: the next extract completes them and equals the clean cache."""
    fs = _copy(clean, tmp_path)
    root = _root(fs)
    shutil.rmtree(fs.path)
    (fs.path / "train" / "ids").mkdir(parents=True)  # what a racing writer could leave behind
    res = fc.extract("builtin:digits", cache_dir=root, progress=False, **OPTIONS)
    assert not res.cached and res.computed == 0 and res.key == clean.key
    again = fc.open_features(res.key, cache_dir=root)
    np.testing.assert_array_equal(again.features("train", view=None), clean.features("train", view=None))
    # The same for a feature store: its directory without attributes is completed, not refused.
    other = tmp_path / "other"
    st_dir = other / store.STORES_DIR / clean.store.name
    (st_dir / "v0" / "features").mkdir(parents=True)
    res = fc.extract("builtin:digits", cache_dir=other, progress=False, **OPTIONS)
    assert not res.cached and res.computed == _rows(clean)
    np.testing.assert_array_equal(fc.open_features(res.key, cache_dir=other).features("test"), clean.features("test"))
