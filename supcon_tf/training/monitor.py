"""Pretraining reports beyond the loss: kNN accuracy, views, exports.

Every function here runs on the host between `tf.function` calls. Only
the chief writes files; every worker runs the collective parts (feature
extraction) so that the replicas stay in step.
"""

import os
import shutil
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from supcon_tf import evaluation, export
from supcon_tf.config import MonitorConfig
from supcon_tf.data import augment, pipeline
from supcon_tf.training import visuals
from supcon_tf.training.classifier import RunContext

_VIEW_PAIRS = 8


def extract_train_and_test(
    context: RunContext, encoder: keras.Model
) -> tuple[evaluation.FeatureCache, evaluation.FeatureCache]:
    """Runs the encoder in inference mode once over both splits."""
    caches = []
    for split in (context.splits.train, context.splits.test):
        caches.append(
            evaluation.extract_features(
                context.strategy,
                encoder,
                split,
                global_batch_size=context.global_batch_size,
            )
        )
    return caches[0], caches[1]


def knn_accuracy(
    context: RunContext,
    encoder: keras.Model,
    monitor: MonitorConfig,
    step: int,
    caches=None,
) -> dict[str, float]:
    """Measures cosine kNN accuracy of the test split against the train split.

    `k` is capped at the number of training examples. The result is written
    as `eval/knn_top1` and `eval/knn_top5` at the pretraining `step`.
    """
    train, test = caches or extract_train_and_test(context, encoder)
    k = min(monitor.knn_k, len(train.labels))
    result = evaluation.knn_accuracy(
        train, test, k=k, num_classes=context.splits.num_classes
    )
    logging.info(
        "pretrain: kNN (k=%d) test top-1 %.4f, top-5 %.4f at step %d.",
        k,
        result["top1"],
        result["top5"],
        step,
    )
    context.writers.write_eval(
        {"eval/knn_top1": result["top1"], "eval/knn_top5": result["top5"]},
        step,
    )
    return result


def write_view_pairs(context: RunContext, augment_mode: str, views: int, seed):
    """Writes a grid of the first training examples' augmented views."""
    if not context.chief:
        return
    split = context.splits.train
    count = min(_VIEW_PAIRS, len(split.labels))
    uniforms = tf.stack(
        [
            augment.draw_uniforms(
                tf.constant([seed, index], tf.int64), views, augment_mode
            )
            for index in range(count)
        ]
    )
    batch = augment.augment_batch(
        tf.constant(split.images[:count]), uniforms, augment_mode
    )
    visuals.write_view_pairs(context.writers.train, batch.numpy(), step=0)


def write_projector(
    context: RunContext, test: evaluation.FeatureCache, directory: str, count
) -> str | None:
    """Exports the first `count` test embeddings for TensorBoard's projector."""
    if not context.chief or count <= 0:
        return None
    count = min(count, len(test.labels))
    features = np.asarray(test.features[:count], dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    embeddings = features / np.maximum(norms, 1e-12)
    path = visuals.write_projector(
        directory,
        embeddings,
        test.labels[:count],
        context.splits.class_names,
        images=context.splits.test.images[:count],
    )
    # TensorBoard's projector only reads configs from folders that contain
    # an event file (TensorBoard 2.21), so the folder gets an empty one.
    writer = tf.summary.create_file_writer(directory)
    writer.flush()
    writer.close()
    return path


def export_encoder(context: RunContext, encoder, export_dir: str) -> None:
    """Writes the encoder SavedModel, replacing an earlier export."""
    if not context.chief:
        return
    staging = export_dir + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    export.export_encoder(
        encoder, staging, image_shape=context.splits.train.images.shape[1:]
    )
    shutil.rmtree(export_dir, ignore_errors=True)
    os.replace(staging, export_dir)
    logging.info("Exported the encoder to %s.", export_dir)


def write_hparams(
    context: RunContext, directory: str, config, results: dict[str, Any]
) -> None:
    """Adds the run to TensorBoard's HParams dashboard."""
    if not context.chief:
        return
    hparams = {
        "loss": config.loss.loss,
        "temperature": config.loss.temperature,
        "encoder": config.model.encoder,
        "global_batch_size": config.run.global_batch_size,
        "learning_rate": config.optimizer.learning_rate,
        "optimizer": config.optimizer.optimizer,
        "views": config.data.num_views,
        "augment": config.data.augment,
        "pretrain_epochs": config.epochs,
        "schedule": config.optimizer.schedule,
        "warmup_epochs": config.optimizer.warmup_epochs,
        "weight_decay": config.optimizer.weight_decay,
        "momentum": config.optimizer.momentum,
        "projection_head": config.model.projection_head,
        "mixed_precision": config.run.mixed_precision or "float32",
        "jit_compile": config.run.jit_compile,
        "max_train_examples": config.data.max_train_examples or 0,
        "seed": config.run.seed,
    }
    metrics = {
        "hparams/test_accuracy": results["test_accuracy"],
        "hparams/knn_top1": results.get("knn_top1", float("nan")),
    }
    visuals.write_hparams(directory, hparams, metrics)


def histogram_writer(context: RunContext, models: list, every: int):
    """Returns `fn(step)` that writes weight histograms every `every` steps.

    TODO: gradient-norm histograms. The gradients live inside the train
    loop's `tf.function`, and the global gradient exists only inside the
    optimizer's all-reduce. Norms of replica-local gradients would be wrong
    for more than one replica. An extra backward pass on the host would
    move the batch-norm statistics.
    """
    last = {"step": 0}

    def write(step: int) -> None:
        if every <= 0 or step // every == last["step"] // every:
            last["step"] = step
            return
        last["step"] = step
        tensors = {
            f"weights/{variable.path}": variable.numpy()
            for model in models
            for variable in model.weights
        }
        visuals.write_histograms(context.writers.train, tensors, step)

    return write


def steps_per_epoch(context: RunContext) -> int:
    return pipeline.steps_per_epoch(
        len(context.splits.train.labels), context.global_batch_size
    )
