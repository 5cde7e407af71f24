"""Distribution strategies by name, logical CPU replicas and chief checks."""

import json
import os

import tensorflow as tf
from absl import logging

from supcon_tf.errors import UsageError

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")


def configure_cpu_replicas(num_replicas: int) -> list[str]:
    """Splits the first physical CPU into `num_replicas` logical devices.

    This must run before TensorFlow initialises its devices. When the
    runtime already has at least `num_replicas` logical CPUs (for example
    because a test session configured them), those are reused.

    Returns:
      The names of the first `num_replicas` logical CPU devices.
    """
    if num_replicas < 1:
        raise UsageError(
            f"--cpu_replicas={num_replicas} is invalid; use 1 or more."
        )
    cpu = tf.config.list_physical_devices("CPU")[0]
    configured = tf.config.get_logical_device_configuration(cpu) or []
    if num_replicas > len(configured) and num_replicas > 1:
        requested = [tf.config.LogicalDeviceConfiguration()] * num_replicas
        try:
            tf.config.set_logical_device_configuration(cpu, requested)
        except RuntimeError:
            pass  # Already initialised; the check below reports it.
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(devices) < num_replicas:
        raise UsageError(
            f"--cpu_replicas={num_replicas} could not be applied because "
            f"TensorFlow was already initialised with {len(devices)} CPU "
            "device(s); set it before any other TensorFlow work."
        )
    return devices[:num_replicas]


def make_strategy(
    name: str,
    *,
    cpu_replicas: int = 1,
    cross_device_ops: str | None = None,
    tpu: str | None = None,
) -> tf.distribute.Strategy:
    """Creates a `tf.distribute.Strategy` from its flag name.

    Args:
      name: One of `STRATEGIES`. `mirrored` uses every local GPU, or
        `cpu_replicas` logical CPU devices on a machine without GPUs.
        `multi_worker` reads the cluster from the `TF_CONFIG` environment
        variable.
      cpu_replicas: Number of logical CPU devices to mirror over when there
        is no GPU; only valid with `mirrored`.
      cross_device_ops: `nccl`, `hierarchical_copy` or `reduce_to_one` for
        `mirrored`; None picks TensorFlow's default.
      tpu: Address or name of the TPU for `tpu`; empty for a local TPU VM.
    """
    if name not in STRATEGIES:
        raise UsageError(
            f"Unknown --strategy={name!r}; choose one of "
            f"{', '.join(STRATEGIES)}."
        )
    gpus = tf.config.list_physical_devices("GPU")
    if cpu_replicas != 1 and (name != "mirrored" or gpus):
        raise UsageError(
            f"--cpu_replicas={cpu_replicas} only applies to "
            "--strategy=mirrored on a machine without GPUs; remove the flag."
        )
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "multi_worker":
        return _make_multi_worker_strategy()
    if name == "tpu":
        return _make_tpu_strategy(tpu)
    devices = None if gpus else configure_cpu_replicas(cpu_replicas)
    return tf.distribute.MirroredStrategy(
        devices=devices,
        cross_device_ops=_cross_device_ops(cross_device_ops),
    )


def _make_multi_worker_strategy() -> tf.distribute.Strategy:
    if "TF_CONFIG" not in os.environ:
        raise UsageError(
            "--strategy=multi_worker needs the TF_CONFIG environment "
            'variable, e.g. {"cluster": {"worker": ["host1:port", '
            '"host2:port"]}, "task": {"type": "worker", "index": 0}}.'
        )
    try:
        json.loads(os.environ["TF_CONFIG"])
    except json.JSONDecodeError as error:
        raise UsageError(f"TF_CONFIG is not valid JSON: {error}.") from None
    return tf.distribute.MultiWorkerMirroredStrategy()


def _make_tpu_strategy(tpu: str | None) -> tf.distribute.Strategy:
    # TODO: never run here (no TPU on the development machines); the steps
    # and the all-gather in the loss are written to run under TPUStrategy.
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def _cross_device_ops(name: str | None):
    if name is None:
        return None
    choices = {
        "nccl": tf.distribute.NcclAllReduce,
        "hierarchical_copy": tf.distribute.HierarchicalCopyAllReduce,
        "reduce_to_one": tf.distribute.ReductionToOneDevice,
    }
    if name not in choices:
        raise UsageError(
            f"Unknown --cross_device_ops={name!r}; choose one of "
            f"{', '.join(choices)}."
        )
    return choices[name]()


def check_global_batch_size(global_batch_size: int, num_replicas: int) -> int:
    """Returns the per-replica batch size, or raises with valid neighbours."""
    if global_batch_size < 1:
        raise UsageError(
            f"--global_batch_size={global_batch_size} is invalid; use a "
            "positive multiple of the number of replicas."
        )
    if global_batch_size % num_replicas:
        lower = global_batch_size - global_batch_size % num_replicas
        upper = lower + num_replicas
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        raise UsageError(
            f"--global_batch_size={global_batch_size} does not divide by the "
            f"{num_replicas} replicas in sync; use {nearest}."
        )
    return global_batch_size // num_replicas


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True for the worker that writes summaries, checkpoints and results.

    That is the single process of a one-machine strategy, else the `chief`
    task, or worker 0 when the cluster has no chief.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return (
        not has_chief
        and resolver.task_type == "worker"
        and resolver.task_id == 0
    )


def worker_id(strategy: tf.distribute.Strategy) -> str:
    """Returns a name for this process: `worker_1`, or `chief` alone."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return "chief"
    return f"{resolver.task_type}_{resolver.task_id}"


def log_strategy(strategy: tf.distribute.Strategy) -> None:
    try:
        devices = ", ".join(strategy.extended.worker_devices)
    except RuntimeError:  # The default strategy has no device list.
        devices = "the default device"
    logging.info(
        "Strategy %s with %d replica(s) in sync on %s.",
        type(strategy).__name__,
        strategy.num_replicas_in_sync,
        devices,
    )
