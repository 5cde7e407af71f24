"""Replica steps and the `tf.function` loops that run them.

A replica step returns a dict of per-replica values already scaled so that
their SUM over replicas is the global value: a loss summed over the
replica's examples and divided by the global batch size, or a count. The
loops reduce with SUM, so the logged loss is the same with 1 or N replicas.
"""

from collections.abc import Callable

import keras
import tensorflow as tf

from supcon_tf import losses
from supcon_tf.config import LossConfig
from supcon_tf.errors import UsageError
from supcon_tf.training.diagnostics import embedding_diagnostics

ReplicaStep = Callable[..., dict[str, tf.Tensor]]


def make_contrastive_loss_fn(config: LossConfig) -> Callable:
    """Returns `fn(features [b, views, dim], labels [b]) -> [b]` losses."""
    if config.temperature <= 0:
        raise UsageError(
            f"--temperature={config.temperature} is invalid; use a positive "
            "value such as 0.05 or 0.1."
        )
    if config.loss == "supcon":
        return lambda f, y: losses.supcon_loss(
            f, y, temperature=config.temperature
        )
    if config.loss == "simclr":
        return lambda f, y: losses.supcon_loss(
            f, None, temperature=config.temperature
        )
    if config.loss == "npairs":
        return lambda f, y: losses.npairs_feature_loss(
            f, y, temperature=config.temperature
        )
    raise UsageError(
        f"Unknown --loss={config.loss!r}; choose supcon, simclr or npairs."
    )


def _regularization(models: list[keras.Model], num_replicas: int):
    """Layer regularisation losses, split evenly over the replicas."""
    terms = [loss for model in models for loss in model.losses]
    if not terms:
        return 0.0
    return tf.add_n(terms) / num_replicas


def _share_overflow(optimizer, gradients: list) -> list:
    """Makes a float16 gradient overflow on any replica skip every replica.

    Keras 3.15's LossScaleOptimizer decides per replica whether to skip a
    step, and assumes that its gradients are already all-reduced. In a
    custom loop they are not, so one replica's overflow would reach the
    summed update as NaN. Every replica therefore turns its gradients into
    NaN when any replica overflowed, and all skip the step together.
    """
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return gradients
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return gradients
    finite = tf.reduce_all(
        [tf.reduce_all(tf.math.is_finite(g)) for g in gradients]
    )
    overflows = context.all_reduce("SUM", tf.cast(~finite, tf.float32))
    return [
        tf.where(overflows > 0, tf.constant(float("nan"), g.dtype), g)
        for g in gradients
    ]


def make_pretrain_step(
    encoder: keras.Model,
    projection_head: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    loss_fn: Callable,
    global_batch_size: int,
    *,
    jit_compile: bool = False,
) -> ReplicaStep:
    """Builds the replica step of contrastive pretraining.

    The step trains on this replica's share of the global batch; the loss
    draws its negatives from the whole global batch. With `jit_compile`,
    XLA compiles the forward and backward pass (not the optimizer update).
    """
    variables = (
        encoder.trainable_variables + projection_head.trainable_variables
    )

    def forward_backward(views, labels):
        shape = tf.shape(views)
        batch_size, num_views = shape[0], views.shape[1]
        images = tf.reshape(views, tf.concat([[-1], shape[2:]], axis=0))

        with tf.GradientTape() as tape:
            embeddings = encoder(images, training=True)
            features = projection_head(embeddings, training=True)
            features = tf.reshape(features, [batch_size, num_views, -1])
            per_example = loss_fn(features, labels)
            loss = tf.reduce_sum(per_example) / global_batch_size
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            total = loss + _regularization([encoder, projection_head], replicas)
            scaled = optimizer.scale_loss(total)

        gradients = tape.gradient(scaled, variables)
        return loss, gradients, tf.stop_gradient(features)

    if jit_compile:
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def replica_step(views, labels):
        loss, gradients, features = forward_backward(views, labels)
        gradients = _share_overflow(optimizer, gradients)
        optimizer.apply_gradients(zip(gradients, variables, strict=True))

        # Diagnostics of this replica's rows; the loop sums over replicas.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        metrics = {"loss": loss}
        for name, value in embedding_diagnostics(features, labels).items():
            metrics[name] = value / replicas
        return metrics

    return replica_step


def _classification_sums(logits, labels, weights):
    """Weighted cross-entropy and top-1/top-5 hit counts of one batch."""
    logits = tf.cast(logits, tf.float32)
    cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=logits
    )
    top1 = tf.cast(tf.math.in_top_k(labels, logits, 1), tf.float32)
    k = min(5, logits.shape[-1])
    top5 = tf.cast(tf.math.in_top_k(labels, logits, k), tf.float32)
    return {
        "loss": tf.reduce_sum(cross_entropy * weights),
        "top1": tf.reduce_sum(top1 * weights),
        "top5": tf.reduce_sum(top5 * weights),
        "count": tf.reduce_sum(weights),
    }


def make_classifier_step(
    encoder: keras.Model,
    head: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    global_batch_size: int,
    train_encoder: bool,
) -> ReplicaStep:
    """Builds a cross-entropy step of the head, and of the encoder if trained.

    With `train_encoder=False` the encoder runs in inference mode (batch
    norm uses its moving statistics and nothing in it changes) and only
    the head's variables receive gradients.
    """
    variables = list(head.trainable_variables)
    if train_encoder:
        variables = encoder.trainable_variables + variables
    models = [encoder, head] if train_encoder else [head]

    def replica_step(views, labels):
        images = views[:, 0]
        weights = tf.ones_like(labels, dtype=tf.float32)

        with tf.GradientTape() as tape:
            embeddings = encoder(images, training=train_encoder)
            if not train_encoder:
                embeddings = tf.stop_gradient(embeddings)
            logits = head(embeddings, training=True)
            sums = _classification_sums(logits, labels, weights)
            loss = sums["loss"] / global_batch_size
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            total = loss + _regularization(models, replicas)
            scaled = optimizer.scale_loss(total)

        gradients = _share_overflow(optimizer, tape.gradient(scaled, variables))
        optimizer.apply_gradients(zip(gradients, variables, strict=True))

        return {
            "loss": loss,
            "accuracy": sums["top1"] / global_batch_size,
        }

    return replica_step


def make_train_loop(
    strategy: tf.distribute.Strategy, replica_step: ReplicaStep
) -> Callable:
    """Wraps `replica_step` in a loop of `num_steps` steps in one call.

    The returned function takes a distributed iterator and a scalar int32
    tensor `num_steps`; passing a tensor keeps one trace for every loop
    length. It returns each metric averaged over the steps it ran, as the
    global (replica-summed) value.
    """

    def one_step(iterator):
        per_replica = strategy.run(replica_step, args=next(iterator))
        return {
            name: strategy.reduce("SUM", value, axis=None)
            for name, value in per_replica.items()
        }

    @tf.function
    def train_loop(iterator, num_steps):
        totals = one_step(iterator)
        for _ in tf.range(num_steps - 1):
            values = one_step(iterator)
            totals = {name: totals[name] + values[name] for name in totals}
        steps = tf.cast(num_steps, tf.float32)
        return {name: total / steps for name, total in totals.items()}

    return train_loop
