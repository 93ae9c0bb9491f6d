"""The content-keyed Zarr feature cache: keys (``keys``) and storage (``store``)."""

from featurecache.cache.keys import FORMAT_VERSION, FeatureSpec, canonical_json
from featurecache.cache.store import (
    FeatureSet,
    Lease,
    Unit,
    find_entry,
    iter_entries,
    open_features,
    remove_entry,
    resolve_cache_dir,
)

__all__ = [
    "FORMAT_VERSION",
    "FeatureSet",
    "FeatureSpec",
    "Lease",
    "Unit",
    "canonical_json",
    "find_entry",
    "iter_entries",
    "open_features",
    "remove_entry",
    "resolve_cache_dir",
]
