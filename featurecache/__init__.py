"""featurecache: run a frozen Keras backbone once, reuse its features.

The Python API mirrors the CLI::

    import featurecache as fc
    result = fc.extract("builtin:digits", backbone="mobilenetv2", weights="random", size=32)
    fs = fc.open_features(result.key)
    X, y = fs.features("train"), fs.labels("train")
    # or by the options, as the CLI's --data --backbone ...:
    opts = fc.ExtractOptions(backbone="mobilenetv2", weights="random", size=32)
    fs = fc.features_for("builtin:digits", opts)
"""

import os as _os

from featurecache import quiet_tf as _quiet_tf

# The Python API keeps TensorFlow's native start-up lines off stderr as the command does (they
# came twice: at import and at the first device query); FEATURECACHE_QUIET_TF=0 keeps them.
if _os.environ.get(_quiet_tf.QUIET_ENV) != "0":
    _quiet_tf.install()

from featurecache.cache.store import resolve_cache_dir
from featurecache.cache.views import FeatureSet, find_entry, iter_entries, open_features
from featurecache.audit import ExplainReport, VerifyReport, explain, verify
from featurecache.errors import FeatureCacheError
from featurecache.extract import ExtractResult, extract, features_for, plan
from featurecache.options import ExtractOptions
from featurecache.sweep import sweep
from featurecache.ensemble import EnsembleResult, ensemble
from featurecache.train import train_head
from featurecache.finetune import FinetuneResult, finetune
from featurecache.predict import EvaluateResult, Prediction, evaluate, predict

__version__ = "0.1.0"

__all__ = [
    "ExtractOptions",
    "ExtractResult",
    "ExplainReport",
    "VerifyReport",
    "EnsembleResult",
    "EvaluateResult",
    "FeatureCacheError",
    "FeatureSet",
    "FinetuneResult",
    "Prediction",
    "__version__",
    "ensemble",
    "evaluate",
    "explain",
    "extract",
    "features_for",
    "finetune",
    "find_entry",
    "iter_entries",
    "open_features",
    "plan",
    "predict",
    "resolve_cache_dir",
    "verify",
    "sweep",
    "train_head",
]
