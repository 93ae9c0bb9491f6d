"""``cache verify``, ``cache gc`` and ``cache explain`` on real entries (and real damage)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import featurecache as fc
from featurecache.cache import maintenance, store
from featurecache.cli.main import app
from featurecache.errors import UsageError

# Two views for train, chunks of 4 rows: several units per split, augmented ones included.
PLAN = dict(backbone="vgg16", weights="random", size=32, limit=8, views=1, augment="flip,rotation=10")
OPTIONS = dict(PLAN, batch_size=4, chunk_rows=4)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> store.FeatureSet:
    root = tmp_path_factory.mktemp("clean")
    res = fc.extract("builtin:digits", cache_dir=root, progress=False, **OPTIONS)
    return fc.open_features(res.key, cache_dir=root)


def _copy(fs: store.FeatureSet, tmp_path: Path) -> store.FeatureSet:
    root = tmp_path / "cache"
    root.mkdir(exist_ok=True)
    shutil.copytree(fs.path, root / fs.name)
    return store.FeatureSet(root / fs.name)


def _rows(fs: store.FeatureSet) -> int:
    return sum(fs.layout(s).n * fs.layout(s).views for s in fs.splits)


# -- verify -----------------------------------------------------------------------------
def test_verify_passes_on_a_clean_entry(clean: store.FeatureSet) -> None:
    report = fc.verify(clean.key[:12], sample=_rows(clean), cache_dir=clean.path.parent)
    assert report.ok, report.problems
    assert report.units_checked == len(clean.units()) and report.sampled == _rows(clean)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4 * np.abs(clean.features("train")).max()
    res = CliRunner().invoke(app, ["cache", "verify", clean.key[:12], "--sample", "4", "--cache", str(clean.path.parent)])
    assert res.exit_code == 0, res.output
    assert f"ok {clean.name}" in res.stdout and "4 vectors recomputed" in res.stdout


def test_verify_detects_a_corrupted_chunk(clean: store.FeatureSet, tmp_path: Path) -> None:
    fs = _copy(clean, tmp_path)
    chunk = fs.path / "train" / "features" / "c" / "1" / "1" / "0"  # augmented view, rows 4:8
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = fc.verify(fs.name, sample=_rows(fs), cache_dir=fs.path.parent)
    assert not report.ok
    assert any("train/features view 1 rows 4:8 is unreadable" in p for p in report.problems), report.problems
    assert report.sampled == _rows(fs) - 4, "the unreadable unit is reported, the rest still recomputed"
    res = CliRunner().invoke(app, ["cache", "verify", fs.name, "--cache", str(fs.path.parent)])
    assert res.exit_code == 1
    assert "problem: chunk train/features view 1 rows 4:8 is unreadable" in res.stderr
    assert [ln for ln in res.stderr.splitlines() if ln.startswith("error:")] == [f"error: {fs.name} failed verification with 1 problem (listed above)"]


def test_verify_detects_an_altered_feature_value(clean: store.FeatureSet, tmp_path: Path) -> None:
    import zarr

    fs = _copy(clean, tmp_path)
    arr = zarr.open_array(str(fs.path / "train" / "features"), mode="r+")
    before = float(arr[1, 5, 3])
    arr[1, 5, 3] = before + 0.25  # a valid chunk with a valid checksum: only recomputation can tell
    report = fc.verify(fs.name, sample=_rows(fs), cache_dir=fs.path.parent)
    assert not report.ok and len(report.mismatches) == 1
    m = report.mismatches[0]
    assert (m.split, m.view, m.index) == ("train", 1, 5) and m.id == str(fs.ids("train")[5])
    assert m.max_abs_diff == pytest.approx(0.25, rel=1e-3)
    assert any("max abs diff 0.25" in p and "stored values were altered" in p for p in report.problems), report.problems


def test_verify_detects_a_tampered_spec_and_missing_units(clean: store.FeatureSet, tmp_path: Path) -> None:
    fs = _copy(clean, tmp_path)
    meta = json.loads((fs.path / "zarr.json").read_text())
    meta["attributes"]["featurecache"]["spec"]["input_size"] = 48
    (fs.path / "zarr.json").write_text(json.dumps(meta))
    (fs.path / fs.units()[2].marker).unlink()
    report = fc.verify(fs.name, sample=0, cache_dir=fs.path.parent)
    assert any("hashes to" in p and "not to the stored key" in p for p in report.problems), report.problems
    assert any(f"1 of {len(fs.units())} write units have no completion marker (first: {fs.units()[2].marker})" in p for p in report.problems)


def test_verify_rejects_bad_arguments(clean: store.FeatureSet) -> None:
    with pytest.raises(UsageError, match="sample"):
        fc.verify(clean.name, sample=-1, cache_dir=clean.path.parent)


# -- gc ---------------------------------------------------------------------------------
def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (then, then), follow_symlinks=False)


def test_gc_dry_run_then_yes(clean: store.FeatureSet, tmp_path: Path) -> None:
    complete = _copy(clean, tmp_path)
    root = complete.path.parent
    # An abandoned incomplete entry (2 days old), and one whose extraction is running now.
    other = fc.plan("builtin:digits", cache_dir=root, **{**PLAN, "limit": 6}).spec
    abandoned = store.create_entry(root, other, classes=["a"], splits={"train": (np.zeros(3), ["x", "y", "z"])}, feature_shape=(4,))
    busy_spec = fc.plan("builtin:digits", cache_dir=root, **{**PLAN, "limit": 5}).spec
    busy = store.create_entry(root, busy_spec, classes=["a"], splits={"train": (np.zeros(3), ["x", "y", "z"])}, feature_shape=(4,))
    _age(abandoned.path, 2 * 86400)
    _age(busy.path, 2 * 86400)
    held = store.Lease(root, busy_spec.key)
    assert held.try_acquire()
    # Debris: a dead holder's lease, an entry built aside and never renamed, a torn chunk file.
    dead = store.Lease(root, "cd" * 32)
    dead.path.write_text(json.dumps({"token": "t", "host": "elsewhere", "pid": 1}))
    _age(dead.path, 3600)
    aside = root / store.TMP_DIR / "0123456789ab-deadbeef"
    (aside / "train").mkdir(parents=True)
    (aside / "train" / "zarr.json").write_text("{}")
    torn = complete.path / "train" / "features" / "c" / "0" / "0" / "0.abc.partial"
    torn.write_bytes(b"x" * 100)
    _age(aside, 3 * 86400)
    _age(torn, 3 * 86400)

    dry = maintenance.gc(older_than="24h", cache_dir=root)
    found = {(i.kind, i.path) for i in dry.items}
    assert found == {
        ("incomplete entry", abandoned.path), ("stale lease", dead.path), ("temporary", aside), ("temporary", torn),
    }, found
    assert not dry.removed and dry.size_bytes > 0 and all(p.exists() for _, p in found)

    res = CliRunner().invoke(app, ["cache", "gc", "--older-than", "1d", "--cache", str(root)])
    assert res.exit_code == 0 and res.stdout.count("would remove") == 4 and "pass --yes to remove" in res.stderr
    res = CliRunner().invoke(app, ["cache", "gc", "--older-than", "1d", "--yes", "--cache", str(root)])
    assert res.exit_code == 0 and res.stdout.count("removed") == 4, res.output
    assert not any(p.exists() for _, p in found)
    assert busy.path.exists() and held.path.exists(), "an entry under a live lease is never collected"
    assert store.FeatureSet(complete.path).complete and fc.verify(complete.name, sample=0, cache_dir=root).ok
    held.release()
    # Younger than the threshold: kept; older: collected.
    assert not maintenance.gc(older_than="3d", cache_dir=root).items
    assert [i.path for i in maintenance.gc(older_than="1d", cache_dir=root).items] == [busy.path]


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800), ("1.5h", 5400), ("0", 0)])
def test_parse_age(text: str, seconds: float) -> None:
    assert maintenance.parse_age(text) == seconds


def test_parse_age_error_lists_the_units() -> None:
    with pytest.raises(UsageError, match="s, m, h, d or w"):
        maintenance.parse_age("yesterday")


# -- explain ------------------------------------------------------------------------------
def test_explain_hit_and_miss(clean: store.FeatureSet) -> None:
    root = clean.path.parent
    opts = PLAN
    assert fc.explain("builtin:digits", cache_dir=root, **opts).status == "hit"
    miss = fc.explain("builtin:digits", cache_dir=root, **{**opts, "size": 48, "pooling": "max"})
    assert miss.status == "miss" and miss.nearest == clean.name
    assert miss.message.endswith(f"differs from {clean.name}: input_size 32 -> 48, pooling avg -> max"), miss.message
    data = fc.explain("builtin:digits", cache_dir=root, **{**opts, "limit": 9, "augment": "flip"})
    assert [d.field for d in data.differences] == ["augment", "dataset_digest"]
    assert "augment flip,rotation=10.0 -> flip" in data.message and "--limit 8 -> 9" in data.message, data.message


def test_cli_explain(clean: store.FeatureSet) -> None:
    args = ["cache", "explain", "--data", "builtin:digits", "--backbone", "vgg16", "--weights", "random", "--size", "32", "--limit", "8",
            "--views", "1", "--augment", "flip,rotation=10", "--seed", "3", "--cache", str(clean.path.parent)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "seed 0 -> 3" in res.stdout and "weights random:seed=0 -> random:seed=3" in res.stdout
    doc = json.loads(CliRunner().invoke(app, [*args, "--json"]).stdout)
    assert doc["status"] == "miss" and {d["field"] for d in doc["differences"]} == {"seed", "weights"}
