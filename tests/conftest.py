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
