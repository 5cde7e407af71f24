"""Warm-up and cosine schedules against hand-computed rates."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import schedules
from supcon_tf.errors import UsageError

# Base rate 1, 10 warm-up steps, then 90 cosine steps to step 100.
COSINE = {
    "base_lr": 1.0,
    "total_steps": 100,
    "warmup_steps": 10,
    "schedule": "cosine",
}

# (step, rate) pairs worked out by hand from the formula in the module
# docstring. Cosine points use cos(0) = 1, cos(pi/3) = 1/2, cos(pi/2) = 0,
# cos(2 pi/3) = -1/2 and cos(pi) = -1 at steps 10, 40, 55, 70 and 100.
COSINE_RATES = [
    (0, 0.1),
    (4, 0.5),
    (9, 1.0),
    (10, 1.0),
    (40, 0.75),
    (55, 0.5),
    (70, 0.25),
    (100, 0.0),
    (150, 0.0),
]


@pytest.mark.parametrize("step,expected", COSINE_RATES)
def test_cosine_rate_by_hand(step, expected):
    rate = schedules.learning_rate_at(step, **COSINE)

    assert rate == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("step,expected", [(40, 0.775), (55, 0.55)])
def test_cosine_final_rate(step, expected):
    # f + (b - f) * cosine with f = 0.1: 0.1 + 0.9 * 0.75, 0.1 + 0.9 * 0.5.
    rate = schedules.learning_rate_at(step, **COSINE, final_lr=0.1)

    assert rate == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "step,expected", [(0, 0.25), (3, 1.0), (4, 1.0), (20, 1.0), (500, 1.0)]
)
def test_constant_after_warmup(step, expected):
    rate = schedules.learning_rate_at(
        step, base_lr=1.0, total_steps=20, warmup_steps=4, schedule="constant"
    )

    assert rate == pytest.approx(expected, abs=1e-12)


def test_no_warmup_starts_at_base():
    schedule = schedules.WarmupCosine(0.5, 10, 0, "cosine")

    assert float(schedule(0)) == pytest.approx(0.5, rel=1e-7)
    assert float(schedule(5)) == pytest.approx(0.25, rel=1e-6)
    assert float(schedule(10)) == pytest.approx(0.0, abs=1e-7)


def test_warmup_as_long_as_training():
    schedule = schedules.WarmupCosine(2.0, 4, 4, "cosine", final_lr=0.5)

    rates = [float(schedule(step)) for step in range(6)]

    np.testing.assert_allclose(rates, [0.5, 1.0, 1.5, 2.0, 0.5, 0.5])


@pytest.mark.parametrize("schedule_name", schedules.SCHEDULES)
def test_keras_schedule_matches_reference(schedule_name):
    arguments = dict(COSINE, schedule=schedule_name, final_lr=0.01)
    schedule = schedules.WarmupCosine(**arguments)
    steps = np.arange(130)

    traced = tf.function(lambda step: schedule(step))
    rates = [float(traced(tf.constant(step, tf.int64))) for step in steps]
    reference = [
        schedules.learning_rate_at(int(step), **arguments) for step in steps
    ]

    np.testing.assert_allclose(rates, reference, rtol=1e-6, atol=1e-7)


def test_schedule_config_round_trip():
    schedule = schedules.WarmupCosine(0.3, 50, 5, "cosine", final_lr=0.02)

    serialized = keras.optimizers.schedules.serialize(schedule)
    restored = keras.optimizers.schedules.deserialize(serialized)

    assert isinstance(restored, schedules.WarmupCosine)
    assert restored.get_config() == {
        "base_lr": 0.3,
        "total_steps": 50,
        "warmup_steps": 5,
        "schedule": "cosine",
        "final_lr": 0.02,
    }
    assert float(restored(30)) == pytest.approx(float(schedule(30)))


@pytest.mark.parametrize(
    "arguments,message",
    [
        (dict(warmup_steps=11, total_steps=10), "11 warm-up steps"),
        (dict(schedule="linear"), "schedule='linear' is invalid"),
        (dict(base_lr=0.0), "learning rate 0.0 is invalid"),
        (dict(total_steps=0, warmup_steps=0), "total_steps=0 is invalid"),
        (dict(final_lr=-1.0), "final learning rate -1.0 is invalid"),
    ],
)
def test_invalid_schedule_raises(arguments, message):
    values = dict(COSINE, **arguments)

    with pytest.raises(UsageError, match=message):
        schedules.WarmupCosine(**values)
    with pytest.raises(UsageError, match=message):
        schedules.learning_rate_at(0, **values)


def test_linear_scaling_rule():
    assert schedules.scaled_learning_rate(0.5, 1024, True) == 2.0
    assert schedules.scaled_learning_rate(0.5, 1024, False) == 0.5
    assert schedules.scaled_learning_rate(0.1, 128, True) == 0.05
    with pytest.raises(UsageError, match="global_batch_size=0 is invalid"):
        schedules.scaled_learning_rate(0.5, 0, True)
