"""The dense head's hyperparameters: type, bounds, default and search range of each (its schema).

:class:`featurecache.heads.dense.DenseHead` takes its ``__init__`` defaults from here and
validates ``fit``'s parameters against these specs; the registry lists the same tuple. It is a
module of its own because ``dense.py`` imports scikit-learn, which the CLI must not pay for
to list heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from featurecache.training.heads.params import CLASS_WEIGHT, SEED, ParamSpec, SearchSpace

__all__ = ["DENSE_DEFAULTS", "DENSE_PARAMS"]

#: The dense head's parameters, in display order.
DENSE_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec(
        "pool",
        "choice",
        "auto",
        "pooling of spatial (n,h,w,c) features; auto = avg for 4-D, none for 2-D",
        choices=("auto", "avg", "flatten", "none"),
    ),
    ParamSpec(
        "hidden",
        "int_tuple",
        (256,),
        "hidden layer widths",
        search=SearchSpace(
            "choice",
            choices=((), (256,), (512,), (256, 128), (512, 256), (1024, 256)),
        ),
    ),
    ParamSpec(
        "normalize",
        "bool",
        True,
        "standardise the pooled input features with training-set mean and variance (a frozen layer inside the head)",
    ),
    ParamSpec(
        "batchnorm",
        "bool",
        False,
        "BatchNormalization after each hidden Dense",
        search=SearchSpace("choice", choices=(False, True)),
    ),
    ParamSpec(
        "dropout",
        "float",
        0.5,
        "dropout rate after each hidden layer",
        ge=0,
        lt=1,
        search=SearchSpace("choice", choices=(0.0, 0.2, 0.3, 0.5)),
    ),
    ParamSpec(
        "activation",
        "choice",
        "relu",
        "hidden activation",
        choices=("relu", "gelu", "swish", "elu", "tanh", "selu"),
    ),
    ParamSpec(
        "l2",
        "float",
        0.0,
        "L2 weight penalty on every Dense kernel",
        ge=0,
        search=SearchSpace("loguniform", 1e-6, 1e-2),
    ),
    ParamSpec(
        "optimizer",
        "choice",
        "adam",
        "optimizer (sgd uses Nesterov momentum 0.9)",
        choices=("adam", "rmsprop", "sgd"),
    ),
    ParamSpec(
        "lr",
        "float",
        1e-3,
        "learning rate",
        gt=0,
        search=SearchSpace("loguniform", 1e-4, 1e-2),
    ),
    ParamSpec(
        "batch_size",
        "int",
        64,
        "mini-batch size",
        ge=1,
        search=SearchSpace("choice", choices=(32, 64, 128, 256)),
    ),
    ParamSpec("epochs", "int", 30, "maximum epochs", ge=1),
    ParamSpec(
        "patience",
        "int",
        5,
        "early-stopping patience on val_loss (0 = off; needs validation data)",
        ge=0,
    ),
    CLASS_WEIGHT,
    SEED,
    ParamSpec("verbose", "int", 0, "Keras fit verbosity (0, 1 or 2)", ge=0, le=2),
)

#: Default value of each parameter by name (``DenseHead()``'s defaults).
DENSE_DEFAULTS: Mapping[str, Any] = MappingProxyType({p.name: p.default for p in DENSE_PARAMS})
