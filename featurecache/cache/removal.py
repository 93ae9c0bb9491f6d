"""``cache rm``: removing a feature set, a whole feature store, or a damaged entry, safely.

Removing a feature set (a dataset view) never removes rows: other views may read them, and
``cache gc`` reclaims the rows no view references. Removing a feature store takes its lease
(an extract writing into it is never pulled out from under) and removes the views over it
first. Directories are renamed aside inside the cache before deletion, so no reader sees half
of one; where that rename cannot work (another filesystem, or an object store, which has no
rename), they are deleted in place, the ``zarr.json`` that makes them an entry first. A
symbolic link is unlinked, never followed, and frees nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from featurecache.cache import storage
from featurecache.cache import store as store_mod
from featurecache.cache import views as views_mod
from featurecache.cache.lease import Lease
from featurecache.cache.storage import Location
from featurecache.errors import CacheCorruptError, EntryNotFoundError, LeaseError


@dataclass(frozen=True)
class RemovalPlan:
    """What ``cache rm`` will remove."""

    what: str
    root: Location
    paths: tuple[Location, ...]
    size_bytes: int
    note: str = ""
    lease_key: str | None = None
    views: tuple[Location, ...] = field(default=())


def plan_removal(ref: str, *, cache_dir: str | os.PathLike[str] | None = None) -> RemovalPlan:
    """Resolve ``ref`` (a feature set, a feature store, or a damaged entry's name) to what ``rm`` removes.

    Raises
    ------
    EntryNotFoundError, AmbiguousEntryError
        Nothing (or several feature sets) match.
    """
    root = store_mod.resolve_cache_dir(cache_dir)
    for sub in (store_mod.VIEWS_DIR, store_mod.STORES_DIR):
        named = root / sub / ref
        if ref and "/" not in ref and (storage.is_link(named) or storage.is_dir(named)):
            if storage.is_link(named):
                return RemovalPlan(
                    f"the link {named}", root, (named,), 0, " (a symbolic link: nothing it points to was touched)"
                )
            try:
                if sub == store_mod.VIEWS_DIR:
                    views_mod.FeatureSet(named)
                else:
                    store_mod.FeatureStore(named)
            except (EntryNotFoundError, CacheCorruptError):
                return RemovalPlan(f"the damaged entry {named.name}", root, (named,), storage.tree_size(named))
    try:
        fs = views_mod.find_entry(ref, cache_dir=root)
    except EntryNotFoundError:
        st = store_mod.find_store(ref, cache_dir=root)
        if st is None:
            raise
        over = tuple(v.path for v in views_mod.iter_entries(root) if v.attrs.get("store") == st.name)
        size = st.size_bytes() + sum(storage.tree_size(p) for p in over)
        return RemovalPlan(
            f"feature store {st.name} and its {len(over)} feature set(s)",
            root,
            (*over, st.path),
            size,
            lease_key=st.key,
            views=over,
        )
    return RemovalPlan(
        f"feature set {fs.name}",
        root,
        (fs.path,),
        fs.size_bytes(),
        f"; its rows stay in feature store {fs.attrs.get('store')} for other feature sets until `featurecache cache gc --yes`",
    )


def remove(plan: RemovalPlan) -> int:
    """Carry out ``plan``; returns the bytes freed.

    Raises
    ------
    LeaseError
        The feature store is being written by a running extract.
    """
    lease = None
    if plan.lease_key is not None:
        lease = Lease(plan.root, plan.lease_key)
        if not lease.try_acquire():
            judged = lease.holder()
            if not lease.is_stale(judged) or not lease.break_stale(judged) or not lease.try_acquire():
                raise LeaseError(
                    f"an extract (pid {(judged or {}).get('pid', '?')}) is writing into {plan.paths[-1].name}; run `cache rm` again when it has finished"
                )
    try:
        freed = 0
        for path in plan.paths:
            freed += _delete(path, plan.root)
        return freed
    finally:
        if lease is not None:
            lease.release()


def _delete(path: Location, root: Location) -> int:
    size = 0 if storage.is_link(path) else storage.tree_size(path)
    storage.discard(path, trash_dir=root / store_mod.TMP_DIR)
    return size
