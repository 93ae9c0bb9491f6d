"""Stage 1 end to end: reference equality, keying, cache hits, resume after SIGKILL, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import featurecache as fc
from featurecache.cache import views
from tests.conftest import wait_on_exit

# (registry name, keras.applications constructor, preprocess module)
REFERENCE = [
    ("vgg19", "VGG19", "vgg19"),
    ("resnet50", "ResNet50", "resnet"),
    ("mobilenetv2", "MobileNetV2", "mobilenet_v2"),
    ("efficientnetb0", "EfficientNetB0", "efficientnet"),
]


def _digits_reference_images(ids: np.ndarray) -> np.ndarray:
    """The digits images for ``ids``, decoded independently of featurecache."""
    from sklearn.datasets import load_digits

    images = load_digits().images  # (1797, 8, 8) in 0..16
    rgb = np.round(images * 255.0 / 16.0).astype(np.uint8)[..., None].repeat(3, axis=-1)
    return rgb[[int(i) for i in ids]]


@pytest.mark.parametrize("name,constructor,module", REFERENCE)
def test_features_equal_plain_keras(cache_dir: Path, name: str, constructor: str, module: str) -> None:
    import keras
    import tensorflow as tf

    res = fc.extract(
        "builtin:digits", backbone=name, weights="random", size=32, limit=12, cache_dir=cache_dir, progress=False
    )
    fs = fc.open_features(res.key, cache_dir=cache_dir)

    keras.utils.set_random_seed(0)
    base = getattr(keras.applications, constructor)(include_top=False, weights=None, input_shape=(32, 32, 3))
    preprocess = getattr(keras.applications, module).preprocess_input
    for split in fs.splits:
        ids = fs.ids(split)
        images = _digits_reference_images(ids)
        x = tf.image.resize(images.astype("float32"), (32, 32), method="bilinear").numpy()
        expected = base(preprocess(x), training=False).numpy().mean(axis=(1, 2))
        got = fs.features(split)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
        from sklearn.datasets import load_digits

        assert list(fs.labels(split)) == list(load_digits().target[[int(i) for i in ids]])
        assert fs.valid(split).all()


def test_folder_dataset_and_layer_pooling_dtype(cache_dir: Path, image_folder: Path) -> None:
    res = fc.extract(
        str(image_folder),
        backbone="vgg16",
        weights="random",
        size=32,
        layer="block4_pool",
        pooling="none",
        dtype="float16",
        cache_dir=cache_dir,
        progress=False,
    )
    fs = fc.open_features(res.key, cache_dir=cache_dir)
    assert fs.classes == ["cat", "dog"]
    assert fs.features("train").shape == (8, 2, 2, 512)
    assert fs.features("train").dtype == np.float16
    assert sorted(fs.ids("train"))[0] == "cat/cat_0.png"


def test_second_run_is_a_hit_that_builds_no_model(cache_dir: Path) -> None:
    args = dict(backbone="mobilenetv2", weights="random", size=32, limit=6, cache_dir=cache_dir, progress=False)
    first = fc.extract("builtin:digits", **args)
    assert not first.cached
    code = (
        "import sys, json, featurecache as fc;"
        f"r = fc.extract('builtin:digits', backbone='mobilenetv2', weights='random', size=32, limit=6, cache_dir={str(cache_dir)!r}, progress=False);"
        "print(json.dumps({'cached': r.cached, 'key': r.key, 'tf': 'tensorflow' in sys.modules, 'keras': 'keras' in sys.modules}))"
    )
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert out == {"cached": True, "key": first.key, "tf": False, "keras": False}
    assert len(list(views.iter_entries(cache_dir))) == 1


def test_changing_options_changes_the_key(cache_dir: Path) -> None:
    base = dict(backbone="mobilenetv2", weights="random", size=32, limit=4, cache_dir=cache_dir)
    keys = {fc.plan("builtin:digits", **base).key}
    for change in (
        dict(size=40),
        dict(pooling="max"),
        dict(seed=1),
        dict(dtype="float16"),
        dict(backbone="vgg16"),
        dict(views=1, augment="flip"),
        dict(resize="nearest"),
        dict(layer="block_16_project"),
    ):
        keys.add(fc.plan("builtin:digits", **{**base, **change}).key)
    assert len(keys) == 9


def test_changing_one_pixel_or_label_changes_the_key(cache_dir: Path, image_folder: Path) -> None:
    from PIL import Image

    base = dict(backbone="mobilenetv2", weights="random", size=32, cache_dir=cache_dir)
    k0 = fc.plan(str(image_folder), **base).key
    img = image_folder / "cat" / "cat_0.png"
    arr = np.array(Image.open(img))
    arr[0, 0, 0] ^= 1
    Image.fromarray(arr).save(img)
    k1 = fc.plan(str(image_folder), **base).key
    (image_folder / "cat" / "cat_2.png").rename(image_folder / "dog" / "cat_2.png")
    k2 = fc.plan(str(image_folder), **base).key
    assert len({k0, k1, k2}) == 3


def test_local_weights_file_is_keyed_by_content(cache_dir: Path, tmp_path: Path) -> None:
    import keras

    keras.utils.set_random_seed(3)
    model = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "mnv2.weights.h5"
    model.save_weights(path)
    base = dict(backbone="mobilenetv2", weights=str(path), size=32, limit=4, cache_dir=cache_dir)
    k0 = fc.plan("builtin:digits", **base).key
    model.layers[-3].set_weights([w + 1 for w in model.layers[-3].get_weights()])
    # No wait: the digest memo re-hashes a file whose size or mtime differ, or that changed
    # within the last 2 s (featurecache.data.dataset.file_digests).
    model.save_weights(path)
    assert fc.plan("builtin:digits", **base).key != k0
    res = fc.extract("builtin:digits", **base, progress=False)
    assert fc.open_features(res.key, cache_dir=cache_dir).complete


def test_augmented_views_are_deterministic_and_differ(cache_dir: Path, tmp_path: Path) -> None:
    args = dict(
        backbone="mobilenetv2",
        weights="random",
        size=32,
        limit=8,
        views=2,
        augment="flip,rotation=20,zoom=0.1",
        progress=False,
    )
    a = fc.open_features(fc.extract("builtin:digits", cache_dir=cache_dir, **args).key, cache_dir=cache_dir)
    b = fc.open_features(
        fc.extract("builtin:digits", cache_dir=tmp_path / "other", chunk_rows=3, **args).key,
        cache_dir=tmp_path / "other",
    )
    fa, fb = a.features("train", view=None), b.features("train", view=None)
    assert fa.shape[0] == 3 and a.features("test", view=None).shape[0] == 1
    np.testing.assert_array_equal(fa, fb)  # different chunking / batching, same bytes
    # Random-init features are tiny (~1e-12), so compare relative to their scale.
    scale = np.abs(fa).max()
    assert np.abs(fa[0] - fa[1]).max() > 1e-3 * scale and np.abs(fa[1] - fa[2]).max() > 1e-3 * scale


RUNNER = """
import sys, featurecache as fc
fc.extract('builtin:digits', backbone='mobilenetv2', weights='random', size=32, limit=60, views=1,
           augment='flip,rotation=10', batch_size=4, chunk_rows=6, cache_dir=sys.argv[1], progress=False)
"""


@pytest.mark.slow  # three real extractions, one killed
def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(killed)])
    deadline = time.monotonic() + 120
    # Completion markers only (zarr.json renamed into place), never their temp files.
    marker_glob = "features/*/units/v*/u*/zarr.json"
    while time.monotonic() < deadline:
        if len(list(killed.glob(marker_glob))) >= 3 or proc.poll() is not None:
            break
        wait_on_exit(proc, 0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    total = 30 + 10  # 180 images in units of 6, plus the 60 training images' augmented view
    done_before = len(list(killed.glob(marker_glob)))
    assert 3 <= done_before < total and next(views.iter_entries(killed), None) is None, (
        "the kill should land mid-extraction"
    )
    subprocess.run([sys.executable, "-c", RUNNER, str(killed)], check=True)
    subprocess.run([sys.executable, "-c", RUNNER, str(clean)], check=True)
    assert len(list(killed.glob(marker_glob))) == total
    a, b = next(views.iter_entries(killed)), next(views.iter_entries(clean))
    assert a.key == b.key and a.complete and b.complete
    for split in a.splits:
        np.testing.assert_array_equal(a.features(split, view=None), b.features(split, view=None))
        np.testing.assert_array_equal(a.valid(split), b.valid(split))
    assert not list(killed.rglob("*.partial"))


# -- CLI ------------------------------------------------------------------------------
def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "featurecache", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


@pytest.mark.slow  # five real processes, each importing TensorFlow
def test_cli_extract_json_then_hit_and_cache_commands(cache_dir: Path) -> None:
    args = [
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
        "5",
        "--cache",
        str(cache_dir),
        "--json",
    ]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["cached"] is False and set(doc["splits"]) == {"train", "val", "test"}
    assert doc["splits"]["train"]["shape"][1:] == [doc["splits"]["train"]["n"], 1280]
    second = json.loads(_cli(*args).stdout)
    assert second["cached"] is True and second["key"] == doc["key"]
    ls = json.loads(_cli("cache", "ls", "--cache", str(cache_dir), "--json").stdout)
    assert [e["key"] for e in ls["views"]] == [doc["key"]] and ls["views"][0]["complete"]
    assert [s["rows"]["v0"] for s in ls["stores"]] == [doc["computed"]] == [15]
    info = json.loads(_cli("cache", "info", doc["key"][:12], "--cache", str(cache_dir), "--json").stdout)
    assert info["spec"]["backbone"] == "mobilenetv2" and info["spec"]["input_size"] == 32
    assert _cli("cache", "rm", doc["name"], "--cache", str(cache_dir)).returncode != 0  # needs --yes (no stdin)
    assert _cli("cache", "rm", doc["name"], "--yes", "--cache", str(cache_dir)).returncode == 0
    ls = json.loads(_cli("cache", "ls", "--cache", str(cache_dir), "--json").stdout)
    assert ls["views"] == [] and ls["stores"][0]["rows"]["v0"] == 15, "removing a feature set keeps the rows for others"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--backbone", "vgg20"], "vgg19"),
        (["--augment", "flip,wobble=3", "--views", "1"], "wobble"),
        (["--data", "/nonexistent/images"], "/nonexistent/images"),
        (["--size", "8"], "minimum"),
        (["--pooling", "mean"], "pooling"),
    ],
)
def test_cli_bad_input_is_one_line_without_traceback(cache_dir: Path, args: list[str], needle: str) -> None:
    base = {
        "--data": "builtin:digits",
        "--backbone": "mobilenetv2",
        "--weights": "random",
        "--size": "32",
        "--limit": "3",
    }
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    flat = [x for kv in base.items() for x in kv]
    res = _cli("extract", *flat, "--cache", str(cache_dir))
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    debug = _cli("extract", *flat, "--cache", str(cache_dir), env={"FEATURECACHE_DEBUG": "1"})
    assert "Traceback" in debug.stderr
