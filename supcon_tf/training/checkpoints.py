"""Checkpoint managers that resume runs and keep non-chief writes apart."""

import os
import shutil
import tempfile

import tensorflow as tf
from absl import logging


class PhaseCheckpoint:
    """A `tf.train.CheckpointManager` for one training phase.

    The chief saves under `directory`. Every other worker must take part in
    each save (saving runs collective ops under multi-worker strategies), so
    it writes to a private temporary directory that it deletes afterwards.
    All workers restore from `directory`, which therefore has to be on a
    file system that every worker can read.
    """

    def __init__(
        self,
        directory: str,
        checkpoint: tf.train.Checkpoint,
        *,
        chief: bool,
        max_to_keep: int = 3,
    ):
        self.directory = directory
        self.checkpoint = checkpoint
        self._chief = chief
        save_dir = directory if chief else tempfile.mkdtemp(prefix="ckpt_")
        self._manager = tf.train.CheckpointManager(
            checkpoint, save_dir, max_to_keep=max_to_keep
        )

    def latest(self) -> str | None:
        """Returns the newest checkpoint path in `directory`, or None."""
        return tf.train.latest_checkpoint(self.directory)

    def restore_latest(self) -> str | None:
        """Restores the newest checkpoint in `directory`, if there is one."""
        path = tf.train.latest_checkpoint(self.directory)
        if path is None:
            return None
        self.checkpoint.restore(path).assert_existing_objects_matched()
        logging.info("Restored checkpoint %s.", path)
        return path

    def save(self, step: int) -> None:
        path = self._manager.save(checkpoint_number=step)
        if self._chief:
            logging.info("Saved checkpoint %s.", path)
        else:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
