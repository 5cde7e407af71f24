"""The contrastive pretraining phase: projection head, loss, optimizer."""

import keras
import tensorflow as tf

from supcon_tf import models, optim
from supcon_tf.config import PretrainConfig
from supcon_tf.data import pipeline
from supcon_tf.training import steps
from supcon_tf.training.checkpoints import PhaseCheckpoint
from supcon_tf.training.classifier import (
    RunContext,
    checkpoint_path,
    make_phase_optimizer,
)
from supcon_tf.training.diagnostics import DIAGNOSTIC_NAMES
from supcon_tf.training.loop import Phase


def make_pretrain_phase(
    context: RunContext, config: PretrainConfig, encoder: keras.Model
) -> Phase:
    """Builds the contrastive pretraining phase around `encoder`."""
    strategy = context.strategy
    with strategy.scope():
        head = models.build_projection_head(
            config.model.projection_head,
            input_dim=encoder.output_shape[-1],
            output_dim=config.model.projection_dim,
        )
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    variables = encoder.trainable_variables + head.trainable_variables
    optimizer, steps_per_epoch = make_phase_optimizer(
        context, config.optimizer, variables, config.epochs
    )
    checkpoint = tf.train.Checkpoint(
        encoder=encoder, projection_head=head, optimizer=optimizer, step=step
    )
    replica_step = steps.make_pretrain_step(
        encoder,
        head,
        optimizer,
        steps.make_contrastive_loss_fn(config.loss),
        config.run.global_batch_size,
        jit_compile=config.run.jit_compile,
    )
    splits = context.splits

    def dataset_fn_for_step(start_step: int):
        return pipeline.make_train_dataset_fn(
            splits.train,
            global_batch_size=config.run.global_batch_size,
            num_views=config.data.num_views,
            augment=config.data.augment,
            seed=config.run.seed,
            num_epochs=config.epochs,
            start_step=start_step,
        )

    phase = Phase(
        name="pretrain",
        strategy=strategy,
        train_loop=steps.make_train_loop(strategy, replica_step),
        dataset_fn_for_step=dataset_fn_for_step,
        step=step,
        checkpoint=PhaseCheckpoint(
            checkpoint_path(config.run.model_dir, "pretrain"),
            checkpoint,
            chief=context.chief,
            max_to_keep=config.run.keep_checkpoints,
        ),
        writers=context.writers,
        total_steps=steps_per_epoch * config.epochs,
        steps_per_epoch=steps_per_epoch,
        examples_per_step=config.run.global_batch_size,
        tags={
            **{name: f"diagnostics/{name}" for name in DIAGNOSTIC_NAMES},
            "loss": f"loss/{config.loss.loss}",
            "lr": "lr",
            "steps_per_sec": "perf/steps_per_sec",
            "examples_per_sec": "perf/examples_per_sec",
        },
        learning_rate=lambda: optim.current_learning_rate(optimizer),
        steps_per_loop=config.run.steps_per_loop,
        checkpoint_every_steps=config.run.checkpoint_every_steps,
    )
    return phase
