"""Encoders, projection heads and classifier heads, built from Keras layers.

Every encoder maps float images in [0, 1], `[batch, height, width, 3]`, to
an embedding `[batch, embedding_dim]`. Its first layer standardises the
pixels with per-channel statistics that are stored as non-trainable weights,
so a checkpoint restores them with the rest of the encoder.
"""

from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from supcon_tf.errors import UsageError

ENCODERS = ("resnet50v2", "resnet18_cifar", "small_cnn")
PROJECTION_HEADS = ("keras_example", "mlp")
CLASSIFIER_HEADS = ("mlp", "linear")


class Standardize(keras.layers.Layer):
    """Subtracts a per-channel mean and divides by a per-channel std.

    The statistics are weights, not constants, so `linear_eval` restores
    the values that pretraining used from the checkpoint.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], **kwargs):
        super().__init__(**kwargs)
        self._initial_mean = np.asarray(mean, dtype="float32")
        self._initial_std = np.asarray(std, dtype="float32")

    def build(self, input_shape):
        channels = input_shape[-1]
        self.mean = self.add_weight(
            name="mean",
            shape=(channels,),
            initializer=keras.initializers.Constant(self._initial_mean),
            trainable=False,
        )
        self.std = self.add_weight(
            name="std",
            shape=(channels,),
            initializer=keras.initializers.Constant(self._initial_std),
            trainable=False,
        )

    def call(self, images):
        mean = keras.ops.cast(self.mean, images.dtype)
        std = keras.ops.cast(self.std, images.dtype)
        return (images - mean) / std


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


NormFactory = Callable[[str], keras.layers.BatchNormalization]


def _batch_norm_factory(synchronized: bool, fused: bool) -> NormFactory:
    """Returns `name -> batch-norm layer` for the CIFAR-sized bodies."""
    layer_class = (
        FusedBatchNormalization if fused else keras.layers.BatchNormalization
    )

    def make(name: str) -> keras.layers.BatchNormalization:
        return layer_class(
            momentum=0.9, epsilon=1e-5, synchronized=synchronized, name=name
        )

    return make


def _basic_block(x, filters: int, stride: int, norm: NormFactory, name: str):
    """Two 3x3 convolutions with an identity or 1x1 projection shortcut."""
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(
            filters, 1, strides=stride, use_bias=False, name=name + "_proj"
        )(x)
        shortcut = norm(name + "_proj_bn")(shortcut)
    x = keras.layers.Conv2D(
        filters,
        3,
        strides=stride,
        padding="same",
        use_bias=False,
        name=name + "_conv1",
    )(x)
    x = norm(name + "_bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(
        filters, 3, padding="same", use_bias=False, name=name + "_conv2"
    )(x)
    x = norm(name + "_bn2")(x)
    return keras.layers.ReLU()(keras.layers.Add()([x, shortcut]))


def _resnet18_cifar(x, synchronized: bool, fused: bool):
    """ResNet-18 for 32x32 inputs: 3x3 stem, stride 1, no max-pool."""
    norm = _batch_norm_factory(synchronized, fused)
    x = keras.layers.Conv2D(
        64, 3, padding="same", use_bias=False, name="stem_conv"
    )(x)
    x = keras.layers.ReLU()(norm("stem_bn")(x))
    for stage, filters in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(
                x,
                filters,
                stride,
                norm,
                f"stage{stage + 1}_block{block + 1}",
            )
    return keras.layers.GlobalAveragePooling2D()(x)


def _small_cnn(x, synchronized: bool, fused: bool):
    """Builds a two-convolution network for tests and smoke runs (32-d)."""
    norm = _batch_norm_factory(synchronized, fused)
    # No conv biases: the batch norm that follows would cancel them.
    x = keras.layers.Conv2D(
        16, 3, padding="same", use_bias=False, name="conv1"
    )(x)
    x = keras.layers.ReLU()(norm("bn1")(x))
    x = keras.layers.Conv2D(
        32, 3, strides=2, padding="same", use_bias=False, name="conv2"
    )(x)
    x = keras.layers.ReLU()(norm("bn2")(x))
    return keras.layers.GlobalAveragePooling2D()(x)


def _resnet50v2(x, synchronized: bool, fused: bool):
    """keras.applications ResNet50V2, random init, global average pooling."""
    backbone = keras.applications.ResNet50V2(
        include_top=False,
        weights=None,
        input_shape=tuple(x.shape[1:]),
        pooling="avg",
    )
    if synchronized or fused:
        layer_class = (
            FusedBatchNormalization
            if fused
            else keras.layers.BatchNormalization
        )

        def replace_batch_norm(layer):
            config = layer.get_config()
            if not isinstance(layer, keras.layers.BatchNormalization):
                return layer.__class__.from_config(config)
            config["synchronized"] = synchronized
            return layer_class.from_config(config)

        backbone = keras.models.clone_model(
            backbone, clone_function=replace_batch_norm
        )
    return backbone(x)


_ENCODER_BODIES: dict[str, Callable] = {
    "resnet50v2": _resnet50v2,
    "resnet18_cifar": _resnet18_cifar,
    "small_cnn": _small_cnn,
}


def build_encoder(
    name: str,
    *,
    image_shape: tuple[int, int, int],
    channel_mean: Sequence[float],
    channel_std: Sequence[float],
    sync_batchnorm: bool = False,
    fused_batchnorm: bool = True,
) -> keras.Model:
    """Builds an encoder from images in [0, 1] to pooled embeddings.

    Args:
      name: One of `ENCODERS`.
      image_shape: `(height, width, channels)` of the input images.
      channel_mean: Per-channel mean of the training images in [0, 1].
      channel_std: Per-channel standard deviation, same units.
      sync_batchnorm: Computes batch-norm statistics over the global batch
        of all replicas instead of each replica's share.
      fused_batchnorm: Uses `FusedBatchNormalization`, which trains with
        one fused kernel where it can; False keeps Keras's layer.

    Returns:
      A `keras.Model` from `[batch, height, width, channels]` float images to
      `[batch, embedding_dim]` (2048 for resnet50v2, 512 for resnet18_cifar,
      32 for small_cnn).
    """
    if name not in _ENCODER_BODIES:
        raise UsageError(
            f"Unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}."
        )
    inputs = keras.Input(shape=image_shape, name="images")
    x = Standardize(channel_mean, channel_std, name="standardize")(inputs)
    outputs = _ENCODER_BODIES[name](x, sync_batchnorm, fused_batchnorm)
    return keras.Model(inputs, outputs, name=f"encoder_{name}")


def build_projection_head(
    name: str, *, input_dim: int, output_dim: int = 128
) -> keras.Model:
    """Builds the head that maps embeddings to the contrastive features.

    `keras_example` is the keras.io example's single Dense layer with ReLU;
    `mlp` is the SupCon paper's two-layer MLP (hidden width = input_dim,
    ReLU, linear output). The loss L2-normalises the output.
    """
    inputs = keras.Input(shape=(input_dim,), name="embeddings")
    if name == "keras_example":
        outputs = keras.layers.Dense(output_dim, activation="relu")(inputs)
    elif name == "mlp":
        hidden = keras.layers.Dense(input_dim, activation="relu")(inputs)
        outputs = keras.layers.Dense(output_dim)(hidden)
    else:
        raise UsageError(
            f"Unknown projection head {name!r}; choose one of "
            f"{', '.join(PROJECTION_HEADS)}."
        )
    return keras.Model(inputs, outputs, name=f"projection_{name}")


def build_classifier_head(
    name: str,
    *,
    input_dim: int,
    num_classes: int,
    dropout: float = 0.5,
    hidden_units: int = 512,
) -> keras.Model:
    """Builds the head trained on top of the encoder; it returns logits.

    `mlp` is the keras.io example's classifier (dropout, Dense 512 ReLU,
    dropout, Dense); `linear` is one Dense layer, the usual linear probe.
    The example ends in a softmax; these heads return logits and the loss
    applies the softmax, which is the same model with better numerics.
    """
    inputs = keras.Input(shape=(input_dim,), name="embeddings")
    if name == "mlp":
        x = keras.layers.Dropout(dropout)(inputs)
        x = keras.layers.Dense(hidden_units, activation="relu")(x)
        x = keras.layers.Dropout(dropout)(x)
        outputs = keras.layers.Dense(num_classes, name="logits")(x)
    elif name == "linear":
        outputs = keras.layers.Dense(num_classes, name="logits")(inputs)
    else:
        raise UsageError(
            f"Unknown classifier head {name!r}; choose one of "
            f"{', '.join(CLASSIFIER_HEADS)}."
        )
    return keras.Model(inputs, outputs, name=f"classifier_{name}")
