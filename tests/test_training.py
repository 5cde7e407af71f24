"""Train steps: one replica against two, and the frozen-encoder step."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import models, optim
from supcon_tf.config import LossConfig, OptimizerConfig
from supcon_tf.data import pipeline
from supcon_tf.data.sources import ArraySplit
from supcon_tf.training import steps

GLOBAL_BATCH = 8


def _split(num_examples=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_examples, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, num_examples).astype(np.int64)
    return ArraySplit(images=images, labels=labels)


def _build(strategy, initial_weights=None, optimizer="sgd"):
    with strategy.scope():
        encoder = models.build_encoder(
            "small_cnn",
            image_shape=(16, 16, 3),
            channel_mean=[0.5] * 3,
            channel_std=[0.25] * 3,
            sync_batchnorm=True,
        )
        head = models.build_projection_head("mlp", input_dim=32, output_dim=8)
        if initial_weights:
            encoder.set_weights(initial_weights[0])
            head.set_weights(initial_weights[1])
    variables = encoder.trainable_variables + head.trainable_variables
    # Plain SGD is linear in the gradient, so equal gradients give equal
    # weights. Adam's first steps are close to sign(gradient), which turns
    # float rounding in a near-zero gradient into a full-size step.
    optimizer = optim.make_optimizer(
        OptimizerConfig(optimizer, learning_rate=0.1, momentum=0.9),
        strategy,
        variables,
    )
    return encoder, head, optimizer


def _pretrain(strategy, split, loss, initial_weights, num_steps):
    encoder, head, optimizer = _build(strategy, initial_weights)
    replica_step = steps.make_pretrain_step(
        encoder,
        head,
        optimizer,
        steps.make_contrastive_loss_fn(LossConfig(loss, temperature=0.1)),
        GLOBAL_BATCH,
    )
    loop = steps.make_train_loop(strategy, replica_step)
    dataset = strategy.distribute_datasets_from_function(
        pipeline.make_train_dataset_fn(
            split,
            global_batch_size=GLOBAL_BATCH,
            num_views=1 if loss == "npairs" else 2,
            augment="supcon",
            seed=3,
            num_epochs=1,
        )
    )
    iterator = iter(dataset)
    losses = [
        float(loop(iterator, tf.constant(1))["loss"]) for _ in range(num_steps)
    ]
    return losses, encoder.get_weights() + head.get_weights()


@pytest.mark.parametrize("loss", ["supcon", "simclr", "npairs"])
def test_two_replicas_train_like_one(loss, mirrored):
    split = _split()
    keras.utils.set_random_seed(1)
    reference = _build(tf.distribute.get_strategy())
    initial = (reference[0].get_weights(), reference[1].get_weights())

    one, two = mirrored(1), mirrored(2)
    losses_one, weights_one = _pretrain(one, split, loss, initial, 3)
    losses_two, weights_two = _pretrain(two, split, loss, initial, 3)

    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-5, atol=1e-6)
    assert losses_one[0] > 0.0
    assert len(weights_one) == len(weights_two)
    for after_one, after_two, _before in zip(
        weights_one, weights_two, initial[0] + initial[1], strict=True
    ):
        np.testing.assert_allclose(after_two, after_one, rtol=1e-5, atol=1e-5)
    # Every weight but the two fixed pixel statistics moved, so the equality
    # above is not trivially true.
    moved = [
        not np.allclose(after, before)
        for after, before in zip(
            weights_one, initial[0] + initial[1], strict=True
        )
    ]
    assert moved[:2] == [False, False]
    assert all(moved[2:])


def test_replica_copies_stay_identical(mirrored):
    split = _split()
    two = mirrored(2)
    encoder, head, optimizer = _build(two)
    replica_step = steps.make_pretrain_step(
        encoder,
        head,
        optimizer,
        steps.make_contrastive_loss_fn(LossConfig("supcon", 0.1)),
        GLOBAL_BATCH,
    )
    loop = steps.make_train_loop(two, replica_step)
    dataset = two.distribute_datasets_from_function(
        pipeline.make_train_dataset_fn(
            split,
            global_batch_size=GLOBAL_BATCH,
            num_views=2,
            augment="supcon",
            seed=0,
            num_epochs=1,
        )
    )
    loop(iter(dataset), tf.constant(2))
    for variable in encoder.weights + head.weights:
        copies = [v.numpy() for v in variable.value.values]
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1])


def test_frozen_encoder_step_trains_only_head(mirrored):
    split = _split()
    strategy = mirrored(2)
    encoder, _, _ = _build(strategy)
    with strategy.scope():
        head = models.build_classifier_head(
            "linear", input_dim=32, num_classes=3
        )
    optimizer = optim.make_optimizer(
        OptimizerConfig(learning_rate=0.1),
        strategy,
        head.trainable_variables,
    )
    encoder_before = encoder.get_weights()
    head_before = head.get_weights()
    replica_step = steps.make_classifier_step(
        encoder, head, optimizer, GLOBAL_BATCH, train_encoder=False
    )
    loop = steps.make_train_loop(strategy, replica_step)
    dataset = strategy.distribute_datasets_from_function(
        pipeline.make_train_dataset_fn(
            split,
            global_batch_size=GLOBAL_BATCH,
            num_views=1,
            augment="none",
            seed=0,
            num_epochs=1,
        )
    )
    metrics = loop(iter(dataset), tf.constant(2))
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0
    assert float(metrics["loss"]) > 0.0
    # Inference mode: batch-norm moving statistics stay put as well.
    for after, before in zip(
        encoder.get_weights(), encoder_before, strict=True
    ):
        np.testing.assert_array_equal(after, before)
    assert any(
        not np.allclose(after, before)
        for after, before in zip(head.get_weights(), head_before, strict=True)
    )


def test_eval_counts_every_example_once(mirrored):
    split = _split(num_examples=13)
    strategy = mirrored(2)
    encoder, _, _ = _build(strategy)
    with strategy.scope():
        head = models.build_classifier_head(
            "linear", input_dim=32, num_classes=3
        )
    evaluate = steps.make_eval_loop(
        strategy, steps.make_eval_step(encoder, head)
    )
    dataset = strategy.distribute_datasets_from_function(
        pipeline.make_eval_dataset_fn(split, global_batch_size=GLOBAL_BATCH)
    )
    sums = evaluate(dataset)
    assert sums["count"] == 13.0

    images = split.images.astype("float32") / 255.0
    logits = head(encoder(images, training=False), training=False)
    expected_top1 = np.sum(np.argmax(logits, axis=1) == split.labels)
    assert sums["top1"] == float(expected_top1)
