"""Cached encoder features, kNN classification, metrics and a cached probe.

`extract_features` runs a frozen encoder over a split once and keeps its
outputs, so that kNN evaluation and a linear probe can use them many times
without running the encoder again. Features and predictions are the same
with 1 or N replicas, because each global batch is gathered in replica
order and padding rows are dropped by their weight. The cached probe sums
its loss over replicas, so it matches one replica up to float rounding.
"""

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from supcon_tf.data import pipeline
from supcon_tf.data.sources import ArraySplit
from supcon_tf.errors import UsageError
from supcon_tf.training import steps

DEFAULT_MAX_MEMORY_BYTES = 4 * 1024**3


@dataclasses.dataclass(frozen=True)
class FeatureCache:
    """Encoder outputs of one split, in the split's order.

    Attributes:
        features: float32 `[num_examples, dim]`, the encoder output as is
            (not L2-normalised). A NumPy array, or a read-only `np.memmap`
            of a `.npy` file when the features exceed the memory limit of
            `extract_features`.
        labels: int64 `[num_examples]`.
    """

    features: np.ndarray
    labels: np.ndarray


def extract_features(
    strategy: tf.distribute.Strategy,
    encoder: keras.Model,
    split: ArraySplit,
    *,
    global_batch_size: int,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    cache_dir: str | None = None,
) -> FeatureCache:
    """Run `encoder(images, training=False)` over every example of `split`.

    The input comes from `pipeline.make_eval_dataset_fn`, so images are
    `split.images / 255` and the last global batch is padded with rows of
    weight 0, which are dropped here.

    Features of up to `max_memory_bytes` stay in host memory. Larger ones
    are written to a new `features-*.npy` file in `cache_dir` and returned
    as a read-only memmap of it (path: `cache.features.filename`). The
    file stays until the caller deletes it.

    Args:
        strategy: The strategy the encoder was built under.
        encoder: Maps float images `[batch, height, width, 3]` in [0, 1] to
            `[batch, dim]`.
        split: The images and labels.
        global_batch_size: Examples per step, summed over all replicas.
        max_memory_bytes: Size limit of features held in memory.
        cache_dir: Existing folder for the `.npy` file; needed only when the
            features exceed `max_memory_bytes`.

    Returns:
        The features `[num_examples, dim]` and `split.labels`.

    Raises:
        UsageError: The features exceed `max_memory_bytes` and `cache_dir`
            is None or not a folder.
    """
    num_examples = len(split.labels)
    dim = encoder.output_shape[-1]
    features = _allocate(
        (num_examples, dim), max_memory_bytes, cache_dir, "features-"
    )
    dataset_fn = pipeline.make_eval_dataset_fn(
        split, global_batch_size=global_batch_size
    )
    _predict_rows(strategy, encoder, dataset_fn, split.labels, features)
    if isinstance(features, np.memmap):
        features.flush()
        features = np.load(features.filename, mmap_mode="r")
    labels = np.asarray(split.labels, dtype=np.int64)
    return FeatureCache(features=features, labels=labels)


def predict_cached(
    strategy: tf.distribute.Strategy,
    head: keras.Model,
    cache: FeatureCache,
    *,
    global_batch_size: int,
) -> np.ndarray:
    """Return `head(features, training=False)`, float32 `[n, num_classes]`."""
    num_classes = head.output_shape[-1]
    logits = np.empty((len(cache.labels), num_classes), np.float32)
    dataset_fn = _make_padded_dataset_fn(cache, global_batch_size)
    _predict_rows(strategy, head, dataset_fn, cache.labels, logits)
    return logits


def _allocate(shape, max_memory_bytes, cache_dir, prefix) -> np.ndarray:
    """Return an empty float32 array, on disk when it exceeds the limit."""
    num_bytes = 4 * int(np.prod(shape))
    if num_bytes <= max_memory_bytes:
        return np.empty(shape, np.float32)
    if cache_dir is None or not os.path.isdir(cache_dir):
        raise UsageError(
            f"Features of shape {list(shape)} take {num_bytes} bytes, more "
            f"than max_memory_bytes={max_memory_bytes}, and cache_dir="
            f"{cache_dir!r} is not an existing folder. Pass a folder for "
            "the .npy file or raise max_memory_bytes."
        )
    descriptor, path = tempfile.mkstemp(
        suffix=".npy", prefix=prefix, dir=cache_dir
    )
    os.close(descriptor)
    return np.lib.format.open_memmap(
        path, mode="w+", dtype=np.float32, shape=shape
    )


def _make_padded_dataset_fn(cache: FeatureCache, global_batch_size: int):
    """Like `make_eval_dataset_fn`, for rows of cached features."""
    num_examples = len(cache.labels)
    num_steps = -(-num_examples // global_batch_size)
    with tf.device("/cpu:0"):
        features = tf.convert_to_tensor(cache.features, tf.float32)
        labels = tf.convert_to_tensor(cache.labels.astype(np.int32))

    def make_batch(positions):
        indices = tf.minimum(positions, num_examples - 1)
        weights = tf.cast(positions < num_examples, tf.float32)
        return (
            tf.gather(features, indices),
            tf.gather(labels, indices),
            weights,
        )

    def dataset_fn(input_context):
        lo, hi, per_replica_batch_size = pipeline.pipeline_columns(
            input_context, global_batch_size
        )
        positions = np.arange(num_steps * global_batch_size)
        positions = positions.reshape(num_steps, global_batch_size)[:, lo:hi]
        dataset = tf.data.Dataset.from_tensor_slices(positions.reshape(-1))
        dataset = dataset.batch(per_replica_batch_size, drop_remainder=True)
        return dataset.map(make_batch).prefetch(tf.data.AUTOTUNE)

    return dataset_fn


def _predict_rows(strategy, model, dataset_fn, labels, output) -> None:
    """Write `model(inputs, training=False)` of every real row to `output`.

    `dataset_fn` yields `(inputs, labels, weights)` per replica. Gathering
    in replica order rebuilds each global batch in column order, so the
    real rows (weight 1) come out in the split's order. The gathered labels
    are compared with `labels` to check that order.
    """

    def replica_fn(inputs, batch_labels, weights):
        return model(inputs, training=False), batch_labels, weights

    @tf.function
    def predict_batch(inputs):
        per_replica = strategy.run(replica_fn, args=inputs)
        return [strategy.gather(value, axis=0) for value in per_replica]

    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    start = 0
    for inputs in dataset:
        outputs, batch_labels, weights = predict_batch(inputs)
        keep = weights.numpy() > 0
        end = start + int(keep.sum())
        output[start:end] = outputs.numpy()[keep]
        if not np.array_equal(batch_labels.numpy()[keep], labels[start:end]):
            raise RuntimeError(
                f"Rows {start}:{end} came back out of order from "
                f"{type(strategy).__name__}; its replicas do not receive "
                "consecutive input elements."
            )
        start = end
    if start != len(labels):
        raise RuntimeError(f"Got {start} rows for {len(labels)} examples.")


def knn_predict(
    train: FeatureCache,
    queries: np.ndarray,
    *,
    k: int,
    num_classes: int,
    temperature: float = 0.07,
    batch_size: int = 1024,
) -> np.ndarray:
    """Score classes by the weighted votes of the k nearest train rows.

    This is the weighted kNN of Wu et al. 2018, "Unsupervised Feature
    Learning via Non-Parametric Instance Discrimination": both sides are
    L2-normalised, the k train rows of highest cosine similarity `s_i` are
    the neighbours, and neighbour i adds `exp(s_i / temperature)` to the
    score of its class. Among equal similarities the lower train index
    wins (`tf.math.top_k`). Queries run in batches of `batch_size`, so the
    similarity matrix takes `batch_size * num_train` floats.

    NOTE: The normalised train features are held in memory whole, even
    when `train.features` is a memmap. Below a temperature of about 0.0113,
    `exp(1 / temperature)` overflows float32 and the scores become inf.

    Args:
        train: Features `[num_train, dim]` and labels `[num_train]`.
        queries: float32 `[num_queries, dim]`.
        k: Number of neighbours, in `[1, num_train]`.
        num_classes: Number of classes; labels are in `[0, num_classes)`.
        temperature: Positive temperature of the vote weights.
        batch_size: Queries per batch.

    Returns:
        float32 `[num_queries, num_classes]`, the summed vote weights.
    """
    num_train = len(train.labels)
    if not 1 <= k <= num_train:
        raise UsageError(
            f"k={k} is invalid: use 1 to {num_train}, the train size."
        )
    if temperature <= 0 or batch_size < 1:
        raise UsageError(
            f"temperature={temperature} and batch_size={batch_size} must "
            "be positive."
        )
    train_features = tf.math.l2_normalize(
        tf.convert_to_tensor(train.features, tf.float32), axis=1
    )
    train_labels = tf.convert_to_tensor(train.labels, tf.int64)
    scores = [
        _knn_scores(
            tf.constant(queries[start : start + batch_size], tf.float32),
            train_features,
            train_labels,
            k,
            num_classes,
            temperature,
        ).numpy()
        for start in range(0, len(queries), batch_size)
    ]
    if not scores:
        return np.zeros((0, num_classes), np.float32)
    return np.concatenate(scores)


@tf.function(
    input_signature=[
        tf.TensorSpec([None, None], tf.float32),
        tf.TensorSpec([None, None], tf.float32),
        tf.TensorSpec([None], tf.int64),
        tf.TensorSpec([], tf.int32),
        tf.TensorSpec([], tf.int32),
        tf.TensorSpec([], tf.float32),
    ]
)
def _knn_scores(queries, train_features, train_labels, k, num_classes, tau):
    """Return kNN votes `[num_queries, num_classes]` of normalised rows."""
    queries = tf.math.l2_normalize(queries, axis=1)
    similarity = tf.matmul(queries, train_features, transpose_b=True)
    top_similarity, top_indices = tf.math.top_k(similarity, k=k)
    votes = tf.one_hot(tf.gather(train_labels, top_indices), num_classes)
    weights = tf.exp(top_similarity / tau)
    return tf.einsum("qk,qkc->qc", weights, votes)


def knn_accuracy(
    train: FeatureCache,
    test: FeatureCache,
    *,
    k: int,
    num_classes: int,
    temperature: float = 0.07,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy of `knn_predict` on the test features.

    A class that no neighbour voted for never counts as a top-5 hit, even
    when fewer than 5 classes received votes.
    """
    scores = knn_predict(
        train,
        test.features,
        k=k,
        num_classes=num_classes,
        temperature=temperature,
    )
    labels = np.asarray(test.labels)
    voted = scores[np.arange(len(labels)), labels] > 0
    return {
        "top1": _mean(_top_k_hits(scores, labels, 1) & voted),
        "top5": _mean(_top_k_hits(scores, labels, 5) & voted),
    }


def classification_metrics(
    scores_or_logits: np.ndarray, labels: np.ndarray, num_classes: int
) -> dict:
    """Compute accuracies and the confusion matrix of class scores.

    A class is in the top k when fewer than k classes rank above it. Among
    equal scores the lower class id ranks first, the order of `np.argmax`
    and `tf.math.top_k`.

    Args:
        scores_or_logits: float `[num_examples, num_classes]`.
        labels: int `[num_examples]`, true classes in `[0, num_classes)`.
        num_classes: Number of classes.

    Returns:
        `top1` and `top5` (float), `per_class_accuracy` (list of
        `num_classes` floats, None for a class without examples) and
        `confusion_matrix` (`num_classes` lists of `num_classes` ints; row
        = true class, column = predicted class).
    """
    scores = np.asarray(scores_or_logits)
    labels = np.asarray(labels, dtype=np.int64)
    if scores.shape != (len(labels), num_classes):
        raise UsageError(
            f"Scores of shape {scores.shape} do not match {len(labels)} "
            f"labels and {num_classes} classes."
        )
    if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise UsageError(f"Labels must be in [0, {num_classes}).")
    predictions = np.argmax(scores, axis=1) if len(labels) else labels
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    examples_per_class = confusion.sum(axis=1)
    per_class = [
        float(confusion[c, c] / examples_per_class[c])
        if examples_per_class[c]
        else None
        for c in range(num_classes)
    ]
    return {
        "top1": _mean(_top_k_hits(scores, labels, 1)),
        "top5": _mean(_top_k_hits(scores, labels, 5)),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def _top_k_hits(scores, labels, k) -> np.ndarray:
    """Return bool `[n]`: the true class ranks among the first k."""
    true_scores = scores[np.arange(len(labels)), labels][:, None]
    lower_ids = np.arange(scores.shape[1])[None, :] < labels[:, None]
    above = (scores > true_scores) | ((scores == true_scores) & lower_ids)
    return above.sum(axis=1) < k


def _mean(hits: np.ndarray) -> float:
    return float(hits.mean()) if len(hits) else float("nan")


def train_cached_probe(
    strategy: tf.distribute.Strategy,
    head: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    train: FeatureCache,
    *,
    global_batch_size: int,
    epochs: int,
    seed: int,
    steps_per_loop: int = 50,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train `head` with softmax cross-entropy on cached features.

    The step is `steps.make_classifier_step` with the cached features in
    place of a frozen encoder: the loss of a replica is its summed
    cross-entropy divided by `global_batch_size`, and the logged loss is
    the sum over replicas. Batches follow the order of
    `pipeline.make_train_dataset_fn` with the same `seed`, so this trains
    the same head as that pipeline with `augment="none"` and a frozen
    encoder does.

    Args:
        strategy: The strategy that `head` and `optimizer` were built under.
        head: Maps features `[batch, dim]` to logits `[batch, num_classes]`.
        optimizer: Built for `head.trainable_variables`.
        train: Cached features and labels.
        global_batch_size: Examples per step, summed over all replicas.
        epochs: Passes over the features; each drops its last partial batch.
        seed: Seed of the per-epoch order.
        steps_per_loop: Steps per `tf.function` call.
        on_log: Called after each call as `on_log(global_step, metrics)`,
            with the `loss` and `accuracy` averaged over that call's steps
            and its `examples_per_sec`.

    Returns:
        `steps`, `final_loss` (mean loss of the last call), `seconds` and
        `examples_per_second`; the time includes the first call's tracing.
    """
    total_steps = epochs * pipeline.steps_per_epoch(
        len(train.labels), global_batch_size
    )
    if epochs < 1 or steps_per_loop < 1:
        raise UsageError(
            f"epochs={epochs} and steps_per_loop={steps_per_loop} must be >= 1."
        )
    replica_step = steps.make_classifier_step(
        cached_encoder,
        head,
        optimizer,
        global_batch_size,
        train_encoder=False,
    )
    train_loop = steps.make_train_loop(strategy, replica_step)
    dataset_fn = make_cached_train_dataset_fn(
        train, global_batch_size, epochs, seed
    )
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))

    step, loss, start = 0, float("nan"), time.perf_counter()
    while step < total_steps:
        num_steps = min(steps_per_loop, total_steps - step)
        loop_start = time.perf_counter()
        metrics = train_loop(iterator, tf.constant(num_steps, tf.int32))
        loss = float(metrics["loss"])
        step += num_steps
        if on_log is not None:
            elapsed = time.perf_counter() - loop_start
            logged = {
                "loss": loss,
                "accuracy": float(metrics["accuracy"]),
                "examples_per_sec": num_steps * global_batch_size / elapsed,
            }
            on_log(step, logged)
    seconds = time.perf_counter() - start
    return {
        "steps": total_steps,
        "final_loss": loss,
        "seconds": seconds,
        "examples_per_second": total_steps * global_batch_size / seconds,
    }


def cached_encoder(features, training):
    """Return the cached features, which are the frozen encoder's output."""
    del training
    return features


def make_cached_train_dataset_fn(
    train: FeatureCache,
    global_batch_size: int,
    epochs: int,
    seed: int,
    start_step: int = 0,
):
    """Return an input function of `(features [b, 1, dim], labels [b])`.

    The run starts at global step `start_step`, for resume.

    Epoch `e` is `tf.random.experimental.stateless_shuffle` of the indices
    seeded by `(seed, e)`, cut into full global batches, as in
    `data/pipeline.py`. The shuffle runs inside tf.data there and here, so
    both use the same device and therefore the same random algorithm.
    """
    num_examples = len(train.labels)
    rows_shape = [num_examples // global_batch_size, global_batch_size]
    seed = tf.constant(seed, tf.int64)
    with tf.device("/cpu:0"):
        features = tf.convert_to_tensor(train.features, tf.float32)
        labels = tf.convert_to_tensor(train.labels.astype(np.int32))

    def epoch_indices(epoch, lo, hi):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(num_examples, dtype=tf.int64),
            seed=tf.stack([seed, epoch]),
        )
        rows = tf.reshape(order[: rows_shape[0] * rows_shape[1]], rows_shape)
        return tf.data.Dataset.from_tensor_slices(
            tf.reshape(rows[:, lo:hi], [-1])
        )

    def make_batch(indices):
        # The classifier step reads view 0 of `[batch, num_views, ...]`.
        return tf.gather(features, indices)[:, None], tf.gather(labels, indices)

    def dataset_fn(input_context):
        lo, hi, per_replica_batch_size = pipeline.pipeline_columns(
            input_context, global_batch_size
        )
        dataset = tf.data.Dataset.range(epochs).flat_map(
            lambda epoch: epoch_indices(epoch, lo, hi)
        )
        dataset = dataset.batch(per_replica_batch_size, drop_remainder=True)
        batches_per_step = (hi - lo) // per_replica_batch_size
        dataset = dataset.skip(start_step * batches_per_step)
        return dataset.map(make_batch).prefetch(tf.data.AUTOTUNE)

    return dataset_fn
