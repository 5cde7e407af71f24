"""Strategy construction, batch-size checks and the chief rule."""

import json

import pytest
import tensorflow as tf

from supcon_tf import distribute
from supcon_tf.errors import UsageError


def test_mirrored_over_logical_cpus():
    strategy = distribute.make_strategy("mirrored", cpu_replicas=2)
    assert strategy.num_replicas_in_sync == 2
    assert distribute.is_chief(strategy)


def test_default_and_one_device():
    assert distribute.make_strategy("default").num_replicas_in_sync == 1
    one = distribute.make_strategy("one_device")
    assert isinstance(one, tf.distribute.OneDeviceStrategy)


@pytest.mark.parametrize(
    "batch, replicas, message",
    [
        (265, 2, "use 264 or 266"),
        (3, 4, "use 4"),
        (10, 4, "use 8 or 12"),
        (0, 1, "is invalid"),
    ],
)
def test_global_batch_size_names_neighbours(batch, replicas, message):
    with pytest.raises(UsageError, match=message):
        distribute.check_global_batch_size(batch, replicas)


def test_global_batch_size_valid():
    assert distribute.check_global_batch_size(256, 4) == 64


def test_cpu_replicas_needs_mirrored():
    with pytest.raises(UsageError, match="--cpu_replicas=2 only applies"):
        distribute.make_strategy("one_device", cpu_replicas=2)


def test_unknown_strategy_and_ops():
    with pytest.raises(UsageError, match="Unknown --strategy='tpu5'"):
        distribute.make_strategy("tpu5")
    with pytest.raises(UsageError, match="Unknown --cross_device_ops"):
        distribute.make_strategy("mirrored", cross_device_ops="ring")


def test_multi_worker_needs_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UsageError, match="needs the TF_CONFIG"):
        distribute.make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        distribute.make_strategy("multi_worker")


class _Resolver:
    def __init__(self, task_type, task_id, cluster):
        self.task_type, self.task_id = task_type, task_id
        self._cluster = cluster

    def cluster_spec(self):
        return tf.train.ClusterSpec(self._cluster)


class _Strategy:
    def __init__(self, resolver):
        self.cluster_resolver = resolver


@pytest.mark.parametrize(
    "task_type, task_id, cluster, chief",
    [
        ("worker", 0, {"worker": ["a:1", "b:2"]}, True),
        ("worker", 1, {"worker": ["a:1", "b:2"]}, False),
        ("chief", 0, {"chief": ["c:1"], "worker": ["a:1"]}, True),
        ("worker", 0, {"chief": ["c:1"], "worker": ["a:1"]}, False),
    ],
)
def test_chief_rule(task_type, task_id, cluster, chief):
    strategy = _Strategy(
        _Resolver(task_type, task_id, json.loads(json.dumps(cluster)))
    )
    assert distribute.is_chief(strategy) is chief
    assert distribute.worker_id(strategy) == f"{task_type}_{task_id}"
