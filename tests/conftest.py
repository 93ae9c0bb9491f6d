"""Shared fixtures: a temporary cache, tiny generated image datasets, and digits features
extracted once per session."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# A test that needs an optional component skips with the reason when it is absent
# (pytest.importorskip, Chromium's skipif). CI installs everything and sets this variable, so
# there such a skip is a failure: a test skipped in CI checks nothing.
REQUIRE_ALL = os.environ.get("FEATURECACHE_REQUIRE_ALL") == "1"
OPTIONAL_SKIP_MARKERS = ("could not import", "is not installed")


def _fail_optional_skip(report: Any) -> None:
    if REQUIRE_ALL and report.skipped and any(m in str(report.longrepr) for m in OPTIONAL_SKIP_MARKERS):
        report.outcome = "failed"
        report.longrepr = f"FEATURECACHE_REQUIRE_ALL=1 but an optional component is missing: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    outcome = yield
    _fail_optional_skip(outcome.get_result())


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _fail_optional_skip(report)


@pytest.fixture(scope="module")
def one_blas_thread():
    """One BLAS thread for a module's in-process fits.

    On the shared 2-core box, OpenBLAS's second thread spins against other processes and makes
    one lbfgs fit ~30x slower (7 s instead of 0.2 s); sweep workers get this limit from joblib.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache, also set as $FEATURECACHE_DIR so CLI calls use it."""
    d = tmp_path / "cache"
    d.mkdir()
    monkeypatch.setenv("FEATURECACHE_DIR", str(d))
    return d


def make_image_folder(
    root: Path,
    *,
    classes: tuple[str, ...] = ("cat", "dog"),
    per_class: int = 4,
    size: int = 20,
    seed: int = 0,
    splits: tuple[str, ...] = (),
) -> Path:
    """Write small random PNG/JPEG images in class sub-folders (optionally inside split folders)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits or ("",):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, size=(size + i, size, 3), dtype=np.uint8)
                ext = "png" if i % 2 == 0 else "jpg"
                Image.fromarray(arr).save(d / f"{c}_{i}.{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Two classes of four small images each, mixed PNG and JPEG, varied sizes."""
    return make_image_folder(tmp_path / "pets")


# -- digits features, extracted once per session ----------------------------------------------
# A real TensorFlow extraction costs seconds, and most tests of training, reports and
# fine-tuning only need features to exist. Each set of options is extracted once per session
# (under pytest-xdist: once per worker process) into a cache of its own, so what a test reads
# never depends on which other files ran before it. Tests only read these caches; a test that
# damages or adds to a cache works on a copy (``DigitsFeatures.copy``, ``*_copy`` fixtures).

#: The options the digits fixtures extract with: tiny, fast, nothing downloaded.
DIGITS = {"backbone": "mobilenetv2", "weights": "random", "size": 32}


@dataclasses.dataclass(frozen=True)
class DigitsFeatures:
    """builtin:digits features alone in their cache ``cache``; ``result`` is what extract returned."""

    cache: Path
    result: Any  # featurecache.ExtractResult

    @property
    def key(self) -> str:
        return self.result.key

    def open(self) -> Any:
        """The feature set (a ``featurecache.cache.views.FeatureSet``)."""
        import featurecache as fc

        return fc.open_features(self.key, cache_dir=self.cache)

    def copy(self, cache: Path) -> DigitsFeatures:
        """The whole cache copied to ``cache``: far cheaper than extracting again."""
        shutil.copytree(self.cache, cache, symlinks=True)
        path = cache / Path(self.result.path).relative_to(self.cache)
        return DigitsFeatures(cache, dataclasses.replace(self.result, path=path))


@pytest.fixture(scope="session")
def digits_features_for(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., DigitsFeatures]:
    """``digits_features_for(**options)``: builtin:digits extracted with ``DIGITS`` updated by
    ``options``, once per session for each set of options."""
    made: dict[str, DigitsFeatures] = {}

    def get(**options: Any) -> DigitsFeatures:
        import featurecache as fc

        options = {**DIGITS, **options}
        tag = json.dumps(options, sort_keys=True)
        if tag not in made:
            cache = tmp_path_factory.mktemp("digits-features")
            made[tag] = DigitsFeatures(cache, fc.extract("builtin:digits", cache_dir=cache, progress=False, **options))
        return made[tag]

    return get


@pytest.fixture(scope="session")
def digits_features(digits_features_for: Callable[..., DigitsFeatures]) -> DigitsFeatures:
    """All 1797 digits (train 1257, val 270, test 270) with ``DIGITS``."""
    return digits_features_for()


@pytest.fixture(scope="session")
def digits(digits_features: DigitsFeatures) -> Any:
    """The feature set of ``digits_features``."""
    return digits_features.open()


@pytest.fixture(scope="session")
def digits_cache(digits_features: DigitsFeatures) -> Path:
    """The cache holding ``digits_features`` (and nothing else): read it, never write to it."""
    return digits_features.cache


@pytest.fixture
def digits_features_copy(digits_features: DigitsFeatures, tmp_path: Path) -> DigitsFeatures:
    """``digits_features`` in a copy of its cache under ``tmp_path``, for a test to alter."""
    return digits_features.copy(tmp_path / "digits-cache")


@pytest.fixture(scope="session")
def digits_features_20(digits_features_for: Callable[..., DigitsFeatures]) -> DigitsFeatures:
    """20 digits per split (10 classes x 2) with ``DIGITS``."""
    return digits_features_for(limit=20)


@pytest.fixture
def digits_features_20_copy(digits_features_20: DigitsFeatures, tmp_path: Path) -> DigitsFeatures:
    """``digits_features_20`` in a copy of its cache under ``tmp_path``, for a test to alter."""
    return digits_features_20.copy(tmp_path / "digits-cache")


#: Test files that run longest (multi-process, end-to-end), in the order the workers should take
#: them: with ``--dist loadfile`` a file runs whole on one worker, and pytest-xdist's default
#: order (files with the most tests first) left these for the end, one worker busy and the other
#: idle. Longest first lets the short files fill in around them (pyproject: --no-loadscope-reorder).
LONG_FILES_FIRST = (
    "test_faults.py",
    "test_scale_out.py",
    "test_sweep.py",
    "test_s3.py",
    "test_pipelines.py",
    "test_ensemble.py",
    "test_extract.py",
    "test_finetune.py",
    "test_incremental.py",
    "test_quiet_stderr.py",
    "test_train.py",
    "test_dense_group.py",
    "test_predict.py",
    "test_report.py",
    "test_estimator_checks.py",
    "test_backbone_table.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order whole files longest-first (stable, so each file's own order is kept)."""
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def plain_keras_proba(model_path: Path, images: list[np.ndarray], workdir: Path) -> list[list[float]]:
    """Class probabilities of ``images`` from ``model_path`` loaded by plain Keras in a bare process.

    The process cannot import featurecache: ``-I`` (no PYTHONPATH, user site or cwd on sys.path)
    and ``-S`` (no .pth files, so an editable install's import hook is never installed); only the
    site-packages directories are added. ``safe_mode`` stays on, with no custom objects.
    """
    import json
    import shutil
    import site
    import subprocess
    import sys

    model_file = workdir / "isolated" / "model.keras"
    model_file.parent.mkdir(parents=True)
    shutil.copy(model_path, model_file)
    np.save(workdir / "images.npy", np.array(images, dtype=object), allow_pickle=True)
    code = (
        "import sys, json; sys.path.extend(json.loads(sys.argv[1]))\n"
        "import importlib.util; assert importlib.util.find_spec('featurecache') is None, 'featurecache is importable'\n"
        "import numpy as np, keras\n"
        "model = keras.saving.load_model(sys.argv[2])\n"
        "images = np.load(sys.argv[3], allow_pickle=True)\n"
        "proba = [model.predict(img[None].astype('float32'), verbose=0)[0].tolist() for img in images]\n"
        "print(json.dumps({'proba': proba, 'featurecache_loaded': any(m.startswith('featurecache') for m in sys.modules)}))\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            code,
            json.dumps(site.getsitepackages()),
            str(model_file),
            str(workdir / "images.npy"),
        ],
        cwd=model_file.parent,
        env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3", "HOME": str(workdir)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    isolated = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not isolated["featurecache_loaded"]
    return isolated["proba"]


def kill_frozen_worker(pids: set[int], fired: Path, runner: Any) -> int:
    """SIGKILL the worker among ``pids`` that froze itself (a ``:stop`` fault) while ``runner`` runs.

    Waits on states, never on a duration: until the fault's once-file ``fired`` exists and a
    worker is stopped (``T`` in ``/proc``), or the runner thread ends. Returns the killed pid.
    """
    import signal

    def state(pid: int) -> str:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return "gone"

    frozen = None
    while frozen is None and runner.is_alive():
        frozen = next((pid for pid in pids if fired.exists() and state(pid) == "T"), None)
        runner.join(0.1)
    assert frozen is not None, "no worker froze: the fault never fired"
    os.kill(frozen, signal.SIGKILL)
    return frozen


def wait_on_exit(proc: subprocess.Popen, seconds: float) -> None:
    """The pause between two checks of a polling loop, spent waiting for ``proc`` to exit.

    It ends at once when ``proc`` exits, so a loop that polls a state (with its own deadline)
    never waits a fixed time past the state change that ends it.
    """
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=seconds)
