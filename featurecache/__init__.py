"""featurecache: run a frozen Keras backbone once, reuse its features.

The Python API mirrors the CLI::

    import featurecache as fc
    result = fc.extract("builtin:digits", backbone="mobilenetv2", weights="random", size=32)
    fs = fc.open_features(result.key)
    X, y = fs.features("train"), fs.labels("train")
    # or by the options, as the CLI's --data --backbone ...:
    opts = fc.ExtractOptions(backbone="mobilenetv2", weights="random", size=32)
    fs = fc.features_for("builtin:digits", opts)

The public functions are verbs and the packages nouns, one per stage over shared infrastructure:
``cache`` (the store, keys, views), ``data``, ``backbones``, ``extraction`` (stage 1),
``training`` (stage 2: heads, sweeps, ensembles), ``finetuning`` (stage 3, predict), ``report``,
``pipelines`` and ``cli``. Each name below is imported on first use, so ``import featurecache``
imports neither TensorFlow nor Keras and changes nothing in the process.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "ExtractOptions": "featurecache.extraction.options",
    "ExtractResult": "featurecache.extraction.extract",
    "extract": "featurecache.extraction.extract",
    "features_for": "featurecache.extraction.extract",
    "plan": "featurecache.extraction.extract",
    "ExplainReport": "featurecache.extraction.audit",
    "VerifyReport": "featurecache.extraction.audit",
    "explain": "featurecache.extraction.audit",
    "verify": "featurecache.extraction.audit",
    "FeatureCacheError": "featurecache.errors",
    "FeatureSet": "featurecache.cache.views",
    "find_entry": "featurecache.cache.views",
    "iter_entries": "featurecache.cache.views",
    "open_features": "featurecache.cache.views",
    "resolve_cache_dir": "featurecache.cache.store",
    "train_head": "featurecache.training.train",
    "TrainOptions": "featurecache.training.options",
    "SweepOptions": "featurecache.training.options",
    "sweep": "featurecache.training.sweeps.sweep",
    "EnsembleResult": "featurecache.training.ensemble",
    "ensemble": "featurecache.training.ensemble",
    "FinetuneResult": "featurecache.finetuning.finetune",
    "finetune": "featurecache.finetuning.finetune",
    "FinetuneOptions": "featurecache.finetuning.options",
    "EvaluateResult": "featurecache.finetuning.predict",
    "Prediction": "featurecache.finetuning.predict",
    "evaluate": "featurecache.finetuning.predict",
    "predict": "featurecache.finetuning.predict",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access (PEP 562) and keep the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'featurecache' has no attribute {name!r}")
    _quiet_tensorflow()
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def _quiet_tensorflow() -> None:
    """Keep TensorFlow's native start-up lines off stderr in the Python API, as the command does.

    Done when a public name is first used (it may import TensorFlow), never at import, so
    ``import featurecache`` changes nothing in the process. ``FEATURECACHE_QUIET_TF=0`` keeps them.
    """
    import os

    from featurecache._runtime import quiet_tf

    if os.environ.get(quiet_tf.QUIET_ENV) != "0":
        quiet_tf.install()


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # pragma: no cover - what type checkers and IDEs see
    # `name as name` marks a re-export (PEP 484): linters cannot read __all__, which is built from _EXPORTS.
    from featurecache.cache.store import resolve_cache_dir as resolve_cache_dir
    from featurecache.cache.views import FeatureSet as FeatureSet
    from featurecache.cache.views import find_entry as find_entry
    from featurecache.cache.views import iter_entries as iter_entries
    from featurecache.cache.views import open_features as open_features
    from featurecache.errors import FeatureCacheError as FeatureCacheError
    from featurecache.extraction.audit import ExplainReport as ExplainReport
    from featurecache.extraction.audit import VerifyReport as VerifyReport
    from featurecache.extraction.audit import explain as explain
    from featurecache.extraction.audit import verify as verify
    from featurecache.extraction.extract import ExtractResult as ExtractResult
    from featurecache.extraction.extract import extract as extract
    from featurecache.extraction.extract import features_for as features_for
    from featurecache.extraction.extract import plan as plan
    from featurecache.extraction.options import ExtractOptions as ExtractOptions
    from featurecache.finetuning.finetune import FinetuneResult as FinetuneResult
    from featurecache.finetuning.finetune import finetune as finetune
    from featurecache.finetuning.options import FinetuneOptions as FinetuneOptions
    from featurecache.finetuning.predict import EvaluateResult as EvaluateResult
    from featurecache.finetuning.predict import Prediction as Prediction
    from featurecache.finetuning.predict import evaluate as evaluate
    from featurecache.finetuning.predict import predict as predict
    from featurecache.training.ensemble import EnsembleResult as EnsembleResult
    from featurecache.training.ensemble import ensemble as ensemble
    from featurecache.training.options import SweepOptions as SweepOptions
    from featurecache.training.options import TrainOptions as TrainOptions
    from featurecache.training.sweeps.sweep import sweep as sweep
    from featurecache.training.train import train_head as train_head
