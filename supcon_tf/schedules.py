"""Learning-rate schedules: linear warm-up, then a constant or cosine rate.

The rate at training step `s` (the optimizer's `iterations`, counted from
0), with base rate `b`, final rate `f`, `W` warm-up steps and `T` total
steps:

    s < W:       lr = b * (s + 1) / W
    W <= s < T:  constant: lr = b
                 cosine:   lr = f + (b - f) * (1 + cos(pi * p)) / 2,
                           where p = (s - W) / (T - W)
    s >= T:      constant: lr = b;  cosine: lr = f

Warm-up starts at `b / W` rather than 0, so the first step already trains,
and it reaches `b` on its last step, `W - 1`. The cosine part starts at `b`
on step `W` and reaches `f` at step `T`, one step after the last training
step.
"""

import math

import keras
from keras import ops

from supcon_tf.errors import UsageError

SCHEDULES = ("constant", "cosine")

# The linear scaling rule sets lr = base_lr * global_batch_size / 256.
REFERENCE_BATCH_SIZE = 256


def _validate(
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    final_lr: float,
) -> None:
    if schedule not in SCHEDULES:
        raise UsageError(
            f"schedule={schedule!r} is invalid; choose one of "
            f"{', '.join(SCHEDULES)}."
        )
    if not math.isfinite(base_lr) or base_lr <= 0:
        raise UsageError(
            f"learning rate {base_lr} is invalid; use a positive value such "
            "as 1e-3."
        )
    if not math.isfinite(final_lr) or final_lr < 0:
        raise UsageError(
            f"final learning rate {final_lr} is invalid; use 0 or more."
        )
    if total_steps < 1:
        raise UsageError(
            f"total_steps={total_steps} is invalid; training needs 1 or more "
            "steps."
        )
    if not 0 <= warmup_steps <= total_steps:
        raise UsageError(
            f"{warmup_steps} warm-up steps do not fit in {total_steps} "
            "training steps; lower --warmup_epochs or train for more epochs."
        )


def learning_rate_at(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    final_lr: float = 0.0,
) -> float:
    """Returns the learning rate at `step`, as in the module docstring.

    This is the float64 reference that `WarmupCosine` computes in float32,
    for tests and logs.

    Raises:
      UsageError: if the schedule name or a value is invalid, or the
        warm-up is longer than training.
    """
    _validate(base_lr, total_steps, warmup_steps, schedule, final_lr)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if step >= total_steps:
        return final_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    cosine = (1 + math.cos(math.pi * progress)) / 2
    return final_lr + (base_lr - final_lr) * cosine


@keras.saving.register_keras_serializable(package="supcon_tf")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up, then a constant or cosine-decayed learning rate.

    The rate is a pure function of the step, given in the module docstring,
    so a restored optimizer continues the schedule from its `iterations`.

    Args:
      base_lr: Rate at the end of warm-up, before any decay.
      total_steps: Steps of the whole training run; the cosine reaches
        `final_lr` here.
      warmup_steps: Steps of linear warm-up, 0 to `total_steps`.
      schedule: `constant` or `cosine`, the rate after warm-up.
      final_lr: Rate at `total_steps` for `cosine`; ignored by `constant`.

    Raises:
      UsageError: if the schedule name or a value is invalid, or the
        warm-up is longer than training.
    """

    def __init__(
        self,
        base_lr: float,
        total_steps: int,
        warmup_steps: int,
        schedule: str = "constant",
        final_lr: float = 0.0,
    ):
        _validate(base_lr, total_steps, warmup_steps, schedule, final_lr)
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.schedule = schedule
        self.final_lr = float(final_lr)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        base_lr = ops.cast(self.base_lr, "float32")
        after_warmup = self._after_warmup(step, base_lr)
        if self.warmup_steps == 0:
            return after_warmup
        warmup = base_lr * (step + 1.0) / float(self.warmup_steps)
        return ops.where(step < self.warmup_steps, warmup, after_warmup)

    def _after_warmup(self, step, base_lr):
        if self.schedule == "constant":
            return base_lr + ops.zeros_like(step)
        final_lr = ops.cast(self.final_lr, "float32")
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps == 0:
            return final_lr + ops.zeros_like(step)
        progress = (step - float(self.warmup_steps)) / float(decay_steps)
        progress = ops.clip(progress, 0.0, 1.0)
        cosine = (1.0 + ops.cos(math.pi * progress)) / 2.0
        return final_lr + (base_lr - final_lr) * cosine

    def get_config(self) -> dict:
        return {
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "schedule": self.schedule,
            "final_lr": self.final_lr,
        }


def scaled_learning_rate(
    base_lr: float, global_batch_size: int, scale: bool
) -> float:
    """Applies the linear scaling rule when `scale` is set.

    Returns:
      `base_lr * global_batch_size / 256` if `scale`, else `base_lr`.

    Raises:
      UsageError: if `scale` is set and `global_batch_size` is below 1.
    """
    if not scale:
        return base_lr
    if global_batch_size < 1:
        raise UsageError(
            f"global_batch_size={global_batch_size} is invalid for "
            "--scale_lr_by_batch; use 1 or more."
        )
    return base_lr * global_batch_size / REFERENCE_BATCH_SIZE
