"""Writes the embeddings of an exported encoder for one split to a .npz.

    python -m experiments.embed --export_dir=/tmp/run1/export \\
        --dataset=cifar10 --split=test --output=/tmp/test_embeddings.npz

The .npz contains `embeddings` (float32 `[n, dim]`, L2-normalised), `labels`
(int64 `[n]`) and `class_names` (str `[num_classes]`). The encoder comes
from `supcon_tf.export.export_encoder`.
"""

import os

import numpy as np
from absl import flags, logging

from experiments import flags as job_flags
from supcon_tf import export
from supcon_tf.data import sources
from supcon_tf.errors import UsageError

FLAGS = flags.FLAGS

flags.DEFINE_string(
    "export_dir", None, "SavedModel folder written by export_encoder."
)
flags.DEFINE_enum(
    "dataset",
    "cifar10",
    list(sources.DATASET_NAMES),
    "cifar10/cifar100 read the CIFAR python folder or .tar.gz in "
    "--data_dir (or the Keras cache); folder reads an image folder.",
)
flags.DEFINE_string(
    "data_dir",
    None,
    "CIFAR python folder or .tar.gz, or the image folder root (with "
    "optional train/ and test/ sub-folders).",
)
flags.DEFINE_enum("split", "test", ["test", "train"], "Split to embed.")
flags.DEFINE_string("output", None, "Path of the .npz file to write.")
flags.DEFINE_integer(
    "max_examples",
    None,
    "Embed a fixed random subset of this many examples of the split.",
)
flags.DEFINE_integer(
    "seed",
    0,
    "Seed of the --max_examples subset and of the test split held out of "
    "an image folder without train/ and test/; use the training run's "
    "--seed to embed the same split.",
)
flags.DEFINE_integer("batch_size", 256, "Images per call of the model.")
flags.mark_flags_as_required(["export_dir", "output"])
job_flags.require_at_least("max_examples", 1)
job_flags.require_at_least("batch_size", 1)


def embed() -> None:
    output_dir = os.path.dirname(os.path.abspath(FLAGS.output))
    if not os.path.isdir(output_dir):
        raise UsageError(
            f"--output={FLAGS.output}: folder {output_dir} not found."
        )
    encoder = export.load_exported_encoder(FLAGS.export_dir)
    split, class_names = _load_split(encoder.image_shape)
    embeddings = np.concatenate(
        [
            encoder.embed(split.images[start : start + FLAGS.batch_size])
            for start in range(0, len(split.labels), FLAGS.batch_size)
        ]
    )
    with open(FLAGS.output, "wb") as stream:
        np.savez(
            stream,
            embeddings=embeddings,
            labels=split.labels.astype(np.int64),
            class_names=np.asarray(class_names, dtype=str),
        )
    logging.info(
        "Wrote %d embeddings of size %d to %s.",
        len(embeddings),
        embeddings.shape[1],
        FLAGS.output,
    )


def _load_split(image_shape):
    """Load the chosen split, resized to a square model input if needed."""
    height, width, _ = image_shape
    limits = {"train": FLAGS.max_examples, "test": FLAGS.max_examples}
    # load_dataset loads both splits, so the other one is cut to 1 example.
    limits["test" if FLAGS.split == "train" else "train"] = 1
    splits = sources.load_dataset(
        FLAGS.dataset,
        FLAGS.data_dir,
        image_size=height if height == width else None,
        max_train_examples=limits["train"],
        max_test_examples=limits["test"],
        seed=FLAGS.seed,
    )
    split = splits.train if FLAGS.split == "train" else splits.test
    if split.images.shape[1:] != tuple(image_shape):
        raise UsageError(
            f"The {FLAGS.split} images have shape {split.images.shape[1:]} "
            f"but the exported encoder takes {tuple(image_shape)}."
        )
    return split, splits.class_names


if __name__ == "__main__":
    job_flags.run(embed)
