"""The weights' identity in the cache key: a digest of the weights themselves, memoised so that a cache hit builds no model.

The cache key never uses the weights' name: it uses the bytes of a weights file, the seed of a
random initialisation (made reproducible by ``keras.utils.set_random_seed``), or the values of
the ImageNet weights. File digests share the dataset files' memo
(:func:`featurecache.data.dataset.file_digests`); ImageNet digests are memoised in
``weights-digests.json`` beside it, through the same :mod:`featurecache.cache.memo` helper, so a
cache hit neither re-hashes a file nor builds a model.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featurecache.backbones.build import build_base
from featurecache.backbones.custom import check_custom_weights
from featurecache.backbones.spec import BackboneSpec
from featurecache.backbones.weights import WeightsRef
from featurecache.cache.memo import read_memo, write_memo
from featurecache.errors import WeightsUnavailableError

if TYPE_CHECKING:
    import keras

MEMO_FILE = "weights-digests.json"


def _read_memo(memo_dir: Path | None) -> dict:
    if memo_dir is None:
        return {}
    memo = read_memo(Path(memo_dir) / MEMO_FILE)  # None when missing or torn: one recomputation
    return memo if isinstance(memo, dict) else {}


def _update_memo(memo_dir: Path | None, section: str, key: str, value: object) -> None:
    if memo_dir is None:
        return
    # Re-read just before writing so entries another process added meanwhile survive; a lost
    # concurrent update only means one more recomputation later.
    memo = _read_memo(memo_dir)
    memo.setdefault(section, {})[key] = value
    write_memo(Path(memo_dir) / MEMO_FILE, lambda f: json.dump(memo, f, indent=1, sort_keys=True))


def _file_sha256(path: str, memo_dir: Path | None) -> str:
    """sha256 of a weights or model file, memoised with the dataset files' digests.

    Uses :func:`featurecache.data.dataset.file_digests` and its memo (size + mtime, and never
    trusting a file modified within the last 2 s, so a rewrite of the same size is noticed).

    Raises
    ------
    OSError
        The file cannot be read.
    """
    import errno

    from featurecache.data.dataset import MEMO_FILENAME, file_digests

    memo_path = None if memo_dir is None else Path(memo_dir) / MEMO_FILENAME
    digest = file_digests([Path(path)], memo_path=memo_path)[0]
    if digest.startswith("unreadable:"):
        code = getattr(errno, digest.split(":", 1)[1], errno.EIO)
        raise OSError(code, os.strerror(code), path)
    return digest


def _weights_sha256(model: keras.Model) -> str:
    import keras

    digest = hashlib.sha256()
    # Values, shapes and dtypes in model.weights order; variable names are left out because
    # auto-generated names are not part of what the weights are.
    for variable in model.weights:
        array = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _local_identity(ref: WeightsRef, memo_dir: Path | None) -> str:
    """Identity of random or file weights: needs neither the backbone nor a model."""
    if ref.kind == "random":
        return f"random:seed={ref.seed}"
    try:
        return f"file:sha256={_file_sha256(str(ref.path), memo_dir)}"
    except OSError as error:
        raise WeightsUnavailableError(
            f"cannot read weights file {ref.path}: {error.strerror or error}; pass an existing weights file"
        ) from error


def weights_identity(ref: WeightsRef, spec: BackboneSpec, *, memo_dir: Path | None) -> str:
    """Identify the actual weights for the cache key, without building a model when memoised.

    * file: ``"file:sha256=<hex>"`` of the file bytes, memoised by (path, size, mtime_ns);
    * random: ``"random:seed=<seed>"``;
    * imagenet: ``"imagenet:sha256=<hex>"`` over all weight values of the base model, memoised by
      (backbone, Keras version) since Keras pins each weights file by hash. MobileNet/MobileNetV2
      pick their ImageNet file by input size; the digest is of the default-size file and the input
      size, which is keyed separately, tells the files apart.
    * custom backbone: ``"custom:sha256=<hex of the .keras file>"``, plus ``"+"`` and the identity of
      ``ref`` when it is not that same file.

    Parameters
    ----------
    ref : WeightsRef
        The weights.
    spec : BackboneSpec
        The backbone.
    memo_dir : Path or None
        Directory of the digest memo (``weights-digests.json``); None disables memoisation.

    Returns
    -------
    str
        The identity.

    Raises
    ------
    WeightsUnavailableError
        If ImageNet weights must be downloaded to be hashed and cannot be, or a file is unreadable.
    """
    if spec.family == "custom":
        check_custom_weights(spec, ref)
        model_id = f"custom:sha256={_file_sha256(spec.constructor, memo_dir)}"
        if ref.kind == "file" and ref.path == spec.constructor:
            return model_id
        return f"{model_id}+{_local_identity(ref, memo_dir)}"
    if ref.kind != "imagenet":
        return _local_identity(ref, memo_dir)
    key = f"{spec.name}@keras-{metadata.version('keras')}"
    memoised = _read_memo(memo_dir).get("imagenet", {}).get(key)
    if isinstance(memoised, str):
        return f"imagenet:sha256={memoised}"
    digest = _weights_sha256(build_base(spec, ref, input_size=spec.default_size))
    _update_memo(memo_dir, "imagenet", key, digest)
    return f"imagenet:sha256={digest}"


def recorded_weights_source(identity: str, source: str | None) -> str | None:
    """The ``--weights`` value that reproduces a recorded weights identity.

    Extraction records the ``--weights`` value beside the identity; entries and runs made
    before it did can still name random and ImageNet weights from the identity alone
    (``random:seed=0`` -> ``random``), but not a file.

    Parameters
    ----------
    identity : str
        The recorded identity (see :func:`weights_identity`).
    source : str or None
        The ``--weights`` value the caller was given or found recorded; used as is when set.

    Returns
    -------
    str or None
        The value to pass to :func:`parse_weights`; None when only the user can say which file
        it was. Check the result with :func:`weights_identity`: a recorded source may have changed.
    """
    if source:
        return str(source)
    if identity.startswith(("random", "imagenet")):
        return identity.split(":", 1)[0]
    return None
