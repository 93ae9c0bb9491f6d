"""What a user sees on stderr: the command's own lines and nothing from TensorFlow's start-up.

TensorFlow 2.21 prints absl lines from C++ (oneDNN notice, CUDA driver probe, cuInit) that
ignore ``TF_CPP_MIN_LOG_LEVEL``; tests and CI usually set that variable, which hid the problem.
These run the real command in a clean environment (no TF_* variables, 80 columns), as a user
does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
QUIET_EXTRACT = [
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
    "-q",
]


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    """What ``env -i PATH=... HOME=... COLUMNS=80`` gives, plus this tree on the import path."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "COLUMNS": "80",
        "PYTHONPATH": str(REPO),
        **extra,
    }


def _featurecache(args: list[str], home: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "featurecache", *args],
        capture_output=True,
        text=True,
        env=_clean_env(home, **extra),
        cwd=home,
        timeout=300,
    )


def test_quiet_extract_prints_nothing_on_stderr_and_a_failure_exactly_one_line(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ok = _featurecache([*QUIET_EXTRACT, "--cache", str(cache)], tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""
    assert ok.stdout.startswith("extracted mobilenetv2-random-32-avg--digits--")

    # Fails after TensorFlow started (the layer is only known once the model is built).
    bad = _featurecache([*QUIET_EXTRACT, "--cache", str(cache), "--layer", "no_such_layer"], tmp_path)
    assert bad.returncode != 0
    assert bad.stderr.splitlines() == [bad.stderr.strip()], bad.stderr
    assert bad.stderr.startswith("error: layer 'no_such_layer' is not in mobilenetv2")


def test_native_stderr_silenced_discards_c_level_writes_and_restores_the_descriptor(tmp_path: Path) -> None:
    # os.write(2, ...) is what TensorFlow's C++ logging amounts to: below sys.stderr.
    code = (
        "import os, sys\n"
        "from featurecache._runtime.quiet_tf import native_stderr_silenced\n"
        "print('before', file=sys.stderr)\n"
        "with native_stderr_silenced():\n"
        "    os.write(2, b'native noise\\n')\n"
        "    print('python noise', file=sys.stderr)\n"
        "try:\n"
        "    with native_stderr_silenced():\n"
        "        raise RuntimeError\n"
        "except RuntimeError:\n"
        "    pass\n"
        "os.write(2, b'after\\n')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(tmp_path), timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "before\nafter\n"


def test_debug_keeps_tensorflow_unfiltered(tmp_path: Path) -> None:
    # With FEATURECACHE_DEBUG=1 the hook is not installed and the log level is left alone.
    code = (
        "import os, sys\n"
        "from featurecache._runtime import quiet_tf\n"
        "quiet_tf.install()\n"
        "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'), os.environ.get(quiet_tf.QUIET_ENV),\n"
        "      any(type(f).__name__ == '_QuietTensorFlowFinder' for f in sys.meta_path))\n"
    )
    debug = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_clean_env(tmp_path, FEATURECACHE_DEBUG="1"),
        timeout=60,
    )
    assert debug.stdout.split() == ["None", "None", "False"]
    user_level = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_clean_env(tmp_path, TF_CPP_MIN_LOG_LEVEL="1"),
        timeout=60,
    )
    assert user_level.stdout.split() == ["1", "1", "True"]  # the user's own setting wins


@pytest.mark.slow
def test_parallel_sweep_with_dense_heads_prints_nothing_on_stderr(tmp_path: Path) -> None:
    # Workers are separate processes that import TensorFlow themselves, and dense trials used to
    # print Keras's "triggered tf.function retracing" warnings.
    cache = tmp_path / "cache"
    assert _featurecache([*QUIET_EXTRACT, "--cache", str(cache)], tmp_path).returncode == 0
    proc = _featurecache(
        [
            "sweep",
            *QUIET_EXTRACT[1:-1],
            "--cache",
            str(cache),
            "--grid",
            "dense:hidden=16;lr=1e-3,1e-2;batch_size=8,16",
            "--grid",
            "logreg:C=1",
            "--one-by-one",
            "--jobs",
            "2",
            "--out",
            str(tmp_path / "sweep"),
            "-q",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_dataset_warning_is_one_line_on_stderr(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    for c, seed in (("a", 1), ("b", 2)):
        (root / c).mkdir(parents=True)
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
            root / c / f"{c}.png"
        )
    (root / "a" / "b-again.png").symlink_to("../b/b.png")
    proc = _featurecache(
        [
            "extract",
            "--data",
            str(root),
            "--backbone",
            "mobilenetv2",
            "--weights",
            "random",
            "--size",
            "32",
            "-q",
            "--cache",
            str(tmp_path / "cache"),
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "warning: dataset 'pets': 1 image(s) appear under two labels with the same bytes: "
        "train/a/b-again.png ('a') = train/b/b.png ('b'); remove the duplicates or fix their labels"
    ]


@pytest.mark.slow
def test_dask_extract_shows_dasks_lines_only_when_asked(tmp_path: Path) -> None:
    # distributed printed "Port 8787 is already in use" (its HTTP server took 8787 even with no
    # dashboard) and "Restarting worker" when a worker died (issue 20): here both happen.
    pytest.importorskip("distributed")
    import socket

    cache = tmp_path / "cache"
    fired = tmp_path / "fault-fired"
    cluster = ["--cache", str(cache), "--cluster", "local:1", "--units-per-task", "1"]
    with socket.socket() as taken:
        try:
            taken.bind(("127.0.0.1", 8787))
            taken.listen()
        except OSError:
            pass  # another process holds it: just as good
        # The worker SIGKILLs itself in its first unit, once: its nanny restarts it.
        proc = _featurecache(
            [*QUIET_EXTRACT, *cluster],
            tmp_path,
            FEATURECACHE_FAULT="unit_forward_done",
            FEATURECACHE_FAULT_ONCE=str(fired),
        )
        assert proc.returncode == 0, proc.stderr
        assert fired.exists(), "the injected fault never fired: the test proved nothing"
        # Only featurecache's own line about resubmitting the lost unit may remain.
        assert [ln for ln in proc.stderr.splitlines() if not ln.startswith("featurecache: ")] == [], proc.stderr

        verbose = _featurecache(
            [*QUIET_EXTRACT, *cluster, "-v"], tmp_path
        )  # a cache hit: the cluster starts all the same
        assert verbose.returncode == 0, verbose.stderr
        links = [ln for ln in verbose.stderr.splitlines() if ln.startswith("Dask dashboard: ")]
        assert len(links) == 1 and links[0].startswith("Dask dashboard: http://127.0.0.1:"), verbose.stderr
        assert ":8787/" not in links[0] and "8787 is already in use" not in verbose.stderr


def test_python_api_prints_nothing_on_stderr_and_results_have_short_reprs(tmp_path: Path) -> None:
    # Importing featurecache silences TensorFlow's start-up lines as the command does (they came
    # twice), and printing a result does not dump its metrics (2 KB of per-class tables).
    code = (
        "import featurecache as fc\n"
        "r = fc.extract('builtin:digits', backbone='mobilenetv2', weights='random', size=32, limit=20, cache_dir='cache', progress=False)\n"
        "t = fc.train_head(r.key, head='logreg', out='run', cache_dir='cache', plots=False)\n"
        "print(repr(r)); print(repr(t))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_clean_env(tmp_path),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    extract_repr, train_repr = proc.stdout.splitlines()
    assert extract_repr.startswith("ExtractResult(key=") and len(extract_repr) < 600, extract_repr
    assert train_repr.startswith("TrainResult(run_dir=") and "confusion" not in train_repr and len(train_repr) < 300, (
        train_repr
    )
