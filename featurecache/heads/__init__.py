"""Heads: classifiers trained on cached features, all with the scikit-learn estimator API.

``make_head(name, params)`` builds one from the registry (``registry.py``); sklearn heads
are pipelines (``sklearn_heads.py``), ``dense`` is the Keras ``DenseHead`` (``dense.py``).
``save_head`` / ``load_head`` persist a fitted head in a directory:

``head.json``
    written last, so its presence marks a complete save: kind, estimator class, classes,
    library versions.
``head.joblib``
    the estimator (for ``DenseHead``: the wrapper without its Keras model).
``head.keras``
    ``DenseHead`` only: the plain Keras model (built-in layers only, uncompiled), loadable
    with ``keras.saving.load_model`` and no custom objects, so ``finetune`` can splice it
    onto the backbone.

joblib files are pickles: load heads only from run directories you trust.

``DenseHead`` is imported on first access, so ``import featurecache.heads`` needs neither
scikit-learn nor Keras.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurecache.errors import RunError
from featurecache.heads.registry import (
    HEAD_NAMES,
    IMPORT_PATH_PACKAGES,
    HeadSpec,
    ParamSpec,
    SearchSpace,
    coerce_head_params,
    get_head_spec,
    head_param_schema,
    make_head,
    parse_param,
)

if TYPE_CHECKING:
    from sklearn.base import BaseEstimator

    from featurecache.heads.dense import DenseHead

__all__ = [
    "HEAD_FILES",
    "HEAD_NAMES",
    "IMPORT_PATH_PACKAGES",
    "DenseHead",
    "HeadSpec",
    "ParamSpec",
    "SearchSpace",
    "coerce_head_params",
    "get_head_spec",
    "head_param_schema",
    "load_head",
    "make_head",
    "parse_param",
    "save_head",
]

#: File names inside a saved head directory.
HEAD_FILES: tuple[str, ...] = ("head.json", "head.joblib", "head.keras")
_SAVE_FORMAT = 1


def __getattr__(name: str) -> Any:
    # PEP 562: defer the scikit-learn import that dense.py needs until DenseHead is used.
    if name == "DenseHead":
        from featurecache.heads.dense import DenseHead

        return DenseHead
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def save_head(est: BaseEstimator, dirpath: str | os.PathLike[str]) -> Path:
    """Save a fitted head into ``dirpath`` (created if needed; existing files replaced).

    Parameters
    ----------
    est
        A fitted head from ``make_head`` (or any fitted sklearn classifier).
    dirpath
        Target directory, typically ``runs/<name>/head``.

    Returns
    -------
    pathlib.Path
        The directory.

    Raises
    ------
    sklearn.exceptions.NotFittedError
        When ``est`` is not fitted.
    """
    import joblib
    import numpy as np
    import sklearn
    from sklearn.utils.validation import check_is_fitted

    from featurecache.heads.dense import DenseHead, _inference_copy

    check_is_fitted(est)
    out = Path(dirpath)
    out.mkdir(parents=True, exist_ok=True)
    # head.json is the completion marker: drop it first so a crash mid-save never leaves
    # a marker next to a half-written head.
    (out / "head.json").unlink(missing_ok=True)
    versions = {"sklearn": sklearn.__version__, "numpy": np.__version__}
    if isinstance(est, DenseHead):
        import keras

        kind = "keras-dense"
        versions["keras"] = keras.__version__
        _atomic_write(
            out / "head.keras",
            lambda tmp: keras.saving.save_model(_inference_copy(est.model_), tmp),
            suffix=".keras",
        )
        shell = DenseHead.__new__(type(est))
        shell.__dict__.update({k: v for k, v in est.__dict__.items() if k != "model_"})
        _atomic_write(out / "head.joblib", lambda tmp: joblib.dump(shell, tmp))
        files = ["head.joblib", "head.keras"]
    else:
        kind = "sklearn"
        (out / "head.keras").unlink(missing_ok=True)
        _atomic_write(out / "head.joblib", lambda tmp: joblib.dump(est, tmp))
        files = ["head.joblib"]
    classes = getattr(est, "classes_", None)
    meta = {
        "format": _SAVE_FORMAT,
        "kind": kind,
        "estimator": f"{type(est).__module__}.{type(est).__qualname__}",
        "classes": np.asarray(classes).tolist() if classes is not None else None,
        "files": files,
        "versions": versions,
    }
    _atomic_write(
        out / "head.json",
        lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, default=str) + "\n"),
    )
    return out


def load_head(dirpath: str | os.PathLike[str]) -> BaseEstimator:
    """Load a head saved by ``save_head``.

    Parameters
    ----------
    dirpath
        Directory passed to ``save_head``.

    Returns
    -------
    sklearn.base.BaseEstimator
        The fitted head (``DenseHead`` with its Keras model restored, uncompiled).

    Raises
    ------
    RunError
        When the directory has no complete saved head or an unknown format.
    """
    import joblib

    src = Path(dirpath)
    meta_path = src / "head.json"
    if not meta_path.is_file():
        raise RunError(
            f"no saved head in {str(src)!r} (head.json missing); point to a run directory "
            "written by `featurecache train-head` (e.g. runs/<name>) or train the head again"
        )
    meta = json.loads(meta_path.read_text())
    kind = meta.get("kind")
    if meta.get("format") != _SAVE_FORMAT or kind not in ("sklearn", "keras-dense"):
        raise RunError(
            f"saved head in {str(src)!r} has format {meta.get('format')!r} kind {kind!r}; "
            f"this version reads format {_SAVE_FORMAT} kinds 'keras-dense', 'sklearn' -- "
            "retrain the head"
        )
    missing = [f for f in meta.get("files", []) if not (src / f).is_file()]
    if missing:
        raise RunError(
            f"saved head in {str(src)!r} lacks {missing!r}; retrain or copy the whole directory"
        )
    est = joblib.load(src / "head.joblib")
    if kind == "keras-dense":
        import keras

        est.model_ = keras.saving.load_model(src / "head.keras", compile=False)
    return est


def _atomic_write(path: Path, write: Any, *, suffix: str = "") -> None:
    """Write through ``write(tmp_path)`` then rename, so readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
