"""The keras.io SupCon example's `model.fit` pipeline, for speed comparison.

The keras.io example "Supervised Contrastive Learning" (Khalid Salama,
2020-11-30; examples/vision/supervised-contrastive-learning.py in the
keras-team/keras-io repository) pretrains a ResNet50V2 encoder with
`model.fit`. Its model is one Keras graph: a `keras.Sequential`
augmentation block (Normalization adapted to the train images,
RandomFlip("horizontal"), RandomRotation(0.02), RandomWidth(0.2),
RandomHeight(0.2)) in front of the encoder, then a Dense(128, relu)
projection. Its loss L2-normalises the projections, divides their cosine
similarities by the temperature 0.05 and applies TensorFlow Addons'
`npairs_loss`. It trains with Adam at 1e-3 on batches of 265 CIFAR-10
images with raw pixel values (0 to 255).

This module rebuilds that pipeline with Keras 3.15 and without
TensorFlow Addons. It differs from the example in three ways:

- Keras 3.15 no longer has RandomWidth and RandomHeight.
  `RandomAxisResize` ports them: one random size per batch along one
  axis, so every batch reaches the encoder at a different shape. The
  `fixed_shape` augmentation replaces both with
  `RandomZoom(height_factor=0.2, width_factor=0.2)`, which rescales the
  content by up to 20% along each axis and keeps the image size; that
  isolates the cost of the changing shapes.
- The loss is `losses.NPairsLoss`, our reimplementation of the N-pairs
  objective on normalised features.
- The data are `benchmarks.synthetic_split`, passed to `fit` as a
  shuffled, repeating `tf.data.Dataset` of full global batches, where the
  example passes the CIFAR-10 arrays.

The encoder is `models.build_encoder` with Keras's own batch norm and
convolutions and an identity standardisation, because the Normalization
layer has already standardised the pixels. For `resnet50v2` that is the
example's `keras.applications.ResNet50V2` with `weights=None` and average
pooling.

`jit_compile` is passed to `compile` explicitly. Keras 3.15's default
("auto") enables XLA only on a machine with an accelerator and without a
distribution strategy, so it could differ from our step's setting.
"""

import time
from typing import Any

import keras
import tensorflow as tf

from supcon_tf import benchmarks, distribute, losses, models, precision
from supcon_tf.benchmarks import ThroughputSettings

AUGMENTATIONS = ("example", "fixed_shape")


class EpochEndTimer(keras.callbacks.Callback):
    """Records when the last batch of each epoch finished.

    Defining `on_train_batch_end` makes Keras call callbacks synchronously
    and convert the batch's logs to Python numbers, so the recorded time
    follows the end of the step's computation.
    """

    def __init__(self):
        super().__init__()
        self.train_begin = 0.0
        self.epoch_ends: list[float] = []
        self._last_batch_end = 0.0

    def on_train_begin(self, logs=None):
        self.train_begin = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._last_batch_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_ends.append(self._last_batch_end)


class RandomAxisResize(keras.layers.Layer):
    """Resizes a batch along one axis by one random factor per call.

    This ports Keras 2's RandomWidth (`axis=2`) and RandomHeight
    (`axis=1`). In training, each call draws one scale from
    `[1 - factor, 1 + factor)` and bilinearly resizes the whole batch to
    `int(scale * size)` pixels along `axis`, so the size along that axis
    changes from batch to batch. Outside training the images pass
    through unchanged.
    """

    def __init__(self, factor: float, axis: int, seed=None, **kwargs):
        super().__init__(**kwargs)
        if axis not in (1, 2):
            raise ValueError(f"axis={axis} must be 1 (height) or 2 (width).")
        self.factor = factor
        self.axis = axis
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training:
            return images
        scale = keras.random.uniform(
            (),
            minval=1.0 - self.factor,
            maxval=1.0 + self.factor,
            seed=self.seed_generator,
        )
        shape = tf.shape(images)
        size = [shape[1], shape[2]]
        old_size = tf.cast(shape[self.axis], tf.float32)
        size[self.axis - 1] = tf.cast(scale * old_size, tf.int32)
        resized = tf.image.resize(images, tf.stack(size), "bilinear")
        return tf.cast(resized, images.dtype)

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        shape[self.axis] = None
        return tuple(shape)


def build_augmentation(
    images, augmentation: str = "example", seed: int | None = None
) -> keras.Sequential:
    """Builds the example's augmentation block, adapted to `images`.

    Args:
      images: float32 `[num_examples, height, width, 3]` pixel values, 0
        to 255, for the Normalization layer's mean and variance.
      augmentation: `example` resizes each batch to a random shape, as the
        example does; `fixed_shape` zooms instead and keeps the shape.
      seed: Seed of the random resizing.
    """
    if augmentation not in AUGMENTATIONS:
        raise ValueError(
            f"augmentation={augmentation!r}; choose one of "
            f"{', '.join(AUGMENTATIONS)}."
        )
    if augmentation == "example":
        # Two seeds, so that width and height draw independent scales.
        height_seed = None if seed is None else seed + 1
        resize = [
            RandomAxisResize(0.2, axis=2, seed=seed, name="random_width"),
            RandomAxisResize(
                0.2, axis=1, seed=height_seed, name="random_height"
            ),
        ]
    else:
        resize = [keras.layers.RandomZoom(height_factor=0.2, width_factor=0.2)]
    normalization = keras.layers.Normalization()
    block = keras.Sequential(
        [
            normalization,
            keras.layers.RandomFlip("horizontal"),
            keras.layers.RandomRotation(0.02),
            *resize,
        ],
        name="data_augmentation",
    )
    normalization.adapt(images)
    return block


def build_example_model(
    settings: ThroughputSettings, images, augmentation: str = "example"
):
    """Builds augmentation, encoder and projection head as one model.

    Returns:
      `(model, encoder, head)`: the model maps pixel values
      `[batch, height, width, 3]` to projections `[batch, 128]`. Under
      the `example` augmentation the encoder takes any image size.
    """
    size = settings.image_size
    encoder_shape = (size, size, 3)
    if augmentation == "example":
        encoder_shape = (None, None, 3)
    encoder = models.build_encoder(
        settings.encoder,
        image_shape=encoder_shape,
        channel_mean=(0.0, 0.0, 0.0),
        channel_std=(1.0, 1.0, 1.0),
        fused_batchnorm=False,
        float32_filter_grad=False,
    )
    head = models.build_projection_head(
        "keras_example",
        input_dim=encoder.output_shape[-1],
        output_dim=benchmarks.EXAMPLE_PROJECTION_DIM,
    )
    inputs = keras.Input((size, size, 3), name="pixels")
    block = build_augmentation(images, augmentation, seed=settings.seed)
    model = keras.Model(inputs, head(encoder(block(inputs))), name="supcon_fit")
    return model, encoder, head


def make_example_dataset(split, global_batch_size: int, seed: int):
    """Shuffles and batches the split as float32 pixels, repeating forever."""
    dataset = tf.data.Dataset.from_tensor_slices((split.images, split.labels))
    dataset = dataset.shuffle(len(split.labels), seed=seed)
    dataset = dataset.batch(global_batch_size, drop_remainder=True)
    dataset = dataset.map(lambda x, y: (tf.cast(x, tf.float32), y))
    return dataset.repeat().prefetch(tf.data.AUTOTUNE)


def keras_fit_throughput(
    settings: ThroughputSettings, augmentation: str = "example"
) -> dict[str, Any]:
    """Measures the example's `model.fit` pipeline on `synthetic_split`.

    One `fit` call runs `1 + repeats` epochs of `steps` steps each. The
    first epoch (tracing included) is the warm-up. Each later epoch is one
    timed repeat, from the end of the previous epoch's last batch to the
    end of its own. The loss is always the example's N-pairs loss with one
    view, whatever `settings.loss` is, and the batch norm is always
    Keras's. FLOPs per example are counted at `settings.image_size`
    under either augmentation. Run it through
    `benchmarks.run_isolated` so that the strategy and policy start fresh.
    """
    strategy = distribute.make_strategy(
        settings.strategy, cpu_replicas=settings.cpu_replicas
    )
    precision.set_policy(settings.mixed_precision)
    split = benchmarks.synthetic_split(settings)
    with strategy.scope():
        model, encoder, head = build_example_model(
            settings, split.images.astype("float32"), augmentation
        )
        model.compile(
            optimizer=keras.optimizers.Adam(benchmarks.EXAMPLE_LEARNING_RATE),
            loss=losses.NPairsLoss(benchmarks.EXAMPLE_TEMPERATURE),
            jit_compile=settings.jit_compile,
        )
    timer = EpochEndTimer()
    model.fit(
        make_example_dataset(split, settings.global_batch_size, settings.seed),
        epochs=1 + settings.repeats,
        steps_per_epoch=settings.steps,
        callbacks=[timer],
        shuffle=False,  # The dataset shuffles.
        verbose=0,
    )
    ends = timer.epoch_ends
    size = settings.image_size
    seconds = [ends[i] - ends[i - 1] for i in range(1, len(ends))]
    examples = settings.steps * settings.global_batch_size
    return {
        **benchmarks.summarize_seconds(seconds, examples),
        "steps": settings.steps,
        "warmup_seconds": ends[0] - timer.train_begin,
        "num_views": 1,
        "augmentation": augmentation,
        "flops_per_example": benchmarks.training_flops_per_example(
            encoder, head, 1, image_shape=(size, size, 3)
        ),
        "peak_rss_bytes": benchmarks.peak_rss_bytes(),
    }
