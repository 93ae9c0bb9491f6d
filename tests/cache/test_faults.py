"""Crash safety and concurrency with real processes: SIGKILL at every named point, ENOSPC, races.

Each killed run is a subprocess with ``FEATURECACHE_FAULT`` set, so it dies exactly at one
checkpoint (see ``featurecache/cache/faults.py``). The resume runs in this process (TensorFlow
is already imported here, which keeps the file fast) and must give bytes identical to one
uninterrupted reference extraction, and leave no temporary files behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import featurecache as fc
from featurecache.cache import faults, store, views
from featurecache.cache.lease import LOCKS_DIR, Lease
from featurecache.cache.maintenance import gc
from featurecache.errors import UsageError
from tests.conftest import wait_on_exit

pytestmark = pytest.mark.slow  # real processes killed at every checkpoint

REPO = Path(__file__).resolve().parents[2]
# 20 images per split, chunks of 5 rows: train has 2 views x 4 units, val and test 4 units each.
OPTIONS = dict(
    backbone="mobilenetv2",
    weights="random",
    size=32,
    limit=20,
    views=1,
    augment="flip,rotation=10",
    batch_size=4,
    chunk_rows=5,
)
RUNNER = (
    "import json, sys, featurecache as fc\n"
    f"r = fc.extract('builtin:digits', cache_dir=sys.argv[1], progress=len(sys.argv) > 2, **json.loads({json.dumps(OPTIONS)!r}))\n"
    "print(json.dumps({'cached': r.cached, 'key': r.key}))\n"
)
CLI = [
    "extract",
    "--data",
    "builtin:digits",
    "--backbone",
    "mobilenetv2",
    "--weights",
    "random",
    "--size",
    "32",
    "--limit",
    "20",
    "--views",
    "1",
    "--augment",
    "flip,rotation=10",
    "--batch-size",
    "4",
    "--quiet",
]

# (fault, what must be on disk right after the kill). Ten distinct points, one per on-disk
# state a crash can leave; every process costs a TensorFlow import, so no two share a state.
# (model_built, unit_forward_done and lease_released leave the same states as lease_acquired,
# unit_prepared and sealed.)
KILL_POINTS = [
    ("lease_acquired", "lease"),
    ("entry_tmp_created", "tmp_dir"),
    ("entry_created", "no_units"),
    ("unit_prepared@3", "partial_units"),  # dies in the decode/prepare thread
    ("unit_data_written@2", "data_without_marker"),  # view-0 features chunk, no valid chunk, no marker
    ("unit_valid_written@6", "data_without_marker"),  # an augmented view's unit, before its marker
    ("marker_tmp_written@4", "marker_tmp"),
    ("unit_marker_written@9", "partial_units"),
    ("before_seal", "all_units_unsealed"),
    ("sealed", "complete"),
]


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stderr: str
    cache: Path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (faults.FAULT_ENV, "FEATURECACHE_DEBUG")}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def _run_python(cache: Path, fault: str | None = None) -> Outcome:
    env = _env(**({faults.FAULT_ENV: fault} if fault else {}))
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(cache)], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )
    return Outcome(proc.returncode, proc.stderr, cache)


def _run_cli(cache: Path, fault: str, **env: str) -> Outcome:
    proc = subprocess.run(
        [sys.executable, "-m", "featurecache", *CLI, "--cache", str(cache)],
        capture_output=True,
        text=True,
        env=_env(**{faults.FAULT_ENV: fault}, **env),
        cwd=REPO,
        timeout=300,
    )
    return Outcome(proc.returncode, proc.stderr, cache)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> views.FeatureSet:
    """One uninterrupted extraction, in this process."""
    root = tmp_path_factory.mktemp("reference")
    res = fc.extract("builtin:digits", cache_dir=root, progress=False, **OPTIONS)
    return fc.open_features(res.key, cache_dir=root)


@pytest.fixture(scope="module")
def faulted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every faulted subprocess, two at a time (each spends ~5 s importing TensorFlow)."""
    base = tmp_path_factory.mktemp("faulted")
    jobs = {point: (lambda p=point: _run_python(base / p.replace("@", "_"), p)) for point, _ in KILL_POINTS}
    # The CLI's default chunking puts the 60 clean images in one unit and the 20 augmented in a second.
    jobs["cli-enospc"] = lambda: _run_cli(base / "cli-enospc", "unit_data_written@2:enospc")
    # The disk fills up while writing the lease: the same error path, before TensorFlow loads.
    jobs["cli-enospc-debug"] = lambda: _run_cli(
        base / "cli-enospc-debug", "lease_acquired:enospc", FEATURECACHE_DEBUG="1"
    )
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def assert_identical(a: views.FeatureSet, b: views.FeatureSet) -> None:
    """Same key, same bytes in every array, same failures and attributes (creation time aside)."""
    assert a.key == b.key and a.complete and b.complete
    assert a.splits == b.splits
    for split in a.splits:
        np.testing.assert_array_equal(a.features(split, view=None), b.features(split, view=None), strict=True)
        np.testing.assert_array_equal(a.valid(split), b.valid(split), strict=True)
        np.testing.assert_array_equal(a.labels(split), b.labels(split), strict=True)
        assert list(a.ids(split)) == list(b.ids(split))
    assert a.failures() == b.failures()
    strip = lambda attrs: {k: v for k, v in attrs.items() if k not in ("created", "computed", "compute")}  # noqa: E731 - per run, not per result
    assert strip(a.attrs) == strip(b.attrs)


def assert_no_debris(root: Path) -> None:
    """No temp file survives: zarr's and our *.partial, views built aside, leases moved aside."""
    assert not list(root.rglob("*.partial"))
    assert not list((root / store.TMP_DIR).glob("*"))
    assert not list((root / LOCKS_DIR).glob("*.stale-*"))


def _entry(root: Path) -> views.FeatureSet | None:
    return next(views.iter_entries(root), None)


def _store(root: Path) -> store.FeatureStore | Path | None:
    return next(store.iter_stores(root), None)


def _marked(st: store.FeatureStore) -> int:
    return sum(len(st.markers(v, refresh=True)) for v in range(st.views))


# 20 images per split (60 distinct digits images), 5 rows per unit: 12 view-0 units, 4 view-1 units.
TOTAL_UNITS = 16


def _check_state_after_kill(root: Path, state: str) -> None:
    fs, st = _entry(root), _store(root)
    leases = list((root / LOCKS_DIR).glob("*.lease"))
    if state != "complete":
        assert leases and Lease(root, leases[0].name[: -len(".lease")]).is_stale(), (
            "the dead holder's lease stays, stale"
        )
        assert fs is None, "a view exists only once complete"
    if state == "lease":
        assert st is None
    elif state == "tmp_dir":
        assert isinstance(st, Path), (
            "the store's directory exists but it is not a store until its attributes are written"
        )
    elif state == "complete":
        assert fs is not None and isinstance(st, store.FeatureStore) and _marked(st) == TOTAL_UNITS
    else:
        assert isinstance(st, store.FeatureStore)
        done = _marked(st)
        if state == "no_units":
            assert done == 0
        elif state == "all_units_unsealed":
            assert done == TOTAL_UNITS and list((root / store.TMP_DIR).glob("*")), (
                "the view was built aside, never renamed"
            )
        else:
            assert 0 <= done < TOTAL_UNITS
        if state == "marker_tmp":
            assert list((st.path / store.UNITS_GROUP).rglob(".*.partial")), "the marker temp file was left"
        if state == "data_without_marker":
            written = {int(p.parent.name) for v in range(st.views) for p in st.path.glob(f"v{v}/features/c/*/0")}
            marked = set(st.markers(0)) | set(st.markers(1))
            assert written - marked, "a unit's data is on disk without its marker"


def _plant_zarr_partial(root: Path) -> Path | None:
    """What a kill in the middle of zarr writing a chunk leaves: a torn temp file beside it."""
    st = _store(root)
    if not isinstance(st, store.FeatureStore):
        return None
    torn = st.path / "v0" / "features" / "c" / "1" / "0.0123456789abcdef.partial"
    torn.parent.mkdir(parents=True, exist_ok=True)
    torn.write_bytes(b"\x00torn chunk")
    return torn


@pytest.mark.parametrize("point,state", KILL_POINTS, ids=[p for p, _ in KILL_POINTS])
def test_sigkill_at_point_then_resume_is_bit_identical(
    faulted: dict[str, Outcome], uninterrupted: views.FeatureSet, point: str, state: str
) -> None:
    out = faulted[point]
    assert out.returncode == -signal.SIGKILL, (
        f"expected death by SIGKILL at {point}, got rc {out.returncode}: {out.stderr[-2000:]}"
    )
    _check_state_after_kill(out.cache, state)
    torn = _plant_zarr_partial(out.cache)

    res = fc.extract("builtin:digits", cache_dir=out.cache, progress=False, **OPTIONS)
    assert res.cached == (state == "complete")
    assert_identical(fc.open_features(res.key, cache_dir=out.cache), uninterrupted)
    if torn is not None and state != "complete":
        assert not torn.exists()
    # A run that died after sealing is a cache hit, which never touches leases; gc reclaims it.
    leftover = list((out.cache / LOCKS_DIR).glob("*.lease"))
    assert all(Lease(out.cache, p.name[: -len(".lease")]).is_stale() for p in leftover)
    gc(older_than=0, dry_run=False, cache_dir=out.cache)
    assert not list((out.cache / LOCKS_DIR).glob("*"))
    assert_no_debris(out.cache)
    assert_identical(fc.open_features(res.key, cache_dir=out.cache), uninterrupted)


def test_disk_full_is_one_line_keeps_finished_units_and_resumes(faulted: dict[str, Outcome], tmp_path: Path) -> None:
    # The CLI has no --chunk-rows, and features are bit-identical only for the same units and
    # batches, so the reference here is an uninterrupted run with the CLI's default chunking.
    cli_options = {k: v for k, v in OPTIONS.items() if k != "chunk_rows"}
    reference = fc.open_features(
        fc.extract("builtin:digits", cache_dir=tmp_path, progress=False, **cli_options).key, cache_dir=tmp_path
    )
    out = faulted["cli-enospc"]
    assert out.returncode == 1, out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "no space left" in errors[0] and "resume" in errors[0], out.stderr
    assert "Traceback" not in out.stderr
    assert _entry(out.cache) is None
    st = _store(out.cache)
    assert sorted(st.markers(0, refresh=True)) == [0] and not st.markers(1, refresh=True), (
        "the second unit hit ENOSPC: no marker; the first is kept"
    )
    assert not list((out.cache / LOCKS_DIR).glob("*.lease")), "the lease is released on error"

    debug = faulted["cli-enospc-debug"]
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DiskFullError" in debug.stderr, debug.stderr
    assert not list((debug.cache / LOCKS_DIR).glob("*")), "a lease that could not be written is not left behind"

    res = fc.extract("builtin:digits", cache_dir=out.cache, progress=False, **cli_options)
    assert_identical(fc.open_features(res.key, cache_dir=out.cache), reference)
    assert_no_debris(out.cache)


# -- concurrency ------------------------------------------------------------------------
def _popen(
    cache: Path, *, fault: str | None = None, stderr_path: Path | None = None, progress: bool = False
) -> subprocess.Popen:
    env = _env(**({faults.FAULT_ENV: fault} if fault else {}))
    args = [sys.executable, "-c", RUNNER, str(cache), *(["progress"] if progress else [])]
    err = open(stderr_path, "w") if stderr_path else subprocess.DEVNULL  # noqa: SIM115 - closed by the child's exit
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=REPO)


def test_two_processes_on_the_same_key_make_one_correct_entry(tmp_path: Path, uninterrupted: views.FeatureSet) -> None:
    procs = [_popen(tmp_path), _popen(tmp_path)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    docs = [json.loads(o) for o in outs]
    assert sorted(d["cached"] for d in docs) == [False, True], "one extracts, the other waits and gets a hit"
    assert len(list(views.iter_entries(tmp_path))) == 1
    assert_identical(_entry(tmp_path), uninterrupted)
    assert not list((tmp_path / LOCKS_DIR).glob("*.lease"))
    assert_no_debris(tmp_path)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_killed_lease_holder_is_taken_over_by_the_waiter(tmp_path: Path, uninterrupted: views.FeatureSet) -> None:
    # The holder freezes itself mid-extraction (after 3 unit markers), holding the lease.
    holder = _popen(tmp_path, fault="unit_marker_written@3:stop")
    deadline = time.monotonic() + 240
    while _state(holder.pid) != "T":
        assert holder.poll() is None and time.monotonic() < deadline, "the holder should stop itself at the 3rd marker"
        wait_on_exit(holder, 0.1)
    log = tmp_path / "waiter.err"
    waiter = _popen(tmp_path, stderr_path=log, progress=True)
    while "waiting for another process" not in log.read_text():
        assert waiter.poll() is None and time.monotonic() < deadline, log.read_text()
        wait_on_exit(waiter, 0.1)
    assert _entry(tmp_path) is None and _marked(_store(tmp_path)) == 3
    holder.send_signal(signal.SIGKILL)
    holder.wait()  # reaped, so its pid is gone and the waiter sees the lease as stale
    out, _ = waiter.communicate(timeout=240)
    assert waiter.returncode == 0, log.read_text()
    assert json.loads(out)["cached"] is False
    assert_identical(_entry(tmp_path), uninterrupted)
    assert not list((tmp_path / LOCKS_DIR).glob("*.lease"))
    assert_no_debris(tmp_path)


# -- small pieces, no TensorFlow ------------------------------------------------------------
def test_breaking_a_stale_lease_never_removes_a_fresh_one(tmp_path: Path) -> None:
    key = "ab" * 32
    dead = Lease(tmp_path, key)
    dead.path.parent.mkdir(parents=True)
    dead.path.write_text(json.dumps({"token": "dead", "host": "elsewhere", "pid": 1}))
    old = time.time() - 3600
    os.utime(dead.path, (old, old))
    slow, fast = Lease(tmp_path, key), Lease(tmp_path, key)
    judged = slow.holder()
    assert slow.is_stale()
    # Meanwhile another waiter breaks the same stale lease and takes a fresh one.
    assert fast.break_stale(fast.holder()) and fast.try_acquire()
    assert not slow.break_stale(judged), "the slow breaker must not remove the fresh lease"
    assert slow.holder()["token"] == fast.holder()["token"] and not slow.try_acquire()
    fast.release()
    assert not list(dead.path.parent.glob("*"))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("sealed", ("sealed", 1, "kill")),
        ("unit_data_written@7", ("unit_data_written", 7, "kill")),
        ("before_seal:enospc", ("before_seal", 1, "enospc")),
        ("unit_prepared@2:stop", ("unit_prepared", 2, "stop")),
    ],
)
def test_fault_spec_parses(text: str, expected: tuple) -> None:
    spec = faults.FaultSpec.parse(text)
    assert (spec.point, spec.nth, spec.action) == expected


@pytest.mark.parametrize(
    "text,needle", [("unit_writen", "unit_data_written"), ("sealed@0", "positive"), ("sealed:explode", "enospc")]
)
def test_fault_spec_errors_name_the_choices(text: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        faults.FaultSpec.parse(text)


def test_checkpoints_cover_store_and_extract() -> None:
    import re

    called = set()
    for path in (REPO / "featurecache").rglob("*.py"):
        called |= set(re.findall(r'checkpoint\("([a-z_]+)"\)', path.read_text()))
    assert called == set(faults.POINTS) and len(called) >= 10
