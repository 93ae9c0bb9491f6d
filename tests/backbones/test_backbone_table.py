"""Every row of the backbone table against Keras: it builds at its minimum size, and no smaller.

For each registry row, with random weights at ``min_size``: Keras refuses one pixel less (so
``min_size`` is the true minimum), the base ends at ``feature_layer``, has ``params``
parameters and ``feature_dim`` channels, and the blocks cover every layer exactly once.

The rows in ``IN_EVERY_RUN`` build in at most ~1.6 s of CPU each on this 2-core machine
(about 13 s together, measured row by row with ``time.process_time`` around
``build_base`` at ``min_size``); they run in every test run, so a Keras upgrade that renames a
layer or changes a model fails CI. The larger rows (about 80 s together) run with
``FEATURECACHE_AUDIT_BACKBONES=1``: do that after a Keras upgrade. DenseNet121 is also built
by ``test_backbones.py::test_feature_model_equals_plain_keras`` in every run.
"""

from __future__ import annotations

import os

import pytest
from test_backbones import _check_blocks_and_table

from featurecache import backbones as B

#: Rows that build in a few seconds at their minimum size (CPU seconds measured on 2 cores).
IN_EVERY_RUN = frozenset({
    "vgg16", "vgg19",  # 0.3
    "mobilenet", "mobilenetv2", "mobilenetv3small", "mobilenetv3large",  # 0.5-0.9
    "convnexttiny", "convnextsmall",  # 0.8, 1.3
    "xception",  # 0.9
    "resnet50", "resnet50v2",  # 1.1, 1.0
    "efficientnetb0", "efficientnetv2b0",  # 1.2, 1.6
    "inceptionv3",  # 1.6 at 75 px
})  # fmt: skip

AUDIT_ALL = bool(os.environ.get("FEATURECACHE_AUDIT_BACKBONES"))


def _rows() -> list:
    skip = pytest.mark.skipif(
        not AUDIT_ALL, reason="a large model: set FEATURECACHE_AUDIT_BACKBONES=1 to build every row"
    )
    return [pytest.param(s.name, marks=() if s.name in IN_EVERY_RUN else (skip,)) for s in B.list_backbones()]


def test_rows_run_in_every_run_exist() -> None:
    # A renamed row must not drop out of CI silently.
    assert IN_EVERY_RUN <= {s.name for s in B.list_backbones()}


@pytest.mark.parametrize("name", _rows())
def test_backbone_row_matches_keras(name: str) -> None:
    import keras

    spec = B.get_backbone(name)
    with pytest.raises(ValueError):  # Keras itself refuses one pixel less: min_size is the minimum
        getattr(keras.applications, spec.constructor)(
            include_top=False, weights=None, input_shape=(spec.min_size - 1, spec.min_size - 1, 3)
        )
    base = B.build_base(spec, B.WeightsRef("random"), input_size=spec.min_size)
    assert base.layers[-1].name == spec.feature_layer and base.count_params() == spec.params
    assert min(base.output.shape[1:3]) >= 1
    _check_blocks_and_table(spec, base)
