"""The in-memory split types and the helpers every data source shares."""

import dataclasses

import numpy as np
import tensorflow as tf

# Number of images in one tf.data batch while decoding or resizing.
DECODE_BATCH_SIZE = 512


@dataclasses.dataclass(frozen=True)
class ArraySplit:
    """Images and labels of one split, held in memory.

    Attributes:
        images: uint8 `[num_examples, height, width, 3]`.
        labels: int64 `[num_examples]`, class ids in `[0, num_classes)`.
    """

    images: np.ndarray
    labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class DatasetSplits:
    """Train and test splits of one data set, with its class names."""

    train: ArraySplit
    test: ArraySplit
    num_classes: int
    class_names: tuple[str, ...]


def random_indices(num_examples: int, max_examples: int | None, seed: int):
    """Return sorted indices of a seeded random subset, or None for all."""
    if max_examples is None or max_examples >= num_examples:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_examples, size=max_examples, replace=False))


def resize_uint8(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resize uint8 `[..., height, width, 3]` images bilinearly, as uint8."""
    resized = tf.image.resize(images, [image_size, image_size])
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
