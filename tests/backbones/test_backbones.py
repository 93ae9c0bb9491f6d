"""The backbone registry: table consistency, reference equality with plain Keras, blocks, weights.

Models are built with random weights at their minimum size, one representative per family.
Every row of the table is checked against Keras in ``test_backbone_table.py`` (the small rows
in every run, all 40 with ``FEATURECACHE_AUDIT_BACKBONES=1``).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from featurecache import backbones as B
from featurecache.data.dataset import MEMO_FILENAME
from featurecache.errors import BackboneError, UnknownBackboneError, UsageError, WeightsUnavailableError

ALL_CONSTRUCTORS = {
    "VGG16", "VGG19", "ResNet50", "ResNet101", "ResNet152", "ResNet50V2", "ResNet101V2", "ResNet152V2",
    "InceptionV3", "InceptionResNetV2", "Xception", "DenseNet121", "DenseNet169", "DenseNet201",
    "MobileNet", "MobileNetV2", "MobileNetV3Small", "MobileNetV3Large", "NASNetMobile", "NASNetLarge",
    *(f"EfficientNetB{i}" for i in range(8)),
    "EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetV2B2", "EfficientNetV2B3",
    "EfficientNetV2S", "EfficientNetV2M", "EfficientNetV2L",
    "ConvNeXtTiny", "ConvNeXtSmall", "ConvNeXtBase", "ConvNeXtLarge", "ConvNeXtXLarge",
}  # fmt: skip

# One per family, at its minimum size; a few are also cut at a mid-network layer.
REPRESENTATIVES = [
    ("vgg19", "block4_pool"),
    ("resnet50", None),
    ("mobilenetv2", None),
    ("efficientnetb0", "block5c_add"),
    ("densenet121", None),
    pytest.param("inceptionv3", "mixed5", marks=pytest.mark.slow),  # the largest model of the table
    ("convnexttiny", None),
    ("mobilenetv3small", None),  # its feature layer is auto-named ("activation_17")
]


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, size=(n, size, size, 3)).astype(np.float32)


def _check_blocks_and_table(spec: B.BackboneSpec, model) -> None:
    """``model`` is the base, possibly followed by a pooling layer."""
    assert model.get_layer(spec.feature_layer).output.shape[-1] == spec.feature_dim
    groups = B.block_layers(model, spec)
    assert list(groups) == list(spec.blocks)
    assert [block for block, names in groups.items() if not names] == []
    flat = [layer for names in groups.values() for layer in names]
    assert sorted(flat) == sorted(layer.name for layer in model.layers)  # each layer exactly once


def _reference_base(spec: B.BackboneSpec, size: int, seed: int):
    """The include_top=False model built with plain Keras, independently of featurecache."""
    import keras

    keras.utils.set_random_seed(seed)
    return getattr(keras.applications, spec.constructor)(include_top=False, weights=None, input_shape=(size, size, 3))


# ------------------------------------------------------------------ registry table (no models built)


def test_registry_covers_every_keras_application() -> None:
    import keras

    specs = B.list_backbones()
    assert {s.constructor for s in specs} == ALL_CONSTRUCTORS
    assert len({s.name for s in specs}) == len(specs) == 40
    for spec in specs:
        assert spec.name == spec.name.lower() and B.get_backbone(spec.name) is spec
        assert callable(getattr(keras.applications, spec.constructor))
        assert callable(getattr(keras.applications, spec.module).preprocess_input)
        assert spec.preprocess in B.PREPROCESS_MODES
        assert len(spec.blocks) == len(spec.block_patterns) == len(set(spec.blocks)) > 0
        assert spec.min_size <= spec.default_size
        assert spec.feature_dim and spec.params


def test_import_does_not_load_tensorflow() -> None:
    code = "import sys, featurecache.backbones as b; b.list_backbones(); print(sorted(m for m in ('keras', 'tensorflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module", sorted({s.module for s in B.list_backbones()}))
def test_preprocess_mode_matches_module_and_copies(module: str) -> None:
    import keras

    spec = next(s for s in B.list_backbones() if s.module == module)
    x = _images(2, 8)
    before = x.copy()
    got = B.preprocess_input(spec, x)
    np.testing.assert_array_equal(x, before)  # Keras preprocesses float arrays in place; we must not
    expected = (
        before
        if spec.preprocess == "none"
        else keras.applications.imagenet_utils.preprocess_input(before.copy(), mode=spec.preprocess)
    )
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("alias", ["vgg19", "VGG19", "vgg-19", "Vgg_19"])
def test_get_backbone_is_case_and_separator_insensitive(alias: str) -> None:
    assert B.get_backbone(alias).constructor == "VGG19"


def test_get_backbone_aliases_of_other_families() -> None:
    assert B.get_backbone("ResNet50V2").module == "resnet_v2"
    assert B.get_backbone("EfficientNet-B0").default_size == 224
    assert B.get_backbone("efficientnet_b7").default_size == 600
    assert B.get_backbone("ConvNeXt Tiny").constructor == "ConvNeXtTiny"


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(UnknownBackboneError) as info:
        B.get_backbone("resnet51")
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ValueError)
    assert "'resnet51'" in message and "did you mean 'resnet50'" in message
    assert all(repr(s.name) in message for s in B.list_backbones())


def test_input_size_below_minimum() -> None:
    with pytest.raises(BackboneError, match=r"^input size 16 is below vgg19's minimum 32; pass --size 32 or more$"):
        B.check_input_size(B.get_backbone("vgg19"), 16)
    with pytest.raises(BackboneError, match="inceptionv3's minimum 75"):
        B.check_input_size(B.get_backbone("inceptionv3"), 74)
    B.check_input_size(B.get_backbone("inceptionv3"), 75)
    with pytest.raises(BackboneError):  # checked before anything is built
        B.build_base(B.get_backbone("xception"), B.WeightsRef("random"), input_size=70)


def test_model_summary_row_is_static() -> None:
    row = B.model_summary_row(B.get_backbone("resnet50"))
    assert row["name"] == "resnet50" and row["params"] == 23587712 and row["feature_dim"] == 2048
    assert row["default_size"] == 224 and row["min_size"] == 32 and row["preprocess"] == "caffe"


# ------------------------------------------------------------------ representatives, built for real


@pytest.mark.parametrize(("name", "mid_layer"), REPRESENTATIVES)
def test_feature_model_equals_plain_keras(name: str, mid_layer: str | None) -> None:
    import keras

    spec = B.get_backbone(name)
    size, seed = spec.min_size, 3
    keras.layers.Activation("relu")  # advance Keras's auto-name counters: names must not depend on them
    weights = B.WeightsRef("random", seed=seed)
    model = B.build_feature_model(spec, weights, input_size=size, pooling="avg")

    assert model.layers[-2].name == spec.feature_layer  # the base's output, before the pooling layer
    _check_blocks_and_table(spec, model)

    ref = _reference_base(spec, size, seed)
    assert ref.count_params() == spec.params
    for ours, theirs in zip(model.weights, ref.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs))

    x = B.preprocess_input(spec, _images(2, size))
    expected = keras.ops.convert_to_numpy(ref(x, training=False)).mean(axis=(1, 2))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x, training=False)), expected, rtol=1e-5, atol=1e-5)

    if mid_layer is not None:
        cut = B.build_feature_model(spec, weights, input_size=size, layer=mid_layer, pooling="avg")
        ref_cut = keras.Model(ref.input, ref.get_layer(mid_layer).output)
        expected = keras.ops.convert_to_numpy(ref_cut(x, training=False)).mean(axis=(1, 2))
        np.testing.assert_allclose(keras.ops.convert_to_numpy(cut(x, training=False)), expected, rtol=1e-5, atol=1e-5)


def test_vgg19_blocks_and_pooling_modes() -> None:
    import keras

    spec = B.get_backbone("vgg19")
    weights = B.WeightsRef("random", seed=1)
    base = B.build_base(spec, weights, input_size=32)
    groups = B.block_layers(base, spec)
    assert groups["block5"] == ["block5_conv1", "block5_conv2", "block5_conv3", "block5_conv4", "block5_pool"]
    assert groups["block1"][0] == base.layers[0].name  # the input joins the first block

    x = B.preprocess_input(spec, _images(2, 64))
    spatial = keras.ops.convert_to_numpy(B.build_base(spec, weights, input_size=64)(x))  # (2, 2, 2, 512)
    for pooling, expected in [
        ("none", spatial),
        ("max", spatial.max(axis=(1, 2))),
        ("flatten", spatial.reshape(2, -1)),
    ]:
        model = B.build_feature_model(spec, weights, input_size=64, pooling=pooling)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), expected, rtol=1e-5, atol=1e-5)

    cut = B.build_feature_model(spec, weights, input_size=32, layer="block3_pool")
    cut_groups = B.block_layers(cut, spec)
    assert cut_groups["block4"] == cut_groups["block5"] == [] and cut_groups["block3"][-1] == "features_avg"


def test_unknown_layer_and_pooling_errors() -> None:
    spec = B.get_backbone("vgg16")
    with pytest.raises(BackboneError) as info:
        B.build_feature_model(spec, B.WeightsRef("random"), input_size=32, layer="block5_conv4")
    message = str(info.value)
    assert "'block5_conv3'" in message and "`featurecache backbones --layers vgg16`" in message and "\n" not in message
    with pytest.raises(UsageError, match="'avg', 'flatten', 'max', 'none'"):
        B.build_feature_model(spec, B.WeightsRef("random"), input_size=32, pooling="mean")  # type: ignore[arg-type]


def test_list_layers_names_blocks() -> None:
    rows = B.list_layers(B.get_backbone("vgg16"))
    assert [r["name"] for r in rows][1:4] == ["block1_conv1", "block1_conv2", "block1_pool"]
    assert {r["block"] for r in rows} == {f"block{i}" for i in range(1, 6)}
    assert sum(int(r["params"]) for r in rows) == B.get_backbone("vgg16").params


# ------------------------------------------------------------------ weights


def test_parse_weights() -> None:
    assert B.parse_weights("imagenet") == B.WeightsRef("imagenet")
    assert B.parse_weights("ImageNet").kind == "imagenet"
    assert B.parse_weights("random", seed=5) == B.WeightsRef("random", seed=5)
    with pytest.raises(WeightsUnavailableError) as info:
        B.parse_weights("no/such/file.weights.h5")
    assert isinstance(info.value, OSError)
    assert os.path.abspath("no/such/file.weights.h5") in str(info.value) and "\n" not in str(info.value)


def test_parse_weights_rejects_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"x")
    with pytest.raises(WeightsUnavailableError, match="unsupported suffix"):
        B.parse_weights(str(path))


def _imagenet_reachable() -> bool:
    try:
        socket.getaddrinfo("storage.googleapis.com", 443)
    except OSError:
        return False
    return True


def test_imagenet_offline_names_the_file_and_the_fix() -> None:
    spec = B.get_backbone("mobilenetv3small")
    file_name = "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
    if _imagenet_reachable() or (Path.home() / ".keras" / "models" / file_name).exists():
        pytest.skip("needs a machine without internet and without cached ImageNet weights")
    with pytest.raises(WeightsUnavailableError) as info:
        B.build_base(spec, B.WeightsRef("imagenet"), input_size=32)
    message = str(info.value)
    assert "\n" not in message and file_name in message
    assert f"https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v3/{file_name}" in message
    assert f"--weights /path/to/{file_name}" in message and "/models/" in message


def test_imagenet_identity_is_memoised_without_building(tmp_path: Path) -> None:
    # Offline, building would raise: a returned identity proves the memo was used.
    spec = B.get_backbone("resnet50")
    key = f"resnet50@keras-{metadata.version('keras')}"
    (tmp_path / B.MEMO_FILE).write_text(json.dumps({"imagenet": {key: "ab" * 32}}))
    assert B.weights_identity(B.WeightsRef("imagenet"), spec, memo_dir=tmp_path) == f"imagenet:sha256={'ab' * 32}"
    assert B.weights_identity(B.WeightsRef("random", seed=4), spec, memo_dir=tmp_path) == "random:seed=4"


def _weights_equal(a, b) -> bool:
    return len(a.get_weights()) == len(b.get_weights()) and all(
        np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True)
    )


def test_weights_file_round_trip_and_identity(tmp_path: Path) -> None:
    spec = B.get_backbone("mobilenetv2")
    source = B.build_base(spec, B.WeightsRef("random", seed=7), input_size=32)
    path = tmp_path / "mine.weights.h5"
    source.save_weights(path)

    ref = B.parse_weights(str(path))
    assert ref == B.WeightsRef("file", path=str(path))
    loaded = B.build_base(spec, ref, input_size=48)  # weights do not depend on the input size
    assert _weights_equal(loaded, source)

    memo = tmp_path / "memo"
    # A file modified within the last 2 s is never memoised (a same-size rewrite could hide).
    # The mtime is set, not left to the clock: building the model above can take over 2 s.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, time.time_ns() + 60 * 10**9))
    identity = B.weights_identity(ref, spec, memo_dir=memo)
    assert identity == f"file:sha256={hashlib.sha256(path.read_bytes()).hexdigest()}"
    assert not (memo / MEMO_FILENAME).exists()
    os.utime(path, ns=(stat.st_atime_ns, time.time_ns() - 10 * 10**9))
    assert B.weights_identity(ref, spec, memo_dir=memo) == identity
    # A second call reads the memo instead of hashing: prove it by planting a value there.
    data = json.loads((memo / MEMO_FILENAME).read_text())
    data["files"][str(path)]["sha256"] = "memoised"
    (memo / MEMO_FILENAME).write_text(json.dumps(data))
    assert B.weights_identity(ref, spec, memo_dir=memo) == "file:sha256=memoised"

    source.set_weights([w + 1.0 for w in source.get_weights()])
    source.save_weights(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a distinct mtime even on coarse clocks
    changed = B.weights_identity(ref, spec, memo_dir=memo)
    assert changed == f"file:sha256={hashlib.sha256(path.read_bytes()).hexdigest()}" and changed != identity


def test_keras_model_file_as_weights(tmp_path: Path) -> None:
    spec = B.get_backbone("mobilenet")
    source = B.build_base(spec, B.WeightsRef("random", seed=2), input_size=32)
    path = tmp_path / "model.keras"
    source.save(path)
    assert _weights_equal(B.build_base(spec, B.parse_weights(str(path)), input_size=32), source)


def test_mismatched_or_corrupt_weights_file_names_the_file(tmp_path: Path) -> None:
    other = tmp_path / "vgg16.weights.h5"
    B.build_base(B.get_backbone("vgg16"), B.WeightsRef("random"), input_size=32).save_weights(other)
    corrupt = tmp_path / "corrupt.weights.h5"
    corrupt.write_bytes(b"not an hdf5 file")
    for path in (other, corrupt):
        with pytest.raises(WeightsUnavailableError) as info:
            B.build_base(B.get_backbone("mobilenet"), B.parse_weights(str(path)), input_size=32)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------ custom backbones


def _tiny_model(path: Path):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((24, 24, 3))
    x = keras.layers.Conv2D(4, 3, name="c1")(inputs)
    x = keras.layers.Conv2D(6, 3, name="c2")(x)
    model = keras.Model(inputs, keras.layers.Conv2D(8, 3, name="c3")(x))
    model.save(path)
    return model


def test_custom_backbone(tmp_path: Path) -> None:
    import keras

    path = tmp_path / "tiny.keras"
    model = _tiny_model(path)
    spec = B.custom_backbone(str(path), preprocess="tf")
    assert (spec.name, spec.constructor, spec.family, spec.feature_layer, spec.default_size) == (
        "custom",
        str(path),
        "custom",
        "c3",
        24,
    )
    with pytest.raises(BackboneError, match="pass --size 24"):
        B.check_input_size(spec, 32)

    x = B.preprocess_input(spec, _images(2, 24))
    np.testing.assert_allclose(x, _images(2, 24) / 127.5 - 1.0, rtol=1e-6)
    weights = B.parse_weights(str(path))
    features = B.build_feature_model(spec, weights, input_size=24, layer="c2", pooling="max")
    expected = keras.ops.convert_to_numpy(keras.Model(model.input, model.get_layer("c2").output)(x)).max(axis=(1, 2))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(features(x)), expected, rtol=1e-5, atol=1e-6)
    assert B.block_layers(model, spec) == {"backbone": [layer.name for layer in model.layers]}

    identity = B.weights_identity(weights, spec, memo_dir=None)
    assert identity == f"custom:sha256={hashlib.sha256(path.read_bytes()).hexdigest()}"
    assert B.weights_identity(B.WeightsRef("random", seed=1), spec, memo_dir=None) == f"{identity}+random:seed=1"
    with pytest.raises(WeightsUnavailableError, match="no ImageNet weights"):
        B.build_base(spec, B.WeightsRef("imagenet"), input_size=24)
    with pytest.raises(BackboneError, match="'c2'"):
        B.custom_backbone(str(path), layer="c22")


def _readme_block(after: str, lang: str) -> str:
    """The first ```lang block of the stage 1 guide (docs/guide/extract.md) after the line starting with ``after``."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "guide" / "extract.md").read_text()
    rest = text[text.index(after) :]
    start = rest.index(f"```{lang}\n") + len(lang) + 4
    return rest[start : rest.index("```", start)]


@pytest.mark.slow  # the README's commands end to end: extract, train, fine-tune, predict
def test_readme_custom_keras_backbone_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shlex

    from PIL import Image
    from typer.testing import CliRunner

    from featurecache.cli.main import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEATURECACHE_DIR", raising=False)
    exec(compile(_readme_block("**Your own model as a backbone**", "python"), "extract.md", "exec"), {})
    assert (tmp_path / "my_backbone.keras").is_file()
    (tmp_path / "images" / "sub").mkdir(parents=True)
    for i, size in enumerate((20, 40)):
        Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(tmp_path / "images" / "sub" / f"{i}.png")
    commands = [
        shlex.split(line)
        for line in _readme_block("**Your own model as a backbone**", "bash").splitlines()
        if line.strip()
    ]
    assert [c[1] for c in commands] == ["extract", "train-head", "finetune", "predict"]
    for words in commands:
        res = CliRunner().invoke(app, words[1:])
        assert res.exit_code == 0, (words, res.output)
    config = json.loads((tmp_path / "runs" / "mine-ft" / "config.json").read_text())
    assert config["features"]["spec"]["backbone"] == "custom" and config["trainable"]["backbone"]["layers"] == 2
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert rows[0] == "image,class_1,probability_1,class_2,probability_2,class_3,probability_3" and len(rows) == 3
