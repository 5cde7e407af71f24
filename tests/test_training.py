"""Train steps: 1, 2 and 4 replicas agree; frozen encoder; tracing."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import models, optim, precision
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
    # float rounding in a near-zero gradient into a full-size step. The
    # rounding of a gradient element scales with the terms summed into it,
    # not with the element, so the learning rate sets the size of the weight
    # difference between replica counts: 0.02 keeps it under 1e-5 here.
    optimizer = optim.make_optimizer(
        OptimizerConfig(optimizer, learning_rate=0.02, momentum=0.9),
        strategy,
        variables,
    )
    return encoder, head, optimizer


def _initial_weights(num_classes=3):
    """Weights that every strategy's copy of the models starts from."""
    keras.utils.set_random_seed(1)
    encoder, head, _ = _build(tf.distribute.get_strategy())
    classifier = models.build_classifier_head(
        "linear", input_dim=32, num_classes=num_classes
    )
    return encoder.get_weights(), head.get_weights(), classifier.get_weights()


def _run_steps(strategy, loop, dataset_fn, num_steps):
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    return [
        float(loop(iterator, tf.constant(1))["loss"]) for _ in range(num_steps)
    ]


def _pretrain(strategy, split, loss, initial, num_steps):
    encoder, head, optimizer = _build(strategy, initial[:2])
    replica_step = steps.make_pretrain_step(
        encoder,
        head,
        optimizer,
        steps.make_contrastive_loss_fn(LossConfig(loss, temperature=0.1)),
        GLOBAL_BATCH,
    )
    dataset_fn = pipeline.make_train_dataset_fn(
        split,
        global_batch_size=GLOBAL_BATCH,
        num_views=1 if loss == "npairs" else 2,
        augment="supcon",
        seed=3,
        num_epochs=1,
    )
    loop = steps.make_train_loop(strategy, replica_step)
    losses = _run_steps(strategy, loop, dataset_fn, num_steps)
    return losses, encoder.get_weights() + head.get_weights()


def _classify(strategy, split, train_encoder, initial, num_steps):
    encoder, _, _ = _build(strategy, initial[:2])
    with strategy.scope():
        head = models.build_classifier_head(
            "linear", input_dim=32, num_classes=3
        )
        head.set_weights(initial[2])
    variables = list(head.trainable_variables)
    if train_encoder:
        variables = encoder.trainable_variables + variables
    optimizer = optim.make_optimizer(
        OptimizerConfig("sgd", learning_rate=0.02), strategy, variables
    )
    replica_step = steps.make_classifier_step(
        encoder, head, optimizer, GLOBAL_BATCH, train_encoder=train_encoder
    )
    dataset_fn = pipeline.make_train_dataset_fn(
        split,
        global_batch_size=GLOBAL_BATCH,
        num_views=1,
        augment="keras_example",
        seed=5,
        num_epochs=1,
    )
    loop = steps.make_train_loop(strategy, replica_step)
    losses = _run_steps(strategy, loop, dataset_fn, num_steps)
    return losses, encoder.get_weights() + head.get_weights()


PHASES = {
    "pretrain_supcon": lambda st, sp, w, n: _pretrain(st, sp, "supcon", w, n),
    "pretrain_simclr": lambda st, sp, w, n: _pretrain(st, sp, "simclr", w, n),
    "pretrain_npairs": lambda st, sp, w, n: _pretrain(st, sp, "npairs", w, n),
    "frozen_probe": lambda st, sp, w, n: _classify(st, sp, False, w, n),
    "baseline": lambda st, sp, w, n: _classify(st, sp, True, w, n),
}


@pytest.mark.parametrize("num_replicas", [2, 4])
@pytest.mark.parametrize("phase", sorted(PHASES))
def test_replicas_train_like_one(phase, num_replicas, mirrored):
    split = _split()
    initial = _initial_weights()
    run = PHASES[phase]
    losses_one, weights_one = run(mirrored(1), split, initial, 3)
    losses_many, weights_many = run(mirrored(num_replicas), split, initial, 3)

    # The loss at every step, then every weight, batch-norm moving
    # statistics included, within 1e-5.
    np.testing.assert_allclose(losses_many, losses_one, rtol=1e-5, atol=1e-6)
    assert losses_one[0] > 0.0
    assert len(weights_many) == len(weights_one)
    for many, one in zip(weights_many, weights_one, strict=True):
        np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-5)

    # The trained weights moved, so the equality above is not trivial.
    # The first two arrays are the fixed pixel statistics.
    if phase.startswith("pretrain"):
        start = initial[0] + initial[1]
    else:
        start = initial[0] + initial[2]
    moved = [
        not np.allclose(after, before)
        for after, before in zip(weights_one, start, strict=True)
    ]
    assert moved[:2] == [False, False]
    if phase == "frozen_probe":
        assert not any(moved[: len(initial[0])])
    assert all(moved[len(initial[0]) :])
    if phase != "frozen_probe":
        assert all(moved[2:])


def test_train_loop_traces_once(mirrored):
    strategy = mirrored(2)
    encoder, head, optimizer = _build(strategy)
    replica_step = steps.make_pretrain_step(
        encoder,
        head,
        optimizer,
        steps.make_contrastive_loss_fn(LossConfig("supcon", 0.1)),
        GLOBAL_BATCH,
    )
    loop = steps.make_train_loop(strategy, replica_step)
    dataset_fn = pipeline.make_train_dataset_fn(
        _split(64),
        global_batch_size=GLOBAL_BATCH,
        num_views=2,
        augment="supcon",
        seed=0,
        num_epochs=1,
    )
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    for num_steps in (1, 3, 2):
        loop(iterator, tf.constant(num_steps))
    optimizer.learning_rate.assign(0.01)
    loop(iterator, tf.constant(1))
    assert loop.experimental_get_tracing_count() == 1


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


@pytest.fixture
def float32_after():
    """Restores the float32 Keras policy after a mixed-precision test."""
    yield
    keras.mixed_precision.set_global_policy("float32")


def _pretrain_losses(
    strategy,
    split,
    num_steps,
    *,
    mixed_precision=None,
    jit_compile=False,
    sync_batchnorm=True,
):
    precision.set_policy(mixed_precision)
    keras.utils.set_random_seed(2)
    with strategy.scope():
        encoder = models.build_encoder(
            "small_cnn",
            image_shape=(16, 16, 3),
            channel_mean=[0.5] * 3,
            channel_std=[0.25] * 3,
            sync_batchnorm=sync_batchnorm,
        )
        head = models.build_projection_head("mlp", input_dim=32, output_dim=8)
    variables = encoder.trainable_variables + head.trainable_variables
    optimizer = optim.make_optimizer(OptimizerConfig(), strategy, variables)
    optimizer = precision.wrap_optimizer(
        optimizer, strategy, variables, mixed_precision
    )
    replica_step = steps.make_pretrain_step(
        encoder,
        head,
        optimizer,
        steps.make_contrastive_loss_fn(LossConfig("supcon", 0.1)),
        GLOBAL_BATCH,
        jit_compile=jit_compile,
    )
    dataset_fn = pipeline.make_train_dataset_fn(
        split,
        global_batch_size=GLOBAL_BATCH,
        num_views=2,
        augment="supcon",
        seed=0,
        num_epochs=2,
    )
    loop = steps.make_train_loop(strategy, replica_step)
    return _run_steps(strategy, loop, dataset_fn, num_steps)


def test_float16_overflow_on_one_replica_skips_all(mirrored, float32_after):
    strategy = mirrored(2)
    precision.set_policy("float16")
    with strategy.scope():
        variable = tf.Variable([1.0, 2.0])
    optimizer = precision.wrap_optimizer(
        optim.make_optimizer(
            OptimizerConfig("sgd", learning_rate=0.1), strategy, [variable]
        ),
        strategy,
        [variable],
        "float16",
    )

    def replica_step():
        context = tf.distribute.get_replica_context()
        overflowed = tf.equal(context.replica_id_in_sync_group, 1)
        gradient = tf.where(overflowed, float("inf"), tf.ones([2]))
        gradients = steps._share_overflow(optimizer, [gradient])
        optimizer.apply_gradients(zip(gradients, [variable], strict=True))

    tf.function(lambda: strategy.run(replica_step))()

    # Only replica 1 overflowed, yet neither replica applied the step.
    for copy in variable.values:
        np.testing.assert_array_equal(copy.numpy(), [1.0, 2.0])
    assert optimizer.dynamic_scale.numpy() < 2.0**15


def test_float16_pretraining_stays_finite(mirrored, float32_after):
    losses = _pretrain_losses(
        mirrored(2), _split(), 8, mixed_precision="float16"
    )
    assert np.all(np.isfinite(losses))


def test_bfloat16_loss_close_to_float32(float32_after):
    strategy = tf.distribute.get_strategy()
    full = _pretrain_losses(strategy, _split(), 1, sync_batchnorm=False)
    half = _pretrain_losses(
        strategy,
        _split(),
        1,
        mixed_precision="bfloat16",
        sync_batchnorm=False,
    )
    # bfloat16 keeps 8 mantissa bits; the first loss differs by rounding.
    np.testing.assert_allclose(half, full, rtol=0.05)
    assert half != full


def test_jit_compile_matches_graph_step():
    strategy = tf.distribute.get_strategy()
    graph = _pretrain_losses(strategy, _split(), 3, sync_batchnorm=False)
    compiled = _pretrain_losses(
        strategy, _split(), 3, jit_compile=True, sync_batchnorm=False
    )
    np.testing.assert_allclose(compiled, graph, rtol=1e-4)
