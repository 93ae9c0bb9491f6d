"""The scikit-learn heads' hyperparameters: per head name, a one-line summary and its schema.

Each entry is what :mod:`featurecache.heads.sklearn_heads`'s builder of that name accepts
(type, bounds, default and search range of each parameter); the registry pairs it with the
builder. A module of its own, like :mod:`featurecache.heads.dense_params`, so the CLI lists
heads and their parameters without importing scikit-learn.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from featurecache.training.heads.params import CALIBRATION, CLASS_WEIGHT, CV, SEED, ParamSpec, SearchSpace

__all__ = ["SKLEARN_HEADS"]

#: Head name -> (summary, parameters in display order).
SKLEARN_HEADS: Mapping[str, tuple[str, tuple[ParamSpec, ...]]] = MappingProxyType(
    {
        "logreg": (
            "multinomial logistic regression (lbfgs) behind a StandardScaler",
            (
                ParamSpec(
                    "C",
                    "float",
                    1.0,
                    "inverse L2 regularisation strength",
                    gt=0,
                    search=SearchSpace("loguniform", 1e-4, 1e2),
                ),
                ParamSpec("max_iter", "int", 1000, "lbfgs iterations", ge=1),
                ParamSpec("tol", "float", 1e-4, "stopping tolerance", gt=0),
                CLASS_WEIGHT,
            ),
        ),
        "linear-svm": (
            "linear SVM (LinearSVC) behind a StandardScaler, probabilities by cross-validated calibration",
            (
                ParamSpec(
                    "C",
                    "float",
                    1.0,
                    "inverse regularisation strength",
                    gt=0,
                    search=SearchSpace("loguniform", 1e-4, 1e1),
                ),
                ParamSpec("max_iter", "int", 2000, "liblinear iterations", ge=1),
                CLASS_WEIGHT,
                CALIBRATION,
                CV,
                SEED,
            ),
        ),
        "ridge": (
            "ridge classifier behind a StandardScaler, probabilities by cross-validated calibration",
            (
                ParamSpec(
                    "alpha",
                    "float",
                    1.0,
                    "L2 regularisation strength",
                    gt=0,
                    search=SearchSpace("loguniform", 1e-2, 1e4),
                ),
                CLASS_WEIGHT,
                CALIBRATION,
                CV,
            ),
        ),
        "sgd": (
            "logistic regression trained by SGD (SGDClassifier, loss=log_loss) behind a StandardScaler",
            (
                ParamSpec(
                    "alpha",
                    "float",
                    1e-4,
                    "regularisation strength",
                    gt=0,
                    search=SearchSpace("loguniform", 1e-6, 1e-1),
                ),
                ParamSpec(
                    "penalty",
                    "choice",
                    "l2",
                    "regularisation type",
                    choices=("l2", "l1", "elasticnet"),
                    search=SearchSpace("choice", choices=("l2", "elasticnet")),
                ),
                ParamSpec(
                    "l1_ratio",
                    "float",
                    0.15,
                    "L1 share of the elasticnet penalty",
                    ge=0,
                    le=1,
                    search=SearchSpace("uniform", 0.0, 1.0),
                ),
                ParamSpec("max_iter", "int", 1000, "epochs over the data", ge=1),
                ParamSpec("tol", "float", 1e-3, "stopping tolerance", gt=0),
                CLASS_WEIGHT,
                SEED,
            ),
        ),
        "knn": (
            "k-nearest neighbours on the raw (unscaled) features",
            (
                ParamSpec(
                    "n_neighbors",
                    "int",
                    5,
                    "number of neighbours",
                    ge=1,
                    search=SearchSpace("choice", choices=(1, 3, 5, 7, 11, 15, 25)),
                ),
                ParamSpec(
                    "weights",
                    "choice",
                    "uniform",
                    "neighbour vote weighting",
                    choices=("uniform", "distance"),
                    search=SearchSpace("choice", choices=("uniform", "distance")),
                ),
                ParamSpec(
                    "metric",
                    "choice",
                    "euclidean",
                    "distance metric",
                    choices=("euclidean", "cosine", "manhattan", "minkowski"),
                    search=SearchSpace("choice", choices=("euclidean", "cosine")),
                ),
            ),
        ),
    }
)
