"""Mixed precision: the Keras dtype policy and float16 loss scaling."""

import keras
import tensorflow as tf
from absl import logging

from supcon_tf.errors import UsageError

MIXED_PRECISION = ("float16", "bfloat16")


def set_policy(mixed_precision: str | None) -> None:
    """Sets the global Keras policy before any model is built.

    Layers then compute in `mixed_precision` and keep float32 variables;
    the losses cast their inputs to float32, so the loss math stays in
    float32.
    """
    if mixed_precision is None:
        keras.mixed_precision.set_global_policy("float32")
        return
    if mixed_precision not in MIXED_PRECISION:
        raise UsageError(
            f"--mixed_precision={mixed_precision!r} is invalid; choose "
            f"{' or '.join(MIXED_PRECISION)}, or leave it unset for float32."
        )
    if mixed_precision == "float16" and not tf.config.list_physical_devices(
        "GPU"
    ):
        logging.warning(
            "--mixed_precision=float16 on a CPU is emulated and far slower "
            "than float32 (about 36x in one measurement here); use bfloat16."
        )
    keras.mixed_precision.set_global_policy(f"mixed_{mixed_precision}")


def wrap_optimizer(
    optimizer: keras.optimizers.Optimizer,
    strategy: tf.distribute.Strategy,
    variables: list,
    mixed_precision: str | None,
) -> keras.optimizers.Optimizer:
    """Adds dynamic loss scaling for float16; other policies need none.

    float16 gradients underflow without it; bfloat16 has float32's
    exponent range. The train steps call `optimizer.scale_loss`, which is
    the identity for an unwrapped optimizer.
    """
    if mixed_precision != "float16":
        return optimizer
    with strategy.scope():
        wrapped = keras.optimizers.LossScaleOptimizer(optimizer)
        wrapped.build(variables)
    return wrapped
