"""Datasets, robust image decoding, resizing and deterministic augmentation.

``load_dataset(source)`` turns a folder, CSV manifest, ``.npz``, ``keras:<name>`` or
``builtin:digits`` into a :class:`Dataset` whose :meth:`Dataset.digest` identifies its content;
:func:`decode_image`, :func:`resize_image` and :func:`augment_batch` are the per-image steps
extraction runs before the backbone.
"""

from featurecache.data.dataset import Dataset, Split
from featurecache.data.decode import DECODE_MODES, IMAGE_EXTENSIONS, decode_image, decode_workers
from featurecache.data.sources import ACCEPTED_FORMS, load_dataset
from featurecache.data.transforms import RESIZE_METHODS, AugmentSpec, augment_batch, resize_image

__all__ = [
    "ACCEPTED_FORMS",
    "DECODE_MODES",
    "IMAGE_EXTENSIONS",
    "RESIZE_METHODS",
    "AugmentSpec",
    "Dataset",
    "Split",
    "augment_batch",
    "decode_image",
    "decode_workers",
    "load_dataset",
    "resize_image",
]
