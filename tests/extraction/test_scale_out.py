"""Scale-out: extraction units on a real Dask LocalCluster, and shards without a scheduler.

Every test compares against a single-process extraction of the same tiny dataset (byte for
byte, every split and view), because that is the guarantee: where a unit ran never changes
its bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featurecache.errors import UsageError
from featurecache.extraction.shards import parse_shard

# 30 images (10 per split) in units of 4 rows: 8 units, so tasks of 2 units make 4 tasks.
OPTS = dict(backbone="mobilenetv2", weights="random", size=32, limit=10, chunk_rows=4, batch_size=4, progress=False)
DATA = "builtin:digits"


def all_features(fs) -> dict[str, np.ndarray]:
    return {s: fs.features(s, view=None) for s in fs.splits}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A plain single-process run: its cache (tests only read it) and its key."""
    from featurecache.extraction.extract import extract

    cache = tmp_path_factory.mktemp("ref-cache")
    return cache, extract(DATA, cache_dir=cache, **OPTS).key


@pytest.fixture(scope="module")
def reference(single_process: tuple[Path, str]) -> dict[str, np.ndarray]:
    """The features of a plain single-process run."""
    from featurecache.cache.views import open_features

    cache, key = single_process
    return all_features(open_features(key, cache_dir=cache))


def local_cluster(**env: str):
    pytest.importorskip("distributed")
    import dask
    from distributed import Client, LocalCluster

    # No retries by Dask: a dead worker's task comes back as KilledWorker at once, so the
    # re-plan from markers is what makes the run complete (as the coordinator must not
    # depend on Dask's retry counters).
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        lc = LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            env={"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "TF_CPP_MIN_LOG_LEVEL": "3", **env},
        )
    return lc, Client(lc)


@pytest.mark.slow
def test_cluster_extraction_is_bit_identical_and_records_where(
    tmp_path: Path, reference: dict[str, np.ndarray]
) -> None:
    from featurecache.cache.store import open_store
    from featurecache.cache.views import open_features
    from featurecache.extraction.extract import extract, plan

    cache = tmp_path / "cache"
    lc, client = local_cluster()
    try:
        res = extract(DATA, cache_dir=cache, client=client, units_per_task=2, **OPTS)
        again = extract(DATA, cache_dir=cache, client=client, units_per_task=2, **OPTS)
    finally:
        client.close()
        lc.close()
    fs = open_features(res.key, cache_dir=cache)
    got = all_features(fs)
    assert got.keys() == reference.keys()
    for split in got:
        assert got[split].tobytes() == reference[split].tobytes(), split
    assert res.computed == 30 and again.cached
    summary = fs.attrs["compute"]["cluster"]
    assert summary["tasks"] == 4 and summary["failed"] == 0 and summary["max_submissions"] == 1
    st = open_store(
        cache, plan(DATA, cache_dir=cache, backbone="mobilenetv2", weights="random", size=32, limit=10).spec.key
    )
    markers = st.markers(0, refresh=True)
    assert len(markers) == 8
    for m in markers.values():
        assert (
            m["worker"].startswith("tcp://127.0.0.1:")
            and m["device"] == "CPU"
            and m["host"]
            and "tensorflow" in m["versions"]
        )


@pytest.mark.slow
def test_worker_dying_inside_a_unit_is_replanned_from_markers(tmp_path: Path, reference: dict[str, np.ndarray]) -> None:
    from featurecache.cache.views import open_features
    from featurecache.extraction.extract import extract

    cache = tmp_path / "cache"
    once = tmp_path / "fault-fired"
    # The second unit a worker process computes SIGKILLs that worker after the backbone and
    # before the write (its first unit is already marked): only once across all processes.
    lc, client = local_cluster(FEATURECACHE_FAULT="unit_forward_done@2", FEATURECACHE_FAULT_ONCE=str(once))
    try:
        res = extract(DATA, cache_dir=cache, client=client, units_per_task=2, **OPTS)
    finally:
        client.close()
        lc.close()
    assert once.exists(), "the injected fault never fired: the test proved nothing"
    fs = open_features(res.key, cache_dir=cache)
    got = all_features(fs)
    for split in reference:
        assert got[split].tobytes() == reference[split].tobytes(), split
    summary = fs.attrs["compute"]["cluster"]
    assert summary["failed"] >= 1 and summary["rounds"] == 2
    assert summary["max_submissions"] <= 2


SHARD_SCRIPT = """
import json, sys
from featurecache.extraction.extract import extract
res = extract({data!r}, cache_dir=sys.argv[1], shard=(int(sys.argv[2]), 2), **{opts!r})
print(json.dumps({{"pending": res.pending, "cached": res.cached, "computed": res.computed}}))
"""


@pytest.mark.slow
def test_two_shard_processes_make_one_complete_identical_entry(
    tmp_path: Path, reference: dict[str, np.ndarray]
) -> None:
    from featurecache.cache.views import open_features
    from featurecache.extraction.extract import plan
    from featurecache.extraction.shards import plan_path

    cache = tmp_path / "cache"
    script = SHARD_SCRIPT.format(data=DATA, opts=OPTS)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(cache), str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    docs = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    # Each shard computed its own half of the 8 units (7 of 4 rows, 1 of 2).
    assert sum(d["computed"] for d in docs) == 30 and all(d["computed"] > 0 for d in docs)
    p = plan(DATA, cache_dir=cache, backbone="mobilenetv2", weights="random", size=32, limit=10)
    fs = open_features(p.key, cache_dir=cache)
    got = all_features(fs)
    for split in reference:
        assert got[split].tobytes() == reference[split].tobytes(), split
    assert not plan_path(cache, p.key).exists()
    shards = {m["shard"] for m in fs.store.markers(0, refresh=True).values()}
    assert shards == {"0/2", "1/2"}


def test_shard_text_and_slurm_array() -> None:
    assert parse_shard("1/3") == (1, 3)
    assert parse_shard(None) is None
    assert parse_shard(
        "auto", {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "3"}
    ) == (2, 4)
    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(UsageError, match="--shard|shard"):
            parse_shard(bad)
    with pytest.raises(UsageError, match="SLURM_ARRAY_TASK_ID"):
        parse_shard("auto", {})


CLI_BASE = [
    "extract",
    "--data",
    DATA,
    "--backbone",
    "mobilenetv2",
    "--weights",
    "random",
    "--size",
    "32",
    "--limit",
    "10",
    "--batch-size",
    "4",
]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--cluster", "yarn:2"], "--cluster 'yarn:2' is not understood; pass local:N"),
        (
            ["--cluster", "local:2", "--scheduler", "tcp://127.0.0.1:1"],
            "only one of --cluster, --scheduler and --scheduler-file",
        ),
        (["--shard", "2/2"], "shard 2/2 is out of range"),
        (["--shard", "half"], "--shard 'half' is not i/N"),
    ],
)
def test_cli_scale_out_options_fail_in_one_line(tmp_path: Path, extra: list[str], needle: str) -> None:
    from typer.testing import CliRunner

    from featurecache.cli.main import app

    res = CliRunner().invoke(app, [*CLI_BASE, "--cache", str(tmp_path), *extra])
    assert res.exit_code != 0
    assert needle in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_cli_local_cluster_equals_a_local_run(tmp_path: Path, reference: dict[str, np.ndarray]) -> None:
    pytest.importorskip("distributed")
    from typer.testing import CliRunner

    from featurecache.cache.views import open_features
    from featurecache.cli.main import app

    cache = tmp_path / "cache"
    res = CliRunner().invoke(
        app, [*CLI_BASE, "--cache", str(cache), "--cluster", "local:2", "--units-per-task", "1", "--json"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    fs = open_features(doc["key"], cache_dir=cache)
    assert fs.attrs["compute"]["cluster"]["workers"] == 2
    got = all_features(fs)
    # The CLI picks its own chunk rows, so compare values per split, not store layouts.
    for split in reference:
        assert got[split].tobytes() == reference[split].tobytes(), split


@pytest.fixture(scope="module")
def sweep_features(single_process: tuple[Path, str]) -> tuple[Path, str]:
    """A cache holding the tiny features the dask sweep tests train on, and their key."""
    return single_process


SWEEP_GRID = "logreg:C=0.1,1,10;max_iter=200"


@pytest.fixture(scope="module")
def local_sweep(sweep_features: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory):
    """The dask sweeps' reference: the same grid through joblib in this process."""
    from featurecache.training.sweeps.sweep import sweep

    cache, key = sweep_features
    return sweep(
        key,
        grid=[SWEEP_GRID],
        n_jobs=1,
        out=tmp_path_factory.mktemp("local-sweep") / "local",
        cache_dir=cache,
        progress=False,
    )


def assert_same_trials(rows: list[dict], local_rows: list[dict]) -> None:
    by_trial = {r["trial"]: r for r in rows}
    assert len(rows) == len(local_rows) == 3
    for row in local_rows:
        other = by_trial[row["trial"]]
        assert other["status"] == row["status"] == "ok"
        for metric in ("val_accuracy", "val_log_loss", "test_accuracy"):
            assert other[metric] == row[metric], (row["trial"], metric)


@pytest.mark.slow
def test_cli_dask_sweep_equals_a_local_sweep_trial_by_trial(
    tmp_path: Path, sweep_features: tuple[Path, str], local_sweep
) -> None:
    pytest.importorskip("distributed")
    from typer.testing import CliRunner

    from featurecache.cli.main import app

    cache, key = sweep_features
    grid = SWEEP_GRID
    local = local_sweep
    res = CliRunner().invoke(
        app,
        [
            "sweep",
            "--features",
            key,
            "--grid",
            grid,
            "--backend",
            "dask",
            "--cluster",
            "local:2",
            "--jobs",
            "2",
            "--out",
            str(tmp_path / "dask"),
            "--cache",
            str(cache),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert_same_trials(json.loads(res.stdout)["leaderboard"], local.leaderboard)


@pytest.mark.slow
def test_dask_sweep_resumes_the_trials_of_a_worker_that_died(
    tmp_path: Path, sweep_features: tuple[Path, str], local_sweep
) -> None:
    from typer.testing import CliRunner

    from featurecache.cli.main import app

    cache, key = sweep_features
    once = tmp_path / "fault-fired"
    # The first trial any worker trains ends its worker (os._exit) before its record is written,
    # once across all processes (the nanny's replacement runs clean). Dask retries nothing
    # (allowed-failures 0): the sweep itself must run the lost trial again.
    lc, client = local_cluster(FEATURECACHE_FAULT="trial_fitted:exit", FEATURECACHE_FAULT_ONCE=str(once))
    try:
        res = CliRunner().invoke(
            app,
            [
                "sweep",
                "--features",
                key,
                "--grid",
                SWEEP_GRID,
                "--backend",
                "dask",
                "--scheduler",
                lc.scheduler_address,
                "--jobs",
                "2",
                "--out",
                str(tmp_path / "dask"),
                "--cache",
                str(cache),
                "--json",
            ],
        )
    finally:
        client.close()
        lc.close()
    assert once.exists(), "the injected fault never fired: the test proved nothing"
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["lost_tasks"] >= 1 and doc["rounds"] == 2 and doc["failed"] == 0
    assert_same_trials(doc["leaderboard"], local_sweep.leaderboard)
    records = [json.loads(p.read_text()) for p in (tmp_path / "dask" / "trials").glob("*.json")]
    assert len(records) == 3 and {r["status"] for r in records} == {"ok"}


def test_cli_dask_backend_needs_a_cluster(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from featurecache.cli.main import app

    res = CliRunner().invoke(
        app, ["sweep", "--features", "abcdef123456", "--backend", "dask", "--cache", str(tmp_path)]
    )
    assert res.exit_code != 0
    assert "--backend dask goes with one of --cluster" in res.output


@pytest.mark.slow
def test_the_local_cluster_is_closed_even_when_closing_its_client_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    # A cluster left running on an error path leaves its event loop's tasks pending at exit (issue 20).
    pytest.importorskip("distributed")
    from distributed.core import Status

    from featurecache.extraction import cluster

    client = cluster.connect("local:1")
    lc = client._featurecache_cluster
    real_close = client.close

    def failing_close(*args: object, **kwargs: object) -> None:
        real_close()
        raise OSError("connection reset while closing")

    monkeypatch.setattr(client, "close", failing_close)
    with pytest.raises(OSError, match="connection reset"):
        cluster.close(client)
    assert lc.status == Status.closed


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc")
def test_worker_killed_from_outside_mid_unit(tmp_path: Path, reference: dict[str, np.ndarray]) -> None:
    import threading

    from featurecache.cache.views import open_features
    from featurecache.extraction.extract import extract

    cache = tmp_path / "cache"
    once = tmp_path / "fault-fired"
    # One worker freezes itself (SIGSTOP) inside a unit, after the backbone and before the
    # write; the test then kills it from outside, as an OOM killer or a lost node would.
    lc, client = local_cluster(FEATURECACHE_FAULT="unit_forward_done:stop", FEATURECACHE_FAULT_ONCE=str(once))
    try:
        pids = set(client.run(os.getpid).values())
        out: dict[str, object] = {}
        runner = threading.Thread(
            target=lambda: out.update(res=extract(DATA, cache_dir=cache, client=client, units_per_task=2, **OPTS))
        )
        runner.start()
        from conftest import kill_frozen_worker

        kill_frozen_worker(pids, once, runner)
        runner.join()
    finally:
        client.close()
        lc.close()
    res = out["res"]
    fs = open_features(res.key, cache_dir=cache)  # type: ignore[attr-defined]
    got = all_features(fs)
    for split in reference:
        assert got[split].tobytes() == reference[split].tobytes(), split
    summary = fs.attrs["compute"]["cluster"]
    assert summary["failed"] >= 1 and summary["max_submissions"] <= 2


@pytest.mark.slow
def test_a_bad_image_with_on_error_fail_is_not_retried_on_the_cluster(tmp_path: Path) -> None:
    from conftest import make_image_folder

    from featurecache.errors import ImageDecodeError
    from featurecache.extraction.extract import extract

    root = make_image_folder(tmp_path / "pets")
    (root / "cat" / "broken.png").write_bytes(b"not a png")
    lc, client = local_cluster()
    try:
        with pytest.raises(ImageDecodeError, match="broken.png"):
            extract(
                str(root),
                cache_dir=tmp_path / "cache",
                client=client,
                on_error="fail",
                **{k: v for k, v in OPTS.items() if k != "limit"},
            )
    finally:
        client.close()
        lc.close()


def test_dataset_digests_hashed_on_the_cluster_equal_local_hashing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    pytest.importorskip("distributed")
    from conftest import make_image_folder
    from distributed import get_task_stream

    from featurecache.cache.store import memo_dir
    from featurecache.data import dataset as dataset_mod
    from featurecache.data.dataset import MEMO_FILENAME, file_digests
    from featurecache.extraction import cluster
    from featurecache.extraction.extract import extract

    root = make_image_folder(tmp_path / "pets", splits=("train", "val"), per_class=5)
    old = time.time() - 3600  # past the racily-clean window, so the memo keeps every file
    for f in root.rglob("*"):
        os.utime(f, (old, old))
    paths = sorted(str(f) for f in root.rglob("*.*"))
    here = tmp_path / "here" / MEMO_FILENAME
    expected = file_digests(paths, memo_path=here)  # one process, its threads
    hashed_here: list[int] = []  # files this process hashes: none, when the workers' reads are used
    real = dataset_mod.iter_file_hashes
    monkeypatch.setattr(
        dataset_mod, "iter_file_hashes", lambda paths, **kw: hashed_here.append(len(paths)) or real(paths, **kw)
    )
    lc, client = local_cluster()
    try:
        stats: dict[str, int] = {}
        there = tmp_path / "there" / MEMO_FILENAME
        with get_task_stream(client) as ts:
            # Batches of 3 of 20 files: 7 tasks, finished in any order, digests in path order.
            got = file_digests(
                paths, memo_path=there, hasher=cluster.file_hasher(client, min_files=1, batch_files=3, stats=stats)
            )
        assert got == expected
        assert stats == {"tasks": 7, "failed": 0} and hashed_here == []
        assert sum(t["key"].startswith("_hash_task") for t in ts.data) == 7  # the workers read them
        assert json.loads(there.read_text()) == json.loads(here.read_text())  # memoised as by local hashing

        # extract with a client: the files the memo lacks, past the threshold, go to the cluster.
        monkeypatch.setattr(cluster, "DIGEST_MIN_FILES", 1)
        cache = tmp_path / "cache"
        with get_task_stream(client) as ts, pytest.raises(UsageError, match="not both"):
            # --shard with a client fails after planning (and hashing), before any model is built.
            extract(
                str(root),
                cache_dir=cache,
                client=client,
                shard=(0, 2),
                backbone="mobilenetv2",
                weights="random",
                size=32,
            )
        assert sum(t["key"].startswith("_hash_task") for t in ts.data) == 1
    finally:
        client.close()
        lc.close()
    assert json.loads((memo_dir(cache) / MEMO_FILENAME).read_text()) == json.loads(here.read_text())


def test_writing_a_unit_reads_no_other_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker opens the store afresh for every task; adding its marker to the store's
    # listing used to list and read every marker of the view first: quadratic in units.
    from featurecache.cache import store
    from featurecache.extraction.extract import missing_digests, plan

    p = plan(DATA, cache_dir=tmp_path, backbone="mobilenetv2", weights="random", size=32, limit=10)
    st = store.create_store(p.cache_dir, p.spec, feature_shape=(3,), chunk_rows=4)
    units = [u for view, digests in missing_digests(p, st).items() for u in store.allocate_units(st, view, digests)]

    def write(s: store.FeatureStore, u: store.Unit) -> None:
        store.write_unit(s, u, np.zeros((len(u.digests), 3), np.float32), valid=np.ones(len(u.digests), bool))

    for u in units[:3]:
        write(st, u)
    fresh = store.FeatureStore(st.path)
    reads: list[Path] = []
    real = store.read_group_attrs
    monkeypatch.setattr(store, "read_group_attrs", lambda path: reads.append(path) or real(path))
    write(fresh, units[3])
    assert reads == []
    assert sorted(fresh.markers(0)) == sorted(u.slot for u in units[:4])  # listed from disk: all four
    write(fresh, units[4])
    assert units[4].slot in fresh.markers(0)  # a listing already read is kept current


def test_files_hashed_elsewhere_count_only_if_seen_as_here(tmp_path: Path) -> None:
    # A worker that cannot read a file, or reads another file at the same path (no shared
    # file system), must not change a digest: such files are hashed again by this process.
    import hashlib

    from featurecache.data.dataset import file_digests

    paths = []
    for i in range(3):
        f = tmp_path / f"{i}.png"
        f.write_bytes(bytes([i]) * (100 + i))
        paths.append(str(f))

    def elsewhere(todo):  # type: ignore[no-untyped-def]
        yield "unreadable:ENOENT", None, 0  # could not read it
        yield "0" * 64, (999, 1), 0  # another file there
        yield "1" * 64, (os.stat(todo[2]).st_size, os.stat(todo[2]).st_mtime_ns), 0  # the same file: taken as read

    got = file_digests(paths, hasher=elsewhere)
    assert got[:2] == [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths[:2]]
    assert got[2] == "1" * 64
