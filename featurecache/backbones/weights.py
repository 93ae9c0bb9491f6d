"""Which weights go into a backbone: the ``--weights`` value parsed into a :class:`WeightsRef`, and a weights file loaded into a model.

Failures say the fix in one line: a missing or unsupported file, a file saved from another
backbone, or ImageNet weights Keras cannot download (offline), with the URL to fetch elsewhere.
How weights are identified in the cache key is :mod:`featurecache.backbones.identity`.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from featurecache.backbones.spec import BackboneSpec
from featurecache.errors import WeightsUnavailableError, choices

if TYPE_CHECKING:
    import keras

WEIGHT_SUFFIXES = (".weights.h5", ".h5", ".hdf5", ".keras")


@dataclass(frozen=True)
class WeightsRef:
    """Which weights to put in a backbone.

    Attributes
    ----------
    kind : {"imagenet", "random", "file"}
        Keras's ImageNet weights, a seeded random initialisation, or a local weights file.
    path : str or None
        Absolute path of the weights file when ``kind="file"``.
    seed : int
        Seed passed to ``keras.utils.set_random_seed`` before construction when ``kind="random"``.
    """

    kind: Literal["imagenet", "random", "file"]
    path: str | None = None
    seed: int = 0


def parse_weights(value: str, *, seed: int = 0) -> WeightsRef:
    """Parse a ``--weights`` value.

    Parameters
    ----------
    value : str
        ``"imagenet"``, ``"random"``, or the path of a ``.weights.h5``, legacy ``.h5``/``.hdf5`` or
        ``.keras`` file.
    seed : int
        Seed of the random initialisation for ``"random"``.

    Returns
    -------
    WeightsRef
        With an absolute ``path`` for a file.

    Raises
    ------
    WeightsUnavailableError
        If the file does not exist or has an unsupported suffix.
    """
    word = value.strip().lower()
    if word == "imagenet":
        return WeightsRef("imagenet")
    if word == "random":
        return WeightsRef("random", seed=int(seed))
    path = os.path.abspath(os.path.expanduser(value))
    if not os.path.isfile(path):
        raise WeightsUnavailableError(
            f"weights file {path} does not exist; pass --weights imagenet, --weights random, or the path of an existing {'/'.join(WEIGHT_SUFFIXES)} file"
        )
    if not path.lower().endswith(WEIGHT_SUFFIXES):
        raise WeightsUnavailableError(
            f"weights file {path} has an unsupported suffix; allowed: {choices(WEIGHT_SUFFIXES)}; save weights with model.save_weights('x.weights.h5')"
        )
    return WeightsRef("file", path=path)


def _keras_models_dir() -> str:
    # Where keras.utils.get_file caches application weights.
    return os.path.join(os.environ.get("KERAS_HOME", os.path.join("~", ".keras")), "models")


def offline_error(spec: BackboneSpec, error: Exception) -> WeightsUnavailableError | None:
    """Turn Keras's failed ImageNet weights download into a one-line error with the fix.

    Parameters
    ----------
    spec : BackboneSpec
        The backbone whose weights Keras tried to download.
    error : Exception
        What the Keras constructor raised.

    Returns
    -------
    WeightsUnavailableError or None
        The error naming the file, its URL and where to put it; None when ``error`` is not a
        failed download (the caller re-raises it as is).
    """
    text = " ".join(str(error).split())
    found = re.search(r"https?://\S+", text)
    if found is None:
        return None
    url = found.group(0).rstrip(":,;)")
    file_name = url.rsplit("/", 1)[-1]
    reason = text.split(" -- ", 1)[1] if " -- " in text else type(error).__name__
    return WeightsUnavailableError(
        f"cannot download ImageNet weights {file_name} for {spec.name} ({reason}); "
        f"download {url} on a machine with internet and pass --weights /path/to/{file_name}, "
        f"or put it in {_keras_models_dir()}/"
    )


def load_weights_file(model: keras.Model, spec: BackboneSpec, path: str) -> None:
    """Load a weights file into ``model`` in place, refusing one that leaves any part unloaded.

    Parameters
    ----------
    model : keras.Model
        The backbone built with ``weights=None``.
    spec : BackboneSpec
        Its registry row (or custom backbone), for messages.
    path : str
        A ``.weights.h5``, legacy ``.h5``/``.hdf5`` file, or a ``.keras`` model whose weights (or
        whose nested backbone's weights, for a fine-tuned export) have exactly ``model``'s shapes.

    Raises
    ------
    WeightsUnavailableError
        If the file cannot be read or does not fit ``model``.
    """
    import keras

    def fail(reason: str) -> WeightsUnavailableError:
        return WeightsUnavailableError(
            f"cannot load weights file {path} into {spec.name}: {reason}; pass weights saved from the same backbone built with include_top=False"
        )

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if path.endswith(".keras"):
                source = keras.saving.load_model(path, compile=False)
                # A fine-tuned export nests the backbone as one layer: take the first model whose
                # weights have exactly our shapes.
                shapes = [tuple(w.shape) for w in model.weights]
                candidates = [source, *(layer for layer in source.layers if isinstance(layer, keras.Model))]
                match = next((c for c in candidates if [tuple(w.shape) for w in c.weights] == shapes), None)
                if match is None:
                    raise fail(
                        f"its {len(source.weights)} weights do not match the {len(shapes)} weights of {spec.name}"
                    )
                model.set_weights(match.get_weights())
            else:
                model.load_weights(path)
    except WeightsUnavailableError:
        raise
    except (ValueError, OSError, KeyError, TypeError) as error:
        # Keras's first sentence says what failed ("A total of 5 objects could not be loaded").
        first = " ".join(str(error).split("\n", 1)[0].split()).split(". ", 1)[0].rstrip(":.")
        raise fail(first or type(error).__name__) from error
    # Keras only warns when it leaves part of a model at its random initial values.
    skipped = [str(w.message) for w in caught if "retain their freshly-initialized weights" in str(w.message)]
    if skipped:
        raise fail(f"{len(skipped)} parts of the model were not in the file")
