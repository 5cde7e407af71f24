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
TensorFlow Addons. It differs from the example in four ways:

- Keras 3.15 no longer exports RandomWidth and RandomHeight. They are
  replaced by `RandomZoom(height_factor=0.2, width_factor=0.2)`, which
  rescales the content along each axis independently by up to 20% and
  keeps the image size. RandomWidth and RandomHeight changed the image
  size, so every batch had a different shape. Keeping the size gives the
  encoder the same FLOPs per example as our pipeline, whose
  `keras_example` augmentation makes the same choice.
- The loss is `losses.NPairsLoss`, our reimplementation of the N-pairs
  objective on normalised features.
- The encoder comes from `models.build_encoder` (for `resnet50v2`, the
  same `keras.applications.ResNet50V2` with `weights=None` and average
  pooling) with an identity standardisation, because the Normalization
  layer has already standardised the pixels. Both sides then train the
  same encoder.
- The data are `benchmarks.synthetic_split`, passed to `fit` as a
  shuffled, repeating `tf.data.Dataset` of full global batches, where the
  example passes the CIFAR-10 arrays.

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


def build_augmentation(images) -> keras.Sequential:
    """Builds the example's augmentation block, adapted to `images`.

    Args:
      images: float32 `[num_examples, height, width, 3]` pixel values, 0
        to 255, for the Normalization layer's mean and variance.
    """
    normalization = keras.layers.Normalization()
    augmentation = keras.Sequential(
        [
            normalization,
            keras.layers.RandomFlip("horizontal"),
            keras.layers.RandomRotation(0.02),
            keras.layers.RandomZoom(height_factor=0.2, width_factor=0.2),
        ],
        name="data_augmentation",
    )
    normalization.adapt(images)
    return augmentation


def build_example_model(settings: ThroughputSettings, images):
    """Builds augmentation, encoder and projection head as one model.

    Returns:
      `(model, encoder, head)`: the model maps pixel values
      `[batch, height, width, 3]` to projections `[batch, 128]`.
    """
    size = settings.image_size
    encoder = models.build_encoder(
        settings.encoder,
        image_shape=(size, size, 3),
        channel_mean=(0.0, 0.0, 0.0),
        channel_std=(1.0, 1.0, 1.0),
    )
    head = models.build_projection_head(
        "keras_example",
        input_dim=encoder.output_shape[-1],
        output_dim=benchmarks.EXAMPLE_PROJECTION_DIM,
    )
    inputs = keras.Input((size, size, 3), name="pixels")
    augmented = build_augmentation(images)(inputs)
    model = keras.Model(inputs, head(encoder(augmented)), name="supcon_fit")
    return model, encoder, head


def make_example_dataset(split, global_batch_size: int, seed: int):
    """Shuffles and batches the split as float32 pixels, repeating forever."""
    dataset = tf.data.Dataset.from_tensor_slices((split.images, split.labels))
    dataset = dataset.shuffle(len(split.labels), seed=seed)
    dataset = dataset.batch(global_batch_size, drop_remainder=True)
    dataset = dataset.map(lambda x, y: (tf.cast(x, tf.float32), y))
    return dataset.repeat().prefetch(tf.data.AUTOTUNE)


def keras_fit_throughput(settings: ThroughputSettings) -> dict[str, Any]:
    """Measures the example's `model.fit` pipeline on `synthetic_split`.

    One `fit` call runs `1 + repeats` epochs of `steps` steps each. The
    first epoch (tracing included) is the warm-up. Each later epoch is one
    timed repeat, from the end of the previous epoch's last batch to the
    end of its own. The loss is always the example's N-pairs loss with one
    view, whatever `settings.loss` is. Run it through
    `benchmarks.run_isolated` so that the strategy and policy start fresh.
    """
    strategy = distribute.make_strategy(
        settings.strategy, cpu_replicas=settings.cpu_replicas
    )
    precision.set_policy(settings.mixed_precision)
    split = benchmarks.synthetic_split(settings)
    with strategy.scope():
        model, encoder, head = build_example_model(
            settings, split.images.astype("float32")
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
    seconds = [ends[i] - ends[i - 1] for i in range(1, len(ends))]
    examples = settings.steps * settings.global_batch_size
    return {
        **benchmarks.summarize_seconds(seconds, examples),
        "steps": settings.steps,
        "warmup_seconds": ends[0] - timer.train_begin,
        "num_views": 1,
        "flops_per_example": benchmarks.training_flops_per_example(
            encoder, head, 1
        ),
        "peak_rss_bytes": benchmarks.peak_rss_bytes(),
    }
