"""Encoders and heads: shapes, the CIFAR stem, standardisation, sync BN."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import layers, models
from supcon_tf.errors import UsageError

IMAGE_SHAPE = (32, 32, 3)


def _encoder(name, **kwargs):
    return models.build_encoder(
        name,
        image_shape=IMAGE_SHAPE,
        channel_mean=[0.5, 0.4, 0.3],
        channel_std=[0.2, 0.25, 0.5],
        **kwargs,
    )


@pytest.mark.parametrize(
    "name, dim",
    [("resnet50v2", 2048), ("resnet18_cifar", 512), ("small_cnn", 32)],
)
def test_encoder_embedding_dim(name, dim):
    encoder = _encoder(name)
    images = np.random.default_rng(0).random((2, *IMAGE_SHAPE), "float32")
    assert encoder.output_shape == (None, dim)
    assert encoder(images).shape == (2, dim)


def test_resnet50v2_matches_keras_applications_size():
    reference = keras.applications.ResNet50V2(
        include_top=False,
        weights=None,
        input_shape=IMAGE_SHAPE,
        pooling="avg",
    )
    encoder = _encoder("resnet50v2")
    # The Standardize layer adds 6 non-trainable numbers.
    assert encoder.count_params() == reference.count_params() + 6


def test_resnet18_cifar_stem_keeps_resolution():
    encoder = _encoder("resnet18_cifar")
    stem = encoder.get_layer("stem_conv")
    assert stem.kernel_size == (3, 3)
    assert stem.strides == (1, 1)
    pools = [
        layer
        for layer in encoder.layers
        if isinstance(layer, keras.layers.MaxPooling2D)
    ]
    assert pools == []
    last_block = encoder.get_layer("stage4_block2_conv2")
    assert last_block.output.shape[1:3] == (4, 4)
    # 11.17M is the usual count of the CIFAR ResNet-18 without its classifier.
    assert 11.1e6 < encoder.count_params() < 11.2e6


def test_standardize_is_exact_and_saved_as_weights():
    encoder = _encoder("small_cnn")
    layer = encoder.get_layer("standardize")
    images = np.full((1, *IMAGE_SHAPE), 0.7, "float32")
    expected = (0.7 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.5])
    np.testing.assert_allclose(layer(images)[0, 0, 0], expected, rtol=1e-6)
    names = sorted(weight.name for weight in layer.weights)
    assert names == ["mean", "std"]
    assert not layer.trainable_weights


@pytest.mark.parametrize("name", ["resnet50v2", "resnet18_cifar", "small_cnn"])
def test_sync_batchnorm_reaches_every_layer(name):
    encoder = _encoder(name, sync_batchnorm=True)
    norms = [
        layer
        for layer in _all_layers(encoder)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert norms
    assert all(layer.synchronized for layer in norms)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def test_projection_heads():
    example = models.build_projection_head("keras_example", input_dim=32)
    mlp = models.build_projection_head("mlp", input_dim=32, output_dim=16)
    embeddings = np.random.default_rng(1).normal(size=(4, 32))
    example_out = np.asarray(example(embeddings))
    assert example_out.shape == (4, 128)
    assert example_out.min() >= 0.0  # the example's head ends in ReLU
    assert mlp(embeddings).shape == (4, 16)
    assert len(mlp.layers) == 3  # input, hidden, output
    assert mlp.layers[1].units == 32


def test_classifier_heads():
    mlp = models.build_classifier_head("mlp", input_dim=32, num_classes=10)
    linear = models.build_classifier_head(
        "linear", input_dim=32, num_classes=10
    )
    kinds = [type(layer).__name__ for layer in mlp.layers[1:]]
    assert kinds == ["Dropout", "Dense", "Dropout", "Dense"]
    assert mlp.layers[2].units == 512
    assert mlp.layers[1].rate == 0.5
    assert linear.count_params() == 32 * 10 + 10


@pytest.mark.parametrize(
    "builder, kwargs",
    [
        (_encoder, {}),
        (models.build_projection_head, {"input_dim": 4}),
        (models.build_classifier_head, {"input_dim": 4, "num_classes": 2}),
    ],
)
def test_unknown_names_list_choices(builder, kwargs):
    with pytest.raises(UsageError, match="choose one of"):
        builder("resnet1000", **kwargs)


def _twin_batch_norms(shape, *, fused_dtype=None, **kwargs):
    """A Keras batch norm and a fused one with the same random weights."""
    rng = np.random.default_rng(3)
    keras_norm = keras.layers.BatchNormalization(
        momentum=0.9, epsilon=1e-3, **kwargs
    )
    fused_norm = layers.FusedBatchNormalization(
        momentum=0.9, epsilon=1e-3, dtype=fused_dtype, **kwargs
    )
    gamma = rng.normal(size=shape[-1:]).astype("float32")
    beta = rng.normal(size=shape[-1:]).astype("float32")
    for layer in (keras_norm, fused_norm):
        layer.build(shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    return keras_norm, fused_norm


def _train_call(layer, images):
    """Output and gradients of a nonlinear loss for one training call."""
    with tf.GradientTape() as tape:
        tape.watch(images)
        outputs = layer(images, training=True)
        loss = tf.reduce_sum(outputs * tf.sin(outputs))
    grads = tape.gradient(loss, [images, layer.gamma, layer.beta])
    return [outputs.numpy()] + [g.numpy() for g in grads]


def test_fused_batchnorm_trains_like_keras():
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(2.0, 3.0, (8, 5, 5, 6)), tf.float32)
    keras_norm, fused_norm = _twin_batch_norms(images.shape)
    for _ in range(2):
        expected = _train_call(keras_norm, images)
        actual = _train_call(fused_norm, images)
        for name, want, got in zip(
            ["outputs", "d/dx", "d/dgamma", "d/dbeta"],
            expected,
            actual,
            strict=True,
        ):
            scale = np.abs(want).max()
            np.testing.assert_allclose(
                got, want, atol=1e-5 * scale, err_msg=name
            )
    np.testing.assert_allclose(
        fused_norm.moving_variance.numpy(),
        keras_norm.moving_variance.numpy(),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        fused_norm.moving_mean.numpy(),
        keras_norm.moving_mean.numpy(),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        fused_norm(images, training=False),
        keras_norm(images, training=False),
        atol=1e-5,
    )


def test_fused_batchnorm_one_value_per_channel():
    images = tf.fill((1, 1, 1, 4), 2.0)
    keras_norm, fused_norm = _twin_batch_norms(images.shape)
    keras_norm(images, training=True)
    fused_norm(images, training=True)
    # The batch variance is 0: the moving variance decays 1 -> 0.9.
    np.testing.assert_allclose(fused_norm.moving_variance.numpy(), 0.9)
    np.testing.assert_allclose(keras_norm.moving_variance.numpy(), 0.9)
    np.testing.assert_allclose(fused_norm.moving_mean.numpy(), 0.2)


def test_fused_batchnorm_reads_bfloat16_directly():
    rng = np.random.default_rng(1)
    images = tf.constant(rng.normal(size=(16, 4, 4, 8)), tf.float32)
    keras_norm, fused_norm = _twin_batch_norms(
        images.shape, fused_dtype="mixed_bfloat16"
    )
    outputs = fused_norm(tf.cast(images, tf.bfloat16), training=True)
    expected = keras_norm(images, training=True)
    assert outputs.dtype == tf.bfloat16
    # bfloat16 keeps 8 significant bits, about 2 decimal digits.
    np.testing.assert_allclose(
        tf.cast(outputs, tf.float32), expected, atol=0.05
    )


def _fused_ops(layer, training, strategy=None):
    """Counts FusedBatchNormV3 ops in a traced training or inference call."""
    strategy = strategy or tf.distribute.get_strategy()

    @tf.function
    def call(images):
        return strategy.run(lambda x: layer(x, training=training), (images,))

    graph = call.get_concrete_function(
        tf.TensorSpec((4, 3, 3, 2), tf.float32)
    ).graph
    return sum(op.type == "FusedBatchNormV3" for op in graph.get_operations())


def test_fused_batchnorm_fallback_paths(mirrored):
    plain = layers.FusedBatchNormalization()
    assert _fused_ops(plain, training=True) == 1
    assert _fused_ops(plain, training=False) == 0
    renorm = layers.FusedBatchNormalization(renorm=True)
    assert _fused_ops(renorm, training=True) == 0
    # Synchronized statistics: fused with one replica, Keras's with two.
    synced = layers.FusedBatchNormalization(synchronized=True)
    assert _fused_ops(synced, training=True) == 1
    strategy = mirrored(2)
    with strategy.scope():
        synced_two = layers.FusedBatchNormalization(synchronized=True)
        synced_two.build((4, 3, 3, 2))
    assert _fused_ops(synced_two, training=True, strategy=strategy) == 0


@pytest.mark.parametrize("name", ["resnet50v2", "resnet18_cifar", "small_cnn"])
def test_fused_batchnorm_reaches_every_layer(name):
    def norms(encoder):
        return [
            layer
            for layer in _all_layers(encoder)
            if isinstance(layer, keras.layers.BatchNormalization)
        ]

    fused = norms(_encoder(name))
    plain = norms(_encoder(name, fused_batchnorm=False))
    assert len(fused) == len(plain) > 0
    assert all(isinstance(n, layers.FusedBatchNormalization) for n in fused)
    assert not any(isinstance(n, layers.FusedBatchNormalization) for n in plain)
    # The fused layer keeps each layer's settings, e.g. ResNet50V2's.
    for a, b in zip(fused, plain, strict=True):
        assert (a.name, a.epsilon, a.momentum) == (
            b.name,
            b.epsilon,
            b.momentum,
        )


def test_fused_encoder_takes_the_same_sgd_step():
    # ResNet-18 at batch 6 is too ill-conditioned for this: a relative
    # input change of 1e-6 moves some of its gradients by 7%.
    fused = _encoder("small_cnn")
    plain = _encoder("small_cnn", fused_batchnorm=False)
    plain.set_weights(fused.get_weights())
    images = np.random.default_rng(2).random((6, *IMAGE_SHAPE), "float32")
    for encoder in (fused, plain):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(encoder(images, training=True)))
        grads = tape.gradient(loss, encoder.trainable_variables)
        for variable, grad in zip(
            encoder.trainable_variables, grads, strict=True
        ):
            variable.assign_sub(0.01 * grad)
    for got, want in zip(fused.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
