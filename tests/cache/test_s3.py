"""The cache on object storage: a real S3 protocol endpoint (moto's server on 127.0.0.1).

Every request goes over HTTP to moto's S3 app, served by werkzeug in a thread exactly as
``moto.server.ThreadedMotoServer`` serves it, with a WSGI layer in front that logs each request
(to count LIST and HEAD requests) and, for one endpoint, drops the ``If-None-Match`` /
``If-Match`` headers: a store that ignores conditional writes, which the lease must refuse.
Nothing of Zarr, fsspec or s3fs is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

BUCKET = "featurecache-test"
OPTS = dict(backbone="mobilenetv3small", weights="random", size=32, limit=10)  # 30 images: 8 units of 4 rows


class Endpoint:
    """moto's S3 app on 127.0.0.1 (a free port), logging requests; optionally ignoring conditions."""

    def __init__(self, *, ignore_conditions: bool = False) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        self.log: list[tuple[str, str, str]] = []
        app = DomainDispatcherApplication(create_backend_app)

        def front(environ, start_response):  # noqa: ANN001, ANN202 - a WSGI callable
            if ignore_conditions:
                environ.pop("HTTP_IF_NONE_MATCH", None)
                environ.pop("HTTP_IF_MATCH", None)
            self.log.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", "")))
            return app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, front, threaded=True, request_handler=MotoRequestHandler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self) -> dict[str, int]:
        """Requests logged so far, by kind: LIST (bucket listings), HEAD, GET (objects), PUT, DELETE."""
        out = {"LIST": 0, "HEAD": 0, "GET": 0, "PUT": 0, "DELETE": 0}
        for method, path, query in self.log:
            is_bucket = path.strip("/").count("/") == 0
            kind = "LIST" if method == "GET" and (is_bucket or "list-type" in query) else method
            out[kind] = out.get(kind, 0) + 1
        return out

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """The endpoint, the AWS environment pointing at it, and the test bucket."""
    mp = pytest.MonkeyPatch()
    ep = Endpoint()
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.setenv("AWS_ENDPOINT_URL", ep.url)
    mp.delenv("FEATURECACHE_STORAGE_OPTIONS", raising=False)
    mp.delenv("AWS_PROFILE", raising=False)
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))  # memoised digests of local files
    import boto3

    boto3.client("s3", endpoint_url=ep.url).create_bucket(Bucket=BUCKET)
    yield ep
    ep.stop()
    mp.undo()


def _fs():
    from featurecache.cache.storage import as_location

    return as_location(f"s3://{BUCKET}/x").remote.fs


def _interrupted_run(cache: str, tmp: Path) -> subprocess.CompletedProcess:
    """An extraction killed (SIGKILL) right after its second unit's marker, in its own process."""
    code = (
        "from featurecache.extraction.extract import extract\n"
        f"extract('builtin:digits', cache_dir={cache!r}, chunk_rows=4, progress=False, **{OPTS!r})\n"
    )
    env = {
        **os.environ,
        "FEATURECACHE_FAULT": "unit_marker_written@2",
        "FEATURECACHE_FAULT_ONCE": str(tmp / "fault-once"),
    }
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(s3: Endpoint, tmp_path_factory: pytest.TempPathFactory):
    """An S3 extraction killed after 2 of 8 units, its planning requests, its resume; and a local run."""
    from featurecache.cache import store
    from featurecache.extraction.extract import extract, missing_digests, plan

    tmp = tmp_path_factory.mktemp("s3runs")
    cache = f"s3://{BUCKET}/resumed"
    killed = _interrupted_run(cache, tmp)
    assert killed.returncode == -9, killed.stderr[-2000:]
    p = plan("builtin:digits", cache_dir=cache, **OPTS)
    st = store.open_store(p.cache_dir, p.spec.key)
    before = s3.count()
    missing = missing_digests(p, st)  # what a resume plans, from the markers
    after = s3.count()
    planning = {k: after[k] - before[k] for k in after}
    resumed = extract("builtin:digits", cache_dir=cache, chunk_rows=4, progress=False, **OPTS)
    local = extract("builtin:digits", cache_dir=tmp / "local", chunk_rows=4, progress=False, **OPTS)
    return {"cache": cache, "planning": planning, "missing": missing, "resumed": resumed, "local": local, "tmp": tmp}


def test_resume_plans_from_one_listing(runs) -> None:
    """Resuming lists the units once (no HEAD per marker), fetches the 2 markers, and computes only the rest."""
    assert runs["planning"]["LIST"] == 1 and runs["planning"]["HEAD"] == 0, runs["planning"]
    assert runs["planning"]["GET"] == 2  # the two finished units' markers
    assert len(runs["missing"][0]) == 30 - 8
    assert runs["resumed"].computed == 30 - 8 and runs["resumed"].reused == 8


def test_s3_extraction_equals_local_bit_for_bit(runs) -> None:
    """The interrupted-and-resumed S3 feature set is byte-identical to a local cold run."""
    from featurecache.cache.views import open_features

    s3_res, local_res = runs["resumed"], runs["local"]
    assert s3_res.key == local_res.key and str(s3_res.path).startswith(f"s3://{BUCKET}/resumed/views/")
    a = open_features(s3_res.key, cache_dir=runs["cache"])
    b = open_features(local_res.key, cache_dir=runs["tmp"] / "local")
    assert a.splits == b.splits and a.classes == b.classes
    for split in a.splits:
        fa, fb = a.features(split), b.features(split)
        assert fa.dtype == fb.dtype and fa.tobytes() == fb.tobytes()
        assert np.array_equal(a.labels(split), b.labels(split)) and list(a.ids(split)) == list(b.ids(split))


def test_second_run_is_a_hit(runs) -> None:
    """The same command again finds the view on S3 and computes nothing."""
    from featurecache.extraction.extract import extract

    again = extract("builtin:digits", cache_dir=runs["cache"], chunk_rows=4, progress=False, **OPTS)
    assert again.cached and again.computed == 0 and again.key == runs["resumed"].key


def test_cache_ls_verify_and_refusals_on_s3(runs) -> None:
    """`cache ls` and `cache verify` work on an s3:// root; migrate refuses in one line, touching nothing."""
    from typer.testing import CliRunner

    from featurecache.cli.main import app

    runner = CliRunner()
    listed = runner.invoke(app, ["cache", "ls", "--json", "--cache", runs["cache"]])
    assert listed.exit_code == 0, listed.output
    doc = json.loads(listed.stdout)
    assert [v["key"] for v in doc["views"]] == [runs["resumed"].key]
    assert doc["stores"][0]["rows"]["v0"] == 30 and doc["damaged"] == []
    verified = runner.invoke(
        app, ["cache", "verify", runs["resumed"].key[:12], "--sample", "0", "--cache", runs["cache"]]
    )
    assert verified.exit_code == 0, verified.output
    assert "ok " in verified.stdout
    out = runner.invoke(app, ["cache", "migrate", "--cache", runs["cache"]])
    assert out.exit_code != 0 and "object-store cache" in out.output and len(out.output.strip().splitlines()) == 1, (
        out.output
    )
    assert runner.invoke(app, ["cache", "ls", "--json", "--cache", runs["cache"]]).stdout == listed.stdout


def test_deleted_chunk_is_detected_on_read(runs) -> None:
    """A features chunk removed from the bucket (Zarr would read zeros) fails the read and `verify`."""
    from featurecache.cache.views import open_features
    from featurecache.errors import CacheCorruptError

    fs = _fs()
    copy = f"{BUCKET}/damaged-{uuid.uuid4().hex[:6]}"
    fs.copy(f"{BUCKET}/resumed", copy, recursive=True)
    fs.invalidate_cache()
    chunks = sorted(p for p in fs.find(f"{copy}/features") if "/v0/features/c/" in p)
    assert len(chunks) >= 8
    fs.rm_file(chunks[0])
    fset = open_features(runs["resumed"].key, cache_dir=f"s3://{copy}")
    with pytest.raises(CacheCorruptError, match="cache verify"):
        for split in fset.splits:
            fset.features(split)
    from featurecache.extraction.audit import verify

    report = verify(runs["resumed"].key, sample=0, cache_dir=f"s3://{copy}")
    assert not report.ok and report.problems


def _copy_of_resumed(name: str) -> tuple[str, str]:
    """A copy of the resumed S3 cache under a fresh prefix: its bucket path and its URL."""
    fs = _fs()
    copy = f"{BUCKET}/{name}-{uuid.uuid4().hex[:6]}"
    fs.copy(f"{BUCKET}/resumed", copy, recursive=True)
    fs.invalidate_cache()
    return copy, f"s3://{copy}"


def test_verify_repair_on_s3_then_extract_recomputes_exactly_the_damage(runs) -> None:
    """A deleted chunk, a marker that vouches for other bytes and a torn marker: `verify --repair` drops
    those three units and the feature set; the same extract then recomputes only their rows, equal to
    local bit for bit."""
    from typer.testing import CliRunner

    from featurecache.cache.views import open_features
    from featurecache.cli.main import app
    from featurecache.extraction.audit import verify
    from featurecache.extraction.extract import extract

    fs = _fs()
    copy, cache = _copy_of_resumed("repair")
    key = runs["resumed"].key
    markers = {
        p: json.loads(fs.cat_file(p))
        for p in fs.find(f"{copy}/features")
        if "/units/v0/u" in p and p.endswith("/zarr.json")
    }
    full = sorted((p for p, doc in markers.items() if len(doc["attributes"]["featurecache"]["digests"]) == 4), key=len)[
        :3
    ]
    chunk_of = {p: p.replace("/units/v0/u", "/v0/features/c/").replace("/zarr.json", "/0") for p in full}
    fs.rm_file(chunk_of[full[0]])  # a missing chunk: Zarr would read zeros
    doc = markers[full[1]]
    doc["attributes"]["featurecache"]["sha256"] = "0" * 64  # a marker whose digest disagrees with the bytes
    fs.pipe_file(full[1], json.dumps(doc).encode())
    fs.pipe_file(full[2], b'{"zarr_format": 3, "attri')  # a marker cut short
    assert extract(
        "builtin:digits", cache_dir=cache, chunk_rows=4, progress=False, **OPTS
    ).cached  # the damage is not seen by a hit

    out = CliRunner().invoke(app, ["cache", "verify", key[:12], "--sample", "0", "--repair", "--cache", cache])
    assert "repaired: removed 3 damaged unit(s) of view 0" in out.output and "does not work" not in out.output, (
        out.output
    )
    assert fs.find(f"{copy}/views") == [] and not any(fs.exists(p) or fs.exists(chunk_of[p]) for p in full)

    again = extract("builtin:digits", cache_dir=cache, chunk_rows=4, progress=False, **OPTS)
    assert not again.cached and again.computed == 12 and again.reused == 30 - 12 and again.key == key
    assert verify(key, sample=0, cache_dir=cache).ok
    a, b = open_features(key, cache_dir=cache), open_features(key, cache_dir=runs["tmp"] / "local")
    for split in b.splits:
        assert a.features(split).tobytes() == b.features(split).tobytes(), split
        assert list(a.ids(split)) == list(b.ids(split)) and np.array_equal(a.labels(split), b.labels(split))


def test_rm_and_gc_on_s3(runs) -> None:
    """`cache rm` of a feature set keeps its rows until `cache gc --yes` removes them; a torn feature
    set is collected; `cache rm` of the store removes the rest and gives its lease back."""
    from typer.testing import CliRunner

    from featurecache.cache.store import FeatureStore
    from featurecache.cache.views import open_features
    from featurecache.cli.main import app

    fs = _fs()
    runner = CliRunner()
    copy, cache = _copy_of_resumed("rmgc")
    key = runs["resumed"].key
    store_path = open_features(key, cache_dir=cache).store.path
    view = fs.find(f"{copy}/views")[0].split("/views/", 1)[1].split("/", 1)[0]
    fs.copy(f"{copy}/views/{view}", f"{copy}/views/torn", recursive=True)
    fs.rm_file(f"{copy}/views/torn/zarr.json")  # a feature set whose writer died before sealing it

    planned = runner.invoke(app, ["cache", "rm", key[:12], "--dry-run", "--cache", cache])
    assert planned.exit_code == 0 and f"would remove feature set {view}" in planned.output, planned.output
    removed = runner.invoke(app, ["cache", "rm", key[:12], "--yes", "--cache", cache])
    assert removed.exit_code == 0 and f"removed feature set {view}" in removed.output, removed.output
    assert fs.find(f"{copy}/views/{view}") == []
    assert FeatureStore(store_path).rows(0) == 30  # rows stay for other feature sets until gc

    young = runner.invoke(
        app, ["cache", "gc", "--json", "--cache", cache]
    )  # --older-than 24h: the torn view is too young
    assert young.exit_code == 0 and [i["kind"] for i in json.loads(young.stdout)["items"]] == ["unused rows"], (
        young.output
    )
    dry = runner.invoke(app, ["cache", "gc", "--older-than", "0s", "--json", "--cache", cache])
    assert dry.exit_code == 0, dry.output
    kinds = {i["kind"]: i for i in json.loads(dry.stdout)["items"]}
    assert set(kinds) == {"unused rows", "damaged view"} and kinds["unused rows"]["size_bytes"] > 0, kinds
    assert kinds["damaged view"]["path"] == f"{cache}/views/torn"
    assert fs.find(f"{copy}/views/torn") != []  # a dry run touches nothing
    done = runner.invoke(app, ["cache", "gc", "--older-than", "0s", "--yes", "--cache", cache])
    assert done.exit_code == 0, done.output
    st = FeatureStore(store_path)
    assert st.rows(0) == 0 and fs.find(f"{copy}/views") == []
    assert not any("/c/" in p for p in fs.find(f"{st.path.path}/v0"))  # the unused rows' chunks are gone

    gone = runner.invoke(app, ["cache", "rm", st.name, "--yes", "--cache", cache])
    assert gone.exit_code == 0 and f"feature store {st.name}" in gone.output, gone.output
    assert fs.find(copy) == []  # no store, no lease left behind


def test_gc_on_s3_breaks_the_lease_of_a_dead_holder(s3: Endpoint, tmp_path: Path) -> None:
    """A process that took an S3 lease and died: `cache gc --yes` removes its lease, a live one stays."""
    from typer.testing import CliRunner

    from featurecache.cache.lease import Lease
    from featurecache.cache.store import resolve_cache_dir
    from featurecache.cli.main import app

    cache = f"s3://{BUCKET}/gclease-{uuid.uuid4().hex[:6]}"
    code = f"import os\nfrom featurecache.cache.lease import Lease\nfrom featurecache.cache.store import resolve_cache_dir\nassert Lease(resolve_cache_dir({cache!r}), 'd' * 64).try_acquire()\nos._exit(0)\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    live = Lease(resolve_cache_dir(cache), "l" * 64)
    assert live.try_acquire()
    try:
        out = CliRunner().invoke(app, ["cache", "gc", "--yes", "--json", "--cache", cache])
        assert out.exit_code == 0, out.output
        items = json.loads(out.stdout)["items"]
        assert [(i["kind"], i["path"]) for i in items] == [("stale lease", f"{cache}/.locks/{'d' * 64}.lease")]
        assert Lease(resolve_cache_dir(cache), "d" * 64).holder() is None
        assert live.holder()["token"] == live._token
    finally:
        live.release()


def test_missing_bucket_is_one_line_naming_it(s3: Endpoint) -> None:
    """A cache URL whose bucket does not exist: every command says so in one line with the endpoint
    (not "no feature sets", not "ignores conditional writes", not an unexpected FileNotFoundError)."""
    from typer.testing import CliRunner

    from featurecache.cache.lease import Lease
    from featurecache.cache.store import resolve_cache_dir
    from featurecache.cli.main import app
    from featurecache.errors import BucketNotFoundError

    cache = "s3://no-such-bucket/team"
    with pytest.raises(BucketNotFoundError, match=f"bucket 'no-such-bucket' does not exist at {s3.url}"):
        Lease(resolve_cache_dir(cache), "b" * 64).try_acquire()
    extract = [
        "extract",
        "--data",
        "builtin:digits",
        "--backbone",
        "mobilenetv3small",
        "--weights",
        "random",
        "--size",
        "32",
        "--limit",
        "2",
    ]
    for args in (
        ["cache", "ls"],
        ["cache", "gc", "--yes"],
        ["cache", "rm", "abcdef123456", "--yes"],
        extract,
        [*extract, "--no-lease"],
    ):
        out = CliRunner().invoke(app, [*args, "--cache", cache])
        lines = out.output.strip().splitlines()
        assert out.exit_code != 0 and len(lines) == 1, out.output
        assert (
            f"bucket 'no-such-bucket' does not exist at {s3.url}" in lines[0]
            and "aws s3 mb s3://no-such-bucket" in lines[0]
        ), lines[0]
    import boto3

    assert "no-such-bucket" not in [
        b["Name"] for b in boto3.client("s3", endpoint_url=s3.url).list_buckets()["Buckets"]
    ]


def test_two_shards_on_s3_make_one_entry_equal_to_local(runs) -> None:
    """`--shard 0/2` then `--shard 1/2` on an s3:// root: the plan is shared through the bucket, the last seals."""
    from featurecache.cache.views import open_features
    from featurecache.extraction.extract import extract

    cache = f"s3://{BUCKET}/shards-{uuid.uuid4().hex[:6]}"
    first = extract("builtin:digits", cache_dir=cache, chunk_rows=4, progress=False, shard=(0, 2), **OPTS)
    assert first.pending == 4 and first.computed == 16  # units 0, 2, 4, 6 of 8
    last = extract("builtin:digits", cache_dir=cache, chunk_rows=4, progress=False, shard=(1, 2), **OPTS)
    assert last.pending == 0 and last.computed == 14 and last.key == runs["local"].key
    a, b = open_features(last.key, cache_dir=cache), open_features(last.key, cache_dir=runs["tmp"] / "local")
    assert all(a.features(s).tobytes() == b.features(s).tobytes() for s in a.splits)
    assert _fs().find(f"{cache[len('s3://') :]}/.shards") == []  # the plan is removed once the view is written


# -- the lease on conditional writes (no TensorFlow) ---------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("death", ["inside", "outside"])
def test_cluster_run_on_s3_survives_a_dying_worker_bit_for_bit(runs, death: str) -> None:
    """2 Dask workers writing to S3, one dying in a unit once: the run re-plans from one listing and equals local.

    ``inside``: the worker calls ``os._exit`` after the backbone, before the write. ``outside``:
    it freezes there (SIGSTOP) and the test SIGKILLs it, as an OOM killer or a lost node would.
    """
    import threading

    pytest.importorskip("distributed")
    import dask
    from distributed import Client, LocalCluster

    from featurecache.cache.views import open_features
    from featurecache.extraction.extract import extract

    cache = f"s3://{BUCKET}/cluster-{death}"
    once = runs["tmp"] / f"cluster-fault-{death}"
    env = {
        k: os.environ[k]
        for k in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
            "XDG_CACHE_HOME",
        )
    }
    fault = "unit_forward_done@2" if death == "inside" else "unit_forward_done:stop"
    env |= {
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "FEATURECACHE_FAULT": fault,
        "FEATURECACHE_FAULT_ONCE": str(once),
    }
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):  # no Dask retries: the re-plan must do it
        lc = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None, env=env
        )
    client = Client(lc)
    out: dict[str, object] = {}
    try:
        pids = set(client.run(os.getpid).values())

        def run() -> None:
            out.update(
                res=extract(
                    "builtin:digits",
                    cache_dir=cache,
                    chunk_rows=4,
                    progress=False,
                    client=client,
                    units_per_task=2,
                    **OPTS,
                )
            )

        runner = threading.Thread(target=run)
        runner.start()
        if death == "outside":
            from conftest import kill_frozen_worker

            kill_frozen_worker(pids, once, runner)
        runner.join()
    finally:
        client.close()
        lc.close()
    assert once.exists(), "the injected fault never fired: the test proved nothing"
    res = out["res"]
    a = open_features(res.key, cache_dir=cache)  # type: ignore[attr-defined]
    b = open_features(runs["local"].key, cache_dir=runs["tmp"] / "local")
    assert res.key == runs["local"].key  # type: ignore[attr-defined]
    for split in b.splits:
        assert a.features(split).tobytes() == b.features(split).tobytes(), split
    summary = a.attrs["compute"]["cluster"]
    assert summary["failed"] >= 1 and summary["max_submissions"] <= 2


def test_conditional_lease_admits_exactly_one_of_two(s3: Endpoint) -> None:
    """Two coordinators taking the same lease at once: exactly one gets it; the other sees its record."""
    from featurecache.cache.lease import Lease, ObjectLease
    from featurecache.cache.store import resolve_cache_dir

    root = resolve_cache_dir(f"s3://{BUCKET}/lease-{uuid.uuid4().hex[:6]}")
    leases = [Lease(root, "k" * 64) for _ in range(2)]
    assert all(isinstance(lease, ObjectLease) for lease in leases)
    barrier = threading.Barrier(2)
    got: dict[int, bool] = {}

    def take(i: int) -> None:
        barrier.wait()
        got[i] = leases[i].try_acquire()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got.values()) == [False, True]
    winner, loser = (leases[0], leases[1]) if got[0] else (leases[1], leases[0])
    assert loser.holder()["token"] == winner._token
    winner.release()
    assert loser.try_acquire()
    loser.release()
    assert loser.holder() is None


def test_stale_lease_is_taken_over_once_and_the_old_holder_loses_it(s3: Endpoint) -> None:
    """A silent holder's lease is replaced with If-Match; its late heartbeat and release then do nothing."""
    from featurecache.cache.lease import Lease
    from featurecache.cache.store import resolve_cache_dir

    root = resolve_cache_dir(f"s3://{BUCKET}/stale-{uuid.uuid4().hex[:6]}")
    old = Lease(root, "s" * 64, heartbeat=3600)  # frozen: never beats on its own
    assert old.try_acquire()
    new = Lease(root, "s" * 64, stale_after=0.0)
    new.wait(timeout=30)  # the etag does not change: stale on the second look, then taken with If-Match
    assert new.holder()["token"] == new._token
    assert old._object().put(old._record(), if_match=old._etag) is None  # the old holder's next beat fails
    old.release()  # not ours any more: must not delete the new holder's lease
    assert new.holder()["token"] == new._token
    new.release()
    assert new.holder() is None


def test_two_coordinators_create_one_entry(s3: Endpoint) -> None:
    """Two processes' worth of writers at once on one store: one allocates and writes each image once."""
    from featurecache.cache.keys import FeatureSpec
    from featurecache.cache.store import open_store, resolve_cache_dir
    from featurecache.cache.views import write_arrays

    cache = f"s3://{BUCKET}/two-{uuid.uuid4().hex[:6]}"
    spec = FeatureSpec(
        backbone="synthetic",
        weights="random:seed=0",
        layer="l",
        pooling="avg",
        input_size=8,
        resize="bilinear",
        preprocess="none",
        augment={},
        views=0,
        augment_splits=(),
        seed=0,
        dtype="float32",
    )
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((1, 10, 5)).astype("float32")
    barrier = threading.Barrier(2)
    keys: list[str] = []

    def coordinator() -> None:
        barrier.wait()
        fs = write_arrays(
            cache,
            spec,
            classes=["a", "b"],
            splits={"train": ([str(i) for i in range(10)], np.arange(10) % 2, feats, None)},
            chunk_rows=4,
        )
        keys.append(fs.key)

    threads = [threading.Thread(target=coordinator) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 2 and keys[0] == keys[1]
    st = open_store(resolve_cache_dir(cache), spec.key)
    assert sorted(st.markers(0)) == [0, 1, 2] and st.rows(0) == 10  # one writer's units, none twice


def test_store_ignoring_conditional_writes_is_refused(s3: Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint that drops If-None-Match/If-Match: the lease refuses with one line naming --no-lease."""
    from featurecache.cache.lease import Lease
    from featurecache.cache.store import resolve_cache_dir
    from featurecache.errors import LeaseError

    ignoring = Endpoint(ignore_conditions=True)
    try:
        monkeypatch.setenv("FEATURECACHE_STORAGE_OPTIONS", json.dumps({"endpoint_url": ignoring.url}))
        root = resolve_cache_dir(f"s3://{BUCKET}/ignoring")
        with pytest.raises(LeaseError, match="--no-lease") as info:
            Lease(root, "i" * 64).wait(timeout=5)
        assert "\n" not in str(info.value) and "ignores conditional writes" in str(info.value)
        assert _fs().find(f"{BUCKET}/ignoring") == []  # the probe cleaned up after itself
    finally:
        ignoring.stop()


def test_no_lease_extracts_where_the_lease_is_refused(s3: Endpoint, runs, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a store without conditional writes `extract` refuses in one line naming --no-lease, and
    `--no-lease` runs it (here: the feature set over existing rows, so no model is built)."""
    from typer.testing import CliRunner

    from featurecache.cache.views import open_features
    from featurecache.cli.main import app

    fs = _fs()
    copy = f"{BUCKET}/nolease-{uuid.uuid4().hex[:6]}"
    fs.copy(f"{BUCKET}/resumed", copy, recursive=True)
    fs.rm(f"{copy}/views", recursive=True)  # the store's rows stay; the feature set is to be written
    ignoring = Endpoint(ignore_conditions=True)
    try:
        monkeypatch.setenv("FEATURECACHE_STORAGE_OPTIONS", json.dumps({"endpoint_url": ignoring.url}))
        args = [
            "extract",
            "--data",
            "builtin:digits",
            "--backbone",
            "mobilenetv3small",
            "--weights",
            "random",
            "--size",
            "32",
            "--limit",
            "10",
            "--cache",
            f"s3://{copy}",
            "--json",
        ]
        refused = CliRunner().invoke(app, args)
        assert (
            refused.exit_code != 0 and "--no-lease" in refused.output and len(refused.output.strip().splitlines()) == 1
        ), refused.output
        done = CliRunner().invoke(app, [*args, "--no-lease"])
        assert done.exit_code == 0, done.output
        doc = json.loads(done.stdout)
        assert doc["key"] == runs["local"].key and doc["computed"] == 0 and not doc["cached"]
        a, b = (
            open_features(doc["key"], cache_dir=f"s3://{copy}"),
            open_features(doc["key"], cache_dir=runs["tmp"] / "local"),
        )
        assert all(a.features(s).tobytes() == b.features(s).tobytes() for s in a.splits)
    finally:
        ignoring.stop()


# -- cache roots as URLs (no endpoint needed) ----------------------------------------------------
def test_cache_roots_parse_as_paths_or_urls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Paths and file:// stay local Paths; s3:// gives a remote location; bad storage options fail in one line."""
    from featurecache.cache.storage import RemotePath
    from featurecache.cache.store import resolve_cache_dir
    from featurecache.errors import UsageError

    monkeypatch.delenv("FEATURECACHE_STORAGE_OPTIONS", raising=False)
    assert resolve_cache_dir(tmp_path / "c") == tmp_path / "c"
    assert resolve_cache_dir(f"file://{tmp_path}/c") == tmp_path / "c"
    remote = resolve_cache_dir("s3://bucket/some/prefix/")
    assert isinstance(remote, RemotePath) and str(remote) == "s3://bucket/some/prefix"
    assert str(remote / "views" / "x") == "s3://bucket/some/prefix/views/x" and (remote / "views").parent == remote
    monkeypatch.setenv("FEATURECACHE_DIR", "s3://bucket/from-env")
    assert str(resolve_cache_dir()) == "s3://bucket/from-env"
    monkeypatch.setenv("FEATURECACHE_STORAGE_OPTIONS", "{not json")
    with pytest.raises(UsageError, match="FEATURECACHE_STORAGE_OPTIONS is not valid JSON"):
        resolve_cache_dir("s3://bucket/p")


def test_cli_keeps_a_cache_url_intact(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--cache s3://...` reaches the API as the URL (a Path would collapse it to s3:/...)."""
    from featurecache.cli._common import _cache_folder

    assert _cache_folder("s3://bucket/prefix") == "s3://bucket/prefix"
    assert isinstance(_cache_folder("relative/dir"), Path)


def test_missing_credentials_are_one_line_naming_the_fix(tmp_path: Path) -> None:
    """No AWS credentials anywhere: the command says which cache and what to set, not a botocore traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FEATURECACHE_"))}
    env |= {
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "HOME": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "featurecache", "cache", "ls", "--cache", f"s3://{BUCKET}/x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cache s3://{BUCKET}/x cannot be reached"), proc.stderr
    assert "AWS_ACCESS_KEY_ID" in lines[0] and "Traceback" not in proc.stderr
