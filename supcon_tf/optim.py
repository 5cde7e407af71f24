"""Optimizers, their learning-rate schedule and weight decay.

`make_optimizer` builds Adam (AdamW when weight decay is set), SGD with
momentum, or LARS, and creates their slot variables before the first step.
All of them differ from the stock Keras 3 classes in two ways:

- Global-norm clipping (`global_clipnorm`) applies to the gradient summed
  over replicas. Keras 3.15 clips each replica's share before its
  all-reduce, so under `MirroredStrategy` the applied step could be up to
  `num_replicas` times the clip norm.
- Variables of rank 0 or 1 (biases, batch-norm gamma and beta) never get
  weight decay, and LARS never adapts their learning rate.

Weight decay is decoupled for AdamW (`w -= lr * wd * w` each step, with
`lr` the scheduled rate, as Keras's AdamW does it). For SGD and LARS it is
an L2 term added to the gradient (`g += wd * w`), which momentum then
carries, as in `torch.optim.SGD` (PyTorch 2.0 documentation).
"""

import dataclasses
import re

import keras
import tensorflow as tf
from keras import ops

from supcon_tf import schedules
from supcon_tf.config import OptimizerConfig, validate_optimizer
from supcon_tf.errors import UsageError

# The settings `make_optimizer` reads are exactly an `OptimizerConfig`.
OptimizerSettings = OptimizerConfig


def settings_from_config(config) -> OptimizerSettings:
    """Reads an `OptimizerSettings` from any object with those attributes.

    Fields that `config` lacks take their defaults.
    """
    values = {
        field.name: getattr(config, field.name, field.default)
        for field in dataclasses.fields(OptimizerSettings)
    }
    return OptimizerSettings(**values)


def _excluded_by_rank(variable) -> bool:
    return len(variable.shape) <= 1


class _GlobalGradients:
    """Sums gradients over replicas before Keras clips and applies them.

    NOTE: this overrides two private hooks of the TensorFlow backend of
    Keras 3.15: `_backend_apply_gradients` (clip, decay, update) and
    `_all_reduce_sum_gradients`, which its update step calls.
    """

    def _backend_apply_gradients(self, grads, trainable_variables):
        context = tf.distribute.get_replica_context()
        if context is not None:
            grads = context.all_reduce(tf.distribute.ReduceOp.SUM, list(grads))
        super()._backend_apply_gradients(grads, trainable_variables)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return grads_and_vars  # Already summed in _backend_apply_gradients.

    def _use_weight_decay(self, variable) -> bool:
        if _excluded_by_rank(variable):
            return False
        return super()._use_weight_decay(variable)


class _L2WeightDecay(_GlobalGradients):
    """Adds `weight_decay * w` to the gradient instead of decaying `w`."""

    def _apply_weight_decay(self, variables):
        del variables  # update_step adds the decay to the gradient instead.

    def _add_l2_decay(self, gradient, variable):
        if not self.weight_decay or not self._use_weight_decay(variable):
            return gradient
        weight_decay = ops.cast(self.weight_decay, variable.dtype)
        return gradient + weight_decay * variable


@keras.saving.register_keras_serializable(package="supcon_tf")
class Adam(_GlobalGradients, keras.optimizers.Adam):
    """Keras's Adam, clipping the replica-summed gradient."""


@keras.saving.register_keras_serializable(package="supcon_tf")
class AdamW(_GlobalGradients, keras.optimizers.AdamW):
    """Keras's AdamW, clipping the replica-summed gradient.

    Variables of rank 0 or 1 are not decayed.
    """


@keras.saving.register_keras_serializable(package="supcon_tf")
class SGD(_L2WeightDecay, keras.optimizers.SGD):
    """Keras's SGD with momentum, with weight decay as an L2 gradient term.

    Unlike `keras.optimizers.SGD`, whose weight decay is decoupled, this
    adds `weight_decay * w` to the gradient of each variable of rank 2 or
    more before the momentum update. Clipping happens before the decay is
    added.
    """

    def update_step(self, gradient, variable, learning_rate):
        gradient = self._add_l2_decay(
            ops.cast(gradient, variable.dtype), variable
        )
        super().update_step(gradient, variable, learning_rate)


@keras.saving.register_keras_serializable(package="supcon_tf")
class LARS(_L2WeightDecay, keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017, arXiv 1708.03888).

    For each variable `w` with gradient `g` (summed over replicas, then
    clipped if `global_clipnorm` is set):

        g' = g + weight_decay * w
        trust = trust_coefficient * ||w|| / (||g'|| + epsilon),
                or 1 when ||w|| or ||g'|| is 0
        v = momentum * v + learning_rate * trust * g'
        w = w - v,  or with nesterov: w = w - (momentum * v + lr * trust * g')

    Variables of rank 0 or 1, and those that `exclude_from_adaptation`
    selects, use `trust = 1`; those of rank 0 or 1 also get no weight decay.
    Gradients must be dense tensors.

    Args:
      learning_rate: Float or `LearningRateSchedule`.
      momentum: Momentum of the velocity `v`, in [0, 1).
      weight_decay: L2 coefficient added to the gradient, 0 or more.
      trust_coefficient: The trust ratio's scale, `eta` in the paper.
      epsilon: Added to `||g'||` in the trust ratio's denominator.
      nesterov: Whether to apply Nesterov momentum.
      exclude_from_adaptation: Regular expressions searched in each
        variable's `name`, or a callable that takes a variable and returns
        True to exclude it, or None. Variables of rank 0 or 1 are always
        excluded.
      **kwargs: Base optimizer arguments, such as `global_clipnorm`.
    """

    def __init__(
        self,
        learning_rate=0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        epsilon: float = 0.0,
        nesterov: bool = False,
        exclude_from_adaptation=None,
        name: str | None = None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            name=name,
            **kwargs,
        )
        _check_lars_values(momentum, weight_decay, trust_coefficient, epsilon)
        self.momentum = float(momentum)
        self.trust_coefficient = float(trust_coefficient)
        self.epsilon = float(epsilon)
        self.nesterov = bool(nesterov)
        if isinstance(exclude_from_adaptation, str):
            exclude_from_adaptation = [exclude_from_adaptation]
        self.exclude_from_adaptation = exclude_from_adaptation

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = [
            self.add_variable_from_reference(variable, "momentum")
            for variable in variables
        ]

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        learning_rate = ops.cast(learning_rate, dtype)
        gradient = self._add_l2_decay(ops.cast(gradient, dtype), variable)
        if self._use_adaptation(variable):
            learning_rate = learning_rate * self._trust_ratio(
                gradient, variable
            )
        step = learning_rate * gradient

        velocity = self.momentums[self._get_variable_index(variable)]
        momentum = ops.cast(self.momentum, dtype)
        self.assign(velocity, momentum * velocity + step)
        if self.nesterov:
            self.assign_sub(variable, momentum * velocity + step)
        else:
            self.assign_sub(variable, velocity)

    def _trust_ratio(self, gradient, variable):
        weight_norm = ops.sqrt(ops.sum(ops.square(variable)))
        gradient_norm = ops.sqrt(ops.sum(ops.square(gradient)))
        adapt = ops.logical_and(weight_norm > 0, gradient_norm > 0)
        denominator = ops.where(adapt, gradient_norm + self.epsilon, 1.0)
        ratio = self.trust_coefficient * weight_norm / denominator
        return ops.where(adapt, ratio, ops.ones_like(ratio))

    def _use_adaptation(self, variable) -> bool:
        if _excluded_by_rank(variable):
            return False
        exclude = self.exclude_from_adaptation
        if exclude is None:
            return True
        if callable(exclude):
            return not exclude(variable)
        return not any(re.search(pattern, variable.name) for pattern in exclude)

    def get_config(self) -> dict:
        if callable(self.exclude_from_adaptation):
            raise ValueError(
                "LARS cannot serialize a callable exclude_from_adaptation; "
                "pass a list of variable name patterns instead."
            )
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "trust_coefficient": self.trust_coefficient,
                "epsilon": self.epsilon,
                "nesterov": self.nesterov,
                "exclude_from_adaptation": self.exclude_from_adaptation,
            }
        )
        return config


def _check_lars_values(momentum, weight_decay, trust_coefficient, epsilon):
    if not 0.0 <= momentum < 1.0:
        raise UsageError(
            f"LARS momentum={momentum} is invalid; use a value in [0, 1)."
        )
    if weight_decay is None or weight_decay < 0:
        raise UsageError(
            f"LARS weight_decay={weight_decay} is invalid; use 0 or more."
        )
    if trust_coefficient <= 0:
        raise UsageError(
            f"--lars_trust_coefficient={trust_coefficient} is invalid; use a "
            "positive value such as 0.001."
        )
    if epsilon < 0:
        raise UsageError(f"--lars_epsilon={epsilon} is invalid; use 0 or more.")


def validate_settings(settings: OptimizerSettings) -> None:
    """Raises `UsageError` for a setting that `make_optimizer` rejects.

    The messages name the command-line flags that set each field.
    """
    validate_optimizer(settings)
    if settings.optimizer == "lars":
        _check_lars_values(
            settings.momentum,
            settings.weight_decay,
            settings.lars_trust_coefficient,
            settings.lars_epsilon,
        )


def make_learning_rate(
    settings: OptimizerSettings,
    *,
    steps_per_epoch: int | None = None,
    total_steps: int | None = None,
    global_batch_size: int | None = None,
):
    """Returns the base rate as a float, or a `WarmupCosine` schedule.

    A constant rate without warm-up stays a float, so the optimizer keeps
    a settable `learning_rate` variable.

    Raises:
      UsageError: if the warm-up does not fit in `total_steps`.
      ValueError: if the settings need a step count or batch size that
        the caller did not pass.
    """
    if settings.scale_lr_by_batch and global_batch_size is None:
        raise ValueError(
            "scale_lr_by_batch needs global_batch_size; pass it to "
            "make_optimizer."
        )
    base_lr = schedules.scaled_learning_rate(
        float(settings.learning_rate),
        global_batch_size or 0,
        settings.scale_lr_by_batch,
    )
    if settings.schedule == "constant" and settings.warmup_epochs == 0:
        return base_lr
    if steps_per_epoch is None or total_steps is None:
        raise ValueError(
            f"schedule={settings.schedule!r} with warmup_epochs="
            f"{settings.warmup_epochs} needs steps_per_epoch and total_steps; "
            "pass them to make_optimizer."
        )
    warmup_steps = round(settings.warmup_epochs * steps_per_epoch)
    if settings.warmup_epochs > 0:
        warmup_steps = max(warmup_steps, 1)
    return schedules.WarmupCosine(
        base_lr, total_steps, warmup_steps, settings.schedule
    )


def _create(settings: OptimizerSettings, learning_rate):
    common = {
        "learning_rate": learning_rate,
        "global_clipnorm": settings.clip_global_norm or None,
    }
    weight_decay = float(settings.weight_decay)
    if settings.optimizer == "adam":
        if weight_decay > 0:
            return AdamW(weight_decay=weight_decay, **common)
        return Adam(**common)
    if settings.optimizer == "sgd":
        return SGD(
            momentum=float(settings.momentum),
            nesterov=settings.nesterov,
            weight_decay=weight_decay or None,
            **common,
        )
    return LARS(
        momentum=settings.momentum,
        weight_decay=weight_decay,
        trust_coefficient=settings.lars_trust_coefficient,
        epsilon=settings.lars_epsilon,
        nesterov=settings.nesterov,
        **common,
    )


def make_optimizer(
    config,
    strategy: tf.distribute.Strategy,
    variables: list,
    *,
    steps_per_epoch: int | None = None,
    total_steps: int | None = None,
    global_batch_size: int | None = None,
) -> keras.optimizers.Optimizer:
    """Creates the optimizer and its slot variables under `strategy.scope()`.

    A Keras 3 optimizer that creates its variables lazily inside
    `strategy.run` fails in graph mode, so every slot exists before the
    first distributed step.

    Args:
      config: An `OptimizerConfig` or `OptimizerSettings`; fields it lacks
        take the `OptimizerSettings` defaults.
      strategy: The strategy whose replicas apply the gradients.
      variables: The trainable variables the optimizer will update.
      steps_per_epoch: Steps of one epoch; converts `warmup_epochs` to
        steps. Needed for `schedule=cosine` or a warm-up.
      total_steps: Steps of the whole phase; the cosine ends here.
      global_batch_size: Examples per step over all replicas; needed for
        `scale_lr_by_batch`.

    Raises:
      UsageError: for an invalid setting, named with its flag.
      ValueError: if the settings need an argument the caller omitted.
    """
    settings = settings_from_config(config)
    validate_settings(settings)
    learning_rate = make_learning_rate(
        settings,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        global_batch_size=global_batch_size,
    )
    with strategy.scope():
        optimizer = _create(settings, learning_rate)
        optimizer.build(variables)
    return optimizer


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """Returns the rate of the next step: the schedule at `iterations`."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
