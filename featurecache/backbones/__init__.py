"""Backbones over ``keras.applications``: what to build, how to feed it, where to cut it, and which weights it holds.

The package re-exports its public API, so ``from featurecache import backbones`` then
``backbones.get_backbone("vgg19")`` is all a caller needs. Its modules, lowest first (each
imports only those before it):

* :mod:`~featurecache.backbones.registry` -- the frozen :class:`BackboneSpec` table and lookup by
  name (errors list the valid names);
* :mod:`~featurecache.backbones.weights` -- ``--weights`` parsed into a :class:`WeightsRef`, and a
  weights file loaded into a model;
* :mod:`~featurecache.backbones.custom` -- a user's ``.keras`` model file as a backbone;
* :mod:`~featurecache.backbones.build` -- the base and feature models with stable layer names,
  pooling, input size and preprocessing;
* :mod:`~featurecache.backbones.blocks` -- the named block of each layer, and the layer listing;
* :mod:`~featurecache.backbones.identity` -- the weights' digest in the cache key, memoised.

Nothing here imports TensorFlow or Keras until a model is built or an input preprocessed, so
listing backbones, ``featurecache --help`` and a cache hit stay fast.
"""

from __future__ import annotations

from featurecache.backbones.blocks import block_layers, list_layers
from featurecache.backbones.build import (
    build_base,
    build_feature_model,
    check_input_size,
    pooling_layer,
    preprocess_input,
)
from featurecache.backbones.custom import custom_backbone
from featurecache.backbones.identity import MEMO_FILE, recorded_weights_source, weights_identity
from featurecache.backbones.registry import get_backbone, list_backbones, model_summary_row
from featurecache.backbones.spec import PREPROCESS_MODES, BackboneSpec
from featurecache.backbones.weights import WEIGHT_SUFFIXES, WeightsRef, parse_weights

__all__ = [
    "MEMO_FILE",
    "PREPROCESS_MODES",
    "WEIGHT_SUFFIXES",
    "BackboneSpec",
    "WeightsRef",
    "block_layers",
    "build_base",
    "build_feature_model",
    "check_input_size",
    "custom_backbone",
    "get_backbone",
    "list_backbones",
    "list_layers",
    "model_summary_row",
    "parse_weights",
    "pooling_layer",
    "preprocess_input",
    "recorded_weights_source",
    "weights_identity",
]
