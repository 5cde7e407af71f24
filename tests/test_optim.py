"""Optimizers against NumPy references on one and two replicas, and presets."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from supcon_tf import optim, schedules
from supcon_tf.config import OPTIMIZERS, OptimizerConfig
from supcon_tf.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = os.path.join(REPO, "experiments", "presets")

# A linear regression y = x @ kernel + bias over a global batch of 8, with
# the squared error summed and divided by the global batch size, as the
# train steps do.
GLOBAL_BATCH = 8
_RNG = np.random.default_rng(0)
INPUTS = _RNG.normal(size=(GLOBAL_BATCH, 4)).astype(np.float32)
TARGETS = _RNG.normal(size=(GLOBAL_BATCH, 3)).astype(np.float32)
KERNEL = _RNG.normal(size=(4, 3)).astype(np.float32)
BIAS = np.array([0.5, -0.25, 1.0], np.float32)


def _regression_gradients(kernel, bias):
    """Float64 gradients of the loss with respect to kernel and bias."""
    inputs = INPUTS.astype(np.float64)
    residual = inputs @ kernel + bias - TARGETS
    kernel_gradient = 2 * inputs.T @ residual / GLOBAL_BATCH
    bias_gradient = 2 * residual.sum(axis=0) / GLOBAL_BATCH
    return kernel_gradient, bias_gradient


def _train_regression(strategy, settings, num_steps):
    """Trains the regression under `strategy`, returning kernel and bias."""
    with strategy.scope():
        kernel = keras.Variable(KERNEL, name="kernel")
        bias = keras.Variable(BIAS, name="bias")
    variables = [kernel, bias]
    optimizer = optim.make_optimizer(settings, strategy, variables)

    def replica_step(inputs, targets):
        with tf.GradientTape() as tape:
            predictions = tf.matmul(inputs, kernel.value) + bias.value
            squared = tf.reduce_sum(tf.square(predictions - targets))
            loss = squared / GLOBAL_BATCH
        gradients = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(gradients, variables, strict=True))

    def shard(context):
        size = GLOBAL_BATCH // context.num_replicas_in_sync
        start = context.replica_id_in_sync_group * size
        return INPUTS[start : start + size], TARGETS[start : start + size]

    inputs = strategy.experimental_distribute_values_from_function(shard)

    @tf.function
    def train_step():
        strategy.run(replica_step, args=inputs)

    for _ in range(num_steps):
        train_step()
    return kernel.numpy(), bias.numpy()


def _lars_reference(weights, gradients, *, lr, momentum, wd, trust, nesterov):
    """Float64 LARS on one variable, without adaptation if `trust` is None."""
    weights = weights.astype(np.float64)
    velocity = np.zeros_like(weights)
    for gradient in gradients:
        decayed = gradient + wd * weights
        ratio = 1.0
        weight_norm = np.linalg.norm(weights)
        gradient_norm = np.linalg.norm(decayed)
        if trust is not None and weight_norm > 0 and gradient_norm > 0:
            ratio = trust * weight_norm / gradient_norm
        step = lr * ratio * decayed
        velocity = momentum * velocity + step
        weights = weights - (
            momentum * velocity + step if nesterov else velocity
        )
    return weights, velocity


def _lars_regression_reference(settings, num_steps):
    kernel, bias = KERNEL.astype(np.float64), BIAS.astype(np.float64)
    kernel_velocity, bias_velocity = np.zeros_like(kernel), np.zeros_like(bias)
    lr, momentum = settings.learning_rate, settings.momentum
    for _ in range(num_steps):
        kernel_gradient, bias_gradient = _regression_gradients(kernel, bias)
        decayed = kernel_gradient + settings.weight_decay * kernel
        ratio = (
            settings.lars_trust_coefficient
            * np.linalg.norm(kernel)
            / np.linalg.norm(decayed)
        )
        kernel_velocity = momentum * kernel_velocity + lr * ratio * decayed
        kernel = kernel - kernel_velocity
        # The bias (rank 1) gets plain momentum SGD: no decay, no trust.
        bias_velocity = momentum * bias_velocity + lr * bias_gradient
        bias = bias - bias_velocity
    return kernel, bias


def _zero_gradient_steps(optimizer, variables, num_steps):
    for _ in range(num_steps):
        zeros = [tf.zeros(variable.shape) for variable in variables]
        optimizer.apply_gradients(zip(zeros, variables, strict=True))


def _random_gradients(count):
    rng = np.random.default_rng(1)
    return [rng.normal(size=KERNEL.shape) for _ in range(count)]


def _kernel_and_bias():
    return [
        keras.Variable(KERNEL, name="kernel"),
        keras.Variable(BIAS, name="bias"),
    ]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("num_steps", [1, 2])
def test_lars_matches_numpy(nesterov, num_steps):
    kernel = keras.Variable(KERNEL, name="kernel")
    optimizer = optim.LARS(
        0.1,
        momentum=0.9,
        weight_decay=0.01,
        trust_coefficient=0.5,
        nesterov=nesterov,
    )
    optimizer.build([kernel])
    gradients = _random_gradients(num_steps)

    for gradient in gradients:
        optimizer.apply_gradients([(tf.constant(gradient, tf.float32), kernel)])
    expected, velocity = _lars_reference(
        KERNEL,
        gradients,
        lr=0.1,
        momentum=0.9,
        wd=0.01,
        trust=0.5,
        nesterov=nesterov,
    )

    np.testing.assert_allclose(
        kernel.numpy() - KERNEL, expected - KERNEL, rtol=1e-5, atol=3e-7
    )
    np.testing.assert_allclose(
        optimizer.momentums[0].numpy(), velocity, rtol=1e-5, atol=3e-7
    )


def test_lars_skips_rank_one_variables():
    kernel, bias = _kernel_and_bias()
    optimizer = optim.LARS(
        0.1, momentum=0.9, weight_decay=0.01, trust_coefficient=0.5
    )
    optimizer.build([kernel, bias])
    bias_gradients = [np.array([1.0, -2.0, 0.5]), np.array([0.5, 0.5, 0.5])]

    for bias_gradient in bias_gradients:
        gradients = [
            tf.zeros(KERNEL.shape),
            tf.constant(bias_gradient, tf.float32),
        ]
        optimizer.apply_gradients(zip(gradients, [kernel, bias], strict=True))
    # Plain momentum SGD: v1 = 0.1 g1, v2 = 0.9 v1 + 0.1 g2, b2 = b0 - v1 - v2.
    first = 0.1 * bias_gradients[0]
    second = 0.9 * first + 0.1 * bias_gradients[1]

    np.testing.assert_allclose(bias.numpy(), BIAS - first - second, rtol=1e-6)


def test_lars_trust_is_one_for_zero_weights():
    kernel = keras.Variable(np.zeros((2, 2), np.float32), name="kernel")
    optimizer = optim.LARS(0.1, momentum=0.0, trust_coefficient=0.001)
    optimizer.build([kernel])

    optimizer.apply_gradients([(tf.fill((2, 2), 3.0), kernel)])

    np.testing.assert_allclose(kernel.numpy(), np.full((2, 2), -0.3), rtol=1e-6)


def test_lars_excluded_by_name_keeps_decay():
    kernel = keras.Variable(KERNEL, name="kernel")
    optimizer = optim.LARS(
        0.1,
        momentum=0.9,
        weight_decay=0.01,
        trust_coefficient=0.5,
        exclude_from_adaptation=["kern"],
    )
    optimizer.build([kernel])
    (gradient,) = _random_gradients(1)

    optimizer.apply_gradients([(tf.constant(gradient, tf.float32), kernel)])
    expected, _ = _lars_reference(
        KERNEL,
        [gradient],
        lr=0.1,
        momentum=0.9,
        wd=0.01,
        trust=None,
        nesterov=False,
    )

    np.testing.assert_allclose(
        kernel.numpy() - KERNEL, expected - KERNEL, rtol=1e-5, atol=3e-7
    )


def test_lars_mirrored_matches_one_device(mirrored):
    settings = optim.OptimizerSettings(
        optimizer="lars",
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=0.01,
        lars_trust_coefficient=0.5,
    )

    strategy = mirrored(2)

    one_device = _train_regression(tf.distribute.get_strategy(), settings, 2)
    two_replicas = _train_regression(strategy, settings, 2)
    expected = _lars_regression_reference(settings, 2)

    assert strategy.num_replicas_in_sync == 2
    for got, want in zip(two_replicas, one_device, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=3e-7)
    for got, want, start in zip(
        one_device, expected, (KERNEL, BIAS), strict=True
    ):
        np.testing.assert_allclose(
            got - start, want - start, rtol=1e-5, atol=3e-7
        )


def test_lars_checkpoint_restores_momentum(tmp_path):
    kernel, bias = _kernel_and_bias()
    optimizer = optim.LARS(0.1, momentum=0.9, trust_coefficient=0.5)
    optimizer.build([kernel, bias])
    gradients = [tf.ones(KERNEL.shape), tf.ones(BIAS.shape)]
    optimizer.apply_gradients(zip(gradients, [kernel, bias], strict=True))
    path = tf.train.Checkpoint(optimizer=optimizer).save(str(tmp_path / "c"))

    restored = optim.LARS(0.1, momentum=0.9, trust_coefficient=0.5)
    restored.build(_kernel_and_bias())
    status = tf.train.Checkpoint(optimizer=restored).restore(path)
    status.assert_existing_objects_matched()

    assert int(restored.iterations.numpy()) == 1
    for saved, loaded in zip(
        optimizer.momentums, restored.momentums, strict=True
    ):
        assert np.abs(saved.numpy()).sum() > 0
        np.testing.assert_array_equal(loaded.numpy(), saved.numpy())


def test_lars_config_round_trip():
    optimizer = optim.LARS(
        0.2,
        momentum=0.8,
        weight_decay=1e-4,
        trust_coefficient=0.01,
        epsilon=1e-9,
        nesterov=True,
        exclude_from_adaptation=["head"],
        global_clipnorm=2.0,
    )

    restored = optim.LARS.from_config(optimizer.get_config())

    assert restored.get_config() == optimizer.get_config()
    assert restored.trust_coefficient == 0.01
    assert restored.exclude_from_adaptation == ["head"]
    assert restored.global_clipnorm == 2.0


def test_lars_callable_exclusion_not_serializable():
    optimizer = optim.LARS(0.1, exclude_from_adaptation=lambda v: True)

    with pytest.raises(ValueError, match="cannot serialize a callable"):
        optimizer.get_config()


def _clipped_sgd_reference(clip_norm):
    kernel_gradient, bias_gradient = _regression_gradients(KERNEL, BIAS)
    norm = np.sqrt(np.sum(kernel_gradient**2) + np.sum(bias_gradient**2))
    scale = min(1.0, clip_norm / norm)
    return KERNEL - scale * kernel_gradient, BIAS - scale * bias_gradient, norm


def _per_replica_clipped_kernel(clip_norm, num_replicas):
    """The kernel if each replica clipped its own share before summing."""
    size = GLOBAL_BATCH // num_replicas
    kernel_step = np.zeros_like(KERNEL, dtype=np.float64)
    for replica in range(num_replicas):
        rows = slice(replica * size, (replica + 1) * size)
        residual = INPUTS[rows] @ KERNEL + BIAS - TARGETS[rows]
        kernel_gradient = 2 * INPUTS[rows].T @ residual / GLOBAL_BATCH
        bias_gradient = 2 * residual.sum(axis=0) / GLOBAL_BATCH
        norm = np.sqrt(np.sum(kernel_gradient**2) + np.sum(bias_gradient**2))
        kernel_step += min(1.0, clip_norm / norm) * kernel_gradient
    return KERNEL - kernel_step


@pytest.mark.parametrize("clip_norm", [0.5, 100.0])
def test_clip_applies_to_summed_gradient(mirrored, clip_norm):
    settings = optim.OptimizerSettings(
        optimizer="sgd",
        learning_rate=1.0,
        momentum=0.0,
        clip_global_norm=clip_norm,
    )
    kernel, bias, norm = _clipped_sgd_reference(clip_norm)

    one_device = _train_regression(tf.distribute.get_strategy(), settings, 1)
    two_replicas = _train_regression(mirrored(2), settings, 1)

    np.testing.assert_allclose(one_device[0], kernel, rtol=1e-5)
    np.testing.assert_allclose(one_device[1], bias, rtol=1e-5)
    np.testing.assert_allclose(
        two_replicas[0], one_device[0], rtol=1e-6, atol=3e-7
    )
    np.testing.assert_allclose(
        two_replicas[1], one_device[1], rtol=1e-6, atol=3e-7
    )
    if clip_norm < norm:
        # Clipping each replica's share would move the kernel elsewhere.
        wrong = _per_replica_clipped_kernel(clip_norm, 2)
        assert np.abs(wrong - kernel).max() > 0.01


def test_adamw_decays_only_rank_two():
    kernel, bias = _kernel_and_bias()
    settings = optim.OptimizerSettings(
        optimizer="adam", learning_rate=0.01, weight_decay=0.1
    )
    optimizer = optim.make_optimizer(
        settings, tf.distribute.get_strategy(), [kernel, bias]
    )

    _zero_gradient_steps(optimizer, [kernel, bias], 2)
    # Adam's step is 0 for a zero gradient, so each step only decays the
    # kernel: w -= w * wd * lr, here in float32 in Keras's order.
    expected = KERNEL
    for _ in range(2):
        expected = expected - expected * np.float32(0.1) * np.float32(0.01)

    assert isinstance(optimizer, optim.AdamW)
    np.testing.assert_allclose(kernel.numpy(), expected, rtol=1e-7)
    np.testing.assert_array_equal(bias.numpy(), BIAS)


def test_sgd_weight_decay_is_l2():
    kernel, bias = _kernel_and_bias()
    settings = optim.OptimizerSettings(
        optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=0.5
    )
    optimizer = optim.make_optimizer(
        settings, tf.distribute.get_strategy(), [kernel, bias]
    )

    _zero_gradient_steps(optimizer, [kernel, bias], 1)
    after_one = kernel.numpy()
    _zero_gradient_steps(optimizer, [kernel, bias], 1)
    # v1 = lr wd w0 and w1 = w0 - v1; v2 = 0.9 v1 + lr wd w1; w2 = w1 - v2.
    velocity = 0.1 * 0.5 * KERNEL
    first = KERNEL - velocity
    velocity = 0.9 * velocity + 0.1 * 0.5 * first

    np.testing.assert_allclose(after_one, KERNEL * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(kernel.numpy(), first - velocity, rtol=1e-6)
    np.testing.assert_array_equal(bias.numpy(), BIAS)


def test_sgd_nesterov_matches_lars_without_trust():
    kernel = keras.Variable(KERNEL, name="kernel")
    settings = optim.OptimizerSettings(
        optimizer="sgd",
        learning_rate=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=0.01,
    )
    optimizer = optim.make_optimizer(
        settings, tf.distribute.get_strategy(), [kernel]
    )
    gradients = _random_gradients(2)

    for gradient in gradients:
        optimizer.apply_gradients([(tf.constant(gradient, tf.float32), kernel)])
    expected, _ = _lars_reference(
        KERNEL,
        gradients,
        lr=0.1,
        momentum=0.9,
        wd=0.01,
        trust=None,
        nesterov=True,
    )

    np.testing.assert_allclose(
        kernel.numpy() - KERNEL, expected - KERNEL, rtol=1e-5, atol=3e-7
    )


def test_cosine_schedule_drives_steps():
    weight = keras.Variable(np.zeros(3, np.float32), name="weight")
    settings = optim.OptimizerSettings(
        optimizer="sgd",
        learning_rate=0.4,
        momentum=0.0,
        schedule="cosine",
        warmup_epochs=1.0,
    )
    optimizer = optim.make_optimizer(
        settings,
        tf.distribute.get_strategy(),
        [weight],
        steps_per_epoch=4,
        total_steps=12,
    )
    rates = [
        schedules.learning_rate_at(
            step,
            base_lr=0.4,
            total_steps=12,
            warmup_steps=4,
            schedule="cosine",
        )
        for step in range(12)
    ]

    logged = []
    for _ in range(12):
        logged.append(optim.current_learning_rate(optimizer))
        optimizer.apply_gradients([(tf.ones(3), weight)])

    assert logged[0] == pytest.approx(0.1)
    np.testing.assert_allclose(logged, rates, rtol=1e-6, atol=1e-8)
    # A unit gradient moves the weight by the sum of the applied rates.
    np.testing.assert_allclose(
        weight.numpy(), np.full(3, -sum(rates)), rtol=1e-5
    )


def test_scale_lr_by_batch():
    settings = optim.OptimizerSettings(
        learning_rate=1e-3, scale_lr_by_batch=True
    )

    optimizer = optim.make_optimizer(
        settings,
        tf.distribute.get_strategy(),
        _kernel_and_bias(),
        global_batch_size=512,
    )

    assert optim.current_learning_rate(optimizer) == pytest.approx(2e-3)


@pytest.mark.parametrize(
    "settings,optimizer_class",
    [
        (optim.OptimizerSettings(), optim.Adam),
        (optim.OptimizerSettings(weight_decay=1e-4), optim.AdamW),
        (optim.OptimizerSettings(optimizer="sgd", nesterov=True), optim.SGD),
        (optim.OptimizerSettings(optimizer="lars"), optim.LARS),
    ],
)
def test_make_optimizer_builds_slots(settings, optimizer_class):
    variables = _kernel_and_bias()

    optimizer = optim.make_optimizer(
        settings, tf.distribute.get_strategy(), variables
    )

    assert type(optimizer) is optimizer_class
    assert optimizer.built
    # iterations and a learning-rate variable, then slots per variable.
    slots = {optim.Adam: 2, optim.AdamW: 2, optim.SGD: 1, optim.LARS: 1}
    expected = 2 + slots[optimizer_class] * len(variables)
    assert len(optimizer.variables) == expected


def test_make_optimizer_reads_current_config():
    optimizer = optim.make_optimizer(
        OptimizerConfig("sgd", learning_rate=0.02, momentum=0.5),
        tf.distribute.get_strategy(),
        _kernel_and_bias(),
    )

    assert type(optimizer) is optim.SGD
    assert optimizer.momentum == 0.5
    assert optimizer.weight_decay is None
    assert optim.current_learning_rate(optimizer) == pytest.approx(0.02)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"optimizer": "rmsprop"}, "--optimizer='rmsprop' is invalid"),
        ({"learning_rate": -1.0}, "--learning_rate=-1.0 is invalid"),
        ({"weight_decay": -1e-4}, "--weight_decay=-0.0001 is invalid"),
        ({"schedule": "step"}, "--schedule='step' is invalid"),
        ({"nesterov": True}, "--nesterov applies to"),
        ({"momentum": 1.0}, "--momentum=1.0 is invalid"),
        ({"clip_global_norm": -1.0}, "--clip_global_norm=-1.0 is invalid"),
        ({"warmup_epochs": 5.0}, "20 warm-up steps do not fit in 12"),
        (
            {"optimizer": "lars", "lars_trust_coefficient": 0.0},
            "--lars_trust_coefficient=0.0 is invalid",
        ),
    ],
)
def test_invalid_settings_raise(changes, message):
    settings = optim.OptimizerSettings(**changes)

    with pytest.raises(UsageError, match=message):
        optim.make_optimizer(
            settings,
            tf.distribute.get_strategy(),
            _kernel_and_bias(),
            steps_per_epoch=4,
            total_steps=12,
        )


def test_schedule_without_steps_raises():
    settings = optim.OptimizerSettings(schedule="cosine")

    with pytest.raises(ValueError, match="needs steps_per_epoch"):
        optim.make_optimizer(
            settings, tf.distribute.get_strategy(), _kernel_and_bias()
        )


def _parse_preset(name):
    """Parses a preset into fresh FlagValues that define its flags."""
    values = flags.FlagValues()
    for flag in (
        "encoder",
        "projection_head",
        "eval_head",
        "augment",
        "schedule",
        "eval_optimizer",
        "loss",
        "dataset",
        "eval_augment",
    ):
        flags.DEFINE_string(flag, None, "", flag_values=values)
    flags.DEFINE_enum(
        "optimizer", "adam", list(OPTIMIZERS), "", flag_values=values
    )
    for flag in (
        "global_batch_size",
        "pretrain_epochs",
        "eval_epochs",
        "views",
    ):
        flags.DEFINE_integer(flag, None, "", flag_values=values)
    for flag in (
        "learning_rate",
        "eval_learning_rate",
        "temperature",
        "momentum",
        "weight_decay",
        "warmup_epochs",
        "clip_global_norm",
    ):
        flags.DEFINE_float(flag, None, "", flag_values=values)
    for flag in ("nesterov", "scale_lr_by_batch"):
        flags.DEFINE_bool(flag, None, "", flag_values=values)
    path = os.path.join(PRESETS, f"{name}.cfg")
    values(["prog", f"--flagfile={path}"])
    return values


def test_keras_example_preset():
    values = _parse_preset("keras_example")

    assert values.encoder == "resnet50v2"
    assert values.global_batch_size == 265
    assert values.optimizer == "adam"
    assert values.learning_rate == 0.001
    assert values.temperature == 0.05
    assert values.pretrain_epochs == 50
    assert values.eval_epochs == 50
    assert values.projection_head == "keras_example"
    assert values.eval_head == "mlp"
    assert values.eval_augment == "keras_example"
    assert values.loss is None


def test_paper_cifar10_preset():
    values = _parse_preset("paper_cifar10")

    assert values.global_batch_size == 1024
    assert values.pretrain_epochs == 1000
    assert values.optimizer == "sgd"
    assert values.learning_rate == 0.5
    assert values.temperature == 0.1
    assert values.schedule == "cosine"
    assert values.warmup_epochs == 10
    assert values.weight_decay == 1e-4
    assert values.momentum == 0.9
    assert values.projection_head == "mlp"
    assert values.augment == "supcon"
    assert values.views == 2
    assert values.eval_head == "linear"


# Parses a preset with the flags that experiments/pretrain.py defines, in a
# fresh process, and prints the requested flag values as JSON.
_PARSE_WITH_PRETRAIN_FLAGS = """
import json, sys
from absl import flags
import experiments.pretrain
flags.FLAGS(["pretrain", "--flagfile=" + sys.argv[1], "--model_dir=unused"])
print(json.dumps({name: flags.FLAGS[name].value for name in sys.argv[2:]}))
"""


@pytest.mark.parametrize(
    "name,expected",
    [
        (
            "keras_example",
            {
                "global_batch_size": 265,
                "learning_rate": 0.001,
                "temperature": 0.05,
                "pretrain_epochs": 50,
                "schedule": "constant",
            },
        ),
        (
            "paper_cifar10",
            {
                "global_batch_size": 1024,
                "learning_rate": 0.5,
                "temperature": 0.1,
                "pretrain_epochs": 1000,
                "schedule": "cosine",
            },
        ),
    ],
)
def test_preset_parses_with_pretrain_flags(name, expected):
    path = os.path.join(PRESETS, f"{name}.cfg")
    command = [sys.executable, "-c", _PARSE_WITH_PRETRAIN_FLAGS, path]
    process = subprocess.run(
        command + list(expected),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )

    assert process.returncode == 0, process.stderr[-3000:]
    assert json.loads(process.stdout.splitlines()[-1]) == expected
