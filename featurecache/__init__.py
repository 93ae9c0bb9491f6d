"""featurecache: run a frozen Keras backbone once, reuse its features.

The Python API mirrors the CLI::

    import featurecache as fc
    result = fc.extract("builtin:digits", backbone="mobilenetv2", weights="random", size=32)
    fs = fc.open_features(result.key)
    X, y = fs.features("train"), fs.labels("train")
"""

from featurecache.cache.store import FeatureSet, find_entry, iter_entries, open_features, resolve_cache_dir
from featurecache.errors import FeatureCacheError
from featurecache.extract import ExtractResult, extract, plan

__version__ = "0.1.0"

__all__ = [
    "ExtractResult",
    "FeatureCacheError",
    "FeatureSet",
    "__version__",
    "extract",
    "find_entry",
    "iter_entries",
    "open_features",
    "plan",
    "resolve_cache_dir",
]
