"""The content-addressed Zarr feature cache: keys, feature stores, dataset views, lease, upkeep."""

from featurecache.cache.keys import FORMAT_VERSION, FeatureSpec, canonical_json, view_key
from featurecache.cache.lease import Lease
from featurecache.cache.store import FeatureStore, Unit, resolve_cache_dir
from featurecache.cache.views import FeatureSet, find_entry, iter_entries, open_features, remove_view

__all__ = [
    "FORMAT_VERSION",
    "FeatureSet",
    "FeatureSpec",
    "FeatureStore",
    "Lease",
    "Unit",
    "canonical_json",
    "find_entry",
    "iter_entries",
    "open_features",
    "remove_view",
    "resolve_cache_dir",
    "view_key",
]
