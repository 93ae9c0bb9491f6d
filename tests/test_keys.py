"""The cache key: canonical, stable across processes, sensitive to every field."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from featurecache.cache.keys import FORMAT_VERSION, FeatureSpec, canonical_json
from featurecache.errors import UsageError

BASE = FeatureSpec(
    dataset_digest="d" * 64,
    backbone="vgg19",
    weights="random:seed=0",
    layer="block5_pool",
    pooling="avg",
    input_size=32,
    resize="bilinear",
    preprocess="vgg19:caffe",
    augment={"flip": True, "rotation": 15.0},
    views=2,
    augment_splits=("train",),
    seed=0,
    dtype="float32",
    dataset_name="digits",
)


def test_canonical_json_sorts_and_normalises_numbers() -> None:
    assert canonical_json({"b": 1, "a": [0.1, 2]}) == canonical_json({"a": [0.10000000000000001, 2], "b": 1})
    assert canonical_json({"a": 1}) != canonical_json({"a": 1.0})  # int and float are different settings
    assert " " not in canonical_json({"a": {"x": [1, 2]}})


def test_unhashable_field_is_an_error_not_a_random_key() -> None:
    with pytest.raises(UsageError, match="canonical form"):
        canonical_json({"a": object()})
    with pytest.raises(UsageError, match="finite"):
        canonical_json({"a": float("nan")})


@pytest.mark.parametrize(
    "field,value",
    [
        ("dataset_digest", "e" * 64),
        ("backbone", "vgg16"),
        ("weights", "file:sha256=abc"),
        ("layer", "block4_pool"),
        ("pooling", "max"),
        ("input_size", 48),
        ("resize", "nearest"),
        ("preprocess", "vgg19:tf"),
        ("augment", {"flip": True, "rotation": 10.0}),
        ("views", 3),
        ("augment_splits", ("train", "val")),
        ("seed", 1),
        ("dtype", "float16"),
    ],
)
def test_every_field_changes_the_key(field: str, value: object) -> None:
    assert dataclasses.replace(BASE, **{field: value}).key != BASE.key


def test_readable_labels_do_not_change_the_key() -> None:
    assert dataclasses.replace(BASE, dataset_name="other", weights_label="x").key == BASE.key


def test_key_includes_format_version() -> None:
    assert BASE.key_fields()["format_version"] == FORMAT_VERSION


def test_key_is_stable_across_processes() -> None:
    code = (
        "from featurecache.cache.keys import FeatureSpec;"
        "print(FeatureSpec(dataset_digest='d'*64, backbone='vgg19', weights='random:seed=0', layer='block5_pool',"
        "pooling='avg', input_size=32, resize='bilinear', preprocess='vgg19:caffe', augment={'rotation': 15.0, 'flip': True},"
        "views=2, augment_splits=('train',), seed=0, dtype='float32').key)"
    )
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": str(s)}).stdout.strip() for s in (1, 2)}
    assert outs == {BASE.key}


def test_entry_name_is_readable_and_ends_with_key_prefix() -> None:
    assert BASE.entry_name() == f"vgg19-random-32-avg--digits--{BASE.key[:12]}"


@pytest.mark.parametrize("field,value,match", [("pooling", "mean", "pooling"), ("dtype", "int8", "dtype"), ("views", -1, "views"), ("layer", "", "layer")])
def test_bad_fields_are_rejected(field: str, value: object, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        dataclasses.replace(BASE, **{field: value})
