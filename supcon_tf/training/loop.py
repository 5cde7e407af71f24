"""The host-side loop shared by every training phase.

It restores the phase's checkpoint, runs the `tf.function` train loop
`steps_per_loop` steps at a time, and after each call logs one line,
writes the scalars and saves checkpoints on the configured interval.
"""

import dataclasses
import time
from collections.abc import Callable

import tensorflow as tf
from absl import logging

from supcon_tf.training.checkpoints import PhaseCheckpoint
from supcon_tf.training.summaries import SummaryWriters


@dataclasses.dataclass
class Phase:
    """One training phase: what to run, for how long, and where to record.

    Attributes:
      name: Used in log lines, e.g. `pretrain`.
      strategy: The strategy that owns every variable of the phase.
      train_loop: From `steps.make_train_loop`.
      dataset_fn_for_step: Returns the input function of a run that starts
        at the given global step (for resume).
      step: Scalar int64 variable counting this phase's steps; part of
        `checkpoint`.
      checkpoint: The phase's checkpoint manager.
      writers: TensorBoard writers.
      total_steps: Steps of the whole phase.
      steps_per_epoch: Steps per pass over the training split.
      examples_per_step: The global batch size.
      tags: Maps each metric of the train loop, and `lr`, `steps_per_sec`
        and `examples_per_sec`, to its TensorBoard tag.
      learning_rate: Returns the current learning rate for logging.
      on_epoch_end: Called with the finished epoch number (1-based).
      on_call_end: Called with the global step after each train-loop call.
    """

    name: str
    strategy: tf.distribute.Strategy
    train_loop: Callable
    dataset_fn_for_step: Callable[[int], Callable]
    step: tf.Variable
    checkpoint: PhaseCheckpoint
    writers: SummaryWriters
    total_steps: int
    steps_per_epoch: int
    examples_per_step: int
    tags: dict[str, str]
    learning_rate: Callable[[], float]
    steps_per_loop: int = 10
    checkpoint_every_steps: int = 0
    on_epoch_end: Callable[[int], None] | None = None
    on_call_end: Callable[[int], None] | None = None


@dataclasses.dataclass
class PhaseStats:
    """Measurements of one phase; rates exclude the first (tracing) call."""

    start_step: int
    end_step: int
    last_metrics: dict[str, float]
    examples_per_second: float | None
    first_call_seconds: float | None
    wall_seconds: float
    rate_includes_tracing: bool = False


def _next_stop(step: int, phase: Phase) -> int:
    """The next step at which the host must log, save or end an epoch."""
    stops = [
        phase.total_steps,
        step + phase.steps_per_loop,
        (step // phase.steps_per_epoch + 1) * phase.steps_per_epoch,
    ]
    if phase.checkpoint_every_steps > 0:
        interval = phase.checkpoint_every_steps
        stops.append((step // interval + 1) * interval)
    return min(stops)


def _should_save(step: int, phase: Phase) -> bool:
    interval = phase.checkpoint_every_steps or phase.steps_per_epoch
    return step % interval == 0 or step == phase.total_steps


def run_phase(phase: Phase) -> PhaseStats:
    """Runs `phase` from its latest checkpoint to `total_steps`."""
    phase.checkpoint.restore_latest()
    start = int(phase.step.numpy())
    started = time.perf_counter()
    if start >= phase.total_steps:
        logging.info(
            "%s: already at step %d of %d; nothing to train.",
            phase.name,
            start,
            phase.total_steps,
        )
        return PhaseStats(start, start, {}, None, None, 0.0)

    dataset = phase.strategy.distribute_datasets_from_function(
        phase.dataset_fn_for_step(start)
    )
    iterator = iter(dataset)
    step, metrics = start, {}
    first_call, steady_seconds, steady_steps = None, 0.0, 0
    while step < phase.total_steps:
        stop = _next_stop(step, phase)
        call_started = time.perf_counter()
        outputs = phase.train_loop(iterator, tf.constant(stop - step))
        metrics = {name: float(value) for name, value in outputs.items()}
        seconds = time.perf_counter() - call_started
        if first_call is None:
            first_call = seconds
            logging.info(
                "%s: first call took %.1f s (includes tracing).",
                phase.name,
                seconds,
            )
        else:
            steady_seconds += seconds
            steady_steps += stop - step
        _log_progress(phase, stop, stop - step, seconds, metrics)
        step = stop
        phase.step.assign(step)
        if phase.on_call_end:
            phase.on_call_end(step)
        if step % phase.steps_per_epoch == 0 and phase.on_epoch_end:
            phase.on_epoch_end(step // phase.steps_per_epoch)
        if _should_save(step, phase):
            phase.checkpoint.save(step)

    rate_includes_tracing = not steady_steps
    if steady_steps:
        rate = steady_steps * phase.examples_per_step / steady_seconds
    else:
        # One call ran the whole phase, so its time includes tracing.
        rate = (step - start) * phase.examples_per_step / first_call
    return PhaseStats(
        start,
        step,
        metrics,
        rate,
        first_call,
        time.perf_counter() - started,
        rate_includes_tracing,
    )


# The log line shows these; TensorBoard gets every metric.
_LOGGED_METRICS = ("loss", "accuracy")


def _log_progress(phase, step, num_steps, seconds, metrics) -> None:
    steps_per_second = num_steps / seconds
    examples_per_second = steps_per_second * phase.examples_per_step
    learning_rate = phase.learning_rate()
    logging.info(
        "%s: step %d/%d, %s, lr %.3g, %.2f steps/s, %.1f examples/s",
        phase.name,
        step,
        phase.total_steps,
        ", ".join(
            f"{name} {value:.4f}"
            for name, value in metrics.items()
            if name in _LOGGED_METRICS
        ),
        learning_rate,
        steps_per_second,
        examples_per_second,
    )
    values = dict(
        metrics,
        lr=learning_rate,
        steps_per_sec=steps_per_second,
        examples_per_sec=examples_per_second,
    )
    scalars = {phase.tags[name]: value for name, value in values.items()}
    phase.writers.write_train(scalars, step)
