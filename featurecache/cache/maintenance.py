"""Keeping a cache trustworthy and tidy: structural checks, repair, and ``gc``.

* :func:`check` re-derives everything a view or a feature store claims without recomputing:
  that a store's spec hashes to its key and name; that every unit's chunk reads back (CRC32C)
  and hashes to the sha256 its marker recorded (so a deleted chunk, which Zarr would read as
  zeros, or two swapped chunks, each with a valid CRC, are found); that a view's ids, labels,
  digests and class names hash back to its dataset digest and key, and that every row it
  points at holds the image digest it claims; that a view's name, recorded spec, store and
  failures list agree with its key and its store. ``featurecache.audit.verify`` adds a
  recomputed sample on top. :func:`repair` drops damaged units (and the views that read them)
  and views whose metadata were edited, and restores an edited store spec from a view over the
  store, so the next extract recomputes only what was damaged.
* :func:`gc` removes what nobody needs: rows (units) that no view references, views and stores
  that never finished or were torn, leases of dead holders, and temporary files. Anything
  under a live lease is left alone; symbolic links are never followed.

Both work on object-store roots through :mod:`featurecache.cache.storage` (there, an object
lease is judged stale only when its holder provably died on this machine: one look cannot
tell a silent holder from a live one without comparing clocks).
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featurecache.cache import storage
from featurecache.cache import store as store_mod
from featurecache.cache import views as views_mod
from featurecache.cache.keys import FORMAT_VERSION, FeatureSpec
from featurecache.cache.lease import LOCKS_DIR, Lease
from featurecache.cache.storage import Location, tree_size
from featurecache.errors import CacheCorruptError, EntryNotFoundError, FeatureCacheError, UsageError, one_line

__all__ = ["CheckResult", "GcItem", "GcReport", "check", "find_target", "gc", "parse_age", "repair"]


_one_line = functools.partial(one_line, limit=200)


# ------------------------------------------------------------------------------- check
@dataclass
class CheckResult:
    """What :func:`check` found.

    Attributes
    ----------
    name, key
        The view or store checked.
    problems
        One line per failed check.
    units_checked
        Units whose chunk was read back and hashed.
    damaged
        ``(store path, view, slot)`` of each damaged unit.
    damaged_views
        Views to drop (the extract command rewrites them from the store's rows).
    altered_specs
        Stores whose recorded spec no longer hashes to their key (restored from a view).
    fixable
        The problems :func:`repair` addresses; ``unrepaired`` says which of them it could not.
    """

    name: str
    key: str
    problems: list[str] = field(default_factory=list)
    units_checked: int = 0
    damaged: set[tuple[Location, int, int]] = field(default_factory=set)
    damaged_views: set[Location] = field(default_factory=set)
    altered_specs: set[Location] = field(default_factory=set)
    fixable: set[str] = field(default_factory=set)
    unrepaired: list[str] = field(default_factory=list)

    def flag_view(self, problem: str, path: Location) -> None:
        """Record a problem that dropping the view at ``path`` repairs."""
        self.problems.append(problem)
        self.fixable.add(problem)
        self.damaged_views.add(path)

    @property
    def needs_repair(self) -> bool:
        """Whether :func:`repair` has anything to do."""
        return bool(self.damaged or self.damaged_views or self.altered_specs)


def find_target(ref: str, *, cache_dir: Location) -> views_mod.FeatureSet | store_mod.FeatureStore:
    """A view (by key, prefix, name or path) or else a feature store (by name, key or prefix).

    Raises
    ------
    EntryNotFoundError, AmbiguousEntryError, CacheCorruptError
        Nothing matches, several views match, or the named view is torn.
    """
    try:
        return views_mod.find_entry(ref, cache_dir=cache_dir)
    except EntryNotFoundError:
        st = store_mod.find_store(ref, cache_dir=cache_dir)
        if st is None:
            raise
        return st


def _check_spec(st: store_mod.FeatureStore, result: CheckResult) -> None:
    fix = f"remove the store with `featurecache cache rm {st.name} --yes`"
    altered = st.spec_problem()
    if altered is not None:
        result.problems.append(altered)
        result.fixable.add(altered)
        result.altered_specs.add(st.path)
        return
    out = [p for p in [st.name_problem("feature store")] if p]
    fields_ = {k: v for k, v in st.spec.items() if k != "weights_label"}
    version = fields_.pop("format_version", None)
    if version != FORMAT_VERSION:
        out.append(f"{st.name} has format version {version!r} but this featurecache writes {FORMAT_VERSION}; {fix}")
    try:
        rebuilt = FeatureSpec(**{**fields_, "augment_splits": tuple(fields_.get("augment_splits", ()))})
    except (TypeError, FeatureCacheError) as exc:
        out.append(f"the stored spec of {st.name} is not a valid FeatureSpec ({' '.join(str(exc).split())})")
    else:
        if version == FORMAT_VERSION and rebuilt.key != st.key:
            out.append(f"the stored spec's FeatureSpec key is {rebuilt.key[:12]}, not {st.key[:12]}")
    result.problems.extend(out)


def _check_units(st: store_mod.FeatureStore, units: Iterable[tuple[int, int]], result: CheckResult) -> None:
    for view, slot in sorted(set(units)):
        marker = st.markers(view).get(slot)
        try:
            block = st.read_unit(view, slot, marker=marker)
        except CacheCorruptError as exc:
            result.problems.append(str(exc))
            result.fixable.add(str(exc))
            result.damaged.add((st.path, view, slot))
            continue
        assert marker is not None  # read_unit raised without one
        result.units_checked += 1
        if not np.isfinite(block).all():
            result.problems.append(f"unit v{view}/u{slot} of {st.name} holds NaN or infinite values")
        bad = [j for j, d in enumerate(marker.get("digests", [])) if d in {f[0] for f in marker.get("failures", [])}]
        if bad and np.any(block[bad] != 0):
            result.problems.append(
                f"unit v{view}/u{slot} of {st.name} has non-zero features for images that failed to decode"
            )


def check(target: views_mod.FeatureSet | store_mod.FeatureStore) -> CheckResult:
    """Check a view (its manifest, rows and every unit it reads) or a whole store, recomputing nothing.

    Parameters
    ----------
    target
        An open view or feature store.

    Returns
    -------
    CheckResult
        ``result.problems`` is empty when everything holds.
    """
    if isinstance(target, store_mod.FeatureStore):
        result = CheckResult(target.name, target.key)
        _check_spec(target, result)
        _check_units(target, [(v, s) for v in range(target.views) for s in target.markers(v, refresh=True)], result)
        return result
    fs = target
    result = CheckResult(fs.name, fs.key)
    for problem in fs.identity_problems():  # its name, key, spec, layout and store link (metadata only)
        result.flag_view(problem, fs.path)
    if result.problems:
        return result
    try:
        st = fs.store
        arrays = fs.arrays()  # hashes the manifest back into the dataset digest and the key
    except (CacheCorruptError, UsageError) as exc:
        result.flag_view(str(exc), fs.path)
        return result
    _check_spec(st, result)
    cr = st.chunk_rows
    needed: set[tuple[int, int]] = set()
    for split, a in arrays.items():
        for view in range(a["rows"].shape[0]):
            rows = a["rows"][view]
            markers = st.markers(view)
            for j, row in enumerate(rows):
                slot = int(row) // cr
                needed.add((view, slot))
                digests = markers.get(slot, {}).get("digests", [])
                local = int(row) - slot * cr
                if slot in markers and (local >= len(digests) or digests[local] != a["digests"][j]):
                    result.flag_view(
                        f"{split}/{a['ids'][j]} view {view} of {fs.name} points at store row {int(row)}, which holds another image; "
                        f"remove the view with `featurecache cache rm {fs.name} --yes` and extract again",
                        fs.path,
                    )
                    break
    _check_units(st, needed, result)
    try:
        fs.check_failures(arrays)
    except CacheCorruptError as exc:
        result.flag_view(str(exc), fs.path)
    return result


def repair(result: CheckResult, *, cache_dir: Location) -> list[str]:
    """Restore altered store specs, drop the damaged views, units and every view that reads them.

    The next extract of any dataset over the store then rewrites the dropped views from the
    store's rows and recomputes exactly the images of the dropped units. What could not be
    repaired is added to ``result.unrepaired``.

    Returns
    -------
    list of str
        What was restored or removed, one line each.
    """
    done = []
    for path in sorted(result.altered_specs):
        done.append(_restore_spec(store_mod.FeatureStore(path), cache_dir, result))
    for path in sorted(result.damaged_views):
        storage.remove_tree(path)
        done.append(
            f"removed feature set {path.name} (its metadata, ids, labels or rows are damaged); the same extract command rewrites it from the store's rows"
        )
    by_store: dict[Location, set[tuple[int, int]]] = {}
    for path, view, slot in result.damaged:
        by_store.setdefault(path, set()).add((view, slot))
    for path, units in by_store.items():
        st = store_mod.FeatureStore(path)
        lease = Lease(cache_dir, st.key)
        if not lease.try_acquire():
            done.append(f"skipped {st.name}: an extract holds its lease; repair again when it is done")
            result.unrepaired.append(done[-1])
            continue
        try:
            cr = st.chunk_rows
            for fs in list(views_mod.iter_entries(cache_dir)):
                if fs.attrs.get("store") != st.name:
                    continue
                if _view_slots(fs, cr) & units:
                    views_mod.remove_view(fs)
                    done.append(f"removed view {fs.name} (it reads damaged units)")
            for view in sorted({v for v, _ in units}):
                slots = sorted(s for v, s in units if v == view)
                images = sum(len(st.markers(view).get(s, {}).get("digests", [])) for s in slots)
                n = store_mod.remove_units(st, view, slots)
                done.append(
                    f"removed {n} damaged unit(s) of view {view} from {st.name}; the next extract over it recomputes their {images} image(s)"
                )
        finally:
            lease.release()
    return done


def _restore_spec(st: store_mod.FeatureStore, cache_dir: Location, result: CheckResult) -> str:
    """Rewrite an altered store spec from a view over the store whose recorded spec hashes to the store's key."""
    from featurecache.cache.keys import RECORDED_ONLY, recorded_spec_key

    spec, source = None, ""
    for fs in views_mod.iter_entries(cache_dir):
        if fs.attrs.get("store") == st.name and fs.attrs.get("store_key") == st.key and not fs.identity_problems():
            spec, source = {k: v for k, v in fs.spec.items() if k not in RECORDED_ONLY or k == "weights_label"}, fs.name
            break
    if spec is None or recorded_spec_key(spec) != st.key:
        line = (
            f"could not restore the spec of {st.name}: no feature set over it records one that hashes to its key; "
            "the extract command that made it rewrites it and keeps its rows"
        )
        result.unrepaired.append(line)
        return line
    lease = Lease(cache_dir, st.key)
    if not lease.try_acquire():
        result.unrepaired.append(f"skipped {st.name}: an extract holds its lease; repair again when it is done")
        return result.unrepaired[-1]
    try:
        storage.publish_json(st.path / "zarr.json", store_mod.group_document({**st.attrs, "spec": spec}))
    finally:
        lease.release()
    return f"restored the spec of {st.name} from feature set {source} (its zarr.json had been edited); nothing is recomputed"


def _view_slots(fs: views_mod.FeatureSet, chunk_rows: int) -> set[tuple[int, int]]:
    """``(view, slot)`` of every unit ``fs`` reads (from its raw rows arrays, unverified)."""
    out: set[tuple[int, int]] = set()
    for split in fs.splits:
        try:
            rows = np.asarray(fs.group[f"{split}/rows"][:], dtype=np.int64)
        except Exception:  # noqa: BLE001 - a torn view keeps nothing alive
            continue
        for view in range(rows.shape[0]):
            out.update((view, int(s)) for s in np.unique(rows[view] // chunk_rows))
    return out


# ----------------------------------------------------------------------------------- gc
@dataclass(frozen=True)
class GcItem:
    """One thing :func:`gc` removes (or would remove)."""

    path: Location
    kind: str
    size_bytes: int
    reason: str
    units: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class GcReport:
    """What :func:`gc` found; ``removed`` is False for a dry run."""

    cache_dir: Location
    items: tuple[GcItem, ...]
    removed: bool

    @property
    def size_bytes(self) -> int:
        """Bytes the items take (freed, unless a dry run)."""
        return sum(i.size_bytes for i in self.items)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "cache_dir": str(self.cache_dir),
            "removed": self.removed,
            "size_bytes": self.size_bytes,
            "items": [
                {"path": str(i.path), "kind": i.kind, "size_bytes": i.size_bytes, "reason": i.reason}
                for i in self.items
            ],
        }


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(value: str | float | int) -> float:
    """Seconds in an age such as ``"24h"``, ``"30m"``, ``"7d"``, ``"90s"``, ``"2w"`` or ``3600``.

    Raises
    ------
    UsageError
        The text is not a non-negative number with an optional s/m/h/d/w unit.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise UsageError(f"--older-than must be >= 0, got {value!r}")
        return float(value)
    m = _AGE.match(str(value))
    if not m:
        raise UsageError(
            f"--older-than {value!r} is not an age; use a number with a unit s, m, h, d or w, e.g. 24h, 30m, 7d"
        )
    return float(m.group(1)) * _AGE_UNITS[m.group(2).lower()]


def _real_dir(path: Location) -> bool:
    return storage.is_dir(path) and not storage.is_link(path)


def _live_leases(root: Location) -> set[str]:
    """Keys whose lease is held by a live holder."""
    live = set()
    locks = root / LOCKS_DIR
    for lease_file in storage.glob(locks, "*.lease") if _real_dir(locks) else ():
        key = lease_file.name[: -len(".lease")]
        if not Lease(root, key).is_stale():
            live.add(key)
    return live


def _unused_units(st: store_mod.FeatureStore, root: Location) -> list[tuple[int, int]]:
    used: set[tuple[int, int]] = set()
    for fs in views_mod.iter_entries(root):
        if fs.attrs.get("store") == st.name:
            used |= _view_slots(fs, st.chunk_rows)
    return [(v, s) for v in range(st.views) for s in sorted(st.markers(v, refresh=True)) if (v, s) not in used]


def gc(
    *,
    older_than: str | float = "24h",
    dry_run: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> GcReport:
    """Remove rows no view uses, unfinished or torn stores and views, stale leases and debris.

    Removed are: units of a feature store that no view references (the rows of removed or
    outdated views); stores and views whose ``zarr.json`` is missing or torn and whose newest
    file is older than ``older_than``; leases whose holder is dead or silent; temporary files
    older than ``older_than``. Nothing of a store under a live lease is touched, and symbolic
    links are never followed (a linked ``.tmp`` is reported, not emptied).

    Parameters
    ----------
    older_than
        Minimum age of debris: seconds, or text like ``"24h"``, ``"30m"``, ``"7d"``.
    dry_run
        Only report (the default); pass False to delete.
    cache_dir
        Cache root (default ``$FEATURECACHE_DIR`` or ``./cache``).

    Returns
    -------
    GcReport
        The items with their sizes; ``removed`` says whether they were deleted.

    Raises
    ------
    UsageError
        ``older_than`` is not an age.
    """
    age = parse_age(older_than)
    root = store_mod.resolve_cache_dir(cache_dir)
    now = time.time()
    items: list[GcItem] = []
    if not storage.is_dir(root):
        return GcReport(root, (), removed=not dry_run)
    live = _live_leases(root)
    live12 = {k[:12] for k in live}

    def old(path: Location) -> bool:
        return now - storage.newest_mtime(path) >= age

    locks = root / LOCKS_DIR
    if _real_dir(locks):
        for lease_file in storage.glob(locks, "*.lease"):
            key = lease_file.name[: -len(".lease")]
            if key not in live:
                holder = Lease(root, key).holder() or {}
                items.append(
                    GcItem(
                        lease_file,
                        "stale lease",
                        tree_size(lease_file),
                        f"holder pid {holder.get('pid', '?')} on {holder.get('host', '?')} is gone or silent",
                    )
                )
        for aside in storage.glob(locks, "*.lease.stale-*"):
            items.append(
                GcItem(aside, "temporary", tree_size(aside), "lease moved aside by a breaker that did not finish")
            )
    tmp = root / store_mod.TMP_DIR
    if storage.is_link(tmp):
        items.append(
            GcItem(
                tmp,
                "left alone",
                0,
                "the temporary folder is a symbolic link; featurecache never follows it (remove the link by hand)",
            )
        )
    elif storage.is_dir(tmp):
        for child in storage.children(tmp):
            owner = child.name.removeprefix("rm-").split("-", 1)[0]
            if owner not in live12 and old(child):
                what = (
                    "removal that did not finish"
                    if child.name.startswith("rm-")
                    else "view built aside and never renamed into place"
                )
                items.append(GcItem(child, "temporary", tree_size(child), what))
    memo = store_mod.memo_dir(root)
    for memo_tmp in sorted(memo.glob(".*.tmp")) if _real_dir(memo) else ():
        if old(memo_tmp):
            items.append(GcItem(memo_tmp, "temporary", tree_size(memo_tmp), "digest memo temp file"))
    for damaged in views_mod.damaged_entries(root):
        if old(damaged):
            items.append(GcItem(damaged, "damaged view", tree_size(damaged), "its zarr.json is missing or unreadable"))
    for st in store_mod.iter_stores(root):
        if not isinstance(st, store_mod.FeatureStore):
            if st.name.rsplit("--", 1)[-1] not in live12 and old(st):
                items.append(
                    GcItem(
                        st,
                        "damaged store",
                        tree_size(st),
                        "a store that never finished being created, or whose zarr.json is torn",
                    )
                )
            continue
        if st.key[:12] in live12:
            continue
        unused = _unused_units(st, root)
        if unused:
            items.append(
                GcItem(
                    st.path,
                    "unused rows",
                    _units_size(st, unused),
                    f"{len(unused)} unit(s) no view references",
                    tuple(unused),
                )
            )
        for partial in storage.temp_files(st.path):
            if old(partial):
                items.append(GcItem(partial, "temporary", tree_size(partial), "temp file of a killed writer"))
    if not dry_run:
        for item in items:
            _remove(item, root)
    return GcReport(root, tuple(items), removed=not dry_run)


def _units_size(st: store_mod.FeatureStore, units: list[tuple[int, int]]) -> int:
    total = 0
    for view, slot in units:
        for name in ("features", "digests", "valid"):
            chunk = st.path / f"v{view}" / name / "c" / str(slot)
            total += tree_size(chunk)
        total += tree_size(st.path / store_mod.UNITS_GROUP / f"v{view}" / f"u{slot}")
    return total


def _remove(item: GcItem, root: Location) -> None:
    path = item.path
    if item.kind == "left alone":
        return
    if item.kind == "unused rows":
        st = store_mod.FeatureStore(path)
        lease = Lease(root, st.key)
        if not lease.try_acquire():
            return  # an extract started meanwhile: its view may need these rows
        try:
            still = set(_unused_units(st, root))  # judged again under the lease
            for view in sorted({v for v, _ in item.units}):
                store_mod.remove_units(st, view, [s for v, s in item.units if v == view and (v, s) in still])
        finally:
            lease.release()
    elif item.kind == "stale lease":
        lease = Lease(root, path.name[: -len(".lease")])
        judged = lease.holder()
        # Judged again: a live process may have taken it since the scan. An object lease is
        # broken by taking it over, so it is then given back (a no-op for a local one).
        if lease.is_stale(judged) and lease.break_stale(judged):
            lease.release()
    else:
        storage.remove_tree(path)
