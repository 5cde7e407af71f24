"""Encoders, projection heads and classifier heads, built from Keras layers.

Every encoder maps float images in [0, 1], `[batch, height, width, 3]`, to
an embedding `[batch, embedding_dim]`. Its first layer standardises the
pixels with per-channel statistics that are stored as non-trainable weights,
so a checkpoint restores them with the rest of the encoder.
"""

import dataclasses
from collections.abc import Callable, Sequence

import keras
import numpy as np

from supcon_tf import layers
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


@dataclasses.dataclass(frozen=True)
class _LayerKinds:
    """The batch-norm and convolution classes that an encoder body builds."""

    synchronized: bool
    fused_batchnorm: bool
    float32_filter_grad: bool

    def norm(self, name: str) -> keras.layers.BatchNormalization:
        """Builds a batch norm with the CIFAR bodies' momentum and epsilon."""
        return self._norm_class()(
            momentum=0.9,
            epsilon=1e-5,
            synchronized=self.synchronized,
            name=name,
        )

    def conv(self, filters: int, kernel_size: int, **kwargs):
        return self._conv_class()(filters, kernel_size, **kwargs)

    def replace(self, layer: keras.layers.Layer) -> keras.layers.Layer:
        """Rebuilds `layer` from its config as the chosen class."""
        config = layer.get_config()
        if isinstance(layer, keras.layers.BatchNormalization):
            config["synchronized"] = self.synchronized
            return self._norm_class().from_config(config)
        if type(layer) is keras.layers.Conv2D:
            return self._conv_class().from_config(config)
        return layer.__class__.from_config(config)

    def _norm_class(self):
        if self.fused_batchnorm:
            return layers.FusedBatchNormalization
        return keras.layers.BatchNormalization

    def _conv_class(self):
        if self.float32_filter_grad:
            return layers.Float32FilterGradConv2D
        return keras.layers.Conv2D


def _basic_block(x, filters: int, stride: int, kinds: _LayerKinds, name):
    """Two 3x3 convolutions with an identity or 1x1 projection shortcut."""
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = kinds.conv(
            filters, 1, strides=stride, use_bias=False, name=name + "_proj"
        )(x)
        shortcut = kinds.norm(name + "_proj_bn")(shortcut)
    x = kinds.conv(
        filters,
        3,
        strides=stride,
        padding="same",
        use_bias=False,
        name=name + "_conv1",
    )(x)
    x = kinds.norm(name + "_bn1")(x)
    x = keras.layers.ReLU()(x)
    x = kinds.conv(
        filters, 3, padding="same", use_bias=False, name=name + "_conv2"
    )(x)
    x = kinds.norm(name + "_bn2")(x)
    return keras.layers.ReLU()(keras.layers.Add()([x, shortcut]))


def _resnet18_cifar(x, kinds: _LayerKinds):
    """ResNet-18 for 32x32 inputs: 3x3 stem, stride 1, no max-pool."""
    x = kinds.conv(64, 3, padding="same", use_bias=False, name="stem_conv")(x)
    x = keras.layers.ReLU()(kinds.norm("stem_bn")(x))
    for stage, filters in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(
                x,
                filters,
                stride,
                kinds,
                f"stage{stage + 1}_block{block + 1}",
            )
    return keras.layers.GlobalAveragePooling2D()(x)


def _small_cnn(x, kinds: _LayerKinds):
    """Builds a two-convolution network for tests and smoke runs (32-d)."""
    # No conv biases: the batch norm that follows would cancel them.
    x = kinds.conv(16, 3, padding="same", use_bias=False, name="conv1")(x)
    x = keras.layers.ReLU()(kinds.norm("bn1")(x))
    x = kinds.conv(
        32, 3, strides=2, padding="same", use_bias=False, name="conv2"
    )(x)
    x = keras.layers.ReLU()(kinds.norm("bn2")(x))
    return keras.layers.GlobalAveragePooling2D()(x)


def _resnet50v2(x, kinds: _LayerKinds):
    """keras.applications ResNet50V2, random init, global average pooling."""
    backbone = keras.applications.ResNet50V2(
        include_top=False,
        weights=None,
        input_shape=tuple(x.shape[1:]),
        pooling="avg",
    )
    if kinds != _LayerKinds(False, False, False):
        backbone = keras.models.clone_model(
            backbone, clone_function=kinds.replace
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
    float32_filter_grad: bool = True,
) -> keras.Model:
    """Builds an encoder from images in [0, 1] to pooled embeddings.

    Args:
      name: One of `ENCODERS`.
      image_shape: `(height, width, channels)` of the input images.
      channel_mean: Per-channel mean of the training images in [0, 1].
      channel_std: Per-channel standard deviation, same units.
      sync_batchnorm: Computes batch-norm statistics over the global batch
        of all replicas instead of each replica's share.
      fused_batchnorm: Uses `layers.FusedBatchNormalization`, which
        trains with one fused kernel where it can; False keeps Keras's
        layer.
      float32_filter_grad: Uses `layers.Float32FilterGradConv2D`, which
        computes convolution filter gradients in float32 under a bfloat16
        policy on a machine without GPUs or TPUs; False keeps Keras's
        Conv2D.

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
    kinds = _LayerKinds(sync_batchnorm, fused_batchnorm, float32_filter_grad)
    outputs = _ENCODER_BODIES[name](x, kinds)
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
