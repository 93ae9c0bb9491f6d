"""The cache key: what makes two feature sets the same.

A feature set is determined by everything that changes its numbers and nothing else:

* the dataset's manifest digest (content of every image, its label, its split and its
  relative id; see ``featurecache.data.Dataset.digest``), never absolute paths or mtimes;
* the backbone, the *identity of its weights* (a digest of the weights file or values,
  or ``random:seed=N``; never just the word "imagenet"), the layer and the pooling;
* the input size, resize method and preprocessing mode;
* the augmentation spec, the number of augmented views, which splits get them, the seed;
* the stored dtype, and the compute precision of the backbone (``mixed`` = Keras's
  ``mixed_float16`` policy changes the numbers; the default ``float32`` is left out of the
  hashed document so that entries made before the field existed keep their keys);
* ``FORMAT_VERSION``, bumped whenever the stored output of the same inputs changes
  (a layout change, a fixed bug in resizing, ...), so old entries are never served as new.

The key is the sha256 of the canonical JSON of those fields (sorted keys, no whitespace,
floats normalised to 12 significant digits so ``0.1`` and ``0.10000000000000001`` agree).
Library versions are *recorded* in the entry, not keyed: ``cache verify`` recomputes a
sample to detect numeric drift instead. Unlike fingerprinting schemes that fall back to a
random fingerprint when something cannot be hashed, every field here is required and an
unhashable value is an error: a key that silently changes on every run would make the
cache useless, and one that silently collides would serve wrong features.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from featurecache.errors import UsageError

#: Bump when the bytes stored for the same spec change. Part of every key.
FORMAT_VERSION = 1

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
    """Every input that determines a feature set's numbers; its :attr:`key` names the entry.

    ``dataset_name`` and ``weights_label`` only make the entry name readable; they are
    stored in the entry but are not part of the key (the digests already are).
    """

    dataset_digest: str
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
    dataset_name: str = field(default="data", compare=False)
    weights_label: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name in ("dataset_digest", "backbone", "weights", "layer", "preprocess", "resize"):
            if not getattr(self, name):
                raise UsageError(f"cache key field {name!r} is empty; every key field must be set explicitly")
        if self.pooling not in POOLINGS:
            raise UsageError(f"pooling {self.pooling!r} is not one of {POOLINGS}; pass --pooling avg|max|flatten|none")
        if self.dtype not in DTYPES:
            raise UsageError(f"dtype {self.dtype!r} is not one of {DTYPES}; pass --dtype float32 or float16")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision {self.precision!r} is not one of {PRECISIONS}; pass --precision float32 or mixed")
        if self.views < 0:
            raise UsageError(f"views must be >= 0, got {self.views}; pass --views 0 for clean features only")

    def key_fields(self) -> dict[str, Any]:
        """The fields that enter the key, plus the format version."""
        fields = asdict(self)
        fields.pop("dataset_name")
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

    def entry_name(self) -> str:
        """``<backbone>-<weights>-<size>-<pooling>--<dataset>--<key12>``, filesystem-safe."""
        weights = self.weights_label or self.weights.split(":", 1)[0]
        head = "-".join(_slug(p) for p in (self.backbone, weights, str(self.input_size), self.pooling))
        return f"{head}--{_slug(self.dataset_name)}--{self.key[:12]}"

    def views_for(self, split: str) -> int:
        """Number of stored views for ``split``: 1 clean view plus augmented ones where enabled."""
        return 1 + (self.views if split in self.augment_splits else 0)


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "._" else "-" for c in str(text).lower())
    return "-".join(filter(None, out.split("-")))[:48] or "x"
