"""Optimizer factory; the optimizer is built before the first step."""

import keras
import tensorflow as tf

from supcon_tf.config import OPTIMIZERS, OptimizerConfig
from supcon_tf.errors import UsageError


def make_optimizer(
    config: OptimizerConfig,
    strategy: tf.distribute.Strategy,
    variables: list,
) -> keras.optimizers.Optimizer:
    """Creates the optimizer and its slot variables under `strategy.scope()`.

    A Keras 3 optimizer that creates its variables lazily inside
    `strategy.run` fails in graph mode, so every slot exists before the
    first distributed step.
    """
    if config.learning_rate <= 0:
        raise UsageError(
            f"learning rate {config.learning_rate} is invalid; use a "
            "positive value such as 1e-3."
        )
    with strategy.scope():
        if config.optimizer == "adam":
            optimizer = keras.optimizers.Adam(config.learning_rate)
        elif config.optimizer == "sgd":
            optimizer = keras.optimizers.SGD(
                config.learning_rate, momentum=config.momentum
            )
        else:
            raise UsageError(
                f"Unknown optimizer {config.optimizer!r}; choose one of "
                f"{', '.join(OPTIMIZERS)}."
            )
        optimizer.build(variables)
    return optimizer


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
