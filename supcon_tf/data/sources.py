"""In-memory train and test splits of CIFAR-10, CIFAR-100 and image folders.

CIFAR data come from the official Python release, as a folder or as its
`.tar.gz` archive. Those files are pickles, which `_CifarUnpickler` loads
without running arbitrary pickled code. An image folder contains one
sub-folder per class, and its files are decoded with TensorFlow.
"""

import codecs
import dataclasses
import os
import pickle
import posixpath
import tarfile
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import tensorflow as tf

from supcon_tf.errors import UsageError

DATASET_NAMES = ("cifar10", "cifar100", "folder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

# Number of images in one tf.data batch while decoding a folder.
_DECODE_BATCH_SIZE = 512

_CIFAR10_CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


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
        return _load_folder(
            data_dir, image_size, max_train_examples, max_test_examples,
            test_fraction, seed,
        )  # fmt: skip
    if name in _CIFAR_LAYOUTS:
        splits = _load_cifar(name, data_dir)
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


def _random_indices(num_examples: int, max_examples: int | None, seed: int):
    """Return sorted indices of a seeded random subset, or None for all."""
    if max_examples is None or max_examples >= num_examples:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_examples, size=max_examples, replace=False))


def _subset_split(split: ArraySplit, max_examples, seed) -> ArraySplit:
    indices = _random_indices(len(split.labels), max_examples, seed)
    if indices is None:
        return split
    return ArraySplit(split.images[indices], split.labels[indices])


def _resize_split(split: ArraySplit, image_size: int | None) -> ArraySplit:
    if image_size is None or split.images.shape[1:3] == (image_size,) * 2:
        return split
    chunks = [
        _resize_uint8(
            split.images[start : start + _DECODE_BATCH_SIZE], image_size
        )
        for start in range(0, len(split.images), _DECODE_BATCH_SIZE)
    ]
    images = np.concatenate([chunk.numpy() for chunk in chunks])
    return ArraySplit(images, split.labels)


def _resize_uint8(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resize uint8 `[..., height, width, 3]` images bilinearly, as uint8."""
    resized = tf.image.resize(images, [image_size, image_size])
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


# CIFAR Python release.


class _CifarLayout(NamedTuple):
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    class_names_key: str
    keras_module: str
    keras_kwargs: dict[str, str]


_CIFAR_LAYOUTS = {
    "cifar10": _CifarLayout(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        class_names_key="label_names",
        keras_module="cifar10",
        keras_kwargs={},
    ),
    "cifar100": _CifarLayout(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        class_names_key="fine_label_names",
        keras_module="cifar100",
        keras_kwargs={"label_mode": "fine"},
    ),
}


def _allowed_pickle_globals() -> dict[tuple[str, str], Any]:
    """Return the only globals that a CIFAR pickle may reference."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Protocol 2 pickles written by Python 3 store bytes this way.
        ("_codecs", "encode"): codecs.encode,
    }


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR batch needs."""

    def __init__(self, file: BinaryIO, source: str):
        super().__init__(file, encoding="bytes")
        self._source = source
        self._allowed = _allowed_pickle_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UsageError(
                f"Rejected {self._source}: it references {module}.{name}, "
                "which is not part of a CIFAR file. Use the official CIFAR "
                "Python release."
            ) from None


def _unpickle_cifar(file: BinaryIO, source: str) -> dict[str, Any]:
    """Load one CIFAR pickle as a dict with str keys."""
    try:
        content = _CifarUnpickler(file, source).load()
    except UsageError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise UsageError(
            f"{source} is not a valid CIFAR file: {error}"
        ) from error
    if not isinstance(content, dict):
        raise UsageError(f"{source} is not a valid CIFAR file: no dict inside.")
    return {_to_str(key): value for key, value in content.items()}


def _to_str(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _load_cifar(name: str, data_dir: str | None) -> DatasetSplits:
    layout = _CIFAR_LAYOUTS[name]
    if data_dir is None:
        return _load_cifar_default(layout)
    if not os.path.exists(data_dir):
        raise UsageError(f"--data_dir={data_dir} not found.")
    if os.path.isfile(data_dir):
        return _cifar_splits(_read_cifar_archive(data_dir, layout), layout)
    candidates = [data_dir, os.path.join(data_dir, layout.folder)]
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, layout.meta_file)):
            return _cifar_splits(_read_cifar_folder(folder, layout), layout)
    archive = os.path.join(data_dir, layout.archive)
    if os.path.isfile(archive):
        return _cifar_splits(_read_cifar_archive(archive, layout), layout)
    raise UsageError(
        f"--data_dir={data_dir} contains neither {layout.folder}/ nor "
        f"{layout.archive}. Point --data_dir at the CIFAR Python release "
        "(folder or .tar.gz), or use --dataset=folder for an image folder."
    )


def _cifar_file_names(layout: _CifarLayout) -> tuple[str, ...]:
    return layout.train_files + layout.test_files + (layout.meta_file,)


def _read_cifar_folder(folder: str, layout: _CifarLayout):
    contents = {}
    for file_name in _cifar_file_names(layout):
        path = os.path.join(folder, file_name)
        if not os.path.isfile(path):
            raise UsageError(
                f"CIFAR file {path} is missing. Point --data_dir at a "
                "complete CIFAR Python release."
            )
        with open(path, "rb") as file:
            contents[file_name] = _unpickle_cifar(file, path)
    return contents


def _read_cifar_archive(path: str, layout: _CifarLayout):
    """Read the CIFAR files from a `.tar.gz`, member by member."""
    expected_names = set(_cifar_file_names(layout))
    contents = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                file_name = posixpath.basename(member.name)
                if member.isfile() and file_name in expected_names:
                    source = f"{path}:{member.name}"
                    file = archive.extractfile(member)
                    contents[file_name] = _unpickle_cifar(file, source)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise UsageError(
            f"Failed to read archive {path}: {error}. Pass the CIFAR Python "
            ".tar.gz as downloaded."
        ) from error
    missing = sorted(expected_names - contents.keys())
    if missing:
        raise UsageError(
            f"CIFAR files {missing} are missing from archive {path}."
        )
    return contents


def _cifar_splits(contents, layout: _CifarLayout) -> DatasetSplits:
    meta = contents[layout.meta_file]
    if layout.class_names_key not in meta:
        raise UsageError(
            f"CIFAR file {layout.meta_file} is missing the key "
            f"{layout.class_names_key}."
        )
    class_names = tuple(_to_str(name) for name in meta[layout.class_names_key])
    return DatasetSplits(
        train=_cifar_split(contents, layout.train_files, layout.label_key),
        test=_cifar_split(contents, layout.test_files, layout.label_key),
        num_classes=len(class_names),
        class_names=class_names,
    )


def _cifar_split(contents, file_names, label_key: str) -> ArraySplit:
    images, labels = [], []
    for file_name in file_names:
        batch = contents[file_name]
        if "data" not in batch or label_key not in batch:
            raise UsageError(
                f"CIFAR file {file_name} is missing 'data' or '{label_key}'."
            )
        rows = np.asarray(batch["data"], dtype=np.uint8)
        if rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32:
            raise UsageError(
                f"CIFAR file {file_name} has data of shape {rows.shape}, "
                "not [n, 3072]."
            )
        # Rows are channel-major: 1024 red, then green, then blue values.
        images.append(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return ArraySplit(np.concatenate(images), np.concatenate(labels))


def _keras_cache_folder(layout: _CifarLayout) -> str | None:
    """Return the extracted CIFAR folder in the Keras cache, if there is one."""
    home = os.environ.get("KERAS_HOME") or os.path.expanduser("~/.keras")
    datasets = os.path.join(home, "datasets")
    # Keras 2 extracts to <folder>, Keras 3 to <folder>-target/<folder>.
    for folder in (
        os.path.join(datasets, layout.folder),
        os.path.join(datasets, layout.folder + "-target", layout.folder),
    ):
        if os.path.isfile(os.path.join(folder, layout.meta_file)):
            return folder
    return None


def _load_cifar_default(layout: _CifarLayout) -> DatasetSplits:
    """Load CIFAR from the Keras cache, else download it with Keras."""
    folder = _keras_cache_folder(layout)
    if folder is not None:
        return _cifar_splits(_read_cifar_folder(folder, layout), layout)
    import keras

    loader = getattr(keras.datasets, layout.keras_module).load_data
    try:
        (x_train, y_train), (x_test, y_test) = loader(**layout.keras_kwargs)
    except Exception as error:
        raise UsageError(
            f"Download of {layout.archive} by keras.datasets failed: "
            f"{error!r}. Pass --data_dir with the CIFAR Python folder or "
            f"{layout.archive}, or use --dataset=folder with --data_dir set "
            "to an image folder."
        ) from error
    folder = _keras_cache_folder(layout)
    if folder is not None:
        return _cifar_splits(_read_cifar_folder(folder, layout), layout)
    # NOTE: Keras extracted the download to a folder that this module does not
    # look in, so the class names of CIFAR-100 are not available.
    class_names = _CIFAR10_CLASS_NAMES
    if layout.keras_module == "cifar100":
        class_names = tuple(f"class_{i}" for i in range(100))
    return DatasetSplits(
        train=ArraySplit(x_train, y_train.reshape(-1).astype(np.int64)),
        test=ArraySplit(x_test, y_test.reshape(-1).astype(np.int64)),
        num_classes=len(class_names),
        class_names=class_names,
    )


# Image folders.


class _FileList(NamedTuple):
    paths: list[str]
    labels: np.ndarray  # int64 [num_files]


def _load_folder(
    data_dir, image_size, max_train_examples, max_test_examples,
    test_fraction, seed,
) -> DatasetSplits:  # fmt: skip
    # TODO: every image is decoded into one in-memory uint8 array, which
    # suits CIFAR-sized sets; folders larger than memory need a streaming
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
    indices = _random_indices(len(files.paths), max_examples, seed)
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
    iterator = iter(dataset.ragged_batch(_DECODE_BATCH_SIZE))
    images = None
    for start in range(0, len(paths), _DECODE_BATCH_SIZE):
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
        image = _resize_uint8(image, image_size)
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
