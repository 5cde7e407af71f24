"""Classifier training on an encoder: the frozen probe and the baseline."""

import dataclasses
import os
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from supcon_tf import evaluation, models, optim, precision
from supcon_tf.config import ClassifierConfig, OptimizerConfig
from supcon_tf.data import pipeline
from supcon_tf.data.sources import ArraySplit, DatasetSplits
from supcon_tf.training import steps, visuals
from supcon_tf.training.checkpoints import PhaseCheckpoint
from supcon_tf.training.loop import Phase, PhaseStats, run_phase
from supcon_tf.training.summaries import SummaryWriters


@dataclasses.dataclass
class RunContext:
    """State that every phase of one job shares."""

    strategy: tf.distribute.Strategy
    chief: bool
    splits: DatasetSplits
    global_batch_size: int
    seed: int
    steps_per_loop: int
    checkpoint_every_steps: int
    keep_checkpoints: int
    writers: SummaryWriters | None
    mixed_precision: str | None = None
    jit_compile: bool = False


def evaluate(
    context: RunContext,
    encoder: keras.Model,
    head: keras.Model,
    split: ArraySplit,
    features: evaluation.FeatureCache | None = None,
) -> dict[str, Any]:
    """Evaluates every example of `split` once.

    Args:
      features: The encoder's features of `split` when they are cached
        already (frozen encoder); otherwise the encoder runs now.

    Returns:
      `top1`, `top5`, mean cross-entropy `loss`, `count`,
      `per_class_accuracy` and `confusion_matrix` (rows: true class).
    """
    if features is None:
        features = evaluation.extract_features(
            context.strategy,
            encoder,
            split,
            global_batch_size=context.global_batch_size,
        )
    logits = evaluation.predict_cached(
        context.strategy,
        head,
        features,
        global_batch_size=context.global_batch_size,
    )
    metrics = evaluation.classification_metrics(
        logits, features.labels, context.splits.num_classes
    )
    metrics["loss"] = _mean_cross_entropy(logits, features.labels)
    metrics["count"] = len(features.labels)
    return metrics


def _mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def make_phase_optimizer(
    context: RunContext,
    config: OptimizerConfig,
    variables: list,
    epochs: int,
) -> tuple[keras.optimizers.Optimizer, int]:
    """Builds a phase's optimizer, schedule and loss scaling.

    Returns:
      The optimizer, built for `variables`, and the phase's steps per epoch
      that its schedule uses.
    """
    steps_per_epoch = pipeline.steps_per_epoch(
        len(context.splits.train.labels), context.global_batch_size
    )
    optimizer = optim.make_optimizer(
        config,
        context.strategy,
        variables,
        steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * epochs,
        global_batch_size=context.global_batch_size,
    )
    optimizer = precision.wrap_optimizer(
        optimizer, context.strategy, variables, context.mixed_precision
    )
    return optimizer, steps_per_epoch


def train_classifier(
    context: RunContext,
    encoder: keras.Model,
    config: ClassifierConfig,
    *,
    train_encoder: bool,
    checkpoint_dir: str,
    name: str,
    features: tuple | None = None,
    feature_seconds: float | None = None,
) -> tuple[PhaseStats, dict[str, float]]:
    """Trains a classifier head (and the encoder if asked), then evaluates.

    With a frozen encoder and no augmentation, the encoder runs once over
    train and test and the head trains on the cached features. Otherwise
    the encoder runs on every step. `features`, a `(train, test)` pair of
    `evaluation.FeatureCache`, reuses caches that the caller extracted in
    `feature_seconds`.

    Returns:
      The phase statistics and the test metrics from `evaluate`, plus
      `mode` (`cached` or `recomputed`) and `feature_seconds`.
    """
    splits = context.splits
    strategy = context.strategy
    with strategy.scope():
        head = models.build_classifier_head(
            config.head,
            input_dim=encoder.output_shape[-1],
            num_classes=splits.num_classes,
        )
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    variables = list(head.trainable_variables)
    if train_encoder:
        variables = encoder.trainable_variables + variables
    optimizer, steps_per_epoch = make_phase_optimizer(
        context, config.optimizer, variables, config.epochs
    )
    checkpoint = tf.train.Checkpoint(head=head, optimizer=optimizer, step=step)
    if train_encoder:
        checkpoint.encoder = encoder

    cached = not train_encoder and config.augment == "none"
    train_features = test_features = None
    if cached and features is None:
        started = time.perf_counter()
        features = (
            _extract(context, encoder, splits.train),
            _extract(context, encoder, splits.test),
        )
        feature_seconds = time.perf_counter() - started
    if cached:
        train_features, test_features = features
        logging.info(
            "%s: cached encoder features of %d train and %d test examples "
            "in %.1f s; the head trains on the cache.",
            name,
            len(train_features.labels),
            len(test_features.labels),
            feature_seconds,
        )
    replica_step = steps.make_classifier_step(
        evaluation.cached_encoder if cached else encoder,
        head,
        optimizer,
        context.global_batch_size,
        train_encoder,
    )

    def dataset_fn_for_step(start_step: int):
        if cached:
            return evaluation.make_cached_train_dataset_fn(
                train_features,
                context.global_batch_size,
                config.epochs,
                context.seed + 1,
                start_step=start_step,
            )
        return pipeline.make_train_dataset_fn(
            splits.train,
            global_batch_size=context.global_batch_size,
            num_views=1,
            augment=config.augment,
            seed=context.seed + 1,
            num_epochs=config.epochs,
            start_step=start_step,
        )

    def evaluate_and_log() -> dict[str, Any]:
        return _evaluate_and_log(
            context, encoder, head, name, int(step.numpy()), test_features
        )

    def on_epoch_end(epoch: int) -> None:
        every = config.eval_every_epochs
        if every and epoch % every == 0 and epoch < config.epochs:
            evaluate_and_log()

    phase = Phase(
        name=name,
        strategy=strategy,
        train_loop=steps.make_train_loop(strategy, replica_step),
        dataset_fn_for_step=dataset_fn_for_step,
        step=step,
        checkpoint=PhaseCheckpoint(
            checkpoint_dir,
            checkpoint,
            chief=context.chief,
            max_to_keep=context.keep_checkpoints,
        ),
        writers=context.writers,
        total_steps=steps_per_epoch * config.epochs,
        steps_per_epoch=steps_per_epoch,
        examples_per_step=context.global_batch_size,
        tags=_classifier_tags(name),
        learning_rate=lambda: optim.current_learning_rate(optimizer),
        steps_per_loop=context.steps_per_loop,
        checkpoint_every_steps=context.checkpoint_every_steps,
        on_epoch_end=on_epoch_end,
    )
    stats = run_phase(phase)
    metrics = evaluate_and_log()
    metrics["mode"] = "cached" if cached else "recomputed"
    metrics["feature_seconds"] = feature_seconds if cached else None
    return stats, metrics


def _classifier_tags(name: str) -> dict[str, str]:
    return {
        "loss": f"loss/{name}",
        "accuracy": f"{name}/train_top1",
        "lr": f"{name}/lr",
        "steps_per_sec": f"{name}/perf/steps_per_sec",
        "examples_per_sec": f"{name}/perf/examples_per_sec",
    }


def _extract(context, encoder, split) -> evaluation.FeatureCache:
    return evaluation.extract_features(
        context.strategy,
        encoder,
        split,
        global_batch_size=context.global_batch_size,
    )


def _evaluate_and_log(
    context, encoder, head, name, step, features=None
) -> dict[str, Any]:
    metrics = evaluate(context, encoder, head, context.splits.test, features)
    logging.info(
        "%s: test top-1 %.4f, top-5 %.4f, loss %.4f on %d examples (step %d).",
        name,
        metrics["top1"],
        metrics["top5"],
        metrics["loss"],
        metrics["count"],
        step,
    )
    context.writers.write_eval(
        {
            "eval/top1": metrics["top1"],
            "eval/top5": metrics["top5"],
            f"eval/loss_{name}": metrics["loss"],
        },
        step,
    )
    visuals.write_confusion_matrix(
        context.writers.eval,
        np.asarray(metrics["confusion_matrix"]),
        context.splits.class_names,
        step,
    )
    return metrics


def checkpoint_path(model_dir: str, phase_name: str) -> str:
    return os.path.join(model_dir, "checkpoints", phase_name)
