"""Tests for supcon_tf.data.sources: CIFAR files and image folders."""

import os
import pickle
import tarfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf.data import sources
from supcon_tf.errors import UsageError

CIFAR10_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def _cifar_rows(rng, num_images):
    return rng.integers(0, 256, (num_images, 3072), dtype=np.uint8)


def _dump(path, content):
    with open(path, "wb") as file:
        pickle.dump(content, file, protocol=2)


def _write_cifar10(parent, rng):
    """Write a small CIFAR-10 Python folder and return its expected rows."""
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_rows, train_labels = [], []
    for i in range(1, 6):
        rows = _cifar_rows(rng, 10)
        labels = [int(x) for x in rng.permutation(10)]
        _dump(folder / f"data_batch_{i}", {b"data": rows, b"labels": labels})
        train_rows.append(rows)
        train_labels += labels
    test_rows = _cifar_rows(rng, 20)
    test_labels = [i % 10 for i in range(20)]
    _dump(folder / "test_batch", {b"data": test_rows, b"labels": test_labels})
    names = [name.encode() for name in CIFAR10_NAMES]
    _dump(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    train = (np.concatenate(train_rows), np.array(train_labels))
    return folder, train, (test_rows, np.array(test_labels))


def _write_cifar100(parent, rng):
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    splits = {}
    for name, size in (("train", 12), ("test", 5)):
        rows = _cifar_rows(rng, size)
        fine = [int(x) for x in rng.integers(0, 100, size)]
        coarse = [label // 5 for label in fine]
        content = {
            b"data": rows,
            b"fine_labels": fine,
            b"coarse_labels": coarse,
        }
        _dump(folder / name, content)
        splits[name] = (rows, np.array(fine))
    fine_names = [f"fine{i}".encode() for i in range(100)]
    coarse_names = [f"coarse{i}".encode() for i in range(20)]
    meta = {
        b"fine_label_names": fine_names,
        b"coarse_label_names": coarse_names,
    }
    _dump(folder / "meta", meta)
    return folder, splits["train"], splits["test"]


def _tar_gz(folder, archive_path):
    with tarfile.open(archive_path, "w:gz") as archive:
        archive.add(folder, arcname=folder.name)


def _assert_split_matches(split, rows, labels):
    assert split.images.dtype == np.uint8
    assert split.labels.dtype == np.int64
    np.testing.assert_array_equal(split.labels, labels)
    # Row layout: 1024 red, 1024 green, 1024 blue values, each row-major.
    assert split.images[0, 0, 1, 2] == rows[0, 2 * 1024 + 1]
    assert split.images[3, 5, 7, 1] == rows[3, 1024 + 5 * 32 + 7]
    expected = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(split.images, expected)


@pytest.mark.parametrize("form", ["parent", "folder", "archive", "archive_dir"])
def test_cifar10_python_release_exact(tmp_path, form):
    rng = np.random.default_rng(1)
    folder, train, test = _write_cifar10(tmp_path / "data", rng)
    archive = tmp_path / "cifar-10-python.tar.gz"
    _tar_gz(folder, archive)
    data_dir = {
        "parent": folder.parent,
        "folder": folder,
        "archive": archive,
        "archive_dir": tmp_path,
    }[form]
    if form == "archive_dir":
        os.rename(folder.parent, tmp_path / "moved")

    splits = sources.load_dataset("cifar10", str(data_dir))

    assert splits.num_classes == 10
    assert splits.class_names == CIFAR10_NAMES
    _assert_split_matches(splits.train, *train)
    _assert_split_matches(splits.test, *test)


@pytest.mark.parametrize("use_archive", [False, True])
def test_cifar100_fine_labels_exact(tmp_path, use_archive):
    rng = np.random.default_rng(2)
    folder, train, test = _write_cifar100(tmp_path, rng)
    data_dir = folder
    if use_archive:
        data_dir = tmp_path / "cifar-100-python.tar.gz"
        _tar_gz(folder, data_dir)

    splits = sources.load_dataset("cifar100", str(data_dir))

    assert splits.num_classes == 100
    assert splits.class_names[:2] == ("fine0", "fine1")
    _assert_split_matches(splits.train, *train)
    _assert_split_matches(splits.test, *test)


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("use_archive", [False, True])
def test_cifar_pickle_with_os_system_rejected(tmp_path, use_archive):
    folder, _, _ = _write_cifar10(tmp_path / "data", np.random.default_rng(3))
    side_effect = tmp_path / "side_effect"
    batch = {b"data": _RunsCommand(f"touch {side_effect}"), b"labels": [0]}
    _dump(folder / "data_batch_3", batch)
    data_dir = folder
    if use_archive:
        data_dir = tmp_path / "cifar-10-python.tar.gz"
        _tar_gz(folder, data_dir)

    with pytest.raises(UsageError, match=r"(os|posix)\.system") as error:
        sources.load_dataset("cifar10", str(data_dir))

    assert "data_batch_3" in str(error.value)
    assert not side_effect.exists()


def test_cifar_from_keras_cache(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    _, train, _ = _write_cifar10(tmp_path / "datasets", rng)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def fail_download():
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", fail_download)
    splits = sources.load_dataset("cifar10")

    _assert_split_matches(splits.train, *train)


def test_cifar_offline_download_message(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def fail_download():
        raise Exception("URL fetch failure: no route to host")

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", fail_download)
    with pytest.raises(UsageError) as error:
        sources.load_dataset("cifar10")

    message = str(error.value)
    assert "failed" in message
    assert "no route to host" in message
    assert "--data_dir" in message
    assert "--dataset=folder" in message


def test_cifar_missing_data_dir_message(tmp_path):
    with pytest.raises(UsageError, match="cifar-10-python.tar.gz"):
        sources.load_dataset("cifar10", str(tmp_path))
    with pytest.raises(UsageError, match="nowhere not found"):
        sources.load_dataset("cifar10", str(tmp_path / "nowhere"))


def test_cifar_subset_and_resize(tmp_path):
    _write_cifar10(tmp_path, np.random.default_rng(5))
    full = sources.load_dataset("cifar10", str(tmp_path))

    splits = sources.load_dataset(
        "cifar10", str(tmp_path), max_train_examples=7, image_size=16
    )

    indices = np.sort(np.random.default_rng(0).choice(50, 7, replace=False))
    np.testing.assert_array_equal(
        splits.train.labels, full.train.labels[indices]
    )
    assert splits.train.images.shape == (7, 16, 16, 3)
    resized = tf.image.resize(full.train.images[indices], [16, 16])
    expected = np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(splits.train.images, expected)
    assert splits.test.images.shape == (20, 16, 16, 3)


def test_unknown_name_lists_valid_names():
    with pytest.raises(UsageError, match="cifar10, cifar100, folder"):
        sources.load_dataset("imagenet", "/tmp")


@pytest.mark.parametrize("flag", ["max_train_examples", "max_test_examples"])
def test_invalid_max_examples(tmp_path, flag):
    with pytest.raises(UsageError, match=f"--{flag}=0"):
        sources.load_dataset("folder", str(tmp_path), **{flag: 0})


def test_channel_stats_exact():
    images = np.zeros((4, 2, 2, 3), np.uint8)
    images[:2, :, :, 0] = 255
    images[..., 1] = 51
    images[..., 2] = np.arange(16).reshape(4, 2, 2) * 10
    split = sources.ArraySplit(images, np.zeros(4, np.int64))

    mean, std = sources.channel_stats(split)

    assert mean.dtype == np.float32
    assert std.dtype == np.float32
    blue = np.arange(16) * 10 / 255.0
    np.testing.assert_allclose(mean, [0.5, 0.2, blue.mean()], rtol=1e-6)
    np.testing.assert_allclose(std, [0.5, 0.0, blue.std()], atol=1e-6)


# Image folders.


def _write_image(path, pixels, encoding="png"):
    path.parent.mkdir(parents=True, exist_ok=True)
    encode = tf.io.encode_png if encoding == "png" else tf.io.encode_jpeg
    tf.io.write_file(str(path), encode(pixels))


def _class_pixels(label, number, size=(6, 6)):
    """Return an image whose first pixel encodes its class and number."""
    rng = np.random.default_rng(100 * label + number)
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    pixels[0, 0, :2] = (label, number)
    return pixels


def _write_classes(folder, class_names, images_per_class):
    expected = []
    for label, name in enumerate(sorted(class_names)):
        for number in range(images_per_class):
            pixels = _class_pixels(label, number)
            _write_image(folder / name / f"{number:03d}.png", pixels)
            expected.append((pixels, label))
    return expected


def _identify(split):
    """Return (class, number) of each image, checking label and pixels."""
    keys = []
    for image, label in zip(split.images, split.labels, strict=True):
        label_in_pixels, number = image[0, 0, :2]
        assert label == label_in_pixels
        np.testing.assert_array_equal(image, _class_pixels(label, number))
        keys.append((int(label), int(number)))
    return keys


def test_folder_train_test_subfolders_exact(tmp_path):
    train = _write_classes(tmp_path / "train", ["cat", "ant", "bee"], 3)
    test = _write_classes(tmp_path / "test", ["bee", "ant"], 2)

    splits = sources.load_dataset("folder", str(tmp_path))

    assert splits.class_names == ("ant", "bee", "cat")
    assert splits.num_classes == 3
    np.testing.assert_array_equal(splits.train.images, [p for p, _ in train])
    np.testing.assert_array_equal(splits.train.labels, [y for _, y in train])
    np.testing.assert_array_equal(splits.test.images, [p for p, _ in test])
    np.testing.assert_array_equal(splits.test.labels, [0, 0, 1, 1])
    assert splits.train.labels.dtype == np.int64


def test_folder_test_class_not_in_train(tmp_path):
    _write_classes(tmp_path / "train", ["ant", "bee"], 1)
    _write_classes(tmp_path / "test", ["ant", "wasp"], 1)
    with pytest.raises(UsageError, match="wasp"):
        sources.load_dataset("folder", str(tmp_path))


def test_folder_automatic_split(tmp_path):
    _write_classes(tmp_path, ["b", "a", "c"], 4)
    _write_image(tmp_path / "d" / "only.png", _class_pixels(3, 0))

    splits = sources.load_dataset("folder", str(tmp_path), test_fraction=0.1)
    again = sources.load_dataset("folder", str(tmp_path), test_fraction=0.1)

    train_keys = _identify(splits.train)
    test_keys = _identify(splits.test)
    all_keys = [(label, n) for label in range(3) for n in range(4)] + [(3, 0)]
    assert sorted(train_keys + test_keys) == all_keys
    # Every class with >= 2 images gets one test image, but "d" has one image.
    assert sorted(label for label, _ in test_keys) == [0, 1, 2]
    np.testing.assert_array_equal(again.test.images, splits.test.images)


def test_folder_jpeg_uppercase_extension(tmp_path):
    ramp = np.arange(16, dtype=np.uint8) * 16
    pixels = np.stack(np.broadcast_arrays(ramp[:, None], ramp, 128), axis=-1)
    _write_image(tmp_path / "cls" / "a.JPG", pixels, "jpeg")
    _write_image(tmp_path / "cls" / "b.jpeg", pixels, "jpeg")

    splits = sources.load_dataset("folder", str(tmp_path))

    decoded = tf.io.decode_jpeg(tf.io.read_file(str(tmp_path / "cls/a.JPG")))
    np.testing.assert_array_equal(splits.train.images[0], decoded.numpy())
    # JPEG is lossy, but a smooth image survives it nearly unchanged.
    error = np.abs(splits.train.images[0].astype(int) - pixels).mean()
    assert error < 4


def test_folder_max_train_examples_subset(tmp_path):
    _write_classes(tmp_path / "train", ["a", "b", "c", "d", "e"], 8)
    _write_classes(tmp_path / "test", ["a"], 1)

    splits = sources.load_dataset(
        "folder", str(tmp_path), max_train_examples=10, seed=7
    )
    again = sources.load_dataset(
        "folder", str(tmp_path), max_train_examples=10, seed=7
    )

    keys = _identify(splits.train)
    assert len(keys) == 10
    assert len(set(keys)) == 10
    # The first 10 files would cover only classes a and b.
    assert len({label for label, _ in keys}) > 2
    np.testing.assert_array_equal(again.train.images, splits.train.images)
    np.testing.assert_array_equal(again.train.labels, splits.train.labels)


def test_folder_resize_to_image_size(tmp_path):
    big = _class_pixels(0, 0, size=(8, 8))
    small = _class_pixels(1, 0, size=(6, 4))
    _write_image(tmp_path / "a" / "big.png", big)
    _write_image(tmp_path / "b" / "small.png", small)
    _write_image(tmp_path / "b" / "small2.png", small)

    splits = sources.load_dataset("folder", str(tmp_path), image_size=4)

    assert splits.train.images.shape[1:] == (4, 4, 3)
    resized = tf.image.resize(big, [4, 4]).numpy()
    expected = np.clip(np.round(resized), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(splits.train.images[0], expected)


def test_folder_size_mismatch_message(tmp_path):
    _write_image(tmp_path / "a" / "first.png", _class_pixels(0, 0, (8, 8)))
    _write_image(tmp_path / "b" / "other.png", _class_pixels(1, 0, (6, 5)))

    with pytest.raises(UsageError) as error:
        sources.load_dataset("folder", str(tmp_path), test_fraction=0.5)

    message = str(error.value)
    assert "other.png is 6x5" in message
    assert "first.png is 8x8" in message
    assert "--image_size" in message


def test_folder_missing_message(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(UsageError, match=f"{missing} not found"):
        sources.load_dataset("folder", str(missing))


def test_folder_without_class_folders(tmp_path):
    _write_image(tmp_path / "loose.png", _class_pixels(0, 0))
    with pytest.raises(UsageError, match="no class sub-folders"):
        sources.load_dataset("folder", str(tmp_path))


def test_folder_without_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(UsageError, match="contains no image files"):
        sources.load_dataset("folder", str(tmp_path))


def test_folder_undecodable_file_named(tmp_path):
    _write_classes(tmp_path, ["a"], 3)
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png file")
    with pytest.raises(UsageError, match="broken.png"):
        sources.load_dataset("folder", str(tmp_path))


def test_real_cifar10_jpeg_subset():
    data_dir = os.environ.get("SUPCON_CIFAR10_DIR")
    if not data_dir:
        pytest.skip("SUPCON_CIFAR10_DIR is not set to the CIFAR-10 JPEG set")

    splits = sources.load_dataset(
        "folder", data_dir, max_train_examples=300, max_test_examples=50
    )

    assert splits.class_names == CIFAR10_NAMES
    assert splits.train.images.shape == (300, 32, 32, 3)
    assert splits.test.images.shape == (50, 32, 32, 3)
    assert len(np.unique(splits.train.labels)) == 10
    # The subset is sorted default_rng(0) indices into the sorted file list.
    first = np.sort(np.random.default_rng(0).choice(50000, 300, False))[0]
    label, number = divmod(first, 5000)
    path = os.path.join(data_dir, "train", CIFAR10_NAMES[label])
    path = os.path.join(path, sorted(os.listdir(path))[number])
    decoded = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    np.testing.assert_array_equal(splits.train.images[0], decoded.numpy())
    assert splits.train.labels[0] == label
