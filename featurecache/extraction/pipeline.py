"""The unit pipeline: decode -> resize -> augment -> preprocess -> backbone -> write, for any executor.

One code path computes a write unit wherever it runs: a local extraction, a ``--shard`` process,
a Dask worker (:mod:`featurecache.cluster`), and ``cache verify``'s recomputation
(:mod:`featurecache.audit`). Images are decoded and resized in a thread pool and prefetched
while the backbone runs on the previous unit, and a writer thread stores finished units.
Every backbone batch is padded to the same size, so an image's features never depend on which
other images share its batch.
"""

from __future__ import annotations

import bisect
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from featurecache._runtime.progress import ProgressBar
from featurecache._runtime.versions import library_versions
from featurecache.cache import store
from featurecache.cache.faults import checkpoint
from featurecache.cache.keys import FeatureSpec, view_key
from featurecache.cache.storage import Location
from featurecache.errors import CacheCorruptError, ImageDecodeError, UsageError
from featurecache.extraction.options import OnError


@dataclass(frozen=True)
class Plan:
    """Everything needed to extract one dataset's features, resolved but not yet run."""

    spec: FeatureSpec
    dataset: Any  # featurecache.data.Dataset
    backbone: Any  # featurecache.backbones.BackboneSpec
    weights: Any  # featurecache.backbones.WeightsRef
    cache_dir: Location
    augment: Any  # featurecache.data.AugmentSpec
    # How the user named the weights and the subset: not keyed (the spec holds their
    # digests), but stored so `finetune` can rebuild the backbone and reload the images.
    weights_source: str = ""
    limit: int | None = None

    @property
    def key(self) -> str:
        """The key of the planned feature set: the dataset view of this spec."""
        return view_key(self.spec.key, self.dataset.digest())

    @property
    def name(self) -> str:
        """The planned feature set's name."""
        return self.spec.view_name(self.dataset.name, self.dataset.digest())


def make_runner(
    p: Plan,
    st: store.FeatureStore,
    model: Any = None,
    *,
    batch_size: int,
    on_error: OnError,
    workers: int | None,
    xla: bool | None,
    prefetch: Prefetch | None = None,
) -> tuple[UnitRunner, dict[str, Any]]:
    """The unit pipeline of ``p`` over ``st`` (building the model unless given) and its compute record.

    The same runner serves a local extraction, a shard and a Dask worker, so every executor
    computes a unit through one code path.

    Raises
    ------
    CacheCorruptError
        The store holds features of another shape than the model gives.
    """
    if model is None:
        model = build_model(p)
        checkpoint("model_built")
    if tuple(int(d) for d in model.output_shape[1:]) != st.feature_shape:
        raise CacheCorruptError(
            f"{st.name} stores features of shape {st.feature_shape} but the model gives {tuple(model.output_shape[1:])}; "
            f"remove it with `featurecache cache rm {st.name} --yes`"
        )
    gpu = _gpu_visible()
    use_xla = gpu if xla is None else bool(xla)
    runner = UnitRunner(
        p, st, model, batch_size=batch_size, on_error=on_error, workers=workers, xla=use_xla, prefetch=prefetch
    )
    # Not keyed: XLA moves features by float32 round-off only (recorded per unit, for `cache verify`).
    return runner, {"xla": use_xla, "gpu": gpu}


def unit_record(compute: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What every unit marker records about where it was computed: versions, host, device, compute."""
    return {
        "versions": library_versions(),
        "host": socket.gethostname(),
        "device": _device_name(bool(compute.get("gpu"))),
        "compute": compute,
        **extra,
    }


def _device_name(gpu: bool) -> str:
    if not gpu:
        return "CPU"
    import tensorflow as tf

    names = [d.name for d in tf.config.list_logical_devices("GPU")]
    return names[0] if names else "GPU"


class UnitRunner:
    """Decode → resize → augment → preprocess → backbone → write, overlapped across units."""

    def __init__(
        self,
        p: Plan,
        st: store.FeatureStore,
        model: Any,
        *,
        batch_size: int,
        on_error: OnError,
        workers: int | None,
        xla: bool = False,
        prefetch: Prefetch | None = None,
    ) -> None:
        self.p = p
        self.st = st
        self.batch_size = max(1, int(batch_size))
        self.on_error = on_error
        from featurecache.data import decode_workers

        self.workers = workers or decode_workers()
        self.prefetch = prefetch
        # Traced now, while the prefetch threads decode, rather than at the first batch.
        self.forward = compiled_forward(model, p.spec.input_size, jit_compile=xla, trace=True)
        self.source = source_places(p)

    def _load(self, unit: store.Unit, pool: ThreadPoolExecutor) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
        """Decode and resize the unit's images: those prefetched, the rest in runs of consecutive rows."""
        taken = self.prefetch.take_all(unit.digests) if self.prefetch is not None else {}
        rest = [j for j in range(len(unit.digests)) if j not in taken]
        x, valid, fails = load_places(self.p, [self.source[unit.digests[j]] for j in rest], pool)
        if taken:
            size = self.p.spec.input_size
            full, full_valid = (
                np.empty((len(unit.digests), size, size, 3), dtype=np.float32),
                np.ones(len(unit.digests), dtype=bool),
            )
            full[rest], full_valid[rest] = x, valid
            fails = [(rest[j], where, reason) for j, where, reason in fails]
            for j, (row, ok, failure) in taken.items():
                full[j], full_valid[j] = row, ok
                if failure is not None:
                    fails.append((j, *failure))
            x, valid = full, full_valid
        fails.sort()
        if fails and self.on_error == "fail":
            _j, where, reason = fails[0]
            raise ImageDecodeError(
                f"{where}: {reason}; fix or remove the file, or pass --on-error skip to mark it invalid and go on"
            )
        return x, valid, [(unit.digests[j], reason) for j, _where, reason in fails]

    def _prepare(
        self, unit: store.Unit, pool: ThreadPoolExecutor
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
        from featurecache import backbones
        from featurecache.data import augment_batch

        x, valid, failures = self._load(unit, pool)
        if unit.view > 0:
            x = augment_batch(
                x,
                self.p.augment,
                seed=self.p.spec.seed,
                view=unit.view,
                indices=[store.augment_index(d) for d in unit.digests],
            )
        x = backbones.preprocess_input(self.p.backbone, x)
        checkpoint("unit_prepared")
        return x, valid, failures

    def _features(self, x: np.ndarray, valid: np.ndarray) -> np.ndarray:
        feats, self.batch_size = forward_in_batches(
            self.forward, x, batch_size=self.batch_size, feature_shape=self.st.feature_shape, pad=True
        )
        feats[~valid] = 0  # invalid rows hold zeros, never features of a placeholder image
        return feats.astype(self.p.spec.dtype, copy=False)

    def run(self, units: list[store.Unit], *, progress: bool, record: dict[str, Any] | None = None) -> None:
        total = sum(len(u.digests) for u in units)
        with (
            ProgressBar(progress, total, f"extract {self.p.name}", rate_unit="img") as advance,
            ThreadPoolExecutor(self.workers, thread_name_prefix="fc-decode") as pool,
            ThreadPoolExecutor(1, thread_name_prefix="fc-prep") as prep,
            ThreadPoolExecutor(1, thread_name_prefix="fc-write") as writer,
        ):
            pending_writes: list[Future[None]] = []
            queue: list[tuple[store.Unit, Future]] = []
            it: Iterator[store.Unit] = iter(units)
            depth = 2  # units prepared ahead of the backbone

            def top_up() -> None:
                while len(queue) < depth:
                    nxt = next(it, None)
                    if nxt is None:
                        return
                    queue.append((nxt, prep.submit(self._prepare, nxt, pool)))

            try:
                top_up()
                while queue:
                    unit, fut = queue.pop(0)
                    x, valid, failures = fut.result()
                    top_up()
                    feats = self._features(x, valid)
                    checkpoint("unit_forward_done")
                    while pending_writes and (pending_writes[0].done() or len(pending_writes) >= 2):
                        # Bounds memory (at most two units queued for disk) and surfaces write errors early.
                        pending_writes.pop(0).result()
                    pending_writes.append(
                        writer.submit(
                            store.write_unit,
                            self.st,
                            unit,
                            feats,
                            valid=valid if unit.view == 0 else None,
                            failures=failures if unit.view == 0 else (),
                            record=record,
                        )
                    )
                    advance(len(unit.digests))
            finally:
                for _q_unit, q_fut in queue:
                    q_fut.cancel()
                # Whatever happened, finish the writes already handed over: nothing computed is lost.
                errors = []
                for w in pending_writes:
                    try:
                        w.result()
                    except Exception as exc:  # noqa: BLE001 - re-raised below
                        errors.append(exc)
            if errors:
                raise errors[0]


def build_model(p: Plan) -> Any:
    """Build the feature model of ``p`` in its compute precision.

    Parameters
    ----------
    p
        The plan; ``p.spec.precision`` is ``float32`` or ``mixed``.

    Returns
    -------
    keras.Model
        For ``mixed``, built under Keras's ``mixed_float16`` policy: float32 weights (the
        same values as the float32 model), float16 activations.

    Raises
    ------
    UsageError
        ``mixed`` for a backbone whose saved layers pin their own dtype (a custom ``.keras``
        file), which the policy cannot change.
    """
    from featurecache import backbones

    def build() -> Any:
        return backbones.build_feature_model(
            p.backbone, p.weights, input_size=p.spec.input_size, layer=p.spec.layer, pooling=p.spec.pooling
        )

    if p.spec.precision == "float32":
        return build()
    import keras

    # The dtype policy is Keras state of this thread: set it around this one build only, so it
    # never leaks into models the caller builds afterwards.
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build()
    finally:
        keras.config.set_dtype_policy(previous)
    if not any(getattr(layer, "compute_dtype", None) == "float16" for layer in model.layers):
        raise UsageError(
            f"--precision mixed has no effect on {p.backbone.name}: its saved layers fix their own dtype; "
            "pass --precision float32 (the default)"
        )
    return model


def _gpu_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


class SourcePlaces:
    """Where each digest's image is, as ``(split, row)``: its first occurrence in the dataset.

    One int per digest (its position in the splits laid end to end), not a tuple: this map
    covers every image for the whole extraction, so it counts towards peak memory per image.
    With ``wanted``, only those digests are looked up.
    """

    def __init__(self, p: Plan, wanted: Sequence[str] | None = None) -> None:
        want = set(wanted) if wanted is not None else None
        self._names: list[str] = []
        self._offsets: list[int] = []
        self._pos: dict[str, int] = {}
        offset = 0
        for name, digests in p.dataset.digests_by_split().items():
            self._names.append(name)
            self._offsets.append(offset)
            for i, d in enumerate(digests):
                if want is None or d in want:
                    self._pos.setdefault(d, offset + i)
            offset += len(digests)

    def __getitem__(self, digest: str) -> tuple[str, int]:
        at = self._pos[digest]
        k = bisect.bisect_right(self._offsets, at) - 1
        return self._names[k], at - self._offsets[k]

    def __contains__(self, digest: object) -> bool:
        return digest in self._pos

    def __len__(self) -> int:
        return len(self._pos)


def source_places(p: Plan, wanted: Sequence[str] | None = None) -> SourcePlaces:
    """:class:`SourcePlaces` of ``p``'s dataset (of ``wanted`` only, if given)."""
    return SourcePlaces(p, wanted)


def load_places(
    p: Plan, places: Sequence[tuple[str, int]], pool: ThreadPoolExecutor | None
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str, str]]]:
    """Decode and resize the images at ``places`` (``(split, row)`` pairs) as ``p`` says, in runs of consecutive rows.

    Returns
    -------
    x : numpy.ndarray
        ``float32 (len(places), size, size, 3)``; zeros where an image failed.
    valid : numpy.ndarray
        ``bool (len(places),)``.
    failures : list of (position, "split/id", reason)
    """
    spec = p.spec
    x = np.zeros((len(places), spec.input_size, spec.input_size, 3), dtype=np.float32)
    valid = np.ones(len(places), dtype=bool)
    failures: list[tuple[int, str, str]] = []
    start = 0
    while start < len(places):
        split_name, first = places[start]
        stop = start + 1
        while stop < len(places) and places[stop] == (split_name, first + stop - start):
            stop += 1
        split = p.dataset.splits[split_name]
        x[start:stop], valid[start:stop], fails = load_resized(
            split,
            first,
            first + stop - start,
            size=spec.input_size,
            method=spec.resize,
            pool=pool,
            decode=spec.decode,
            antialias=spec.antialias,
        )
        by_id = dict(fails)
        failures.extend(
            (start + j, f"{split_name}/{split.ids[first + j]}", by_id[split.ids[first + j]])
            for j in range(stop - start)
            if not valid[start + j]
        )
        start = stop
    return x, valid, failures


#: At most this many bytes of resized images are prefetched (and at most PREFETCH_ROWS images).
PREFETCH_BYTES = 64 << 20
PREFETCH_ROWS = 1024


class Prefetch:
    """The first images an extraction computes, decoded and resized while its model is built.

    Building a Keras model (and tracing it) is seconds of Python holding the GIL on one core,
    while decoding and resizing release it: without this, the decode threads sat idle through
    both, and an extraction of a few dozen camera photos was mostly serial. The rows are the
    bytes ``load_places`` gives (it is what they are made with); the unit that needs a digest
    takes its row, and the rest of its images are decoded as usual. Memory is bounded by
    :data:`PREFETCH_BYTES`.
    """

    def __init__(self, p: Plan, digests: Sequence[str], *, workers: int | None, batch_size: int) -> None:
        from featurecache.data import decode_workers

        row_bytes = p.spec.input_size**2 * 3 * 4
        digests = list(digests[: max(1, min(PREFETCH_ROWS, PREFETCH_BYTES // row_bytes))])
        places = source_places(p, wanted=digests)
        self._pool = ThreadPoolExecutor(workers or decode_workers(), thread_name_prefix="fc-decode-early")
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="fc-prefetch")
        self._rows: dict[str, tuple[Future, int]] = {}
        step = max(1, int(batch_size))
        for b in range(0, len(digests), step):  # in batches, so the first unit waits only for its own rows
            chunk = digests[b : b + step]
            fut = self._thread.submit(load_places, p, [places[d] for d in chunk], self._pool)
            self._rows.update((d, (fut, j)) for j, d in enumerate(chunk))

    def take_all(self, digests: Sequence[str]) -> dict[int, tuple[np.ndarray, bool, tuple[str, str] | None]]:
        """Position in ``digests`` -> (row, valid, ("split/id", reason) or None), for the prefetched ones (removed from here)."""
        out = {}
        for j, d in enumerate(digests):
            entry = self._rows.pop(d, None)
            if entry is None:
                continue
            fut, k = entry
            x, valid, fails = fut.result()
            failure = next(((where, reason) for pos, where, reason in fails if pos == k), None)
            out[j] = (x[k], bool(valid[k]), failure)
        return out

    def close(self) -> None:
        """Stop decoding what nobody took and free the threads (idempotent)."""
        for fut, _ in self._rows.values():
            fut.cancel()
        self._rows.clear()
        self._thread.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)


#: Decoded images of at most this many pixels are resized together, one ``tf.image.resize``
#: call per shape and unit: for small images a per-image call costs more in op dispatch than
#: in arithmetic. Larger images are resized in their decode thread, so a unit never holds
#: many full-size photos at once.
BATCH_RESIZE_MAX_PIXELS = 512 * 512
#: Most float32 bytes one batched resize call takes as input.
RESIZE_BATCH_BYTES = 64 << 20


def load_resized(
    split: Any,
    start: int,
    stop: int,
    *,
    size: int,
    method: str,
    pool: ThreadPoolExecutor | None = None,
    max_batch_pixels: int = BATCH_RESIZE_MAX_PIXELS,
    decode: str = "exact",
    antialias: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Decode rows ``[start, stop)`` of ``split`` and resize them to ``size x size``.

    The result is bit-identical to ``resize_image(split.load(i, draft=...), size,
    method=method, antialias=antialias)`` row by row (``tf.image.resize`` computes each image of a batch independently), but array
    datasets are sliced and resized in a few batched calls, and small decoded files are
    grouped by shape and resized together.

    Parameters
    ----------
    split
        A :class:`featurecache.data.Split`.
    start, stop
        Row range.
    size
        Output height and width.
    method
        Resize method (one of ``featurecache.data.RESIZE_METHODS``).
    pool
        Threads that decode files in parallel; ``None`` decodes in this thread.
    max_batch_pixels
        Decoded files up to this many pixels are resized in batches; larger ones one by one
        in their decode thread.
    decode
        ``exact`` decodes every pixel; ``fast`` passes ``draft=size`` to the decoder, so
        large JPEGs are decoded at reduced DCT scale (see ``featurecache.data.decode_image``).
    antialias
        Passed to ``resize_image``.

    Returns
    -------
    x : numpy.ndarray
        ``float32 (stop - start, size, size, 3)``; zeros where an image failed to decode.
    valid : numpy.ndarray
        ``bool (stop - start,)``.
    failures : list of (id, reason)
        The images that failed to decode.
    """
    from featurecache.data import resize_image
    from featurecache.data.decode import drop_channels

    draft = size if decode == "fast" else None
    n = stop - start
    x = np.zeros((n, size, size, 3), dtype=np.float32)
    valid = np.ones(n, dtype=bool)
    failures: list[tuple[str, str]] = []
    block = split.items.load_range(start, stop)
    if block is not None:
        # Already decoded and in memory: resize the unit's slice instead of image by image.
        _resize_into(x, np.arange(n), block, size=size, method=method, antialias=antialias)
        return x, valid, failures

    def load(i: int) -> tuple[np.ndarray | None, bool, str | None]:
        try:
            img = split.load(i, draft=draft)
        except ImageDecodeError as exc:
            return None, False, str(exc)
        if img.shape[0] * img.shape[1] > max_batch_pixels:
            return resize_image(img, size, method=method, antialias=antialias), True, None
        # Grouped with others of its shape and resized as one batch: packed here, in the decode
        # thread, since np.stack of 4-byte-pixel views (decode_image's JPEGs) copies 5x slower.
        return (img if img.flags.c_contiguous else drop_channels(img)), False, None

    rows = range(start, stop)
    loaded = list(pool.map(load, rows)) if pool is not None else [load(i) for i in rows]
    groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    for j, (img, resized, err) in enumerate(loaded):
        if img is None:
            valid[j] = False
            failures.append((split.ids[start + j], err or "undecodable"))
        elif resized:
            x[j] = img
        else:
            groups.setdefault(img.shape, []).append((j, img))
    for group in groups.values():
        _resize_into(
            x,
            np.asarray([j for j, _ in group]),
            [img for _, img in group],
            size=size,
            method=method,
            antialias=antialias,
        )
    return x, valid, failures


def _resize_into(
    out: np.ndarray,
    positions: np.ndarray,
    images: Sequence[np.ndarray] | np.ndarray,
    *,
    size: int,
    method: str,
    antialias: bool = False,
) -> None:
    """``out[positions] = resize(images)`` for same-shape images, in calls of bounded memory."""
    from featurecache.data import resize_image

    if len(positions) == 0:
        return
    first = np.asarray(images[0])
    per = max(1, RESIZE_BATCH_BYTES // max(1, first.shape[0] * first.shape[1] * 3 * 4))
    for b in range(0, len(positions), per):
        batch = np.stack(images[b : b + per]) if isinstance(images, list) else np.asarray(images[b : b + per])
        out[positions[b : b + per]] = resize_image(batch, size, method=method, antialias=antialias)


def forward_in_batches(
    forward: Callable[[np.ndarray], Any],
    x: np.ndarray,
    *,
    batch_size: int,
    feature_shape: Sequence[int] = (),
    pad: bool = False,
) -> tuple[np.ndarray, int]:
    """Run ``forward`` over ``x`` in batches, halving the batch whenever memory runs out.

    Parameters
    ----------
    forward
        Maps a batch ``(b, ...)`` to its features ``(b, *feature_shape)``.
    x
        All inputs.
    batch_size
        Largest batch to try first.
    feature_shape
        Shape of one row's features, for an empty ``x``.
    pad
        Pad a short last batch with zeros to ``batch_size`` rows: backbones on CPU give
        results that depend on the batch *size* at round-off level (not on the other rows'
        values), so a fixed size makes each row's features independent of its batch-mates.

    Returns
    -------
    features : numpy.ndarray
        ``(len(x), *feature_shape)``, in order.
    batch_size : int
        The batch size that worked: callers pass it on, so the next unit does not run out again.

    Raises
    ------
    OutOfMemoryError
        ``forward`` raises ``tf.errors.ResourceExhaustedError`` even for one image.
    """
    import tensorflow as tf

    from featurecache.errors import OutOfMemoryError

    out: list[np.ndarray] = []
    batch_size = max(1, int(batch_size))
    b = 0
    while b < len(x):
        take = min(batch_size, len(x) - b)
        batch = x[b : b + take]
        if pad and take < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - take, *x.shape[1:]), dtype=x.dtype)])
        try:
            out.append(np.asarray(forward(batch))[:take])
        except tf.errors.ResourceExhaustedError as exc:
            if batch_size == 1:
                raise OutOfMemoryError(
                    f"the backbone ran out of memory on a batch of 1 image of shape {tuple(x.shape[1:])} "
                    f"({' '.join(str(exc).split())[:160]}); free device memory, or use a smaller --size, "
                    "a smaller backbone or --precision mixed"
                ) from None
            # Retry the same rows in halves: a batch either fits or is never stored, so nothing is lost.
            batch_size = max(1, min(take, batch_size) // 2)
            continue
        b += take
    if not out:
        return np.zeros((0, *feature_shape), dtype=np.float32), batch_size
    return np.concatenate(out, axis=0), batch_size


def compiled_forward(
    model: Any, size: int, *, jit_compile: bool = False, trace: bool = False
) -> Callable[[np.ndarray], Any]:
    """``model(x, training=False)`` as one traced function for any batch size (XLA-compiled if asked).

    With ``trace=True`` the function is traced now rather than at its first call (the same
    graph either way: the signature is fixed), so the caller chooses when that second or so
    of single-threaded Python happens.
    """
    import tensorflow as tf

    fn = tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)],
        reduce_retracing=True,
        jit_compile=bool(jit_compile),
    )
    if trace:
        fn.get_concrete_function()
    return lambda x: fn(tf.convert_to_tensor(x, dtype=tf.float32)).numpy()
