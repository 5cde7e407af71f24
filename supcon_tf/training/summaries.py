"""TensorBoard writers: `model_dir/train` and `model_dir/eval`, chief only."""

import os

import tensorflow as tf


class SummaryWriters:
    """Scalar writers for the train and eval curves of one run.

    Only the chief writes; on other workers every call is a no-op, so each
    tag has one event per logged step however many workers run.
    """

    def __init__(self, log_dir: str, *, chief: bool):
        if chief:
            self.train = tf.summary.create_file_writer(
                os.path.join(log_dir, "train")
            )
            self.eval = tf.summary.create_file_writer(
                os.path.join(log_dir, "eval")
            )
        else:
            self.train = tf.summary.create_noop_writer()
            self.eval = tf.summary.create_noop_writer()

    def write_train(self, scalars: dict[str, float], step: int) -> None:
        _write(self.train, scalars, step)

    def write_eval(self, scalars: dict[str, float], step: int) -> None:
        _write(self.eval, scalars, step)

    def close(self) -> None:
        self.train.close()
        self.eval.close()


def _write(writer, scalars: dict[str, float], step: int) -> None:
    with writer.as_default():
        for tag, value in scalars.items():
            tf.summary.scalar(tag, value, step=step)
    writer.flush()
