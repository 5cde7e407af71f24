"""Float32FilterGradConv2D: the same convolution, float32 filter gradients."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import layers, models

CASES = [
    # (strides, padding, dilations)
    ((1, 1), "SAME", (1, 1)),
    ((2, 2), "SAME", (1, 1)),
    ((2, 1), "VALID", (1, 1)),
    ((1, 1), "SAME", (2, 2)),
]


def _inputs_and_kernel(dtype=tf.float32):
    rng = np.random.default_rng(0)
    inputs = tf.constant(rng.normal(size=(3, 9, 8, 4)), dtype)
    kernel = tf.constant(rng.normal(size=(3, 3, 4, 5)), dtype)
    weights = tf.constant(rng.normal(size=(3, 9, 8, 5)), tf.float32)
    return inputs, kernel, weights


def _values_and_gradients(convolve, inputs, kernel, weights):
    with tf.GradientTape() as tape:
        tape.watch([inputs, kernel])
        outputs = convolve(inputs, kernel)
        shape = tf.shape(outputs)
        # A loss whose output gradient differs at every position.
        loss = tf.reduce_sum(
            tf.cast(outputs, weights.dtype)
            * weights[:, : shape[1], : shape[2], :]
        )
    input_gradient, kernel_gradient = tape.gradient(loss, [inputs, kernel])
    return outputs, input_gradient, kernel_gradient


@pytest.mark.parametrize("strides, padding, dilations", CASES)
def test_float32_matches_tensorflow_autodiff(strides, padding, dilations):
    inputs, kernel, weights = _inputs_and_kernel()

    def reference(x, k):
        return tf.nn.conv2d(
            x, k, [1, *strides, 1], padding, dilations=[1, *dilations, 1]
        )

    def ours(x, k):
        return layers.conv2d_float32_filter_grad(
            x, k, strides, padding, dilations
        )

    expected = _values_and_gradients(reference, inputs, kernel, weights)
    actual = _values_and_gradients(ours, inputs, kernel, weights)
    for name, want, got in zip(
        ["outputs", "d/dinputs", "d/dkernel"], expected, actual, strict=True
    ):
        np.testing.assert_allclose(
            got, want, rtol=1e-5, atol=1e-4, err_msg=name
        )


def test_bfloat16_filter_gradient_precision():
    inputs32, kernel32, weights = _inputs_and_kernel()
    inputs = tf.cast(inputs32, tf.bfloat16)
    kernel = tf.cast(kernel32, tf.bfloat16)

    def ours(x, k):
        return layers.conv2d_float32_filter_grad(x, k, (1, 1), "SAME", (1, 1))

    def bfloat16_reference(x, k):
        return tf.nn.conv2d(x, k, 1, "SAME")

    outputs, input_gradient, kernel_gradient = _values_and_gradients(
        ours, inputs, kernel, weights
    )
    assert outputs.dtype == tf.bfloat16
    assert input_gradient.dtype == tf.bfloat16
    assert kernel_gradient.dtype == tf.bfloat16
    # The forward pass is the plain bfloat16 convolution.
    reference = _values_and_gradients(
        bfloat16_reference, inputs, kernel, weights
    )
    np.testing.assert_array_equal(
        tf.cast(outputs, tf.float32), tf.cast(reference[0], tf.float32)
    )
    # The filter gradient of the same bfloat16 values in float64.
    exact = _values_and_gradients(
        lambda x, k: tf.nn.conv2d(x, k, 1, "SAME"),
        tf.cast(inputs, tf.float64),
        tf.cast(kernel, tf.float64),
        tf.cast(weights, tf.float64),
    )[2].numpy()

    def error(gradient):
        return np.abs(tf.cast(gradient, tf.float64).numpy() - exact).max()

    # Rounding the float32 result to bfloat16 keeps 8 bits: relative error
    # at most 2**-8 of the largest entry.
    assert error(kernel_gradient) <= 2**-8 * np.abs(exact).max()
    assert error(kernel_gradient) <= error(reference[2])


def _filter_gradient_dtypes(layer, images):
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(layer(x), tf.float32))
        return tape.gradient(loss, layer.trainable_variables)

    graph = step.get_concrete_function(
        tf.TensorSpec(images.shape, images.dtype)
    ).graph
    return {
        op.get_attr("T").name
        for op in graph.get_operations()
        if op.type == "Conv2DBackpropFilter"
    }


def test_layer_uses_float32_filter_gradient_under_bfloat16():
    images = tf.zeros((2, 8, 8, 3))
    ours = layers.Float32FilterGradConv2D(4, 3, dtype="mixed_bfloat16")
    plain = keras.layers.Conv2D(4, 3, dtype="mixed_bfloat16")
    assert _filter_gradient_dtypes(ours, images) == {"float32"}
    assert _filter_gradient_dtypes(plain, images) == {"bfloat16"}
    # Under float32 the layer is Keras's Conv2D.
    ours32 = layers.Float32FilterGradConv2D(4, 3)
    assert _filter_gradient_dtypes(ours32, images) == {"float32"}
    np.testing.assert_array_equal(
        ours32(images + 1.0),
        keras.ops.conv(images + 1.0, ours32.kernel) + ours32.bias,
    )


@pytest.mark.parametrize("name", ["resnet50v2", "resnet18_cifar", "small_cnn"])
def test_encoder_convolutions_use_the_layer(name):
    def convolutions(**kwargs):
        encoder = models.build_encoder(
            name,
            image_shape=(32, 32, 3),
            channel_mean=[0.5, 0.5, 0.5],
            channel_std=[0.25, 0.25, 0.25],
            **kwargs,
        )
        found = []
        pending = list(encoder.layers)
        while pending:
            layer = pending.pop()
            if isinstance(layer, keras.Model):
                pending.extend(layer.layers)
            elif isinstance(layer, keras.layers.Conv2D):
                found.append(layer)
        return found

    ours = convolutions()
    plain = convolutions(float32_filter_grad=False)
    assert len(ours) == len(plain) > 0
    assert all(
        isinstance(layer, layers.Float32FilterGradConv2D) for layer in ours
    )
    assert not any(
        isinstance(layer, layers.Float32FilterGradConv2D) for layer in plain
    )
    assert sorted(layer.name for layer in ours) == sorted(
        layer.name for layer in plain
    )
