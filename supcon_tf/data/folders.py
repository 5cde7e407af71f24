"""Image folders: one sub-folder per class, decoded with TensorFlow."""

import os
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from supcon_tf.data.splits import (
    DECODE_BATCH_SIZE,
    ArraySplit,
    DatasetSplits,
    random_indices,
    resize_uint8,
)
from supcon_tf.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


class _FileList(NamedTuple):
    paths: list[str]
    labels: np.ndarray  # int64 [num_files]


def load_folder(
    data_dir, image_size, max_train_examples, max_test_examples,
    test_fraction, seed,
) -> DatasetSplits:  # fmt: skip
    # TODO: every image is decoded into one in-memory uint8 array, which
    # suits CIFAR-sized sets. Folders larger than memory need a streaming
    # source that decodes per batch.
    if data_dir is None:
        raise UsageError("--dataset=folder needs --data_dir: an image folder.")
    if not os.path.isdir(data_dir):
        raise UsageError(f"Image folder --data_dir={data_dir} not found.")
    train_dir = os.path.join(data_dir, "train")
    test_dir = os.path.join(data_dir, "test")
    if os.path.isdir(train_dir) != os.path.isdir(test_dir):
        raise UsageError(
            f"Image folder {data_dir} has only one of train/ and test/: add "
            "the other, or remove it to split the images automatically."
        )
    if os.path.isdir(train_dir):
        class_names = _class_folders(train_dir)
        train_files = _list_images(train_dir, class_names)
        test_files = _list_images(
            test_dir, _class_folders(test_dir), class_names
        )
    else:
        class_names = _class_folders(data_dir)
        files = _list_images(data_dir, class_names)
        train_files, test_files = _split_files(files, test_fraction, seed)
    train_files = _subset_files(train_files, max_train_examples, seed)
    test_files = _subset_files(test_files, max_test_examples, seed)
    train_images = _decode_images(train_files.paths, image_size)
    first = (train_files.paths[0], train_images.shape[1:3])
    test_images = _decode_images(test_files.paths, image_size, first)
    return DatasetSplits(
        train=ArraySplit(train_images, train_files.labels),
        test=ArraySplit(test_images, test_files.labels),
        num_classes=len(class_names),
        class_names=class_names,
    )


def _class_folders(folder: str) -> tuple[str, ...]:
    names = sorted(
        entry.name
        for entry in os.scandir(folder)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    if not names:
        raise UsageError(
            f"Image folder {folder} has no class sub-folders: put the images "
            "of each class in a sub-folder named after the class."
        )
    return tuple(names)


def _list_images(folder: str, folder_names, class_names=None) -> _FileList:
    """List the image files of each class folder, with their class ids.

    `class_names` fixes the class ids. It defaults to `folder_names`.
    """
    class_names = class_names or folder_names
    paths, labels = [], []
    for name in folder_names:
        if name not in class_names:
            raise UsageError(
                f"Class folder {os.path.join(folder, name)} is not a class of "
                f"the train split ({', '.join(class_names)})."
            )
        class_dir = os.path.join(folder, name)
        files = sorted(
            entry.name for entry in os.scandir(class_dir)
            if entry.is_file()
            and entry.name.lower().endswith(IMAGE_EXTENSIONS)
        )  # fmt: skip
        paths += [os.path.join(class_dir, file) for file in files]
        labels += [class_names.index(name)] * len(files)
    if not paths:
        raise UsageError(
            f"Image folder {folder} contains no image files "
            f"({', '.join(IMAGE_EXTENSIONS)}) in its class sub-folders."
        )
    return _FileList(paths, np.asarray(labels, dtype=np.int64))


def _split_files(files: _FileList, test_fraction: float, seed: int):
    """Hold out a seeded random `test_fraction` of each class as test files."""
    if not 0.0 < test_fraction < 1.0:
        raise UsageError(
            f"--test_fraction={test_fraction} is invalid: it must be in (0, 1)."
        )
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(files.paths), dtype=bool)
    for label in np.unique(files.labels):
        members = rng.permutation(np.flatnonzero(files.labels == label))
        num_test = int(round(len(members) * test_fraction))
        if len(members) >= 2:
            num_test = min(max(num_test, 1), len(members) - 1)
        is_test[members[:num_test]] = True
    return _select_files(files, ~is_test), _select_files(files, is_test)


def _select_files(files: _FileList, selection: np.ndarray) -> _FileList:
    """Return the files at the integer indices or boolean mask `selection`."""
    paths = np.asarray(files.paths, dtype=object)[selection]
    return _FileList(list(paths), files.labels[selection])


def _subset_files(files: _FileList, max_examples, seed) -> _FileList:
    indices = random_indices(len(files.paths), max_examples, seed)
    return files if indices is None else _select_files(files, indices)


def _decode_images(paths, image_size, first=None) -> np.ndarray:
    """Decode image files into uint8 `[num_files, height, width, 3]`.

    Args:
        paths: Image file paths.
        image_size: Resize to `image_size x image_size`, or None to keep the
            size, which must then be the size of the first image.
        first: `(path, (height, width))` of the first image of the data set,
            or None when `paths[0]` is the first image.
    """
    if not paths:
        return np.empty((0, *first[1], 3), np.uint8)
    dataset = tf.data.Dataset.from_tensor_slices(paths).map(
        lambda path: _decode_file(path, image_size),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    iterator = iter(dataset.ragged_batch(DECODE_BATCH_SIZE))
    images = None
    for start in range(0, len(paths), DECODE_BATCH_SIZE):
        try:
            flat_images, shapes = next(iterator)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
            raise _find_decode_error(paths[start:], e) from e
        if first is None:
            first = (paths[0], tuple(shapes[0, :2].numpy()))
        height, width = first[1]
        _check_sizes(paths[start:], shapes.numpy(), first)
        if images is None:
            images = np.empty((len(paths), height, width, 3), np.uint8)
        if isinstance(flat_images, tf.RaggedTensor):  # Sizes may differ.
            flat_images = flat_images.flat_values
        batch = flat_images.numpy().reshape(-1, height, width, 3)
        images[start : start + len(batch)] = batch
    return images


def _decode_file(path: tf.Tensor, image_size: int | None):
    """Decode one image into flat uint8 pixels and its int32 `[3]` shape."""
    image = tf.io.decode_image(
        tf.io.read_file(path), channels=3, expand_animations=False
    )
    if image_size is not None:
        image = resize_uint8(image, image_size)
    return tf.reshape(image, [-1]), tf.shape(image)


def _check_sizes(paths, shapes: np.ndarray, first) -> None:
    """Raise UsageError for the first image whose size differs from `first`."""
    first_path, first_size = first
    mismatched = np.flatnonzero(np.any(shapes[:, :2] != first_size, axis=1))
    if len(mismatched):
        index = mismatched[0]
        raise UsageError(
            f"Image {paths[index]} is {shapes[index, 0]}x{shapes[index, 1]} "
            f"but {first_path} is {first_size[0]}x{first_size[1]}. Pass "
            "--image_size to resize all images to one size."
        )


def _find_decode_error(paths, error: tf.errors.OpError) -> UsageError:
    """Decode `paths` one by one to name the file that failed to decode."""
    for path in paths:
        try:
            _decode_file(tf.constant(path), None)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
            return UsageError(
                f"Failed to decode image {path}: {e.message}. Replace or "
                "remove the file."
            )
    return UsageError(
        f"Failed to decode an image from {paths[0]} onwards: {error}"
    )
