"""Classifier training on an encoder: the frozen probe and the baseline."""

import dataclasses
import os

import keras
import tensorflow as tf
from absl import logging

from supcon_tf import models, optim
from supcon_tf.config import ClassifierConfig
from supcon_tf.data import pipeline
from supcon_tf.data.sources import ArraySplit, DatasetSplits
from supcon_tf.training import steps
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


def evaluate(
    context: RunContext,
    encoder: keras.Model,
    head: keras.Model,
    split: ArraySplit,
) -> dict[str, float]:
    """Top-1, top-5 and mean loss over every example of `split` once."""
    dataset = context.strategy.distribute_datasets_from_function(
        pipeline.make_eval_dataset_fn(
            split, global_batch_size=context.global_batch_size
        )
    )
    evaluate_fn = steps.make_eval_loop(
        context.strategy, steps.make_eval_step(encoder, head)
    )
    sums = evaluate_fn(dataset)
    count = sums["count"]
    return {
        "top1": sums["top1"] / count,
        "top5": sums["top5"] / count,
        "loss": sums["loss"] / count,
        "count": count,
    }


def train_classifier(
    context: RunContext,
    encoder: keras.Model,
    config: ClassifierConfig,
    *,
    train_encoder: bool,
    checkpoint_dir: str,
    name: str,
) -> tuple[PhaseStats, dict[str, float]]:
    """Trains a classifier head (and the encoder if asked), then evaluates.

    Returns:
      The phase statistics and the test metrics (`top1`, `top5`, `loss`,
      `count`).
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
    optimizer = optim.make_optimizer(config.optimizer, strategy, variables)
    checkpoint = tf.train.Checkpoint(head=head, optimizer=optimizer, step=step)
    if train_encoder:
        checkpoint.encoder = encoder

    replica_step = steps.make_classifier_step(
        encoder, head, optimizer, context.global_batch_size, train_encoder
    )
    steps_per_epoch = pipeline.steps_per_epoch(
        len(splits.train.labels), context.global_batch_size
    )

    def dataset_fn_for_step(start_step: int):
        return pipeline.make_train_dataset_fn(
            splits.train,
            global_batch_size=context.global_batch_size,
            num_views=1,
            augment=config.augment,
            seed=context.seed + 1,
            num_epochs=config.epochs,
            start_step=start_step,
        )

    def on_epoch_end(epoch: int) -> None:
        every = config.eval_every_epochs
        if every and epoch % every == 0 and epoch < config.epochs:
            _evaluate_and_log(context, encoder, head, name, int(step.numpy()))

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
    metrics = _evaluate_and_log(context, encoder, head, name, int(step.numpy()))
    return stats, metrics


def _classifier_tags(name: str) -> dict[str, str]:
    return {
        "loss": f"loss/{name}",
        "accuracy": f"{name}/train_top1",
        "lr": f"{name}/lr",
        "steps_per_sec": f"{name}/perf/steps_per_sec",
        "examples_per_sec": f"{name}/perf/examples_per_sec",
    }


def _evaluate_and_log(context, encoder, head, name, step) -> dict[str, float]:
    metrics = evaluate(context, encoder, head, context.splits.test)
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
    return metrics


def checkpoint_path(model_dir: str, phase_name: str) -> str:
    return os.path.join(model_dir, "checkpoints", phase_name)
