"""scikit-learn heads: each builder returns ``Pipeline(flatten, [scale,] clf)``.

The first step always flattens ``(n, h, w, c)`` feature maps to ``(n, h*w*c)`` and passes
2-D input through unchanged.  It lives inside the pipeline (not in the caller) so a saved
head accepts exactly the feature tensor it was trained on, whatever produced it.

Probabilities for margin classifiers (``linear-svm``, ``ridge``): their decision scores are
distances to a hyperplane whose scale depends on the regularisation strength, not
log-odds, so a softmax over them gives probabilities that are neither calibrated nor
comparable across ``C`` values (and the log loss a sweep ranks by would reward whichever
``C`` happened to produce the right scale).  We therefore wrap them in
``CalibratedClassifierCV``: Platt (``sigmoid``) or ``isotonic`` calibration fitted on
held-out folds, one-vs-rest and renormalised.  It costs ``cv`` extra fits, which is cheap
for linear models on cached features.

scikit-learn is imported inside the builders so ``import featurecache.heads`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sklearn.base import BaseEstimator
    from sklearn.pipeline import Pipeline

__all__ = [
    "build_import_path",
    "build_knn",
    "build_linear_svm",
    "build_logreg",
    "build_ridge",
    "build_sgd",
    "flatten_features",
]


def flatten_features(X: Any) -> np.ndarray:
    """Flatten features to 2-D: ``(n, *feat) -> (n, prod(feat))``; 2-D input is unchanged.

    Parameters
    ----------
    X
        Array-like of shape ``(n, d)`` or ``(n, h, w, c)`` (any rank >= 2).

    Returns
    -------
    numpy.ndarray
        A 2-D array (a view when possible).

    Raises
    ------
    ValueError
        When ``X`` has fewer than 2 dimensions.
    """
    arr = np.asarray(X)
    if arr.ndim < 2:
        raise ValueError(
            f"features must have shape (n_samples, *feature_shape), got shape {arr.shape}; "
            "reshape a single sample with X[None]"
        )
    return arr.reshape(arr.shape[0], -1) if arr.ndim > 2 else arr


def _pipeline(clf: BaseEstimator, *, scale: bool) -> Pipeline:
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    steps: list[tuple[str, Any]] = [("flatten", FunctionTransformer(flatten_features))]
    if scale:
        steps.append(("scale", StandardScaler()))
    steps.append(("clf", clf))
    return Pipeline(steps)


def build_logreg(*, C: float, max_iter: int, tol: float, class_weight: str | None) -> Pipeline:
    """Multinomial logistic regression (lbfgs; multinomial is sklearn's multiclass default).

    Parameters
    ----------
    C, max_iter, tol, class_weight
        As in ``sklearn.linear_model.LogisticRegression``.

    Returns
    -------
    sklearn.pipeline.Pipeline
        ``flatten -> StandardScaler -> LogisticRegression``.
    """
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=max_iter, tol=tol, class_weight=class_weight)
    return _pipeline(clf, scale=True)


def build_linear_svm(
    *,
    C: float,
    max_iter: int,
    class_weight: str | None,
    calibration: str,
    cv: int,
    seed: int,
) -> Pipeline:
    """Linear SVM with cross-validated probability calibration (see the module docstring).

    Parameters
    ----------
    C, max_iter, class_weight
        As in ``sklearn.svm.LinearSVC``.
    calibration
        ``"sigmoid"`` (Platt) or ``"isotonic"``.
    cv
        Calibration folds; every class needs at least ``cv`` training samples.
    seed
        ``random_state`` of the SVM solver.

    Returns
    -------
    sklearn.pipeline.Pipeline
        ``flatten -> StandardScaler -> CalibratedClassifierCV(LinearSVC)``.
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import LinearSVC

    svm = LinearSVC(C=C, max_iter=max_iter, class_weight=class_weight, random_state=seed)
    return _pipeline(CalibratedClassifierCV(svm, method=calibration, cv=cv), scale=True)


def build_ridge(*, alpha: float, class_weight: str | None, calibration: str, cv: int) -> Pipeline:
    """Ridge classifier with cross-validated probability calibration.

    Parameters
    ----------
    alpha, class_weight
        As in ``sklearn.linear_model.RidgeClassifier``.
    calibration, cv
        As in ``build_linear_svm``.

    Returns
    -------
    sklearn.pipeline.Pipeline
        ``flatten -> StandardScaler -> CalibratedClassifierCV(RidgeClassifier)``.
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import RidgeClassifier

    ridge = RidgeClassifier(alpha=alpha, class_weight=class_weight)
    return _pipeline(CalibratedClassifierCV(ridge, method=calibration, cv=cv), scale=True)


def build_sgd(
    *,
    alpha: float,
    penalty: str,
    l1_ratio: float,
    max_iter: int,
    tol: float,
    class_weight: str | None,
    seed: int,
) -> Pipeline:
    """Logistic regression by SGD (``loss="log_loss"``, so ``predict_proba`` exists).

    SGD needs standardised inputs to converge with its default learning-rate schedule,
    hence the scaler.

    Parameters
    ----------
    alpha, penalty, l1_ratio, max_iter, tol, class_weight
        As in ``sklearn.linear_model.SGDClassifier``.
    seed
        ``random_state`` (sample order).

    Returns
    -------
    sklearn.pipeline.Pipeline
        ``flatten -> StandardScaler -> SGDClassifier``.
    """
    from sklearn.linear_model import SGDClassifier

    clf = SGDClassifier(
        loss="log_loss",
        alpha=alpha,
        penalty=penalty,
        l1_ratio=l1_ratio,
        max_iter=max_iter,
        tol=tol,
        class_weight=class_weight,
        random_state=seed,
    )
    return _pipeline(clf, scale=True)


def build_knn(*, n_neighbors: int, weights: str, metric: str) -> Pipeline:
    """k-nearest neighbours on the raw features.

    No scaler: backbone features live in a space where raw (often cosine) distances are
    what retrieval-style evaluation expects; per-dimension standardisation would let
    near-constant, noisy channels dominate the distance.

    Parameters
    ----------
    n_neighbors, weights, metric
        As in ``sklearn.neighbors.KNeighborsClassifier``.

    Returns
    -------
    sklearn.pipeline.Pipeline
        ``flatten -> KNeighborsClassifier``.
    """
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=n_neighbors, weights=weights, metric=metric)
    return _pipeline(clf, scale=False)


def build_import_path(cls: type, *, path: str, params: dict[str, Any]) -> Pipeline:
    """Instantiate an allowed import-path classifier behind the flatten step and a scaler.

    Import-path heads get the input standardisation the registered linear heads get: backbone
    features can be tiny (random-weight MobileNetV2 gives ~1e-11), which trees treat as
    constant (scikit-learn ignores splits narrower than 1e-7): a random forest sat at chance,
    0.10, and reached 0.87 scaled. Scale-free estimators lose nothing.

    Parameters
    ----------
    cls
        The estimator class, already checked to be a classifier.
    path
        The import path, only for error messages.
    params
        Typed constructor arguments.

    Returns
    -------
    sklearn.pipeline.Pipeline
        ``flatten -> StandardScaler -> cls(**params)``.

    Raises
    ------
    HeadParamError
        When the estimator rejects the arguments or has no ``predict_proba`` with them
        (e.g. ``sklearn.svm:SVC`` without ``probability=true``).
    """
    from featurecache.errors import HeadParamError

    try:
        clf = cls(**params)
    except (TypeError, ValueError) as exc:
        raise HeadParamError(f"head {path!r}: {exc}; check its parameters") from None
    if not hasattr(clf, "predict_proba"):
        raise HeadParamError(
            f"head {path!r} has no predict_proba with these parameters, which metrics and "
            "sweeps need; set probability=true (SVC) or pick another estimator"
        )
    return _pipeline(clf, scale=True)
