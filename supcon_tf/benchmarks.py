"""Measurements for the benchmark harness: our train step and the probe.

Throughput is the median over repeats of `steps` timed train steps, after
warm-up calls that trace the step and run it once. Each throughput
measurement runs in a fresh process (`run_isolated`), so models, the Keras
dtype policy and the process's peak resident set size belong to that
measurement alone. TensorFlow's CPU allocator reports no statistics, so
host memory is the operating system's peak resident set size of that
process (`peak_rss_bytes`), TensorFlow's runtime included.

`keras_fit_baseline` measures the keras.io example's `model.fit` pipeline
with the same settings and helpers, and `loss_benchmarks` the loss.
"""

import dataclasses
import math
import multiprocessing
import queue as queue_lib
import resource
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from supcon_tf import (
    distribute,
    evaluation,
    models,
    optim,
    precision,
    profiling,
)
from supcon_tf.config import LossConfig, OptimizerConfig
from supcon_tf.data import pipeline
from supcon_tf.data.sources import ArraySplit, channel_stats
from supcon_tf.errors import UsageError
from supcon_tf.training import steps

# The keras.io example's settings: temperature, projection and Adam rate.
EXAMPLE_TEMPERATURE = 0.05
EXAMPLE_PROJECTION_DIM = 128
EXAMPLE_LEARNING_RATE = 1e-3


@dataclasses.dataclass(frozen=True)
class ThroughputSettings:
    """Settings of one throughput measurement: the model and the timing.

    `steps` train steps make one timed repeat. Our loop runs them in calls
    of at most `steps_per_loop` steps; `model.fit` runs one step per call.
    """

    encoder: str = "resnet50v2"
    global_batch_size: int = 265
    image_size: int = 32
    augment: str = "keras_example"
    loss: str = "npairs"
    mixed_precision: str | None = None
    fused_batchnorm: bool = True
    float32_filter_grad: bool = True
    jit_compile: bool = False
    strategy: str = "default"
    cpu_replicas: int = 1
    steps_per_loop: int = 1
    steps: int = 10
    repeats: int = 3
    seed: int = 0
    profile_dir: str | None = None

    @property
    def num_views(self) -> int:
        """Views per example: the N-pairs loss takes one, SupCon two."""
        return 1 if self.loss == "npairs" else 2


def synthetic_split(settings: ThroughputSettings) -> ArraySplit:
    """Makes random uint8 CIFAR-shaped images with labels 0..9.

    The split has `max(4 * global_batch_size, 1024)` examples.
    """
    num_examples = max(4 * settings.global_batch_size, 1024)
    size = settings.image_size
    rng = np.random.default_rng(settings.seed)
    images = rng.integers(0, 256, (num_examples, size, size, 3), np.uint8)
    labels = np.arange(num_examples, dtype=np.int64) % 10
    return ArraySplit(images, labels)


def summarize_seconds(seconds: list[float], examples: int) -> dict[str, Any]:
    """Reduces repeat times to seconds and examples/s: median, min, max."""
    rates = [examples / s for s in seconds]
    return {
        "median_seconds": statistics.median(seconds),
        "min_seconds": min(seconds),
        "max_seconds": max(seconds),
        "examples_per_second": statistics.median(rates),
        "min_examples_per_second": min(rates),
        "max_examples_per_second": max(rates),
        "repeats": len(seconds),
    }


def peak_rss_bytes() -> int:
    """Returns this process's peak resident set size in bytes.

    It reads `VmHWM` from /proc/self/status (Linux). `ru_maxrss` is the
    fallback, but a spawned process inherits its parent's `ru_maxrss` when
    that is larger, so it can overstate a child's peak.
    """
    try:
        with open("/proc/self/status") as stream:
            for line in stream:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _isolated_child(function, args, queue) -> None:
    try:
        queue.put(("ok", function(*args)))
    except UsageError as error:  # A bad setting: the parent re-raises it.
        queue.put(("usage", str(error)))
    except BaseException:  # Sent to the parent, which raises it.
        queue.put(("error", traceback.format_exc()))


def run_isolated(function: Callable, *args) -> Any:
    """Runs `function(*args)` in a fresh spawned process; returns its value.

    `function` must be a module-level function and its arguments and
    result picklable. Logical CPU devices set up in the child do not
    touch this process.

    Raises:
      UsageError: if `function` raised one, with its message.
      RuntimeError: with the child's traceback if `function` raised, or
        if the child exited without a result (killed, out of memory).
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_isolated_child, args=(function, args, queue)
    )
    process.start()
    while True:
        try:
            status, value = queue.get(timeout=1.0)
            break
        except queue_lib.Empty:
            if not process.is_alive():
                raise RuntimeError(
                    f"{function.__name__} exited with code "
                    f"{process.exitcode} and no result; see its output "
                    "above."
                ) from None
    process.join()
    if status == "usage":
        raise UsageError(value)
    if status != "ok":
        raise RuntimeError(f"{function.__name__} failed:\n{value}")
    return value


def count_forward_flops(model: keras.Model, input_shape: tuple) -> int:
    """Counts the floating-point operations of `model` on one example.

    TensorFlow's profiler sums the FLOP statistics of the traced graph's
    ops (convolutions, matmuls, additions); a multiply-add counts as 2.
    Ops without statistics, such as ReLU, count 0.
    """
    spec = tf.TensorSpec([1, *input_shape], tf.float32)
    graph = (
        tf.function(lambda x: model(x, training=False))
        .get_concrete_function(spec)
        .graph
    )
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(graph, options=options)
    return int(profile.total_float_ops)


def training_flops_per_example(
    encoder: keras.Model,
    head: keras.Model,
    num_views: int,
    image_shape: tuple | None = None,
) -> int:
    """Estimates train-step FLOPs per example: 3 forward passes per view.

    Forward plus backward is taken as 3 forward passes (the backward pass
    computes gradients of inputs and of weights). The loss and the
    augmentation are not counted. `image_shape` is the encoder's input
    shape per example; by default the encoder's declared one.
    """
    if image_shape is None:
        image_shape = encoder.input_shape[1:]
    forward = count_forward_flops(encoder, image_shape)
    forward += count_forward_flops(head, head.input_shape[1:])
    return 3 * forward * num_views


def matmul_throughput(size: int, dtype: str, repeats: int) -> dict[str, Any]:
    """Times a `[size, size] @ [size, size]` matmul; returns GFLOP/s.

    The product costs `2 * size**3` FLOPs. Only a scalar sum of the
    product comes back to the host, so the copy stays out of the timing.
    """
    rng = np.random.default_rng(0)
    a, b = (
        tf.cast(tf.constant(rng.normal(size=(size, size)), tf.float32), dtype)
        for _ in range(2)
    )
    product = tf.function(lambda x, y: tf.reduce_sum(tf.matmul(x, y)))
    product(a, b).numpy()  # Trace and warm up.
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        product(a, b).numpy()
        seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    return {
        "size": size,
        "dtype": dtype,
        "median_seconds": median,
        "min_seconds": min(seconds),
        "max_seconds": max(seconds),
        "gflops_per_second": 2 * size**3 / median / 1e9,
        "repeats": repeats,
    }


def _build_encoder(settings: ThroughputSettings, split: ArraySplit):
    mean, std = channel_stats(split)
    size = settings.image_size
    return models.build_encoder(
        settings.encoder,
        image_shape=(size, size, 3),
        channel_mean=mean,
        channel_std=std,
        fused_batchnorm=settings.fused_batchnorm,
        float32_filter_grad=settings.float32_filter_grad,
    )


def _call_train_loop(train_loop, iterator, steps_per_call: int) -> None:
    """Runs one train-loop call and waits for its steps to finish."""
    metrics = train_loop(iterator, tf.constant(steps_per_call, tf.int32))
    float(metrics["loss"])


def _timed_loop(train_loop, iterator, settings, steps_per_call, num_calls):
    """Warms up `train_loop`, then times `repeats` runs of `num_calls`."""

    def call() -> None:
        _call_train_loop(train_loop, iterator, steps_per_call)

    warmup_started = time.perf_counter()
    call()  # Traces.
    call()  # First call of the traced function.
    warmup_seconds = time.perf_counter() - warmup_started
    seconds = []
    for _ in range(settings.repeats):
        started = time.perf_counter()
        for _ in range(num_calls):
            call()
        seconds.append(time.perf_counter() - started)
    return warmup_seconds, seconds


def _profile_repeat(train_loop, iterator, settings, steps_per_call, num_calls):
    """Profiles one more timed repeat; returns op seconds per step by type.

    `op_seconds_per_step` is None where the trace cannot be read back; the
    trace in `dir` is written either way.
    """
    with profiling.trace(settings.profile_dir):
        for _ in range(num_calls):
            _call_train_loop(train_loop, iterator, steps_per_call)
    steps_profiled = num_calls * steps_per_call
    op_seconds = profiling.op_seconds_by_type(settings.profile_dir)
    per_step = None
    if op_seconds is not None:
        per_step = {
            op_type: seconds / steps_profiled
            for op_type, seconds in op_seconds.items()
        }
    return {
        "dir": settings.profile_dir,
        "steps": steps_profiled,
        "op_seconds_per_step": per_step,
    }


def pretrain_throughput(settings: ThroughputSettings) -> dict[str, Any]:
    """Measures our pretraining step: examples/s, FLOPs and peak memory.

    The step is `steps.make_pretrain_step` with the keras.io example's
    projection head, temperature and Adam rate, fed by
    `pipeline.make_train_dataset_fn` on `synthetic_split`. Run it through
    `run_isolated` so that the strategy and policy start fresh.
    """
    strategy = distribute.make_strategy(
        settings.strategy, cpu_replicas=settings.cpu_replicas
    )
    precision.set_policy(settings.mixed_precision)
    split = synthetic_split(settings)
    with strategy.scope():
        encoder = _build_encoder(settings, split)
        head = models.build_projection_head(
            "keras_example",
            input_dim=encoder.output_shape[-1],
            output_dim=EXAMPLE_PROJECTION_DIM,
        )
    variables = encoder.trainable_variables + head.trainable_variables
    optimizer = optim.make_optimizer(
        OptimizerConfig(learning_rate=EXAMPLE_LEARNING_RATE),
        strategy,
        variables,
    )
    optimizer = precision.wrap_optimizer(
        optimizer, strategy, variables, settings.mixed_precision
    )
    replica_step = steps.make_pretrain_step(
        encoder,
        head,
        optimizer,
        steps.make_contrastive_loss_fn(
            LossConfig(settings.loss, EXAMPLE_TEMPERATURE)
        ),
        settings.global_batch_size,
        jit_compile=settings.jit_compile,
    )
    steps_per_call = min(settings.steps_per_loop, settings.steps)
    num_calls = math.ceil(settings.steps / steps_per_call)
    # Warm-up, the timed repeats and, with a profile, one more repeat.
    calls = 2 + (settings.repeats + bool(settings.profile_dir)) * num_calls
    total_steps = calls * steps_per_call
    steps_per_epoch = pipeline.steps_per_epoch(
        len(split.labels), settings.global_batch_size
    )
    dataset_fn = pipeline.make_train_dataset_fn(
        split,
        global_batch_size=settings.global_batch_size,
        num_views=settings.num_views,
        augment=settings.augment,
        seed=settings.seed,
        num_epochs=math.ceil(total_steps / steps_per_epoch),
    )
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    train_loop = steps.make_train_loop(strategy, replica_step)
    warmup_seconds, seconds = _timed_loop(
        train_loop, iterator, settings, steps_per_call, num_calls
    )
    profile = None
    if settings.profile_dir:
        profile = _profile_repeat(
            train_loop, iterator, settings, steps_per_call, num_calls
        )
    examples = num_calls * steps_per_call * settings.global_batch_size
    return {
        **summarize_seconds(seconds, examples),
        "profile": profile,
        "steps": num_calls * steps_per_call,
        "warmup_seconds": warmup_seconds,
        "num_views": settings.num_views,
        "flops_per_example": training_flops_per_example(
            encoder, head, settings.num_views
        ),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _probe_epochs(train_loop, dataset_fn, strategy, epochs, steps_per_epoch):
    """Times each of `epochs` epochs after one warm-up epoch."""
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    num_steps = tf.constant(steps_per_epoch, tf.int32)
    seconds = []
    for _ in range(epochs + 1):
        started = time.perf_counter()
        float(train_loop(iterator, num_steps)["loss"])
        seconds.append(time.perf_counter() - started)
    return seconds[1:]


def _make_probe_loop(strategy, encoder, input_dim, settings):
    """Builds a classifier-head loop on top of a frozen `encoder`."""
    with strategy.scope():
        head = models.build_classifier_head(
            "mlp", input_dim=input_dim, num_classes=10
        )
    variables = head.trainable_variables
    optimizer = optim.make_optimizer(OptimizerConfig(), strategy, variables)
    optimizer = precision.wrap_optimizer(
        optimizer, strategy, variables, settings.mixed_precision
    )
    replica_step = steps.make_classifier_step(
        encoder, head, optimizer, settings.global_batch_size, False
    )
    return steps.make_train_loop(strategy, replica_step)


def probe_epoch_seconds(settings: ThroughputSettings) -> dict[str, Any]:
    """Times probe epochs on cached features against a recomputed encoder.

    The head is the keras.io example's classifier (`mlp`) on a frozen,
    randomly initialised encoder. Cached: one `extract_features` pass over
    the train split (timed separately, with its tracing), then the head
    trains on the features. Recomputed: the frozen encoder runs on images
    without augmentation on every step. Epoch times are medians of
    `repeats` epochs after one warm-up epoch.
    """
    strategy = distribute.make_strategy(
        settings.strategy, cpu_replicas=settings.cpu_replicas
    )
    precision.set_policy(settings.mixed_precision)
    split = synthetic_split(settings)
    batch = settings.global_batch_size
    steps_per_epoch = pipeline.steps_per_epoch(len(split.labels), batch)
    epochs = settings.repeats
    with strategy.scope():
        encoder = _build_encoder(settings, split)
    dim = encoder.output_shape[-1]

    started = time.perf_counter()
    cache = evaluation.extract_features(
        strategy, encoder, split, global_batch_size=batch
    )
    cache_seconds = time.perf_counter() - started
    cached = _probe_epochs(
        _make_probe_loop(strategy, evaluation.cached_encoder, dim, settings),
        evaluation.make_cached_train_dataset_fn(
            cache, batch, epochs + 1, settings.seed
        ),
        strategy,
        epochs,
        steps_per_epoch,
    )
    recomputed = _probe_epochs(
        _make_probe_loop(strategy, encoder, dim, settings),
        pipeline.make_train_dataset_fn(
            split,
            global_batch_size=batch,
            num_views=1,
            augment="none",
            seed=settings.seed,
            num_epochs=epochs + 1,
        ),
        strategy,
        epochs,
        steps_per_epoch,
    )
    cached_median = statistics.median(cached)
    recomputed_median = statistics.median(recomputed)
    return {
        "examples": len(split.labels),
        "steps_per_epoch": steps_per_epoch,
        "feature_cache_seconds": cache_seconds,
        "cached_epoch_seconds": cached_median,
        "recomputed_epoch_seconds": recomputed_median,
        "recomputed_over_cached": recomputed_median / cached_median,
        "epochs_timed": epochs,
        "peak_rss_bytes": peak_rss_bytes(),
    }
