"""Training data of dense heads: shuffled batches drawing one view per sample per epoch, and input moments.

Training data flows through ``_ViewBatches``, a ``keras.utils.PyDataset`` over an array of
views ``(V, n, *feat)`` (plain ``X`` is the single view ``X[None]``, a no-copy view).  At
every epoch it draws a fresh permutation and, per sample, one view index from
``numpy.random.default_rng([seed, epoch])``; batches gather ``views[view[i], i]`` on the
fly.  Augmented views are therefore sampled, never stacked into ``V * n`` training rows,
and the draw depends only on (seed, epoch), so training is reproducible.  On-disk views
(zarr, h5py, streamed features) are read a window of batches at a time, never whole.

Keras is imported inside :func:`make_view_batches`: importing this module costs only NumPy.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = ["make_view_batches", "pooled_moments"]

#: Most bytes of on-disk training features read ahead at once (see ``_from_window``).
_STREAM_WINDOW_BYTES = 256 << 20


def pooled_moments(views: Any, pool: str, *, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and variance of the clean view after pooling, read in row blocks.

    ``views`` is ``(V, n, *shape)`` (NumPy or Zarr); only view 0 is read, so on-disk
    features larger than memory are never loaded whole.
    """
    total = sq = None
    n = int(views.shape[1])
    for start in range(0, n, block):
        x = np.asarray(views[0, start : start + block], dtype=np.float64)
        if pool == "avg":
            x = x.mean(axis=(1, 2))
        else:
            x = x.reshape(len(x), -1)
        s1, s2 = x.sum(axis=0), (x * x).sum(axis=0)
        total, sq = (s1, s2) if total is None else (total + s1, sq + s2)
    assert total is not None and sq is not None, (
        "no rows"
    )  # training sets are never empty (load_training_data refuses them)
    mean = total / max(n, 1)
    return mean, np.maximum(sq / max(n, 1) - mean * mean, 0.0)


def make_view_batches(
    views: Any,
    y: np.ndarray,
    sample_weight: np.ndarray | None,
    *,
    batch_size: int,
    seed: int,
) -> Any:
    """Build the ``PyDataset`` of shuffled, view-drawn batches the dense-head trainer feeds on.

    Parameters
    ----------
    views
        ``(V, n, *feat)`` features, NumPy or on-disk (zarr, h5py, streamed; read a window of
        batches at a time, at most half of a ``budget`` attribute's bytes).
    y
        ``(n,)`` int32 class codes.
    sample_weight
        ``(n,)`` weights, or ``None``.
    batch_size, seed
        Batch size; the order and view draw of epoch ``e`` come from ``default_rng([seed, e])``.

    Returns
    -------
    keras.utils.PyDataset
        Batches ``(x, y[, w])``; ``on_epoch_end`` moves to the next epoch's draw. The class is
        defined inside this function so ``keras`` is imported lazily.
    """
    import keras

    row_bytes = 4 * int(np.prod(tuple(views.shape[2:]), dtype=np.int64))
    window_bytes = _STREAM_WINDOW_BYTES
    budget = getattr(views, "budget", None)  # featurecache.training.train.LazyFeatures: the memory it may use
    if isinstance(budget, (int, np.integer)) and budget > 0:
        window_bytes = min(window_bytes, int(budget) // 2)
    window = max(1, window_bytes // max(1, row_bytes * batch_size))  # batches read at once from disk

    class _ViewBatches(keras.utils.PyDataset):
        """One randomly drawn view per sample per epoch; see the module docstring."""

        def __init__(self) -> None:
            # workers=1, no multiprocessing: batches are cheap numpy gathers and the
            # per-epoch state (order, view choice) must not be shared across processes.
            super().__init__(workers=1, use_multiprocessing=False)
            self._n = int(y.shape[0])
            self._n_views = int(views.shape[0])
            self._epoch = 0
            self._window = window
            self._cached: tuple[tuple[int, int], np.ndarray] | None = None
            self._lock = threading.Lock()
            self._draw()

        def _draw(self) -> None:
            rng = np.random.default_rng([seed, self._epoch])
            self._order = rng.permutation(self._n)
            self._view = (
                rng.integers(self._n_views, size=self._n) if self._n_views > 1 else np.zeros(self._n, dtype=np.int64)
            )

        @property
        def num_batches(self) -> int:
            return -(-self._n // batch_size)

        def __len__(self) -> int:
            return self.num_batches

        def __getitem__(self, idx: int) -> tuple[np.ndarray, ...]:
            rows = self._order[idx * batch_size : (idx + 1) * batch_size]
            if isinstance(views, np.ndarray):
                xb = _gather(views, self._view[rows], rows)
            else:
                xb = self._from_window(idx)
            if sample_weight is None:
                return xb, y[rows]
            return xb, y[rows], sample_weight[rows]

        def _from_window(self, idx: int) -> np.ndarray:
            # On-disk views: a batch of randomly ordered rows touches ~one chunk per row, so
            # batch-by-batch reads decompress each chunk many times per epoch. Reading the
            # rows of several batches at once decompresses each chunk once per window, and the
            # batches keep exactly the order (and so the training) of the in-memory path.
            with self._lock:
                w = idx // self._window
                if self._cached is None or self._cached[0] != (self._epoch, w):
                    lo = w * self._window * batch_size
                    rows = self._order[lo : min(lo + self._window * batch_size, self._n)]
                    self._cached = ((self._epoch, w), _gather(views, self._view[rows], rows))
                start = (idx - w * self._window) * batch_size
                return self._cached[1][start : start + batch_size]

        def on_epoch_end(self) -> None:
            self._epoch += 1
            self._draw()

    return _ViewBatches()


def _gather(views: Any, view_idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows ``views[view_idx[j], rows[j]]`` as one float32 batch.

    NumPy arrays use one advanced-indexing gather.  Other arrays (zarr, h5py) are read
    one view at a time with sorted row indices -- via ``oindex`` when the array has it
    (zarr's orthogonal indexing) -- so a batch touches only the chunks it needs.
    """
    if isinstance(views, np.ndarray):
        return np.asarray(views[view_idx, rows], dtype=np.float32)
    out = np.empty((len(rows), *tuple(views.shape[2:])), dtype=np.float32)
    for v in np.unique(view_idx):
        pos = np.flatnonzero(view_idx == v)
        wanted, inverse = np.unique(rows[pos], return_inverse=True)
        reader = views.oindex if hasattr(views, "oindex") else views
        out[pos] = np.asarray(reader[int(v), wanted], dtype=np.float32)[inverse]
    return out
