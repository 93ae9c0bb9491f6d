"""The cache keys: canonical, stable across processes, sensitive to every field.

Store version 2 splits identity in two: a :class:`FeatureSpec` (everything that determines one
image's features, nothing about the dataset) names a feature store, and :func:`view_key` of
the spec key and a dataset's manifest digest names a dataset view.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from featurecache.cache.keys import (
    FORMAT_VERSION,
    UNKEYED_DEFAULTS,
    FeatureSpec,
    canonical_json,
    manifest_digest,
    recorded_spec_key,
    view_key,
)
from featurecache.errors import UsageError

BASE = FeatureSpec(
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
)
DIGEST = "d" * 64

#: One changed value per keyed field of FeatureSpec.
CHANGES = [
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
    ("decode", "fast"),
    ("antialias", True),
    ("precision", "mixed"),
]


def test_canonical_json_sorts_and_normalises_numbers() -> None:
    assert canonical_json({"b": 1, "a": [0.1, 2]}) == canonical_json({"a": [0.10000000000000001, 2], "b": 1})
    assert canonical_json({"a": 1}) != canonical_json({"a": 1.0})  # int and float are different settings
    assert " " not in canonical_json({"a": {"x": [1, 2]}})


def test_unhashable_field_is_an_error_not_a_random_key() -> None:
    with pytest.raises(UsageError, match="canonical form"):
        canonical_json({"a": object()})
    with pytest.raises(UsageError, match="finite"):
        canonical_json({"a": float("nan")})


def test_the_spec_has_no_dataset_fields() -> None:
    names = {f.name for f in dataclasses.fields(FeatureSpec)}
    assert not names & {"dataset_digest", "dataset_name"}, "the dataset belongs to the view, not to the feature spec"
    assert not any("dataset" in k for k in BASE.key_fields())


def test_changes_cover_every_keyed_field() -> None:
    keyed = {f.name for f in dataclasses.fields(FeatureSpec) if f.compare}
    assert {name for name, _ in CHANGES} == keyed, (
        "a FeatureSpec field is not exercised by test_every_field_changes_the_key"
    )


@pytest.mark.parametrize("field,value", CHANGES)
def test_every_field_changes_the_key(field: str, value: object) -> None:
    changed = dataclasses.replace(BASE, **{field: value})
    assert changed.key != BASE.key
    assert changed.store_name() != BASE.store_name()
    # ... and so every view over it, for the same dataset.
    assert view_key(changed.key, DIGEST) != view_key(BASE.key, DIGEST)


def test_augment_splits_order_does_not_change_the_key() -> None:
    a = dataclasses.replace(BASE, augment_splits=("train", "val"))
    b = dataclasses.replace(BASE, augment_splits=("val", "train"))
    assert a.key == b.key


def test_readable_labels_do_not_change_the_key() -> None:
    assert dataclasses.replace(BASE, weights_label="x").key == BASE.key
    assert BASE.view_name("other", DIGEST).endswith(BASE.view_name("digits", DIGEST)[-12:])


def test_default_precision_is_left_out_of_the_keyed_document() -> None:
    assert UNKEYED_DEFAULTS == {"precision": "float32", "decode": "exact", "antialias": False}
    assert not set(UNKEYED_DEFAULTS) & set(BASE.key_fields())
    assert dataclasses.replace(BASE, precision="mixed").key_fields()["precision"] == "mixed"


def test_key_includes_format_version() -> None:
    assert FORMAT_VERSION == 2
    assert BASE.key_fields()["format_version"] == FORMAT_VERSION


def test_key_is_stable_across_processes() -> None:
    code = (
        "from featurecache.cache.keys import FeatureSpec, view_key;"
        "k=FeatureSpec(backbone='vgg19', weights='random:seed=0', layer='block5_pool',"
        "pooling='avg', input_size=32, resize='bilinear', preprocess='vgg19:caffe', augment={'rotation': 15.0, 'flip': True},"
        "views=2, augment_splits=('train',), seed=0, dtype='float32').key;"
        "print(k, view_key(k, 'd'*64))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(s), **_pythonpath()},
        ).stdout.strip()
        for s in (1, 2)
    }
    assert outs == {f"{BASE.key} {view_key(BASE.key, DIGEST)}"}


def _pythonpath() -> dict[str, str]:
    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}


def test_a_recorded_spec_hashes_to_its_key_unless_edited() -> None:
    """What a store or a view records (names and dataset beside the keyed fields) re-derives the key."""
    for spec in (BASE, dataclasses.replace(BASE, precision="mixed", weights_label="imagenet")):
        recorded = {
            **spec.key_fields(),
            "weights_label": spec.weights_label,
            "dataset_digest": "d" * 64,
            "dataset_name": "digits",
        }
        assert recorded_spec_key(recorded) == spec.key
        assert recorded_spec_key({**recorded, "input_size": 48}) != spec.key


def test_view_key_changes_with_the_dataset_digest_and_the_spec() -> None:
    k = view_key(BASE.key, DIGEST)
    assert len(k) == 64 and all(c in "0123456789abcdef" for c in k)
    assert view_key(BASE.key, DIGEST) == k  # deterministic
    assert view_key(BASE.key, "e" * 64) != k
    assert view_key(dataclasses.replace(BASE, seed=1).key, DIGEST) != k
    assert k != BASE.key, "a view is not named by its store's key"


def test_manifest_digest_changes_with_labels_ids_images_classes_splits_and_order() -> None:
    classes = ["a", "b"]
    train = ("train", ["x.png", "y.png"], ["1" * 64, "2" * 64], [0, 1])
    base = manifest_digest(classes, [train])
    assert len(base) == 64 and manifest_digest(classes, [train]) == base
    variants = [
        (classes, [("train", train[1], train[2], [1, 1])]),  # a label fixed
        (classes, [("train", ["x.png", "z.png"], train[2], train[3])]),  # a file renamed
        (classes, [("train", train[1], ["1" * 64, "3" * 64], train[3])]),  # an image's content changed
        (["a", "c"], [train]),  # a class renamed
        (classes, [("val", *train[1:])]),  # re-split
        (classes, [("train", train[1][::-1], train[2][::-1], train[3][::-1])]),  # reordered
        (classes, [train, ("test", ["t.png"], ["4" * 64], [0])]),  # grown
    ]
    digests = {manifest_digest(c, s) for c, s in variants}
    assert base not in digests and len(digests) == len(variants)


def test_manifest_digest_is_the_dataset_digest() -> None:
    from featurecache.data import load_dataset

    ds = load_dataset("builtin:digits", limit=8)
    by_split = ds.digests_by_split()
    recomputed = manifest_digest(ds.classes, [(n, s.ids, by_split[n], s.labels) for n, s in ds.splits.items()])
    assert recomputed == ds.digest()
    # One flipped label gives another digest: what a view re-derives to catch an altered labels chunk.
    first = next(iter(ds.splits))
    labels = ds.splits[first].labels.copy()
    labels[0] = (labels[0] + 1) % len(ds.classes)
    flipped = [(n, s.ids, by_split[n], labels if n == first else s.labels) for n, s in ds.splits.items()]
    assert manifest_digest(ds.classes, flipped) != ds.digest()


def test_names_are_readable_and_end_with_key_prefixes() -> None:
    assert BASE.store_name() == f"vgg19-random-32-avg--{BASE.key[:12]}"
    assert BASE.view_name("digits", DIGEST) == f"vgg19-random-32-avg--digits--{view_key(BASE.key, DIGEST)[:12]}"
    assert BASE.view_name("My Photos!", DIGEST).startswith("vgg19-random-32-avg--my-photos--")
    assert dataclasses.replace(BASE, weights_label="imagenet").store_name().startswith("vgg19-imagenet-32-avg--")


def test_views_for() -> None:
    assert BASE.views_for("train") == 3 and BASE.views_for("test") == 1


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("pooling", "mean", "pooling"),
        ("dtype", "int8", "dtype"),
        ("views", -1, "views"),
        ("layer", "", "layer"),
        ("precision", "half", "precision"),
    ],
)
def test_bad_fields_are_rejected(field: str, value: object, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        dataclasses.replace(BASE, **{field: value})
