"""Run a model on raw images of a dataset split.

Every model this package builds or exports resizes and preprocesses inside, so inference only
decodes images and batches them. :class:`ImagePredictor` traces the model once for any input
shape and batches images of equal shape together; :func:`predict_rows` decodes a split in
chunks on a thread pool (:func:`image_pool`) so memory stays flat however large the split, and
marks undecodable images instead of failing. ``featurecache.predict`` (``evaluate`` and
``predict``) runs models through the same two pieces.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from featurecache.errors import ImageDecodeError

__all__ = ["ImagePredictor", "draft_of", "image_pool", "load_images", "load_or_none", "predict_rows"]


class ImagePredictor:
    """Runs a model on raw RGB images of any sizes, batching images of equal shape.

    The model is traced once for every input shape (``(None, None, None, 3)``), so images of
    many sizes cost one trace, not one per size.

    Parameters
    ----------
    model
        A model from :func:`featurecache.finetune.rebuild_model` or a loaded ``model.keras``
        (it resizes inside).
    batch_size
        Images per forward pass.
    """

    def __init__(self, model: Any, *, batch_size: int = 32) -> None:
        import tensorflow as tf

        self.batch_size = max(1, int(batch_size))
        self.output_shape = tuple(int(d) for d in model.output_shape[1:])
        self._fn = tf.function(
            lambda x: model(x, training=False),
            input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32)],
        )

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Outputs for ``images`` (``uint8`` or float ``(H, W, 3)`` in [0, 255]), float64, in order."""
        out = np.zeros((len(images), *self.output_shape), dtype=np.float64)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(tuple(np.shape(img)), []).append(i)
        for rows in by_shape.values():
            for b in range(0, len(rows), self.batch_size):
                chunk = rows[b : b + self.batch_size]
                x = np.stack([np.asarray(images[i], dtype=np.float32) for i in chunk])
                out[chunk] = np.asarray(self._fn(x))
        return out


def image_pool(name: str) -> ThreadPoolExecutor:
    """Threads that decode images for a model (decoding releases the GIL).

    Parameters
    ----------
    name
        Thread name prefix (``fc-ft``, ``fc-eval``), to tell the pools apart in a dump.

    Returns
    -------
    concurrent.futures.ThreadPoolExecutor
        Use it as a context manager.
    """
    return ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1)), thread_name_prefix=name)


def draft_of(spec: Any) -> int | None:
    """The ``draft`` size images are decoded at for a feature spec: its input size under
    ``decode="fast"`` (so the model sees the pixels the cached features came from), else ``None``."""
    return int(spec["input_size"]) if spec.get("decode", "exact") == "fast" else None


def model_draft(rebuilt: Any) -> int | None:
    """The ``draft`` size for a rebuilt model: that of its spec, or of its branches when they
    agree (an ensemble whose branches decode differently is checked on fully decoded images)."""
    specs = [rebuilt.spec] if hasattr(rebuilt, "spec") else [b.spec for b in rebuilt.branches]
    drafts = {draft_of(s) for s in specs}
    return drafts.pop() if len(drafts) == 1 else None


def load_or_none(split: Any, i: int, *, draft: int | None = None) -> np.ndarray | None:
    """Image ``i`` of ``split``, or ``None`` where it cannot be decoded (the caller skips it)."""
    try:
        return split.load(int(i), draft=draft)
    except ImageDecodeError:
        return None


def load_images(
    split: Any, rows: Sequence[int] | np.ndarray, *, pool: ThreadPoolExecutor | None = None, draft: int | None = None
) -> list[np.ndarray]:
    """Decode ``rows`` of ``split``, failing on the first image that cannot be decoded.

    Parameters
    ----------
    split
        A ``featurecache.data.Split``.
    rows
        Rows to load, in order.
    pool
        Threads to decode on; ``None`` decodes in this thread.
    draft
        Decode JPEGs at reduced scale covering this size (:func:`draft_of`); ``None``: in full.

    Returns
    -------
    list of numpy.ndarray
        ``uint8 (H, W, 3)`` images, in the order of ``rows``.

    Raises
    ------
    ImageDecodeError
        An image cannot be decoded; the message names the split and the image id.
    """

    def load(i: int) -> np.ndarray:
        try:
            return split.load(int(i), draft=draft)
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"{split.name}/{split.ids[int(i)]}: {exc}; fix or remove the image") from None

    if pool is None:
        return [load(i) for i in rows]
    return list(pool.map(load, rows))


def predict_rows(
    predictor: ImagePredictor, split: Any, rows: np.ndarray, *, pool: ThreadPoolExecutor, draft: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Outputs for ``rows`` of a dataset split, decoded in chunks (memory stays flat).

    Parameters
    ----------
    predictor
        Runs the model.
    split
        A ``featurecache.data.Split``.
    rows
        Rows to predict, in order.
    pool
        Threads that decode the images (see :func:`image_pool`).
    draft
        Decode JPEGs at reduced scale covering this size (:func:`draft_of`); ``None``: in full.

    Returns
    -------
    tuple of numpy.ndarray
        ``(outputs, ok)``; rows whose image cannot be decoded have ``ok`` False and zero outputs.
    """
    proba = np.zeros((len(rows), *predictor.output_shape))
    ok = np.ones(len(rows), dtype=bool)
    step = predictor.batch_size * 8
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        images = list(pool.map(lambda i: load_or_none(split, i, draft=draft), chunk))
        good = [j for j, img in enumerate(images) if img is not None]
        ok[start + np.arange(len(chunk))] = [img is not None for img in images]
        if good:
            proba[start + np.asarray(good)] = predictor([img for img in images if img is not None])
    return proba, ok
