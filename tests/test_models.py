"""Encoders and heads: shapes, the CIFAR stem, standardisation, sync BN."""

import keras
import numpy as np
import pytest

from supcon_tf import models
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
