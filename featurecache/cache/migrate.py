"""Converting format-1 cache entries (one Zarr group per dataset) into store-version-2 rows and views.

A format-1 entry holds ``<split>/features (views, n, ...)`` in dataset order with ids and labels
but no per-image digests. Migration reloads the dataset from the recorded source, proves it is
the same dataset (its manifest digest equals the one keyed in the entry), then writes each
image's clean features into the feature store of the same spec as ordinary units, and the
dataset view over them: no backbone runs. Augmented views of format 1 were drawn from each
image's *position*, which store version 2 replaced by its content, so they are not carried
over; the next extract computes them (and only them).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from featurecache.cache import storage
from featurecache.cache import store as store_mod
from featurecache.cache import views as views_mod
from featurecache.cache.keys import FeatureSpec, view_key
from featurecache.cache.lease import Lease
from featurecache.cache.storage import Location
from featurecache.errors import FeatureCacheError

__all__ = ["MigrationResult", "legacy_entries", "migrate"]


@dataclass(frozen=True)
class MigrationResult:
    """One format-1 entry and what became of it (``view`` is None when it was not converted)."""

    entry: Path
    view: str | None
    rows: int
    note: str


def legacy_entries(cache_dir: Location) -> list[Path]:
    """Format-1 entry directories directly under the cache root (none on object storage, which came later)."""
    out: list[Path] = []
    if not storage.supports_rename(cache_dir):
        return out  # format 1 predates object storage
    for child in sorted(cache_dir.iterdir()) if cache_dir.is_dir() else ():
        if (
            child.name.startswith((".", "_"))
            or child.name in (store_mod.STORES_DIR, store_mod.VIEWS_DIR)
            or not child.is_dir()
            or child.is_symlink()
        ):
            continue
        try:
            attrs = json.loads((child / "zarr.json").read_text())["attributes"]["featurecache"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if "layout" in attrs and attrs.get("spec", {}).get("format_version") == 1:
            out.append(child)
    return out


def migrate(
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    data: str | None = None,
    dry_run: bool = False,
    remove: bool = True,
) -> list[MigrationResult]:
    """Convert every complete format-1 entry under the cache root.

    Parameters
    ----------
    cache_dir
        Cache root.
    data
        Where the images are now, if an entry's recorded ``dataset_source`` moved.
    dry_run
        Only report what would be converted.
    remove
        Delete each entry once converted (its rows now live in the feature store).

    Returns
    -------
    list of MigrationResult
        One per format-1 entry found.
    """
    root = storage.refuse_remote(store_mod.resolve_cache_dir(cache_dir), "cache migrate")
    out = []
    for entry in legacy_entries(root):
        try:
            out.append(_migrate_one(root, entry, data=data, dry_run=dry_run, remove=remove))
        except FeatureCacheError as exc:
            out.append(MigrationResult(entry, None, 0, str(exc)))
    return out


def _migrate_one(root: Path, entry: Path, *, data: str | None, dry_run: bool, remove: bool) -> MigrationResult:
    import zarr

    from featurecache.data import load_dataset

    attrs = json.loads((entry / "zarr.json").read_text())["attributes"]["featurecache"]
    old = dict(attrs["spec"])
    if not (entry / "_complete").is_file():
        return MigrationResult(
            entry,
            None,
            0,
            "incomplete format-1 entry: nothing to keep; remove it with `featurecache cache gc --older-than 0 --yes` or by hand",
        )
    source = data or attrs.get("dataset_source")
    if not source:
        return MigrationResult(
            entry, None, 0, "the entry does not record its dataset source; pass --data with its images"
        )
    dataset = load_dataset(str(source), memo_dir=store_mod.memo_dir(root), limit=attrs.get("dataset_limit"))
    if dataset.digest() != old.get("dataset_digest"):
        return MigrationResult(
            entry,
            None,
            0,
            f"the images at {source} changed since the entry was made (digest {dataset.digest()[:12]}, not {str(old.get('dataset_digest'))[:12]}); pass --data with the original images, or remove the entry",
        )
    fields_ = {k: v for k, v in old.items() if k not in ("dataset_digest", "dataset_name", "format_version")}
    spec = FeatureSpec(**{**fields_, "augment_splits": tuple(fields_.get("augment_splits", ()))})
    rows = sum(len(s) for s in dataset.splits.values())
    if dry_run:
        return MigrationResult(entry, spec.view_name(dataset.name, dataset.digest()), rows, "would convert")
    group = zarr.open_group(str(entry), mode="r")
    failures_by_id: dict[tuple[str, str], str] = {}
    for marker in (entry / "_units").glob("*/v0/c*"):
        info = json.loads(marker.read_text() or "{}")
        failures_by_id.update({(marker.parent.parent.name, i): r for i, r in info.get("failures", [])})
    digests = dataset.digests_by_split()
    lease = Lease(root, spec.key)
    lease.wait()
    try:
        feature_shape = tuple(attrs["feature_shape"])
        st = store_mod.open_store(root, spec.key) or store_mod.create_store(
            root,
            spec,
            feature_shape=feature_shape,
            chunk_rows=store_mod.chunk_rows_for(feature_shape, spec.dtype, batch_size=32),
        )
        have = st.index(0)
        todo: dict[str, tuple[np.ndarray, bool, str | None]] = {}
        for split, ds in dataset.splits.items():
            feats = np.asarray(cast("zarr.Array", group[f"{split}/features"])[0])  # format 1's layout: arrays here
            valid = np.asarray(cast("zarr.Array", group[f"{split}/valid"])[:], dtype=bool)
            for i, d in enumerate(digests[split]):
                if d not in have and d not in todo:
                    todo[d] = (feats[i], bool(valid[i]), failures_by_id.get((split, ds.ids[i])))
        units = store_mod.allocate_units(st, 0, list(todo))
        for unit in units:
            block = np.stack([todo[d][0] for d in unit.digests]).astype(spec.dtype)
            valid = np.asarray([todo[d][1] for d in unit.digests])
            fails = [(d, todo[d][2] or "undecodable") for d in unit.digests if not todo[d][1]]
            store_mod.write_unit(st, unit, block, valid=valid, failures=fails, record={"migrated_from": entry.name})
        note = f"converted {len(todo)} rows, reused {rows - len(todo)}"
        view_name = None
        if spec.views == 0:
            index, failed = st.index(0), st.failures()
            splits = {}
            failed_rows: list[tuple[str, str, str, str]] = []
            for split, ds in dataset.splits.items():
                ds_digests = digests[split]
                splits[split] = (
                    ds.ids,
                    ds.labels,
                    ds_digests,
                    np.asarray([[index[d] for d in ds_digests]], dtype=np.int64),
                )
                failed_rows.extend(
                    (split, i, d, failed[d]) for i, d in zip(ds.ids, ds_digests, strict=True) if d in failed
                )
            fs = views_mod.write_view(
                root,
                st,
                name=spec.view_name(dataset.name, dataset.digest()),
                key=view_key(spec.key, dataset.digest()),
                dataset_digest=dataset.digest(),
                classes=dataset.classes,
                splits=splits,
                failures=failed_rows,
                extra={
                    k: attrs.get(k)
                    for k in ("dataset_source", "dataset_limit", "weights_source", "skipped_files", "versions")
                }
                | {"dataset_name": dataset.name, "migrated_from": entry.name},
            )
            view_name = fs.name
        else:
            note += f"; its {spec.views} augmented view(s) were drawn by position in format 1 and are not carried over: run the extract command again to compute them"
    finally:
        lease.release()
    if remove:
        trash = root / store_mod.TMP_DIR / f"rm-{entry.name}-{uuid.uuid4().hex[:6]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return MigrationResult(entry, view_name, rows, note)
