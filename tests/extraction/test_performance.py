"""Performance paths behave exactly like the simple ones: batched resize, OOM halving,
mixed precision keying, and head training that streams from Zarr under a memory budget.

No timings are asserted here (benchmarks/run.py measures them); only behaviour.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import featurecache.extraction.extract as extract_mod
import featurecache.training.train as train_mod
from featurecache.cache import views
from featurecache.cache.keys import FeatureSpec
from featurecache.data import RESIZE_METHODS, Split, resize_image
from featurecache.data.dataset import ArrayItems, FileItems
from featurecache.errors import MemoryBudgetError, OutOfMemoryError, UsageError

# ------------------------------------------------------------------ batched resize


def _array_split(images: np.ndarray) -> Split:
    n = len(images)
    return Split("train", tuple(str(i) for i in range(n)), np.zeros(n, dtype=np.int64), ArrayItems(images))


@pytest.mark.parametrize("method", RESIZE_METHODS)
@pytest.mark.parametrize("grey", [False, True])
def test_batched_array_resize_is_bit_identical_to_per_image(method: str, grey: bool) -> None:
    rng = np.random.default_rng(1)
    shape = (7, 13, 17) if grey else (7, 13, 17, 3)
    split = _array_split(rng.integers(0, 256, size=shape, dtype=np.uint8))
    for size, (start, stop) in ((11, (0, 7)), (32, (2, 6))):  # down- and up-sampling, a sub-range
        x, valid, failures = extract_mod.load_resized(split, start, stop, size=size, method=method)
        expected = np.stack([resize_image(split.load(i), size, method=method) for i in range(start, stop)])
        assert x.dtype == np.float32 and valid.all() and failures == []
        assert np.array_equal(x, expected), f"{method} size {size}"


def _write_images(folder: Path, shapes: list[tuple[int, int]]) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(2)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(shapes):
        # PNGs decode to contiguous arrays; RGB JPEGs to views of 4-byte pixels (packed before grouping).
        p = folder / f"img{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("max_batch_pixels", [0, 10**9])  # every image resized alone / all grouped by shape
def test_file_resize_grouped_by_shape_is_bit_identical(tmp_path: Path, max_batch_pixels: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    paths = _write_images(tmp_path / "imgs", [(20, 24), (31, 24), (20, 24), (9, 40), (20, 24), (31, 24), (9, 40)])
    broken = tmp_path / "imgs" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths.insert(3, broken)
    split = Split("train", tuple(p.name for p in paths), np.zeros(len(paths), dtype=np.int64), FileItems(tuple(paths)))
    with ThreadPoolExecutor(3) as pool:
        x, valid, failures = extract_mod.load_resized(
            split, 0, len(paths), size=16, method="bilinear", pool=pool, max_batch_pixels=max_batch_pixels
        )
    assert valid.tolist() == [True, True, True, False, True, True, True, True]
    assert [f[0] for f in failures] == ["broken.png"]
    assert not x[3].any()  # the failed row is zeros
    assert not split.load(1).flags.c_contiguous and split.load(0).flags.c_contiguous  # both kinds are in the groups
    for j in (0, 1, 2, 4, 5, 6, 7):
        assert np.array_equal(x[j], resize_image(split.load(j), 16, method="bilinear"))


# ------------------------------------------------------------------ OOM halving


class _SmallDevice:
    """A forward pass on a device that holds at most ``limit`` images per batch."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.calls: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        self.calls.append(len(batch))
        if len(batch) > self.limit:
            raise tf.errors.ResourceExhaustedError(None, None, f"OOM when allocating a batch of {len(batch)}")
        return batch.reshape(len(batch), -1).sum(axis=1, keepdims=True) * 2.0


def test_out_of_memory_halves_the_batch_and_keeps_every_row_in_order() -> None:
    x = np.arange(23 * 4, dtype=np.float32).reshape(23, 2, 2)
    device = _SmallDevice(limit=5)
    feats, used = extract_mod.forward_in_batches(device, x, batch_size=32, feature_shape=(1,))
    np.testing.assert_array_equal(feats, x.reshape(23, -1).sum(axis=1, keepdims=True) * 2.0)
    # Halved from the size actually tried (23 rows, not 32): 23 -> 11 -> 5, which fits.
    assert used == 5 and device.calls == [23, 11, 5, 5, 5, 5, 3]
    # The size that worked is reused: no new failure on the next unit.
    device.calls.clear()
    _, again = extract_mod.forward_in_batches(device, x[:9], batch_size=used)
    assert again == 5 and device.calls == [5, 4]


def test_out_of_memory_on_one_image_is_a_clear_error() -> None:
    with pytest.raises(OutOfMemoryError, match="batch of 1 image.*--size"):
        extract_mod.forward_in_batches(_SmallDevice(limit=0), np.zeros((3, 2), np.float32), batch_size=2)


def test_empty_unit_gives_empty_features() -> None:
    feats, used = extract_mod.forward_in_batches(
        _SmallDevice(limit=4), np.zeros((0, 2), np.float32), batch_size=8, feature_shape=(5,)
    )
    assert feats.shape == (0, 5) and used == 8


# ------------------------------------------------------------------ precision


def test_precision_float32_keeps_old_keys_and_mixed_is_keyed() -> None:
    base = dict(
        backbone="vgg19",
        weights="random:seed=0",
        layer="block5_pool",
        pooling="avg",
        input_size=32,
        resize="bilinear",
        preprocess="vgg19:caffe",
        augment={},
        views=0,
        augment_splits=(),
        seed=0,
        dtype="float32",
    )
    default = FeatureSpec(**base)
    assert "precision" not in default.key_fields()  # entries made before the field keep their key
    assert FeatureSpec(**base, precision="float32").key == default.key
    mixed = FeatureSpec(**base, precision="mixed")
    assert mixed.key != default.key and mixed.key_fields()["precision"] == "mixed"
    with pytest.raises(UsageError, match="precision 'half'.*float32 or mixed"):
        FeatureSpec(**base, precision="half")


def test_mixed_precision_extract_runs_on_cpu_and_keys_differently(cache_dir: Path) -> None:
    from typer.testing import CliRunner

    from featurecache.cli.main import app

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
        "4",
        "--cache",
        str(cache_dir),
        "--json",
    ]
    runner = CliRunner()
    mixed = runner.invoke(app, [*args, "--precision", "mixed"])
    assert mixed.exit_code == 0, mixed.output
    plain = runner.invoke(app, args)
    assert plain.exit_code == 0, plain.output
    k_mixed, k_plain = json.loads(mixed.stdout)["key"], json.loads(plain.stdout)["key"]
    assert k_mixed != k_plain
    fs = views.open_features(k_mixed, cache_dir=cache_dir)
    assert fs.spec["precision"] == "mixed" and "precision" not in views.open_features(k_plain, cache_dir=cache_dir).spec
    feats = fs.features("train")
    assert feats.dtype == np.float32 and np.isfinite(feats).all()
    # The policy was set around the build only: later models are float32 again.
    import keras

    assert keras.config.dtype_policy().name == "float32"
    bad = runner.invoke(app, [*args, "--precision", "half"])
    assert bad.exit_code != 0 and "pass --precision float32 or --precision mixed" in bad.output


@pytest.mark.slow  # XLA compilation
def test_xla_is_recorded_not_keyed_and_changes_features_by_round_off_only(cache_dir: Path) -> None:
    from typer.testing import CliRunner

    from featurecache.cli.main import app

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
        "4",
        "--json",
    ]
    runner = CliRunner()
    xla = runner.invoke(app, [*args, "--xla", "--cache", str(cache_dir / "a")])
    assert xla.exit_code == 0, xla.output
    plain = runner.invoke(app, [*args, "--no-xla", "--cache", str(cache_dir / "b")])
    assert plain.exit_code == 0, plain.output
    key = json.loads(xla.stdout)["key"]
    assert json.loads(plain.stdout)["key"] == key
    fx, fp = (views.open_features(key, cache_dir=cache_dir / c) for c in ("a", "b"))
    assert fx.attrs["compute"]["xla"] is True and fp.attrs["compute"]["xla"] is False
    a, b = fx.features("train"), fp.features("train")
    scale = float(np.abs(b).max())
    assert scale > 0 and float(np.abs(a - b).max()) <= 1e-4 * scale


# ------------------------------------------------------------------ streaming heads


def _feature_set(cache_dir: Path, *, views: int, with_val: bool) -> views.FeatureSet:
    """A small complete entry whose features are the digits pixels (+ noise per view)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X, y = digits.data.astype(np.float32) / 16.0, digits.target
    parts = {"train": (X[:600], y[:600]), "test": (X[600:800], y[600:800])}
    if with_val:
        parts["val"] = (X[800:1000], y[800:1000])
    spec = FeatureSpec(
        backbone="fake",
        weights=f"random:seed={views}",
        layer="pixels",
        pooling="none",
        input_size=8,
        resize="bilinear",
        preprocess="none",
        augment={"flip": True} if views else {},
        views=views,
        augment_splits=("train",) if views else (),
        seed=0,
        dtype="float32",
    )
    rng = np.random.default_rng(0)
    splits = {}
    for s, (x, lab) in parts.items():
        nviews = spec.views_for(s)
        feats = np.stack([x if v == 0 else x + rng.normal(0, 0.05, x.shape).astype(np.float32) for v in range(nviews)])
        valid = np.ones(len(lab), dtype=bool)
        if s == "train":
            valid[3] = False  # one failed image: must be skipped in both modes
        splits[s] = ([f"{s}{i}" for i in range(len(lab))], lab, feats, valid)
    from featurecache.cache.views import write_arrays

    fs = write_arrays(
        cache_dir,
        spec,
        classes=[str(i) for i in range(10)],
        splits=splits,
        dataset_name="v" if with_val else "n",
        chunk_rows=128,
    )
    return fs


@pytest.mark.parametrize(
    "views,with_val,budget",
    [(0, True, 1), (2, False, 1), (0, True, "100KiB")],  # 100 KiB: streamed, read ahead 3 batches at a time
)
def test_dense_head_streams_from_zarr_and_matches_in_memory_training(
    cache_dir: Path, views: int, with_val: bool, budget: object
) -> None:
    from featurecache.training.heads import make_head

    fs = _feature_set(cache_dir, views=views, with_val=with_val)
    in_memory = train_mod.load_training_data(fs)
    streamed = train_mod.load_training_data(fs, max_memory=budget)
    assert not in_memory.streamed and streamed.streamed
    assert isinstance(streamed.X_train, train_mod.LazyFeatures) and streamed.X_train.shape == in_memory.X_train.shape
    np.testing.assert_array_equal(streamed.y_train, in_memory.y_train)
    np.testing.assert_array_equal(streamed.X_val, in_memory.X_val)  # validation is read into memory
    with pytest.raises(MemoryBudgetError, match="memory budget"):
        np.asarray(streamed.X_train)  # never loaded whole by accident

    params = {"hidden": (32,), "epochs": 3, "patience": 0, "dropout": 0.0, "lr": 1e-2, "seed": 0}
    a = train_mod.fit_head(make_head("dense", params), in_memory)
    b = train_mod.fit_head(make_head("dense", params), streamed)
    # Same batches in the same order from either source: the same head.
    np.testing.assert_allclose(a.predict_proba(in_memory.X_val), b.predict_proba(in_memory.X_val), atol=1e-6)
    assert b.score(in_memory.X_val, in_memory.y_val) > 0.5


def test_sklearn_head_over_budget_is_refused_with_the_fix(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = _feature_set(cache_dir, views=0, with_val=True)
    monkeypatch.setenv(train_mod.MEMORY_ENV, "1KiB")
    with pytest.raises(
        MemoryBudgetError,
        match=r"LogisticRegression head fits on the whole matrix.*--head dense.*FEATURECACHE_MAX_MEMORY=",
    ):
        train_mod.train_head(fs, head="logreg", out=cache_dir.parent / "run", plots=False)
    # Under the budget the same call trains in memory.
    monkeypatch.setenv(train_mod.MEMORY_ENV, "64MiB")
    res = train_mod.train_head(fs, head="logreg", out=cache_dir.parent / "run", plots=False)
    assert res.metrics["val"]["accuracy"] > 0.5


@pytest.mark.parametrize(
    "text,expected",
    [(None, 4 << 30), ("", 4 << 30), ("123", 123), ("512MiB", 512 << 20), ("2g", 2 << 30), ("1.5K", 1536), (7, 7)],
)
def test_memory_budget_parsing(text: object, expected: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(train_mod.MEMORY_ENV, raising=False)
    assert train_mod.resolve_max_memory(text) == expected


def test_memory_budget_from_env_and_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(train_mod.MEMORY_ENV, "3M")
    assert train_mod.resolve_max_memory() == 3 << 20
    for bad in ("lots", "-1", "5 parsecs", -3):
        with pytest.raises(UsageError, match="not a size.*4GiB"):
            train_mod.resolve_max_memory(bad)
