"""tf.data input functions for `distribute_datasets_from_function`.

Train order: epoch `e` is a permutation of the example indices from a
stateless shuffle seeded by `(seed, e)`. Its first `steps_per_epoch *
global_batch_size` indices, reshaped to `[steps_per_epoch,
global_batch_size]`, are the global batches of the epoch, and the remainder
is dropped. Global step `s` uses row `s % steps_per_epoch` of epoch
`s // steps_per_epoch`. Input pipeline `p` of `P` takes columns
`[p * G / P, (p + 1) * G / P)` of each row (`G` the global batch size) and
emits them as consecutive per-replica batches. MirroredStrategy hands
consecutive elements to its replicas in order, so replica `r` receives
columns `[r * b, (r + 1) * b)` of each row, `b` the per-replica batch size.
Views of an example depend only on `(seed, e * num_examples + index)`, so any
number of replicas and pipelines produce the same global batches as one.

The image array reaches tf.data as an eager tensor that the map functions
capture, not as a constant embedded in the dataset graph. tf.data's default
graph rewrites are off, because they would copy that tensor when an iterator
starts.
"""

import math
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from supcon_tf.data import augment as augment_lib
from supcon_tf.data.sources import ArraySplit
from supcon_tf.errors import UsageError

DatasetFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Return the number of full global batches in one epoch.

    Raises:
        UsageError: The split has fewer examples than one global batch.
    """
    if global_batch_size <= 0:
        raise UsageError(
            f"--global_batch_size={global_batch_size} is invalid: it must "
            "be > 0."
        )
    steps = num_examples // global_batch_size
    if steps == 0:
        raise UsageError(
            f"The train split has {num_examples} examples, fewer than one "
            f"global batch of {global_batch_size}. Lower --global_batch_size "
            "or use more train examples."
        )
    return steps


def make_train_dataset_fn(
    split: ArraySplit,
    *,
    global_batch_size: int,
    num_views: int,
    augment: str,
    seed: int,
    num_epochs: int,
    start_step: int = 0,
) -> DatasetFn:
    """Build the train input function.

    Args:
        split: The train split.
        global_batch_size: Examples per step, summed over all replicas.
        num_views: Augmented views per example.
        augment: One of `augment.AUGMENT_MODES`.
        seed: Seed of the example order and of the augmentations.
        num_epochs: The dataset ends after this many epochs.
        start_step: Global step of the first element, to resume a run.

    Returns:
        A function from `tf.distribute.InputContext` to a dataset of
        `(views, labels)`: views float32 `[per_replica_batch_size,
        num_views, height, width, 3]` in [0, 1] and labels int32
        `[per_replica_batch_size]`.
    """
    if augment not in augment_lib.AUGMENT_MODES:
        raise UsageError(
            f"--augment={augment} is invalid: choose one of "
            f"{', '.join(augment_lib.AUGMENT_MODES)}."
        )
    _check_at_least("num_views", num_views, 1)
    _check_at_least("num_epochs", num_epochs, 1)
    num_examples = len(split.labels)
    steps = steps_per_epoch(num_examples, global_batch_size)
    if not 0 <= start_step <= steps * num_epochs:
        raise UsageError(
            f"start_step={start_step} is outside the run of "
            f"{steps * num_epochs} steps ({num_epochs} epochs)."
        )
    images, labels = _host_tensors(split)
    seed = tf.constant(seed, tf.int64)

    def draw_example_uniforms(epoch, index):
        example_seed = tf.stack([seed, epoch * num_examples + index])
        uniforms = augment_lib.draw_uniforms(example_seed, num_views, augment)
        return index, uniforms

    def make_batch(indices, uniforms):
        batch_images = tf.gather(images, indices)
        views = augment_lib.augment_batch(batch_images, uniforms, augment)
        return views, tf.gather(labels, indices)

    def dataset_fn(input_context):
        lo, hi, per_replica_batch_size = pipeline_columns(
            input_context, global_batch_size
        )
        first_epoch, skip_steps = divmod(start_step, steps)
        dataset = tf.data.Dataset.range(first_epoch, num_epochs).flat_map(
            lambda epoch: _epoch_examples(
                epoch, seed, num_examples, [steps, global_batch_size], lo, hi
            )
        )
        dataset = dataset.skip(skip_steps * (hi - lo))
        dataset = dataset.map(
            draw_example_uniforms,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        dataset = dataset.batch(per_replica_batch_size, drop_remainder=True)
        return _map_and_prefetch(dataset, make_batch)

    return dataset_fn


def make_eval_dataset_fn(
    split: ArraySplit, *, global_batch_size: int
) -> DatasetFn:
    """Build the eval input function, which yields every example once.

    The split is padded to a multiple of `global_batch_size` with examples
    of weight 0, so every replica gets full batches. Columns are sharded by
    input pipeline in the same way as in training.

    Returns:
        A function from `tf.distribute.InputContext` to a dataset of
        `(images, labels, weights)`: images float32
        `[per_replica_batch_size, height, width, 3]` in [0, 1], labels int32
        `[per_replica_batch_size]` and weights float32
        `[per_replica_batch_size]`, 1 for a real example and 0 for padding.
    """
    num_examples = len(split.labels)
    if num_examples == 0:
        raise UsageError(
            "The test split is empty, so there is nothing to evaluate."
        )
    _check_at_least("global_batch_size", global_batch_size, 1)
    num_steps = math.ceil(num_examples / global_batch_size)
    images, labels = _host_tensors(split)

    def make_batch(positions):
        indices = tf.minimum(positions, num_examples - 1)
        batch_images = tf.cast(tf.gather(images, indices), tf.float32) / 255.0
        weights = tf.cast(positions < num_examples, tf.float32)
        return batch_images, tf.gather(labels, indices), weights

    def dataset_fn(input_context):
        lo, hi, per_replica_batch_size = pipeline_columns(
            input_context, global_batch_size
        )
        positions = np.arange(num_steps * global_batch_size)
        positions = positions.reshape(num_steps, global_batch_size)[:, lo:hi]
        dataset = tf.data.Dataset.from_tensor_slices(positions.reshape(-1))
        dataset = dataset.batch(per_replica_batch_size, drop_remainder=True)
        return _map_and_prefetch(dataset, make_batch)

    return dataset_fn


def _check_at_least(flag: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise UsageError(
            f"--{flag}={value} is invalid: it must be >= {minimum}."
        )


def _host_tensors(split: ArraySplit) -> tuple[tf.Tensor, tf.Tensor]:
    """Copy images and labels (as int32) into eager tensors on the host CPU."""
    with tf.device("/cpu:0"):
        images = tf.convert_to_tensor(split.images, tf.uint8)
        labels = tf.convert_to_tensor(split.labels.astype(np.int32))
    return images, labels


def pipeline_columns(input_context, global_batch_size):
    """Return this pipeline's columns `lo, hi` and the per-replica batch.

    Pipeline `p` of `P` takes columns `[p * G / P, (p + 1) * G / P)` of
    each global batch of size `G`.
    """
    num_pipelines = input_context.num_input_pipelines
    num_replicas = input_context.num_replicas_in_sync
    if global_batch_size % num_replicas or num_replicas % num_pipelines:
        raise UsageError(
            f"--global_batch_size={global_batch_size} must be divisible by "
            f"the {num_replicas} replicas, and the replicas by the "
            f"{num_pipelines} input pipelines."
        )
    columns = global_batch_size // num_pipelines
    lo = input_context.input_pipeline_id * columns
    per_replica_batch_size = global_batch_size // num_replicas
    return lo, lo + columns, per_replica_batch_size


def _epoch_examples(epoch, seed, num_examples, rows_shape, lo, hi):
    """Return the `(epoch, index)` pairs of one epoch for columns `[lo, hi)`.

    Args:
        epoch: int64 scalar.
        seed: int64 scalar, the run's seed.
        num_examples: Number of examples in the split.
        rows_shape: `[steps_per_epoch, global_batch_size]`.
        lo: First column of this input pipeline.
        hi: End of the columns of this input pipeline.

    Returns:
        A dataset of `(epoch, index)` int64 scalars, row by row.
    """
    order = tf.random.experimental.stateless_shuffle(
        tf.range(num_examples, dtype=tf.int64), seed=tf.stack([seed, epoch])
    )
    rows = tf.reshape(order[: rows_shape[0] * rows_shape[1]], rows_shape)
    indices = tf.reshape(rows[:, lo:hi], [-1])
    epochs = tf.fill(tf.shape(indices), epoch)
    return tf.data.Dataset.from_tensor_slices((epochs, indices))


def _map_and_prefetch(dataset, batch_fn):
    """Map `batch_fn` over batches in parallel, keeping their order.

    tf.data's default graph rewrites serialize the dataset graph when the
    iterator starts, which copies the captured image tensor (a transient
    extra copy of the whole array, measured with 614 MB of images). The
    pipeline is already parallel and prefetched, so they are turned off.
    """
    dataset = dataset.map(
        batch_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)
