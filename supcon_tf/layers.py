"""Keras layers that train faster than the Keras layers they extend.

`FusedBatchNormalization` and `Float32FilterGradConv2D` keep the weights,
configuration and outputs of their Keras base classes, so checkpoints and
exported models do not depend on which classes built an encoder.
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="supcon_tf")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization whose training step is one fused TensorFlow op.

    Keras 3 normalises a training batch with separate ops for the mean,
    the variance and the affine transform, in float32 even when the layer
    computes in bfloat16 or float16, and differentiates through all of
    them. `FusedBatchNormV3` does the forward pass in one kernel and the
    backward pass in another, and reads 16-bit inputs directly.
    docs/benchmarks.md records the gain (`--nofused_batchnorm` in
    `experiments.benchmark` measures the step without it).

    Weights, outputs and moving-average updates are those of
    `keras.layers.BatchNormalization` (the moving variance takes the
    biased batch variance, as in Keras). Inference, masks, renorm, an
    axis other than the last and inputs of rank other than 4 take the
    Keras path. So do synchronized statistics when more than one replica
    is in sync, because the fused kernel normalises with its own
    replica's batch only.
    """

    def call(self, inputs, training=None, mask=None):
        if not self._fuses(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        gamma = self.gamma if self.scale else tf.ones([channels])
        beta = self.beta if self.center else tf.zeros([channels])
        empty = tf.constant([], tf.float32)

        outputs, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=inputs,
            scale=tf.cast(gamma, tf.float32),
            offset=tf.cast(beta, tf.float32),
            mean=empty,
            variance=empty,
            epsilon=self.epsilon,
            exponential_avg_factor=1.0,
            data_format="NHWC",
            is_training=True,
        )

        # The kernel returns the unbiased variance; Keras keeps the
        # biased one. A single value per channel has variance 0, where
        # the kernel's correction divides by zero.
        count = tf.size(inputs, out_type=tf.int64) // channels
        count = tf.cast(count, tf.float32)
        variance = tf.where(count > 1.0, variance * (count - 1.0) / count, 0.0)

        self.moving_mean.assign(
            self.moving_mean * self.momentum + mean * (1.0 - self.momentum)
        )
        self.moving_variance.assign(
            self.moving_variance * self.momentum
            + variance * (1.0 - self.momentum)
        )
        return tf.cast(outputs, self.compute_dtype)

    def _fuses(self, inputs, training, mask) -> bool:
        if not (training and self.trainable) or mask is not None:
            return False
        if self.renorm or len(inputs.shape) != 4:
            return False
        if self.axis not in (-1, 3) or inputs.shape[-1] is None:
            return False
        if self.synchronized:
            context = tf.distribute.get_replica_context()
            if context is None or context.num_replicas_in_sync > 1:
                return False
        return inputs.dtype in (tf.float32, tf.bfloat16, tf.float16)


def conv2d_float32_filter_grad(inputs, kernel, strides, padding, dilations):
    """2-D convolution whose filter gradient is computed in float32.

    The output and the input gradient are computed in the inputs' dtype.
    The filter gradient casts the inputs and the output gradient to
    float32 and is returned in the kernel's dtype.

    Args:
      inputs: `[batch, height, width, in_channels]`.
      kernel: `[kernel_height, kernel_width, in_channels, filters]`, same
        dtype as `inputs`.
      strides: `(stride_height, stride_width)`.
      padding: "SAME" or "VALID".
      dilations: `(dilation_height, dilation_width)`.
    """
    strides = [1, *strides, 1]
    dilations = [1, *dilations, 1]

    @tf.custom_gradient
    def convolve(inputs, kernel):
        outputs = tf.nn.conv2d(
            inputs, kernel, strides, padding, dilations=dilations
        )

        def gradient(output_gradient):
            input_gradient = tf.raw_ops.Conv2DBackpropInput(
                input_sizes=tf.shape(inputs),
                filter=kernel,
                out_backprop=output_gradient,
                strides=strides,
                padding=padding,
                dilations=dilations,
            )
            kernel_gradient = tf.raw_ops.Conv2DBackpropFilter(
                input=tf.cast(inputs, tf.float32),
                filter_sizes=tf.shape(kernel),
                out_backprop=tf.cast(output_gradient, tf.float32),
                strides=strides,
                padding=padding,
                dilations=dilations,
            )
            return input_gradient, tf.cast(kernel_gradient, kernel.dtype)

        return outputs, gradient

    return convolve(inputs, kernel)


def has_accelerator() -> bool:
    """Returns whether TensorFlow lists a GPU or a TPU device.

    Either turns off the float32 filter gradients of
    `Float32FilterGradConv2D`. TPUs are listed only once the TPU system
    is initialised, which creating a `TPUStrategy` does, so the result is
    not cached.
    """
    return bool(
        tf.config.list_logical_devices("GPU")
        or tf.config.list_logical_devices("TPU")
    )


@keras.saving.register_keras_serializable(package="supcon_tf")
class Float32FilterGradConv2D(keras.layers.Conv2D):
    """Conv2D that computes its filter gradient in float32 on a CPU.

    With a bfloat16 compute dtype, oneDNN's bfloat16 filter-gradient
    kernels (`Conv2DBackpropFilter`) can be slower than its float32 ones:
    profiling a ResNet50V2 step at 32x32 on a 2-core Xeon with AMX put
    more than half of the op time there (docs/benchmarks.md). This layer
    then computes that one gradient in float32, which is also more
    precise. Everything else stays in bfloat16.

    The float32 path runs only for a bfloat16 compute dtype on a machine
    without GPUs or TPUs, whose bfloat16 kernels are fast, and only for
    channels-last convolutions without groups. Otherwise the layer is
    `keras.layers.Conv2D`.
    """

    def convolution_op(self, inputs, kernel):
        if not self._uses_float32_filter_grad(inputs):
            return super().convolution_op(inputs, kernel)
        return conv2d_float32_filter_grad(
            inputs,
            kernel,
            self.strides,
            self.padding.upper(),
            self.dilation_rate,
        )

    def _uses_float32_filter_grad(self, inputs) -> bool:
        if inputs.dtype != tf.bfloat16 or has_accelerator():
            return False
        return self.data_format == "channels_last" and self.groups == 1
