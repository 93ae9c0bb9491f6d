"""The cache keys: what makes two feature rows, and two dataset views, the same.

Store version 2 splits identity in two. A *feature spec* is everything that determines one
image's features, and nothing about the dataset it came in:

* the backbone, the *identity of its weights* (a digest of the weights file or values,
  or ``random:seed=N``; never just the word "imagenet"), the layer and the pooling;
* the input size, resize method and preprocessing mode;
* the augmentation spec, the number of augmented views, which splits get them, the seed;
* the stored dtype, and the compute precision of the backbone (``mixed`` = Keras's
  ``mixed_float16`` policy changes the numbers; the default ``float32`` is left out of the
  hashed document so that entries made before the field existed keep their keys);
* ``FORMAT_VERSION``, bumped whenever the stored output of the same inputs changes
  (a layout change, a fixed bug in resizing, ...), so old entries are never served as new.

Its key (:attr:`FeatureSpec.key`) names a *feature store*, whose rows are addressed by image
content digest. A *dataset view* adds the dataset's manifest digest (content of every image,
its label, its split and its relative id; see ``featurecache.data.Dataset.digest``):
:func:`view_key` of the two names the view, which is what ``--features KEY`` selects. So a
relabelled, re-split, renamed or grown dataset is a new view over mostly the same rows.

Each key is the sha256 of the canonical JSON of those fields (sorted keys, no whitespace,
floats normalised to 12 significant digits so ``0.1`` and ``0.10000000000000001`` agree).
Library versions are *recorded* in the entry, not keyed: ``cache verify`` recomputes a
sample to detect numeric drift instead. Unlike fingerprinting schemes that fall back to a
random fingerprint when something cannot be hashed, every field here is required and an
unhashable value is an error: a key that silently changes on every run would make the
cache useless, and one that silently collides would serve wrong features.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from featurecache.errors import UsageError

#: Bump when the bytes stored for the same spec change. Part of every key.
FORMAT_VERSION = 2

POOLINGS: tuple[str, ...] = ("avg", "max", "flatten", "none")
DTYPES: tuple[str, ...] = ("float32", "float16")
#: Compute precision of the backbone: ``mixed`` runs it under Keras's ``mixed_float16`` policy.
PRECISIONS: tuple[str, ...] = ("float32", "mixed")
#: Fields added after entries existed, left out of the keyed document while they hold the value
#: every earlier entry was computed with: old keys stay valid without a FORMAT_VERSION bump,
#: and any other value is keyed.
UNKEYED_DEFAULTS: dict[str, Any] = {"precision": "float32", "decode": "exact", "antialias": False}


def _normalise(value: Any, where: str) -> Any:
    """Turn ``value`` into plain JSON types with a single canonical spelling."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UsageError(f"cache key field {where!r} is {value!r}; only finite numbers can be keyed")
        # Integral floats keep a float spelling so 1.0 and 1 stay distinct types in the spec.
        return float(f"{value:.12g}")
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _normalise(value.item(), where)  # numpy scalar
    if isinstance(value, Mapping):
        return {str(k): _normalise(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise UsageError(
        f"cache key field {where!r} has type {type(value).__name__}, which has no canonical form; "
        "pass plain str/int/float/bool/list/dict values"
    )


def canonical_json(obj: Mapping[str, Any]) -> str:
    """Serialise ``obj`` canonically: sorted keys, compact separators, normalised numbers."""
    return json.dumps(_normalise(obj, "spec"), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def digest_of(obj: Mapping[str, Any]) -> str:
    """sha256 hex digest of ``canonical_json(obj)``."""
    return hashlib.sha256(canonical_json(obj).encode("ascii")).hexdigest()


@dataclass(frozen=True)
class FeatureSpec:
    """Every input that determines one image's features; its :attr:`key` names a feature store.

    ``weights_label`` only makes names readable; it is stored but not keyed (the weights
    digest already is).
    """

    backbone: str
    weights: str
    layer: str
    pooling: str
    input_size: int
    resize: str
    preprocess: str
    augment: Mapping[str, Any]
    views: int
    augment_splits: tuple[str, ...]
    seed: int
    dtype: str
    precision: str = "float32"
    decode: str = "exact"  # "fast": JPEGs decoded at reduced DCT scale (featurecache.data.decode)
    antialias: bool = False  # resize filters the whole footprint when shrinking
    weights_label: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name in ("backbone", "weights", "layer", "preprocess", "resize"):
            if not getattr(self, name):
                raise UsageError(f"cache key field {name!r} is empty; every key field must be set explicitly")
        if self.pooling not in POOLINGS:
            raise UsageError(f"pooling {self.pooling!r} is not one of {POOLINGS}; pass --pooling avg|max|flatten|none")
        if self.dtype not in DTYPES:
            raise UsageError(f"dtype {self.dtype!r} is not one of {DTYPES}; pass --dtype float32 or float16")
        if self.precision not in PRECISIONS:
            raise UsageError(
                f"precision {self.precision!r} is not one of {PRECISIONS}; pass --precision float32 or mixed"
            )
        if self.views < 0:
            raise UsageError(f"views must be >= 0, got {self.views}; pass --views 0 for clean features only")

    def key_fields(self) -> dict[str, Any]:
        """The fields that enter the key, plus the format version."""
        fields = asdict(self)
        fields.pop("weights_label")
        fields["augment_splits"] = sorted(self.augment_splits)
        fields["augment"] = dict(self.augment)
        for name, default in UNKEYED_DEFAULTS.items():
            if fields[name] == default:
                fields.pop(name)
        fields["format_version"] = FORMAT_VERSION
        return fields

    @property
    def key(self) -> str:
        """The 64-hex-digit content key."""
        return digest_of(self.key_fields())

    def label(self) -> str:
        """``<backbone>-<weights>-<size>-<pooling>``, filesystem-safe: the readable part of names."""
        weights = self.weights_label or self.weights.split(":", 1)[0]
        return "-".join(_slug(p) for p in (self.backbone, weights, str(self.input_size), self.pooling))

    def store_name(self) -> str:
        """Directory name of the feature store: ``<label>--<key12>``."""
        return f"{self.label()}--{self.key[:12]}"

    def view_name(self, dataset_name: str, dataset_digest: str) -> str:
        """Directory name of a dataset view: ``<label>--<dataset>--<viewkey12>``."""
        return f"{self.label()}--{_slug(dataset_name)}--{view_key(self.key, dataset_digest)[:12]}"

    def views_for(self, split: str) -> int:
        """Number of stored views for ``split``: 1 clean view plus augmented ones where enabled."""
        return 1 + (self.views if split in self.augment_splits else 0)


#: Version of the document hashed by :func:`manifest_digest` (the dataset digest).
DIGEST_FORMAT = "featurecache.dataset/1"


def manifest_digest(
    classes: Sequence[str],
    splits: Iterable[tuple[str, Sequence[str] | np.ndarray, Sequence[str] | np.ndarray, Sequence[int] | np.ndarray]],
) -> str:
    """The dataset digest: sha256 of the canonical manifest of classes and items.

    The one definition both sides use: :meth:`featurecache.data.Dataset.digest` hashes a
    dataset with it, and a view re-derives it from its stored ids, digests and labels, so a
    flipped label or id in a view is caught on read.

    Parameters
    ----------
    classes
        Class names, in label order.
    splits
        ``(name, ids, content digests, labels)`` per split, in split order.

    Returns
    -------
    str
        64 hex characters.
    """
    # The bytes of json.dumps({"format", "classes", "splits": [[name, [[id, digest, label], ...]]]},
    # sort_keys=True, separators=(",", ":"), ensure_ascii=True), fed to the hash row by row:
    # the whole document at once costs ~3 KiB per image, which at 100k images set peak memory.
    h = hashlib.sha256()
    dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode
    h.update(
        b'{"classes":'
        + dumps([str(c) for c in classes]).encode("ascii")
        + b',"format":'
        + dumps(DIGEST_FORMAT).encode("ascii")
        + b',"splits":['
    )
    for s, (name, ids, digests, labels) in enumerate(splits):
        h.update((b"," if s else b"") + b"[" + dumps(str(name)).encode("ascii") + b",[")
        rows = zip(ids, digests, labels, strict=True)
        first = True
        while batch := [[str(i), str(d), int(lab)] for i, d, lab in itertools.islice(rows, 4096)]:
            # One encoder call per 4096 rows (the same bytes as row by row, a fraction of the calls).
            h.update((b"" if first else b",") + dumps(batch)[1:-1].encode("ascii"))
            first = False
        h.update(b"]]")
    h.update(b"]}")
    return h.hexdigest()


#: Fields a store's or a view's recorded spec holds besides the keyed ones (names, the dataset).
RECORDED_ONLY: tuple[str, ...] = ("weights_label", "dataset_digest", "dataset_name")


def recorded_spec_key(spec: Mapping[str, Any]) -> str:
    """The feature spec key a store's or a view's recorded ``spec`` hashes to.

    Readers compare it with the key that names the entry: a spec edited in a ``zarr.json``
    (say ``input_size`` 32 -> 48) no longer hashes to it, so it is never trusted or copied.

    Raises
    ------
    UsageError
        The recorded spec holds a value with no canonical form.
    """
    return digest_of({k: v for k, v in spec.items() if k not in RECORDED_ONLY})


def view_key(spec_key: str, dataset_digest: str) -> str:
    """Key of the dataset view of ``dataset_digest``'s manifest over the store ``spec_key``.

    This is the key users pass as ``--features``: it changes with the features' spec and with
    the dataset's images, labels, ids, splits or order, and with nothing else.
    """
    return digest_of({"feature_spec": spec_key, "dataset_digest": dataset_digest, "format_version": FORMAT_VERSION})


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "._" else "-" for c in str(text).lower())
    return "-".join(filter(None, out.split("-")))[:48] or "x"
