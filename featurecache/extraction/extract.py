"""Stage 1: run a frozen backbone once over a dataset and store its features.

``plan`` turns user options into a :class:`~featurecache.cache.keys.FeatureSpec` and a
dataset without building a model, so a cache hit costs a dataset digest (memoised) and a
directory lookup. On a miss, one process takes the feature store's lease, plans the image
digests the store lacks (per view), and runs them as write units with completion markers;
then it writes the dataset view. A relabelled or re-split dataset has nothing to compute and
does not even build the model. The units flow through a small pipeline: images are decoded
and resized in a thread pool and prefetched while the backbone runs on the previous unit, and
a writer thread stores finished units. Augmented view ``v`` of an image is drawn from
``(seed, v, image digest)`` alone, and every backbone batch is padded to the same size, so an
image's bytes never depend on its position, its batch-mates or a crash and resume.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurecache._runtime.versions import library_versions
from featurecache.cache import store
from featurecache.cache import views as views_mod
from featurecache.cache.faults import checkpoint
from featurecache.cache.keys import FeatureSpec
from featurecache.cache.lease import Lease, NoLease
from featurecache.cache.storage import Location
from featurecache.errors import (
    CacheCorruptError,
    EntryNotFoundError,
    IncompleteEntryError,
    UsageError,
    WeightsUnavailableError,
)
from featurecache.extraction.options import KEYED_FIELDS, ExtractOptions, expands_options
from featurecache.extraction.pipeline import (  # noqa: F401 - the pipeline's public pieces stay importable from here
    Plan,
    Prefetch,
    UnitRunner,
    build_model,
    compiled_forward,
    forward_in_batches,
    load_resized,
    make_runner,
    unit_record,
)


@dataclass(frozen=True)
class ExtractResult:
    """What ``extract`` produced.

    ``computed`` counts image views sent through the backbone by this call; ``reused`` the image
    views of the feature set served from rows already in the cache (a duplicate image counts
    once as computed, then as reused).
    """

    key: str
    name: str
    path: Location
    cached: bool
    splits: dict[str, dict[str, Any]]
    seconds: float
    failures: list[dict[str, str]] = field(default_factory=list, repr=False)
    skipped_files: int = 0
    computed: int = 0
    reused: int = 0
    #: Units of other shards still without a marker (a shard that finished before the others).
    pending: int = 0

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
            "computed": self.computed,
            "reused": self.reused,
            **({"pending": self.pending} if self.pending else {}),
        }


@expands_options(*KEYED_FIELDS)
def plan(
    data: str | Any,
    options: ExtractOptions | None = None,
    *,
    cache_dir: str | os.PathLike[str] | Location | None = None,
    limit: int | None = None,
    **overrides: Any,
) -> Plan:
    """Resolve extraction options into a :class:`Plan` and its key, building no model.

    Parameters are those of :func:`extract`; only the keyed options matter here.

    Raises
    ------
    UnknownBackboneError, BackboneError, AugmentSpecError, DatasetError, UsageError
        On bad options, with the valid choices in the message.
    """
    from featurecache import backbones
    from featurecache.data import AugmentSpec, Dataset, load_dataset

    o = ExtractOptions.merge(options, overrides, allowed=KEYED_FIELDS, caller="plan")  # checks every value
    root = store.resolve_cache_dir(cache_dir)
    bspec = backbones.get_backbone(o.backbone)
    input_size = int(o.size or bspec.default_size)
    backbones.check_input_size(bspec, input_size)
    aug = AugmentSpec.parse(o.augment)
    ref = backbones.parse_weights(o.weights, seed=o.seed)
    dataset = data if isinstance(data, Dataset) else load_dataset(str(data), memo_dir=store.memo_dir(root), limit=limit)
    spec = FeatureSpec(
        backbone=bspec.name,
        weights=backbones.weights_identity(ref, bspec, memo_dir=store.memo_dir(root)),
        layer=o.layer or bspec.feature_layer,
        pooling=o.pooling,
        input_size=input_size,
        resize=o.resize,
        preprocess=f"{bspec.module}:{bspec.preprocess}",
        augment=aug.canonical() if o.views else {},
        views=int(o.views),
        augment_splits=o.augment_splits if o.views else (),
        seed=int(o.seed),
        dtype=o.dtype,
        precision=o.precision,
        decode=o.decode,
        antialias=bool(o.antialias),
        weights_label=_weights_label(ref),
    )
    return Plan(
        spec=spec,
        dataset=dataset,
        backbone=bspec,
        weights=ref,
        cache_dir=root,
        augment=aug,
        weights_source=str(o.weights),
        limit=limit,
    )


def _weights_label(ref: Any) -> str:
    if ref.kind == "file":
        return Path(ref.path).name.split(".")[0]
    return ref.kind


@expands_options()
def extract(
    data: str | Any,
    options: ExtractOptions | None = None,
    *,
    cache_dir: str | os.PathLike[str] | Location | None = None,
    limit: int | None = None,
    chunk_rows: int | None = None,
    lease_timeout: float | None = None,
    progress: bool = True,
    client: Any = None,
    units_per_task: int = 4,
    shard: tuple[int, int] | None = None,
    lease: bool = True,
    **overrides: Any,
) -> ExtractResult:
    """Extract (or find in the cache) the features of ``data`` under ``backbone``.

    Only images the feature store does not hold yet go through the backbone: features are
    stored once per (feature spec, image content), and the dataset's splits, ids, labels and
    order are a view over them, so a grown, relabelled, re-split or renamed dataset costs only
    its new images.

    Parameters
    ----------
    data
        Dataset source: a folder of class sub-folders, a CSV manifest, an ``.npz``,
        ``keras:cifar10`` etc., ``builtin:digits``, or a loaded ``Dataset``.
    options
        An :class:`~featurecache.options.ExtractOptions` holding the options below from
        ``backbone`` to ``on_error`` (default: all defaults). Each of them may also be passed
        as a keyword, which wins over ``options``.
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
        Number of augmented views K per image of the ``augment_splits`` (at most 64).
    augment_splits
        Splits that get augmented views (default train only).
    seed
        Seed of augmentation and random weights.
    dtype
        Stored dtype, ``float32`` or ``float16``.
    precision
        Backbone compute precision: ``float32``, or ``mixed`` (Keras's ``mixed_float16``
        policy: float16 maths with float32 weights, about twice as fast on GPUs with tensor
        cores). Part of the key, since it changes the numbers.
    decode
        ``exact`` decodes every pixel (the pixels plain Keras sees); ``fast`` decodes JPEGs
        at least twice ``size`` at reduced DCT scale (1/2, 1/4, 1/8) that still covers
        ``size``, several times faster on camera photos. Keyed (see README, "Decoding").
    antialias
        Filter the whole footprint when shrinking (``tf.image.resize(antialias=True)``)
        instead of bilinear sampling of the nearest pixels. Keyed.
    batch_size
        Backbone batch size; every batch is padded to it, so an image's features do not depend
        on which other images share its batch. Halved and retried whenever the device runs
        out of memory.
    cache_dir
        Cache root (default ``$FEATURECACHE_DIR`` or ``./cache``).
    limit
        At most this many images per split (stratified, deterministic).
    on_error
        ``skip`` marks undecodable images invalid and goes on; ``fail`` stops at the first.
    workers
        Decode threads (default ``featurecache.data.decode_workers()``: one per core this process may use).
    chunk_rows
        Rows per chunk and write unit of a new feature store (default: a multiple of
        ``batch_size`` near 1 MiB chunks); an existing store keeps its own.
    lease_timeout
        Seconds to wait for another process extracting with the same spec (default: as long
        as it is alive).
    xla
        Compile the backbone with XLA (``jit_compile``). Default: on when TensorFlow sees a
        GPU, off on CPU. Round-off only, so recorded per unit, not keyed.
    progress
        Show a progress bar on stderr (it counts only the images really computed).
    client
        A ``dask.distributed.Client``: this process plans, holds the lease and writes the
        view, and the cluster's workers run the units (the cache root must be a path every
        worker sees). See :mod:`featurecache.cluster`.
    units_per_task
        Consecutive write units per Dask task (with ``client``).
    shard
        ``(i, N)``: run only the units with index ``i`` modulo ``N`` of a plan shared through
        the cache, for N processes started without a scheduler; the shard that finds every
        unit done writes the view (see :mod:`featurecache.shards`).
    lease
        False (``--no-lease``): take no lease on the feature store, for a cache that only this
        process writes, on an object store without conditional writes.

    Returns
    -------
    ExtractResult
        Key, path, whether it was a cache hit, split shapes, invalid images, and how many
        image views were computed and reused.

    Raises
    ------
    FeatureCacheError
        Bad options, unreadable data, offline weights, a full disk, or (with
        ``on_error="fail"``) an undecodable image. Finished units are always kept.
    """
    o = ExtractOptions.merge(options, overrides, caller="extract")  # every value checked before any work
    started = time.perf_counter()
    p = plan(data, o, cache_dir=cache_dir, limit=limit)
    if client is not None:  # many files not in the digest memo: the cluster reads them
        from featurecache.extraction import cluster

        p.dataset.prefetch_digests(cluster.file_hasher(client))
    hit = views_mod.find_by_key(p.cache_dir, p.key)
    if hit is not None:
        return _result(hit, cached=True, started=started, plan_=p)

    if client is not None and shard is not None:
        raise UsageError("pass either a Dask client (--cluster/--scheduler) or --shard, not both")
    lease_ = (Lease if lease else NoLease)(p.cache_dir, p.spec.key)

    def tell(holder: dict[str, Any]) -> None:
        if progress:
            print(
                f"waiting for another process (pid {holder.get('pid', '?')} on {holder.get('host', '?')}) extracting with {p.spec.store_name()}",
                file=sys.stderr,
            )

    if shard is not None:
        from featurecache.extraction import shards

        return _extract_shard(
            p,
            shards.check_shard(shard),
            o,
            lease=lease_,
            lease_timeout=lease_timeout,
            tell=tell,
            started=started,
            chunk_rows=chunk_rows,
            progress=progress,
        )
    lease_.wait(timeout=lease_timeout, on_wait=tell)
    try:
        store.remove_leftovers(p.cache_dir, p.spec.key)  # debris of killed runs of this store; ours now
        hit = views_mod.find_by_key(p.cache_dir, p.key)
        if hit is not None:  # another process made the same view while we waited
            return _result(hit, cached=True, started=started, plan_=p)
        st, computed, compute = _run(
            p, o, chunk_rows=chunk_rows, progress=progress, client=client, units_per_task=units_per_task
        )
        fs = _write_view(p, st, computed=computed, compute=compute)
    finally:
        lease_.release()
    return _result(fs, cached=False, started=started, plan_=p, computed=computed)


@expands_options()
def features_for(
    data: str | Any,
    options: ExtractOptions | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    extract_missing: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> views_mod.FeatureSet:
    """The cached feature set of ``data`` under these extract options: features by options, not by key.

    A hit costs what a repeated ``extract`` costs (a dataset digest and a lookup; no model, no
    TensorFlow). ``train-head`` and ``sweep`` use it when given ``--data --backbone ...``
    instead of ``--features KEY``.

    Parameters
    ----------
    data
        The dataset source (or a loaded ``Dataset``), as for :func:`extract`.
    options
        The :class:`~featurecache.options.ExtractOptions` the features were extracted with;
        its fields may also be passed (or overridden) as keywords, as for :func:`extract`.
    cache_dir
        Cache root (default ``$FEATURECACHE_DIR`` or ``./cache``).
    limit
        The ``limit`` the features were extracted with.
    extract_missing
        Extract the features when they are not cached (only the images the store lacks are
        computed) instead of raising.
    progress
        With ``extract_missing``, show the extraction's progress bar.

    Returns
    -------
    FeatureSet

    Raises
    ------
    EntryNotFoundError
        The features are not in the cache (and ``extract_missing`` is False); the message
        gives the ``featurecache extract ...`` command that makes them.
    FeatureCacheError
        Bad options or data, as :func:`extract` raises.
    """
    o = ExtractOptions.merge(options, overrides, caller="features_for")
    try:
        p = plan(data, o, cache_dir=cache_dir, limit=limit)
    except WeightsUnavailableError as exc:
        hint = _other_weights_hint(o, cache_dir)
        if not hint:
            raise
        raise WeightsUnavailableError(f"{exc}; {hint}") from None
    fs = views_mod.find_by_key(p.cache_dir, p.key)
    if fs is not None:
        return fs
    if not extract_missing:
        source = data if isinstance(data, (str, os.PathLike)) else p.dataset.source
        command = o.to_command(os.fspath(source), limit=limit, cache=cache_dir)
        raise EntryNotFoundError(
            f"these features (key {p.key[:12]}) are not in cache {p.cache_dir}; extract them first: {command}"
        )
    res = extract(p.dataset, o, cache_dir=p.cache_dir, limit=limit, progress=progress)
    return views_mod.open_features(res.key, cache_dir=p.cache_dir)


def _other_weights_hint(o: ExtractOptions, cache_dir: str | os.PathLike[str] | None) -> str:
    """When weights cannot be had (offline ImageNet): the cached feature sets of the same backbone with other weights."""
    from featurecache import backbones

    name = backbones.get_backbone(o.backbone).name
    found = []
    for fs in views_mod.iter_entries(store.resolve_cache_dir(cache_dir)):
        spec = fs.attrs.get("spec") or {}
        label = str(spec.get("weights_label") or spec.get("weights", "")).split(":")[0]
        if spec.get("backbone") == name and label and label != o.weights:
            found.append(f"{fs.path.name} (--weights {label} --size {spec.get('input_size')})")
    if not found:
        return ""
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    return f"no {name} features with weights={o.weights} are cached; cached: {', '.join(found[:3])}{more}: pass those options, or --features KEY"


def _extract_shard(
    p: Plan,
    shard: tuple[int, int],
    o: ExtractOptions,
    *,
    lease: Lease | NoLease,
    lease_timeout: float | None,
    tell: Callable[[dict[str, Any]], None],
    started: float,
    chunk_rows: int | None,
    progress: bool,
) -> ExtractResult:
    """One shard of a sharded extraction: agree on the plan, run our units, seal if last."""
    from featurecache.extraction import shards

    model = None
    lease.wait(timeout=lease_timeout, on_wait=tell)
    try:
        hit = views_mod.find_by_key(p.cache_dir, p.key)
        if hit is not None:
            return _result(hit, cached=True, started=started, plan_=p)
        st = store.open_store(p.cache_dir, p.spec.key) if _store_readable(p) else None
        units = shards.read_plan(p.cache_dir, p.key, p.spec.key) if st is not None else None
        if units is None or not _slots_allocated(st, units):
            # First shard: nobody writes this store yet, so its debris can go, and we allocate.
            store.remove_leftovers(p.cache_dir, p.spec.key)
            st, units, model = prepare_units(p, batch_size=o.batch_size, chunk_rows=chunk_rows)
            shards.write_plan(p.cache_dir, p.key, p.spec.key, units)
    finally:
        lease.release()
    assert st is not None  # noqa: S101 - set on every path above
    done = {v: st.markers(v, refresh=True) for v in range(st.views)}
    mine = [u for u in shards.my_units(units, shard) if u.slot not in done[u.view]]
    computed, compute = 0, None
    if mine:
        runner, compute = make_runner(
            p, st, model, batch_size=o.batch_size, on_error=o.on_error, workers=o.workers, xla=o.xla
        )
        runner.run(mine, progress=progress, record=unit_record(compute, shard=f"{shard[0]}/{shard[1]}"))
        computed = sum(len(u.digests) for u in mine)
    # Listed only after our own markers are written: the last shard to get here sees them all.
    done = {v: st.markers(v, refresh=True) for v in range(st.views)}
    pending = sum(1 for u in units if u.slot not in done[u.view])
    if pending:
        return ExtractResult(
            key=p.key,
            name=p.name,
            path=shards.plan_path(p.cache_dir, p.key),
            cached=False,
            splits={},
            seconds=time.perf_counter() - started,
            computed=computed,
            pending=pending,
        )
    lease.wait(timeout=lease_timeout, on_wait=tell)
    try:
        hit = views_mod.find_by_key(p.cache_dir, p.key)
        if hit is None:
            hit = _write_view(p, st, computed=computed, compute=compute)
        shards.remove_plan(p.cache_dir, p.key)
    finally:
        lease.release()
    return _result(hit, cached=False, started=started, plan_=p, computed=computed)


def _slots_allocated(st: store.FeatureStore | None, units: Sequence[store.Unit]) -> bool:
    """Whether every unit of a shard plan has its rows in ``st`` (a removed and recreated store has not)."""
    if st is None:
        return False
    rows = {v: int(st.group[f"v{v}/features"].shape[0]) for v in range(st.views)}
    return all(u.view in rows and (u.slot + 1) * st.chunk_rows <= rows[u.view] for u in units)


def _result(fs: views_mod.FeatureSet, *, cached: bool, started: float, plan_: Plan, computed: int = 0) -> ExtractResult:
    splits = {}
    total = 0
    for s in fs.splits:
        lay = fs.layout(s)
        splits[s] = {"n": lay.n, "views": lay.views, "shape": [lay.views, lay.n, *lay.feature_shape]}
        total += lay.n * lay.views
    return ExtractResult(
        key=fs.key,
        name=fs.name,
        path=fs.path,
        cached=cached,
        splits=splits,
        seconds=time.perf_counter() - started,
        failures=fs.failures(),
        skipped_files=len(plan_.dataset.skipped),
        computed=computed,
        reused=max(0, total - computed),
    )


def needed_digests(p: Plan) -> dict[int, list[str]]:
    """Per store view, the distinct image digests the planned feature set needs, in dataset order."""
    by_split = p.dataset.digests_by_split()
    out: dict[int, list[str]] = {}
    for view in range(1 + p.spec.views):
        seen: dict[str, None] = {}
        for split, digests in by_split.items():
            if view == 0 or split in p.spec.augment_splits:
                seen.update(dict.fromkeys(digests))
        out[view] = list(seen)
    return out


def missing_digests(p: Plan, st: store.FeatureStore | None) -> dict[int, list[str]]:
    """Per store view, the needed digests ``st`` has no finished row for (all, without a store)."""
    needed = needed_digests(p)
    if st is None:
        return needed
    out = {}
    for view, digests in needed.items():
        have = st.index(view)
        out[view] = [d for d in digests if d not in have]
    return out


def _run(
    p: Plan, o: ExtractOptions, *, chunk_rows: int | None, progress: bool, client: Any = None, units_per_task: int = 4
) -> tuple[store.FeatureStore, int, dict[str, Any] | None]:
    """Compute the units ``p`` lacks, here or on ``client``'s cluster; return the store, images computed, compute record."""
    prefetch = _start_prefetch(p, batch_size=o.batch_size, workers=o.workers) if client is None else None
    try:
        return _run_units(
            p, o, prefetch, chunk_rows=chunk_rows, progress=progress, client=client, units_per_task=units_per_task
        )
    finally:
        if prefetch is not None:
            prefetch.close()


def _start_prefetch(p: Plan, *, batch_size: int, workers: int | None) -> Prefetch | None:
    """Start decoding the first images to compute, so they are ready when the model is (``units.Prefetch``)."""
    st = store.open_store(p.cache_dir, p.spec.key) if _store_readable(p) else None
    first = missing_digests(p, st).get(0, [])
    if not first:
        return None
    # TensorFlow (which the resize needs) is imported here, once: a first import racing between
    # the prefetch threads and the model build fails ("Registering two gradient with name ...").
    import tensorflow  # noqa: F401

    return Prefetch(p, first, workers=workers, batch_size=batch_size)


def _run_units(
    p: Plan,
    o: ExtractOptions,
    prefetch: Prefetch | None,
    *,
    chunk_rows: int | None,
    progress: bool,
    client: Any,
    units_per_task: int,
) -> tuple[store.FeatureStore, int, dict[str, Any] | None]:
    st, units, model = prepare_units(p, batch_size=o.batch_size, chunk_rows=chunk_rows, client=client)
    if not units:
        return st, 0, None
    if client is not None:
        from featurecache.extraction import cluster

        computed, compute = cluster.run_units(
            client,
            p,
            st,
            units,
            options=o,
            units_per_task=units_per_task,
        )
        return st, computed, compute
    runner, compute = make_runner(
        p, st, model, batch_size=o.batch_size, on_error=o.on_error, workers=o.workers, xla=o.xla, prefetch=prefetch
    )
    runner.run(units, progress=progress, record=unit_record(compute))
    return st, sum(len(u.digests) for u in units), compute


def prepare_units(
    p: Plan, *, batch_size: int, chunk_rows: int | None, client: Any = None
) -> tuple[store.FeatureStore, list[store.Unit], Any]:
    """Open (or create) the plan's store and allocate units for every digest it lacks.

    Call it holding the store's lease. With a Dask ``client`` the feature shape of a new
    store is asked of a worker, so the coordinating process never builds a model.

    Returns
    -------
    (FeatureStore, list of Unit, keras.Model or None)
        The store, the allocated units (in slot order, view by view), and the model if one was
        built here to learn the feature shape.
    """
    st = store.open_store(p.cache_dir, p.spec.key) if _store_readable(p) else None
    model = None
    if st is None:
        if client is not None:
            from featurecache.extraction import cluster

            feature_shape = cluster.feature_shape(client, p)
        else:
            model = build_model(p)
            checkpoint("model_built")
            feature_shape = tuple(int(d) for d in model.output_shape[1:])
        rows = chunk_rows or store.chunk_rows_for(feature_shape, p.spec.dtype, batch_size=batch_size)
        st = store.create_store(p.cache_dir, p.spec, feature_shape=feature_shape, chunk_rows=rows)
    units = [u for view, digests in missing_digests(p, st).items() for u in store.allocate_units(st, view, digests)]
    return st, units, model


def _store_readable(p: Plan) -> bool:
    """False when the store's ``zarr.json`` is torn: it is rebuilt in place (its units are kept)."""
    try:
        store.open_store(p.cache_dir, p.spec.key)
    except CacheCorruptError:
        return False
    return True


def _write_view(
    p: Plan, st: store.FeatureStore, *, computed: int, compute: dict[str, bool] | None = None
) -> views_mod.FeatureSet:
    """Resolve every item of every split to its store rows and write the view."""
    indexes = {view: st.index(view) for view in range(st.views)}
    failed = st.failures()
    by_split = p.dataset.digests_by_split()
    splits = {}
    failures: list[tuple[str, str, str, str]] = []
    for name, split in p.dataset.splits.items():
        digests = by_split[name]
        nviews = p.spec.views_for(name)
        rows = np.empty((nviews, len(digests)), dtype=np.int64)
        for view in range(nviews):
            index = indexes[view]
            try:
                rows[view] = [index[d] for d in digests]
            except KeyError as exc:  # pragma: no cover - every unit was run or raised above
                raise IncompleteEntryError(
                    f"image {exc} has no features in {st.name} view {view}; run the same extract command again"
                ) from None
        splits[name] = (split.ids, split.labels, digests, rows)
        failures.extend((name, i, d, failed[d]) for i, d in zip(split.ids, digests, strict=True) if d in failed)
    return views_mod.write_view(
        p.cache_dir,
        st,
        name=p.name,
        key=p.key,
        dataset_digest=p.dataset.digest(),
        classes=p.dataset.classes,
        splits=splits,
        failures=failures,
        extra={
            "dataset_name": p.dataset.name,
            "dataset_source": p.dataset.source,
            "dataset_limit": p.limit,
            "weights_source": p.weights_source,
            "skipped_files": [list(s) for s in p.dataset.skipped],
            "versions": library_versions(),
            "computed": computed,
            **({"compute": compute} if compute else {}),
        },
    )
