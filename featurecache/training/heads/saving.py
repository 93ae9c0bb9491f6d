"""Persist fitted heads in formats that load without executing code from the files.

How it works. A saved head is a directory with ``head.json`` (written last: its presence marks
a complete save) and one data file:

``head.skops`` (scikit-learn heads)
    scikit-learn's `skops.io <https://skops.readthedocs.io>`_ format: a zip of JSON and NumPy
    arrays that names every type it holds. Loading imports only those types, and only when they
    are trusted: skops's own defaults (scikit-learn estimators, NumPy) plus
    :data:`TRUSTED_TYPES`, a fixed list in this module. A file naming any other type (a
    function such as ``builtins.exec``, a class from elsewhere) is refused before anything in it
    is built. At save time the same check runs, so a head whose types could not be loaded
    back is refused before its run directory is written.
``head.keras`` (the dense head)
    A plain Keras model (built-in layers only), loaded with ``safe_mode=True``, which refuses
    lambda layers and other serialised code. The ``DenseHead`` wrapper around it is rebuilt
    from the hyperparameters and fitted attributes (classes, history, ...) kept as JSON in
    ``head.json``.

Earlier versions stored heads as ``head.joblib`` (a pickle: loading it can run any code). Such
directories are refused with the command that converts them,
``featurecache convert-run DIR --trust`` (:func:`convert_legacy_head`), which unpickles the old
file only when told to trust it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurecache.errors import RunError, UntrustedHeadError

if TYPE_CHECKING:
    from sklearn.base import BaseEstimator

__all__ = [
    "HEAD_FILES",
    "LEGACY_HEAD_FILE",
    "TRUSTED_TYPES",
    "convert_legacy_head",
    "load_head",
    "retrain_hint",
    "save_head",
]

#: File names inside a saved head directory.
HEAD_FILES: tuple[str, ...] = ("head.json", "head.skops", "head.keras")
#: The pickled head of format 1 run directories.
LEGACY_HEAD_FILE = "head.joblib"
SAVE_FORMAT = 2

#: Types a ``head.skops`` file may name beyond skops's defaults (scikit-learn estimators and
#: NumPy): what the registered heads and the usual import-path classifiers keep once fitted.
#: A fixed list on purpose: trusting "whatever the file names" would make the check pointless.
TRUSTED_TYPES: tuple[str, ...] = (
    "featurecache.training.heads.sklearn_heads.flatten_features",
    "featurecache.heads.sklearn_heads.flatten_features",  # heads saved before 0.2 (the featurecache.heads alias)
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.metrics._dist_metrics.ManhattanDistance64",
    "sklearn.metrics._dist_metrics.ChebyshevDistance64",
    "sklearn.metrics._dist_metrics.MinkowskiDistance64",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.gaussian_process._gpc._BinaryGaussianProcessClassifierLaplace",
    "sklearn.gaussian_process.kernels.ConstantKernel",
    "sklearn.gaussian_process.kernels.Product",
    "sklearn.gaussian_process.kernels.RBF",
)
# numpy dtype kinds whose values survive a JSON round trip (DenseHead.classes_).
_JSON_KINDS = frozenset("biuU")


def _untrusted(*, file: Path | None = None, data: bytes | None = None) -> list[str]:
    import skops.io as sio

    found = sio.get_untrusted_types(file=file) if file is not None else sio.get_untrusted_types(data=data)
    return sorted(set(found) - set(TRUSTED_TYPES))


def _convert_hint(src: Path) -> str:
    return f"`featurecache convert-run {src} --trust` converts it (only if you trust where the run came from), or train the head again"


def save_head(est: BaseEstimator, dirpath: str | os.PathLike[str]) -> Path:
    """Save a fitted head into ``dirpath`` (created if needed; existing head files replaced).

    Parameters
    ----------
    est
        A fitted head from ``make_head`` (or any fitted scikit-learn classifier).
    dirpath
        Target directory, typically a run directory.

    Returns
    -------
    pathlib.Path
        The directory.

    Raises
    ------
    sklearn.exceptions.NotFittedError
        When ``est`` is not fitted.
    UntrustedHeadError
        The fitted head holds types outside :data:`TRUSTED_TYPES` (it could not be loaded back).
    """
    import numpy as np
    import sklearn
    from sklearn.utils.validation import check_is_fitted

    from featurecache.cache.fsio import write_atomic
    from featurecache.training.heads.dense import DenseHead, inference_copy

    check_is_fitted(est)
    out = Path(dirpath)
    out.mkdir(parents=True, exist_ok=True)
    # head.json is the completion marker: drop it first so a crash mid-save never leaves
    # a marker next to a half-written head.
    (out / "head.json").unlink(missing_ok=True)
    versions = {"sklearn": sklearn.__version__, "numpy": np.__version__}
    meta: dict[str, Any] = {"format": SAVE_FORMAT}
    if isinstance(est, DenseHead):
        import keras

        classes = np.asarray(est.classes_)
        if classes.dtype.kind not in _JSON_KINDS:
            raise RunError(f"dense head classes of dtype {classes.dtype} cannot be saved; use integer or string labels")
        versions["keras"] = keras.__version__
        write_atomic(
            out / "head.keras",
            lambda tmp: keras.saving.save_model(inference_copy(est.model_), str(tmp)),
            suffix=".keras",
        )
        meta.update(
            kind="keras-dense",
            files=["head.keras"],
            dense={
                "params": est.get_params(deep=False),
                "classes": classes.tolist(),
                "classes_dtype": classes.dtype.str,
                "history": getattr(est, "history_", {}),
                "best_epoch": int(est.best_epoch_),
                "input_shape": list(est.input_shape_),
            },
        )
        (out / "head.skops").unlink(missing_ok=True)
    else:
        import skops.io as sio

        data = sio.dumps(est)
        untrusted = _untrusted(data=data)
        if untrusted:
            raise UntrustedHeadError(
                f"the fitted {type(est).__name__} head holds types featurecache does not load back ({', '.join(untrusted)}): "
                "loading them could run code; use a registered head (see `featurecache heads`) or another classifier"
            )
        write_atomic(out / "head.skops", lambda tmp: tmp.write_bytes(data))
        (out / "head.keras").unlink(missing_ok=True)
        fitted = getattr(est, "classes_", None)
        meta.update(
            kind="sklearn", files=["head.skops"], classes=np.asarray(fitted).tolist() if fitted is not None else None
        )
    (out / LEGACY_HEAD_FILE).unlink(missing_ok=True)
    meta.update(estimator=f"{type(est).__module__}.{type(est).__qualname__}", versions=versions)
    write_atomic(out / "head.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n"))
    return out


def load_head(dirpath: str | os.PathLike[str]) -> BaseEstimator:
    """Load a head saved by :func:`save_head`, executing no code from its files.

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
        No complete saved head, or an unknown format.
    UntrustedHeadError
        A pickled head of an earlier version (``head.joblib``), or a ``head.skops`` that names
        types outside the allow-list; the message says how to convert or retrain.
    """
    src = Path(dirpath)
    meta_path = src / "head.json"
    legacy = (src / LEGACY_HEAD_FILE).is_file()
    if not meta_path.is_file():
        if legacy:
            raise UntrustedHeadError(
                f"{src} keeps its head as a pickle ({LEGACY_HEAD_FILE}), which can run code when loaded; {_convert_hint(src)}"
            )

        raise RunError(
            f"no saved head in {str(src)!r} (head.json missing); point to a run directory written by train-head, or {retrain_hint(src)}"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {meta_path} ({exc}); {retrain_hint(src)}") from None
    kind = meta.get("format"), meta.get("kind")
    if kind[0] == 1 and legacy:
        raise UntrustedHeadError(
            f"{src} keeps its head as a pickle ({LEGACY_HEAD_FILE}, format 1), which can run code when loaded; {_convert_hint(src)}"
        )
    if kind not in ((SAVE_FORMAT, "sklearn"), (SAVE_FORMAT, "keras-dense")):
        raise RunError(
            f"saved head in {str(src)!r} has format {kind[0]!r} kind {kind[1]!r}; this version reads format "
            f"{SAVE_FORMAT} kinds 'keras-dense', 'sklearn' -- train the head again"
        )
    missing = [f for f in meta.get("files", []) if not (src / f).is_file()]
    if missing:
        raise RunError(f"saved head in {str(src)!r} lacks {missing!r}; train it again or copy the whole directory")
    if kind[1] == "keras-dense":
        return _load_dense(src, meta)
    return _load_skops(src / "head.skops")


def _load_skops(path: Path) -> BaseEstimator:
    import skops.io as sio

    try:
        untrusted = _untrusted(file=path)
    except Exception as exc:  # a corrupt zip or schema: cannot be read, whatever the reason
        raise RunError(
            f"cannot read {path} ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); train the head again"
        ) from None
    if untrusted:
        raise UntrustedHeadError(
            f"{path} names types outside featurecache's allow-list ({', '.join(untrusted)}); loading them could run code, "
            "so it is refused: train the head again with `featurecache train-head`"
        )
    return sio.load(path, trusted=list(TRUSTED_TYPES))


def _load_dense(src: Path, meta: dict[str, Any]) -> BaseEstimator:
    import keras
    import numpy as np

    from featurecache.training.heads.dense import DenseHead

    fields = meta.get("dense") or {}
    try:
        # JSON turns the tuple hidden=(256, 128) into a list; get_params must round-trip.
        params: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in fields["params"].items()}
        est = DenseHead(**params)
        est.classes_ = np.asarray(fields["classes"], dtype=np.dtype(fields["classes_dtype"]))
        est.history_ = {str(k): [float(v) for v in vals] for k, vals in (fields.get("history") or {}).items()}
        est.best_epoch_ = int(fields["best_epoch"])
        est.input_shape_ = tuple(int(d) for d in fields["input_shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RunError(
            f"{src / 'head.json'} does not describe a dense head ({type(exc).__name__}: {exc}); train the head again"
        ) from None
    est.n_features_in_ = int(np.prod(est.input_shape_))
    try:
        est.model_ = keras.saving.load_model(src / "head.keras", compile=False, safe_mode=True)
    except Exception as exc:  # corrupt zip, an unsafe layer refused by safe_mode, a newer Keras
        raise RunError(
            f"cannot load {src / 'head.keras'} in Keras safe mode ({' '.join(str(exc).split())[:200]}); train the head again"
        ) from None
    return est


def convert_legacy_head(dirpath: str | os.PathLike[str], *, trust: bool = False) -> Path:
    """Rewrite a run directory's pickled ``head.joblib`` in the safe format (``head.skops`` / ``head.keras``).

    Parameters
    ----------
    dirpath
        A run directory (or saved head directory) of an earlier version.
    trust
        Must be ``True``: unpickling the old file runs whatever code it holds, so only a run
        you made yourself, or got from someone you trust, may be converted.

    Returns
    -------
    pathlib.Path
        The directory, now loadable by :func:`load_head`.

    Raises
    ------
    UsageError
        ``trust`` is not set.
    RunError
        There is no ``head.joblib`` to convert.
    """
    from featurecache.errors import UsageError

    src = Path(dirpath)
    legacy = src / LEGACY_HEAD_FILE
    if not legacy.is_file():
        raise RunError(
            f"{src} has no {LEGACY_HEAD_FILE} to convert; point to a run directory of an earlier featurecache version"
        )
    if not trust:
        raise UsageError(
            f"converting {src} unpickles {legacy}, which runs any code the file holds; "
            f"pass --trust only for a run you made or trust: featurecache convert-run {src} --trust"
        )
    import joblib

    est = joblib.load(legacy)  # the one pickle load in featurecache, behind an explicit --trust
    if (src / "head.keras").is_file() and getattr(est, "model_", None) is None:
        import keras

        est.model_ = keras.saving.load_model(src / "head.keras", compile=False, safe_mode=True)
    # Build the new head aside, then move its files in: head.json (the marker) last.
    tmp = src / f".head-convert-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        save_head(est, tmp)
        (src / "head.json").unlink(missing_ok=True)
        for name in ("head.skops", "head.keras", "head.json"):
            if (tmp / name).is_file():
                os.replace(tmp / name, src / name)
        legacy.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return src


def retrain_hint(run_dir: str | os.PathLike[str]) -> str:
    """How to (re)write ``run_dir``: the ``train-head`` command its ``config.json`` records, else where to find features.

    Every command it prints works when pasted (the CLI adds the ``--cache`` it was given).
    """
    path = Path(run_dir)
    try:
        config = json.loads((path / "config.json").read_text())
        key, head = str(config["features"]["key"]), str(config["head"])
        from featurecache.training.heads.registry import head_param_schema

        schema = head_param_schema(head)
        params = [
            f"-p {shlex.quote(f'{k}={schema[k].format(v)}')}"
            for k, v in (config.get("params") or {}).items()
            if k in schema and schema[k].format(v) != schema[k].format(schema[k].default)
        ]
    except Exception:  # noqa: BLE001 - no readable record: the generic hint
        return f"list the feature sets with `featurecache cache ls` and train a head into it with train-head --features KEY --out {shlex.quote(str(path))}"
    command = " ".join(
        [
            "featurecache train-head --features",
            key,
            "--head",
            shlex.quote(head),
            *params,
            "--out",
            shlex.quote(str(path)),
        ]
    )
    return f"train it again with `{command}`"
