"""Test session setup: four logical CPU devices for multi-replica tests.

Logical devices can only be configured before TensorFlow initialises its
runtime, so this runs at import time of the test session, before any test
module creates a tensor.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 4

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0],
    [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS,
)


import itertools  # noqa: E402
import pickle  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Every MirroredStrategy numbers its collective ops from the same start, and
# the runtime keeps the shape of each numbered op for the whole process. Two
# strategies in one process would then clash ("Shape mismatch in the
# collective instance"), so each strategy a test creates gets its own key
# range. TensorFlow's own tests set the same class attribute for this.
_collective_key_bases = itertools.count(10_000, 10_000)


def _next_collective_key_base() -> None:
    tf.distribute.MirroredStrategy._collective_key_base = next(
        _collective_key_bases
    )


@pytest.fixture(autouse=True)
def _fresh_collective_keys():
    _next_collective_key_base()


@pytest.fixture
def mirrored():
    """Returns `make(num_replicas)`, a MirroredStrategy over logical CPUs."""

    def make(num_replicas: int) -> tf.distribute.MirroredStrategy:
        _next_collective_key_base()
        devices = [f"/cpu:{index}" for index in range(num_replicas)]
        return tf.distribute.MirroredStrategy(devices)

    return make


def write_tiny_cifar10(root: str) -> str:
    """Writes a tiny CIFAR-10 python-batch folder in the original layout.

    Five training batches of 40 images and a test batch of 123 (which does
    not divide by the usual test batch sizes), whose brightness depends on
    the class so that the task is learnable.
    """
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    names = [f"class{i}".encode() for i in range(10)]
    with open(os.path.join(folder, "batches.meta"), "wb") as stream:
        pickle.dump({b"label_names": names}, stream, protocol=2)
    batches = [(f"data_batch_{i}", 40) for i in range(1, 6)]
    for name, count in batches + [("test_batch", 123)]:
        labels = [i % 10 for i in range(count)]
        data = rng.integers(0, 40, (count, 3072), dtype=np.uint8)
        data += (np.array(labels, dtype=np.uint8) * 20)[:, None]
        with open(os.path.join(folder, name), "wb") as stream:
            pickle.dump({b"data": data, b"labels": labels}, stream, protocol=2)
    return folder


@pytest.fixture(scope="session")
def tiny_cifar10(tmp_path_factory) -> str:
    """Path of a tiny CIFAR-10 python-batch folder (200 train, 123 test)."""
    return write_tiny_cifar10(str(tmp_path_factory.mktemp("cifar")))
