"""CIFAR-10 and CIFAR-100 from the official Python release.

The release is a folder of pickles or its `.tar.gz` archive; `_CifarUnpickler`
loads them without running arbitrary pickled code. Without a folder,
`keras.datasets` downloads the release.
"""

import codecs
import os
import pickle
import posixpath
import tarfile
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from supcon_tf.data.splits import ArraySplit, DatasetSplits
from supcon_tf.errors import UsageError

_CIFAR10_CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


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

CIFAR_NAMES = tuple(_CIFAR_LAYOUTS)


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


def load_cifar(name: str, data_dir: str | None) -> DatasetSplits:
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
