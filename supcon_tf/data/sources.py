"""In-memory train and test splits of CIFAR-10, CIFAR-100 and image folders.

CIFAR data come from the official Python release, as a folder or as its
`.tar.gz` archive, read without running arbitrary pickled code (see
`cifar.py`). An image folder contains one sub-folder per class, and its
files are decoded with TensorFlow (see `folders.py`).
"""

import dataclasses

import numpy as np

from supcon_tf.data.cifar import CIFAR_NAMES, load_cifar
from supcon_tf.data.folders import IMAGE_EXTENSIONS, load_folder
from supcon_tf.data.splits import (
    DECODE_BATCH_SIZE,
    ArraySplit,
    DatasetSplits,
    random_indices,
    resize_uint8,
)
from supcon_tf.errors import UsageError

__all__ = [
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
    "ArraySplit",
    "DatasetSplits",
    "channel_stats",
    "load_dataset",
]

DATASET_NAMES = ("cifar10", "cifar100", "folder")


def load_dataset(
    name: str,
    data_dir: str | None = None,
    *,
    image_size: int | None = None,
    max_train_examples: int | None = None,
    max_test_examples: int | None = None,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> DatasetSplits:
    """Load the train and test splits of a data set into memory.

    Args:
        name: One of `DATASET_NAMES`.
        data_dir: For CIFAR, a folder that is or contains the extracted Python
            release, or its `.tar.gz`. When None, the Keras cache or
            `keras.datasets` supplies CIFAR. For "folder", the image folder.
        image_size: Resize every image to `image_size x image_size` (bilinear).
            When None, all images must share one size.
        max_train_examples: Keep a random subset of this many train examples.
        max_test_examples: Keep a random subset of this many test examples.
        test_fraction: Fraction of each class held out as the test split when
            an image folder has no `train/` and `test/` sub-folders.
        seed: Seed for the subsets and the held-out split.

    Returns:
        The splits, with labels in `[0, num_classes)`.

    Raises:
        UsageError: An invalid argument, or missing or unreadable data.
    """
    for flag, value in (
        ("image_size", image_size),
        ("max_train_examples", max_train_examples),
        ("max_test_examples", max_test_examples),
    ):
        if value is not None and value <= 0:
            raise UsageError(f"--{flag}={value} is invalid: it must be > 0.")
    if name == "folder":
        return load_folder(
            data_dir, image_size, max_train_examples, max_test_examples,
            test_fraction, seed,
        )  # fmt: skip
    if name in CIFAR_NAMES:
        splits = load_cifar(name, data_dir)
        train = _resize_split(
            _subset_split(splits.train, max_train_examples, seed), image_size
        )
        test = _resize_split(
            _subset_split(splits.test, max_test_examples, seed), image_size
        )
        return dataclasses.replace(splits, train=train, test=test)
    raise UsageError(
        f"Unknown data set {name!r}: valid names are "
        f"{', '.join(DATASET_NAMES)}."
    )


def channel_stats(split: ArraySplit) -> tuple[np.ndarray, np.ndarray]:
    """Compute the per-channel mean and standard deviation of `images / 255`.

    Returns:
        `(mean, std)`, each float32 `[3]`. The std is the population std.
    """
    num_examples = len(split.images)
    if num_examples == 0:
        raise UsageError("Cannot compute channel statistics of an empty split.")
    total = np.zeros(3)
    total_squares = np.zeros(3)
    for start in range(0, num_examples, 4096):
        chunk = split.images[start : start + 4096].reshape(-1, 3) / 255.0
        total += chunk.sum(axis=0)
        total_squares += np.square(chunk).sum(axis=0)
    count = split.images[..., 0].size
    mean = total / count
    variance = np.maximum(total_squares / count - np.square(mean), 0.0)
    return mean.astype(np.float32), np.sqrt(variance).astype(np.float32)


def _subset_split(split: ArraySplit, max_examples, seed) -> ArraySplit:
    indices = random_indices(len(split.labels), max_examples, seed)
    if indices is None:
        return split
    return ArraySplit(split.images[indices], split.labels[indices])


def _resize_split(split: ArraySplit, image_size: int | None) -> ArraySplit:
    if image_size is None or split.images.shape[1:3] == (image_size,) * 2:
        return split
    chunks = [
        resize_uint8(
            split.images[start : start + DECODE_BATCH_SIZE], image_size
        )
        for start in range(0, len(split.images), DECODE_BATCH_SIZE)
    ]
    images = np.concatenate([chunk.numpy() for chunk in chunks])
    return ArraySplit(images, split.labels)
