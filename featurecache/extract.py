"""Stage 1: run a frozen backbone once over a dataset and store its features.

``plan`` turns user options into a :class:`~featurecache.cache.keys.FeatureSpec` without
building a model, so a cache hit costs a dataset digest (memoised) and a directory lookup.
On a miss, one process takes the entry's lease, builds the model, creates the entry and runs
the write units that have no completion marker. The units flow through a small pipeline:
images are decoded and resized in a thread pool and prefetched while the backbone runs on
the previous unit, and a writer thread stores finished units, so the backbone rarely waits
on Pillow or Zarr. Sample ``i`` of view ``v`` is augmented from ``(seed, v, i)`` alone, so a
resumed run writes exactly the bytes an uninterrupted one would.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from featurecache.cache import store
from featurecache.cache.keys import FeatureSpec
from featurecache.errors import ImageDecodeError, LeaseError, UsageError

OnError = Literal["skip", "fail"]


@dataclass(frozen=True)
class Plan:
    """Everything needed to extract one feature set, resolved but not yet run."""

    spec: FeatureSpec
    dataset: Any  # featurecache.data.Dataset
    backbone: Any  # featurecache.backbones.BackboneSpec
    weights: Any  # featurecache.backbones.WeightsRef
    cache_dir: Path
    augment: Any  # featurecache.data.AugmentSpec
    # How the user named the weights and the subset: not keyed (the spec holds their
    # digests), but stored so `finetune` can rebuild the backbone and reload the images.
    weights_source: str = ""
    limit: int | None = None

    @property
    def key(self) -> str:
        """The content key of the planned feature set."""
        return self.spec.key


@dataclass(frozen=True)
class ExtractResult:
    """What ``extract`` produced."""

    key: str
    name: str
    path: Path
    cached: bool
    splits: dict[str, dict[str, Any]]
    seconds: float
    failures: list[dict[str, str]] = field(default_factory=list)
    skipped_files: int = 0

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "key": self.key,
            "name": self.name,
            "path": str(self.path),
            "cached": self.cached,
            "splits": self.splits,
            "seconds": round(self.seconds, 3),
            "invalid": len(self.failures),
            "skipped_files": self.skipped_files,
        }


def plan(
    data: str | Any,
    *,
    backbone: str = "vgg19",
    weights: str = "imagenet",
    size: int | None = None,
    layer: str | None = None,
    pooling: str = "avg",
    resize: str = "bilinear",
    augment: str | None = None,
    views: int = 0,
    augment_splits: Sequence[str] = ("train",),
    seed: int = 0,
    dtype: str = "float32",
    cache_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> Plan:
    """Resolve extraction options into a :class:`Plan` and its key, building no model.

    Parameters are those of :func:`extract`.

    Raises
    ------
    UnknownBackboneError, BackboneError, AugmentSpecError, DatasetError, UsageError
        On bad options, with the valid choices in the message.
    """
    from featurecache import backbones
    from featurecache.data import RESIZE_METHODS, AugmentSpec, Dataset, load_dataset

    root = store.resolve_cache_dir(cache_dir)
    bspec = backbones.get_backbone(backbone)
    input_size = int(size or bspec.default_size)
    backbones.check_input_size(bspec, input_size)
    if resize not in RESIZE_METHODS:
        raise UsageError(f"resize method {resize!r} is not one of {', '.join(RESIZE_METHODS)}; pass --resize bilinear")
    aug = AugmentSpec.parse(augment)
    if views < 0:
        raise UsageError(f"--views must be >= 0, got {views}")
    if views > 0 and aug.is_identity():
        raise UsageError(f"--views {views} needs an augmentation to make the views differ; pass e.g. --augment flip,rotation=10")
    ref = backbones.parse_weights(weights, seed=seed)
    dataset = data if isinstance(data, Dataset) else load_dataset(str(data), memo_dir=store.memo_dir(root), limit=limit)
    spec = FeatureSpec(
        dataset_digest=dataset.digest(),
        backbone=bspec.name,
        weights=backbones.weights_identity(ref, bspec, memo_dir=store.memo_dir(root)),
        layer=layer or bspec.feature_layer,
        pooling=pooling,
        input_size=input_size,
        resize=resize,
        preprocess=f"{bspec.module}:{bspec.preprocess}",
        augment=aug.canonical() if views else {},
        views=int(views),
        augment_splits=tuple(augment_splits) if views else (),
        seed=int(seed),
        dtype=dtype,
        dataset_name=dataset.name,
        weights_label=_weights_label(ref),
    )
    return Plan(spec=spec, dataset=dataset, backbone=bspec, weights=ref, cache_dir=root, augment=aug, weights_source=str(weights), limit=limit)


def _weights_label(ref: Any) -> str:
    if ref.kind == "file":
        return Path(ref.path).name.split(".")[0]
    return ref.kind


def extract(
    data: str | Any,
    *,
    backbone: str = "vgg19",
    weights: str = "imagenet",
    size: int | None = None,
    layer: str | None = None,
    pooling: str = "avg",
    resize: str = "bilinear",
    augment: str | None = None,
    views: int = 0,
    augment_splits: Sequence[str] = ("train",),
    seed: int = 0,
    dtype: str = "float32",
    batch_size: int = 32,
    cache_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    on_error: OnError = "skip",
    workers: int | None = None,
    chunk_rows: int | None = None,
    lease_timeout: float | None = None,
    progress: bool = True,
) -> ExtractResult:
    """Extract (or find in the cache) the features of ``data`` under ``backbone``.

    Parameters
    ----------
    data
        Dataset source: a folder of class sub-folders, a CSV manifest, an ``.npz``,
        ``keras:cifar10`` etc., ``builtin:digits``, or a loaded ``Dataset``.
    backbone
        A registry name (``featurecache backbones`` lists them).
    weights
        ``imagenet``, ``random`` (seeded by ``seed``) or a local weights file.
    size
        Square input size; default the backbone's.
    layer
        Layer whose output is stored; default the backbone's bottleneck layer.
    pooling
        ``avg``, ``max``, ``flatten`` or ``none`` (keep the spatial map).
    resize
        Resize method (``bilinear``, ``nearest``, ``bicubic``, ``area``, ...).
    augment
        Augmentation spec for views 1..K, e.g. ``"flip,rotation=15,zoom=0.1"``.
    views
        Number of augmented views K per image of the ``augment_splits``.
    augment_splits
        Splits that get augmented views (default train only).
    seed
        Seed of augmentation and random weights.
    dtype
        Stored dtype, ``float32`` or ``float16``.
    batch_size
        Backbone batch size.
    cache_dir
        Cache root (default ``$FEATURECACHE_DIR`` or ``./cache``).
    limit
        At most this many images per split (stratified, deterministic).
    on_error
        ``skip`` marks undecodable images invalid and goes on; ``fail`` stops at the first.
    workers
        Decode threads (default ``min(8, 2 * cores)``).
    chunk_rows
        Rows per chunk and write unit (default: chunks of about 1 MiB).
    lease_timeout
        Seconds to wait for another process extracting the same key (default: forever
        while it is alive).
    progress
        Show a progress bar on stderr.

    Returns
    -------
    ExtractResult
        Key, path, whether it was a cache hit, split shapes, invalid images.

    Raises
    ------
    FeatureCacheError
        Bad options, unreadable data, offline weights, a full disk, or (with
        ``on_error="fail"``) an undecodable image. Finished units are always kept.
    """
    if on_error not in ("skip", "fail"):
        raise UsageError(f"--on-error must be 'skip' or 'fail', got {on_error!r}")
    started = time.perf_counter()
    p = plan(
        data, backbone=backbone, weights=weights, size=size, layer=layer, pooling=pooling, resize=resize,
        augment=augment, views=views, augment_splits=augment_splits, seed=seed, dtype=dtype,
        cache_dir=cache_dir, limit=limit,
    )
    hit = store.find_by_key(p.cache_dir, p.key)
    if hit is not None and hit.complete:
        return _result(hit, cached=True, started=started, plan_=p)

    lease = store.Lease(p.cache_dir, p.key)
    _wait_for_lease(lease, p, timeout=lease_timeout, progress=progress)
    try:
        hit = store.find_by_key(p.cache_dir, p.key)
        if hit is not None and hit.complete:  # another process finished it while we waited
            return _result(hit, cached=True, started=started, plan_=p)
        fs = _run(p, existing=hit, batch_size=batch_size, on_error=on_error, workers=workers, chunk_rows=chunk_rows, progress=progress)
    finally:
        lease.release()
    return _result(fs, cached=False, started=started, plan_=p)


def _wait_for_lease(lease: store.Lease, p: Plan, *, timeout: float | None, progress: bool) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    told = False
    while not lease.try_acquire():
        if lease.is_stale():
            lease.break_stale()
            continue
        if not told and progress:
            holder = lease.holder() or {}
            print(
                f"waiting for another process (pid {holder.get('pid', '?')} on {holder.get('host', '?')}) extracting {p.spec.entry_name()}",
                file=sys.stderr,
            )
            told = True
        if deadline is not None and time.monotonic() > deadline:
            raise LeaseError(
                f"another process still holds the lease on {p.spec.entry_name()} after {timeout:.0f} s; "
                f"wait for it, or remove {lease.path} if that process is gone"
            )
        # Once the holder finishes it releases the lease; we then take it and find the entry complete.
        time.sleep(0.2)


def _result(fs: store.FeatureSet, *, cached: bool, started: float, plan_: Plan) -> ExtractResult:
    splits = {}
    for s in fs.splits:
        lay = fs.layout(s)
        splits[s] = {"n": lay.n, "views": lay.views, "shape": [lay.views, lay.n, *lay.feature_shape]}
    return ExtractResult(
        key=fs.key,
        name=fs.name,
        path=fs.path,
        cached=cached,
        splits=splits,
        seconds=time.perf_counter() - started,
        failures=fs.failures(),
        skipped_files=len(plan_.dataset.skipped),
    )


def library_versions() -> dict[str, str]:
    """Versions recorded (not keyed) in every entry."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("featurecache", "tensorflow", "keras", "numpy", "zarr", "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _clean_partials(path: Path) -> None:
    """Remove temporary files a killed writer left behind (they are never read)."""
    for tmp in path.rglob("*.partial"):
        tmp.unlink(missing_ok=True)


def _run(
    p: Plan,
    *,
    existing: store.FeatureSet | None,
    batch_size: int,
    on_error: OnError,
    workers: int | None,
    chunk_rows: int | None,
    progress: bool,
) -> store.FeatureSet:
    from featurecache import backbones

    model = backbones.build_feature_model(
        p.backbone, p.weights, input_size=p.spec.input_size, layer=p.spec.layer, pooling=p.spec.pooling
    )
    feature_shape = tuple(int(d) for d in model.output_shape[1:])
    if existing is None:
        splits = {name: (s.labels, s.ids) for name, s in p.dataset.splits.items()}
        existing = store.create_entry(
            p.cache_dir,
            p.spec,
            classes=p.dataset.classes,
            splits=splits,
            feature_shape=feature_shape,
            chunk_rows=chunk_rows,
            extra={
                "versions": library_versions(),
                "dataset_source": p.dataset.source,
                "dataset_limit": p.limit,
                "weights_source": p.weights_source,
                "skipped_files": [list(s) for s in p.dataset.skipped],
            },
        )
    elif existing.feature_shape != feature_shape:
        raise store.CacheCorruptError(
            f"{existing.name} stores features of shape {existing.feature_shape} but the model gives {feature_shape}; "
            f"remove it with `featurecache cache rm {existing.key[:12]} --yes`"
        )
    fs = existing
    _clean_partials(fs.path)
    units = fs.missing_units()
    if units:
        runner = _UnitRunner(p, fs, model, batch_size=batch_size, on_error=on_error, workers=workers)
        runner.run(units, progress=progress)
    store.seal(fs)
    return fs


class _UnitRunner:
    """Decode → resize → augment → preprocess → backbone → write, overlapped across units."""

    def __init__(self, p: Plan, fs: store.FeatureSet, model: Any, *, batch_size: int, on_error: OnError, workers: int | None) -> None:
        self.p = p
        self.fs = fs
        self.batch_size = max(1, int(batch_size))
        self.on_error = on_error
        self.workers = workers or min(8, 2 * (os.cpu_count() or 1))
        self.forward = _compiled_forward(model, p.spec.input_size)

    def _prepare(self, unit: store.Unit, pool: ThreadPoolExecutor) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
        from featurecache import backbones
        from featurecache.data import augment_batch, resize_image

        split = self.p.dataset.splits[unit.split]
        size = self.p.spec.input_size

        def load(i: int) -> tuple[np.ndarray | None, str | None]:
            try:
                return resize_image(split.load(i), size, method=self.p.spec.resize), None
            except ImageDecodeError as exc:
                return None, str(exc)

        rows = list(range(unit.start, unit.stop))
        loaded = list(pool.map(load, rows))
        x = np.zeros((len(rows), size, size, 3), dtype=np.float32)
        valid = np.ones(len(rows), dtype=bool)
        failures: list[tuple[str, str]] = []
        for j, (img, err) in enumerate(loaded):
            if img is None:
                valid[j] = False
                failures.append((split.ids[rows[j]], err or "undecodable"))
            else:
                x[j] = img
        if failures and self.on_error == "fail":
            sid, reason = failures[0]
            raise ImageDecodeError(f"{unit.split}/{sid}: {reason}; fix or remove the file, or pass --on-error skip to mark it invalid and go on")
        if unit.view > 0:
            x = augment_batch(x, self.p.augment, seed=self.p.spec.seed, view=unit.view, indices=rows)
        return backbones.preprocess_input(self.p.backbone, x), valid, failures

    def _features(self, x: np.ndarray, valid: np.ndarray) -> np.ndarray:
        out = []
        for b in range(0, len(x), self.batch_size):
            out.append(np.asarray(self.forward(x[b : b + self.batch_size])))
        feats = np.concatenate(out, axis=0) if out else np.zeros((0, *self.fs.feature_shape), np.float32)
        feats[~valid] = 0  # invalid rows hold zeros, never features of a placeholder image
        return feats.astype(self.p.spec.dtype, copy=False)

    def run(self, units: list[store.Unit], *, progress: bool) -> None:
        total = sum(u.stop - u.start for u in units)
        with _progress(progress, total, f"extract {self.fs.name}") as advance, ThreadPoolExecutor(
            self.workers, thread_name_prefix="fc-decode"
        ) as pool, ThreadPoolExecutor(1, thread_name_prefix="fc-prep") as prep, ThreadPoolExecutor(
            1, thread_name_prefix="fc-write"
        ) as writer:
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
                    while pending_writes and (pending_writes[0].done() or len(pending_writes) >= 2):
                        # Bounds memory (at most two units queued for disk) and surfaces write errors early.
                        pending_writes.pop(0).result()
                    pending_writes.append(
                        writer.submit(
                            store.write_unit, self.fs, unit, feats,
                            valid=valid if unit.view == 0 else None, failures=failures if unit.view == 0 else (),
                        )
                    )
                    advance(unit.stop - unit.start)
            finally:
                for q_unit, q_fut in queue:
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


def _compiled_forward(model: Any, size: int) -> Callable[[np.ndarray], Any]:
    """``model(x, training=False)`` as one traced function for any batch size."""
    import tensorflow as tf

    fn = tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)],
        reduce_retracing=True,
    )
    return lambda x: fn(tf.convert_to_tensor(x, dtype=tf.float32)).numpy()


class _progress:
    """A rich progress bar on stderr showing images/s, or nothing."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.enabled = enabled and total > 0
        self.total = total
        self.label = label

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} img/s"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._bar.__enter__()
        self._task = self._bar.add_task(self.label[:60], total=self.total, rate="-")
        self._t0 = time.perf_counter()
        self._done = 0

        def advance(n: int) -> None:
            self._done += n
            rate = self._done / max(time.perf_counter() - self._t0, 1e-9)
            self._bar.update(self._task, advance=n, rate=f"{rate:,.0f}")

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bar.__exit__(*exc)
