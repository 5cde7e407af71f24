"""Export of a trained encoder as a self-contained TensorFlow SavedModel.

The SavedModel stores the traced graph and the variables, so
`tf.saved_model.load(export_dir)` runs it without supcon_tf or Keras
installed. It has two signatures, each returning
`{"embeddings": float32 [batch, dim]}`, L2-normalised along the last axis:

- `serving_default`: `images`, uint8 `[batch, height, width, 3]`.
- `embed_float`: `images`, float32 `[batch, height, width, 3]` in [0, 1].

The encoder runs in inference mode, so batch normalisation uses its moving
statistics and an embedding does not depend on the rest of its batch.
"""

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from supcon_tf.errors import UsageError

SIGNATURE_UINT8 = "serving_default"
SIGNATURE_FLOAT = "embed_float"
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"


class _EncoderExport(tf.Module):
    """The encoder and its two signature functions, tracked for saving."""

    def __init__(self, encoder: keras.Model, image_shape: Sequence[int]):
        super().__init__(name="encoder_export")
        self.encoder = encoder
        shape = [None, *image_shape]
        self.embed_uint8 = tf.function(
            self._embed_uint8,
            input_signature=[tf.TensorSpec(shape, tf.uint8, INPUT_NAME)],
        )
        self.embed_float = tf.function(
            self._embed_float,
            input_signature=[tf.TensorSpec(shape, tf.float32, INPUT_NAME)],
        )

    def _embed_uint8(self, images):
        return self._embed_float(tf.cast(images, tf.float32) / 255.0)

    def _embed_float(self, images):
        embeddings = tf.cast(self.encoder(images, training=False), tf.float32)
        return {OUTPUT_NAME: tf.math.l2_normalize(embeddings, axis=-1)}


def export_encoder(
    encoder: keras.Model,
    export_dir: str,
    *,
    image_shape: Sequence[int],
) -> None:
    """Write `encoder` as a SavedModel with L2-normalised embeddings.

    Call this outside any `strategy.scope()`. An encoder built under a
    MirroredStrategy exports its first replica's variables, which equal
    the others'.

    Args:
        encoder: Maps float images `[batch, height, width, 3]` in [0, 1] to
            embeddings `[batch, dim]`.
        export_dir: Folder to write; it must not contain a SavedModel yet.
        image_shape: `(height, width, 3)` of the input images.

    Raises:
        UsageError: `image_shape` is not `(height, width, 3)`, or
            `export_dir` already contains a SavedModel.
    """
    image_shape = tuple(int(size) for size in image_shape)
    if len(image_shape) != 3 or image_shape[2] != 3 or min(image_shape) < 1:
        raise UsageError(
            f"image_shape={image_shape} is invalid: use (height, width, 3)."
        )
    if tf.saved_model.contains_saved_model(export_dir):
        raise UsageError(
            f"{export_dir} already contains a SavedModel; choose a new "
            "export folder or delete the old one."
        )
    module = _EncoderExport(encoder, image_shape)
    signatures = {
        SIGNATURE_UINT8: module.embed_uint8.get_concrete_function(),
        SIGNATURE_FLOAT: module.embed_float.get_concrete_function(),
    }
    tf.saved_model.save(module, export_dir, signatures=signatures)


@dataclasses.dataclass(frozen=True)
class LoadedEncoder:
    """An encoder export loaded with `tf.saved_model.load`.

    Attributes:
        saved_model: The loaded object; its `signatures` run the encoder.
        image_shape: `(height, width, 3)` that the signatures accept.
    """

    saved_model: Any
    image_shape: tuple[int, int, int]

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Map uint8 `[batch, height, width, 3]` to float32 `[batch, dim]`."""
        signature = self.saved_model.signatures[SIGNATURE_UINT8]
        outputs = signature(**{INPUT_NAME: tf.constant(images, tf.uint8)})
        return outputs[OUTPUT_NAME].numpy()


def load_exported_encoder(export_dir: str) -> LoadedEncoder:
    """Load an export of `export_encoder` and check its signatures.

    Raises:
        UsageError: `export_dir` is missing, is not a SavedModel, or lacks
            the uint8 signature that `export_encoder` writes.
    """
    if not os.path.isdir(export_dir):
        raise UsageError(f"Export folder --export_dir={export_dir} not found.")
    if not tf.saved_model.contains_saved_model(export_dir):
        raise UsageError(
            f"--export_dir={export_dir} contains no SavedModel "
            "(saved_model.pb). Point it at a folder written by "
            "supcon_tf.export.export_encoder."
        )
    try:
        loaded = tf.saved_model.load(export_dir)
    except (tf.errors.OpError, ValueError, OSError) as error:
        raise UsageError(
            f"Failed to load the SavedModel in {export_dir}: {error}"
        ) from error
    signature = loaded.signatures.get(SIGNATURE_UINT8)
    spec = None
    if signature is not None:
        spec = signature.structured_input_signature[1].get(INPUT_NAME)
    if spec is None or spec.dtype != tf.uint8 or spec.shape.rank != 4:
        raise UsageError(
            f"The SavedModel in {export_dir} has no {SIGNATURE_UINT8} "
            f"signature with uint8 {INPUT_NAME!r} [batch, height, width, 3]; "
            "export the encoder with supcon_tf.export.export_encoder."
        )
    return LoadedEncoder(loaded, tuple(spec.shape.as_list()[1:]))
