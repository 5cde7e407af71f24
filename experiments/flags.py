"""Flag groups shared by the entry points, and their translation to configs.

Each `define_*` function defines one concern's flags; the `*_config`
functions read them into frozen config objects. The library never reads a
flag.
"""

import os
import sys
from collections.abc import Callable
from typing import Any

import tensorflow as tf
from absl import app, flags

from supcon_tf import config as config_lib
from supcon_tf import distribute, models
from supcon_tf.data import augment
from supcon_tf.errors import UsageError

FLAGS = flags.FLAGS
_DEFINED: list[str] = []


def define(definition: Callable, name: str, *args, **kwargs) -> None:
    """Defines a flag with `definition` and records it for results.json."""
    definition(name, *args, **kwargs)
    _DEFINED.append(name)


def require_at_least(name: str, minimum: float) -> None:
    """Rejects `--name` below `minimum` at parse time, naming the fix."""
    flags.register_validator(
        name,
        lambda value: value is None or value >= minimum,
        message=f"use a value of {minimum} or more.",
    )


def define_data_flags(*, augment_default: str, with_views: bool) -> None:
    define(
        flags.DEFINE_enum,
        "dataset",
        "cifar10",
        ["cifar10", "cifar100", "folder"],
        "cifar10/cifar100 load through keras.datasets unless --data_dir "
        "points at the CIFAR python folder or .tar.gz; folder reads "
        "images in class sub-folders of --data_dir.",
    )
    define(
        flags.DEFINE_string,
        "data_dir",
        None,
        "CIFAR python folder or .tar.gz, or the image folder root (with "
        "optional train/ and test/ sub-folders).",
    )
    define(
        flags.DEFINE_integer,
        "image_size",
        None,
        "Resize folder images to this many pixels square; by default all "
        "images must share one size.",
    )
    define(
        flags.DEFINE_integer,
        "max_train_examples",
        None,
        "Use a fixed random subset of this many training examples.",
    )
    define(
        flags.DEFINE_integer,
        "max_test_examples",
        None,
        "Use a fixed random subset of this many test examples.",
    )
    define(
        flags.DEFINE_enum,
        "augment",
        augment_default,
        list(augment.AUGMENT_MODES),
        "Training augmentation: supcon (random resized crop, flip, colour "
        "jitter, grayscale), keras_example (flip, rotation 0.02, width "
        "and height 0.2), none.",
    )
    if with_views:
        define(
            flags.DEFINE_integer,
            "views",
            2,
            "Augmented views of each image per step.",
        )
    require_at_least("image_size", 1)
    require_at_least("max_train_examples", 1)
    require_at_least("max_test_examples", 1)


def define_model_flags(*, with_projection: bool) -> None:
    define(
        flags.DEFINE_enum,
        "encoder",
        "resnet50v2",
        list(models.ENCODERS),
        "Encoder network (keras.applications ResNet50V2, CIFAR ResNet-18, "
        "or a small CNN for smoke tests).",
    )
    if with_projection:
        define(
            flags.DEFINE_enum,
            "projection_head",
            "keras_example",
            list(models.PROJECTION_HEADS),
            "keras_example: Dense(projection_dim, relu); mlp: the SupCon "
            "paper's two-layer MLP.",
        )
        define(
            flags.DEFINE_integer,
            "projection_dim",
            128,
            "Output size of the projection head.",
        )
    define(
        flags.DEFINE_bool,
        "sync_batchnorm",
        None,
        "Batch-norm statistics over the global batch of all replicas. "
        "Default: on for mirrored and multi_worker, off otherwise.",
    )


def define_optimizer_flags(prefix: str = "", phase: str = "training"):
    """Defines `--{prefix}optimizer` and `--{prefix}learning_rate`."""
    define(
        flags.DEFINE_enum,
        prefix + "optimizer",
        "adam",
        list(config_lib.OPTIMIZERS),
        f"Optimizer of the {phase} (sgd and lars use --momentum).",
    )
    define(
        flags.DEFINE_float,
        prefix + "learning_rate",
        1e-3,
        f"Learning rate of the {phase}.",
    )
    if prefix:
        return
    define(flags.DEFINE_float, "momentum", 0.9, "Momentum of sgd and lars.")
    define(flags.DEFINE_bool, "nesterov", False, "Nesterov momentum.")
    define(
        flags.DEFINE_float,
        "weight_decay",
        0.0,
        "Weight decay: decoupled (AdamW) for adam, an L2 term added to the "
        "gradient for sgd and lars. Variables of rank 0 or 1 (biases, "
        "batch-norm parameters) are excluded.",
    )
    define(
        flags.DEFINE_enum,
        "schedule",
        "constant",
        ["constant", "cosine"],
        "Learning-rate schedule after the warm-up.",
    )
    define(
        flags.DEFINE_float,
        "warmup_epochs",
        0.0,
        "Epochs of linear learning-rate warm-up: step s of W warm-up steps "
        "uses lr x (s + 1) / W.",
    )
    define(
        flags.DEFINE_bool,
        "scale_lr_by_batch",
        False,
        "Linear scaling rule: learning rate x global_batch_size / 256.",
    )
    define(
        flags.DEFINE_float,
        "clip_global_norm",
        0.0,
        "Clip the global gradient norm to this value; 0 is off.",
    )
    define(
        flags.DEFINE_float,
        "lars_trust_coefficient",
        0.001,
        "Trust coefficient of lars.",
    )
    define(
        flags.DEFINE_float,
        "lars_epsilon",
        0.0,
        "Added to the denominator of the lars trust ratio.",
    )


def define_run_flags(*, model_dir_required: bool = True) -> None:
    define(
        flags.DEFINE_string,
        "model_dir",
        None,
        "Directory for checkpoints, TensorBoard events, config.json and "
        "results.json; rerunning with the same directory resumes.",
    )
    if model_dir_required:
        flags.mark_flag_as_required("model_dir")
    define(
        flags.DEFINE_enum,
        "strategy",
        "default",
        list(distribute.STRATEGIES),
        "tf.distribute strategy; multi_worker reads TF_CONFIG.",
    )
    define(
        flags.DEFINE_integer,
        "cpu_replicas",
        1,
        "With --strategy=mirrored and no GPU, mirror over this many "
        "logical CPU devices.",
    )
    define(
        flags.DEFINE_enum,
        "cross_device_ops",
        None,
        ["nccl", "hierarchical_copy", "reduce_to_one"],
        "All-reduce implementation for --strategy=mirrored.",
    )
    define(
        flags.DEFINE_string,
        "tpu",
        None,
        "TPU name or grpc:// address for --strategy=tpu; empty on a TPU VM.",
    )
    define(
        flags.DEFINE_integer,
        "global_batch_size",
        265,
        "Examples per step over all replicas; must divide by the number "
        "of replicas.",
    )
    define(
        flags.DEFINE_integer,
        "seed",
        0,
        "Seed for initialisation, data order and augmentation.",
    )
    define(
        flags.DEFINE_bool,
        "deterministic",
        False,
        "Use TensorFlow's deterministic op implementations (slower), so "
        "runs repeat exactly on GPUs too. CPU runs with one --seed repeat "
        "without it in our tests.",
    )
    define(
        flags.DEFINE_enum,
        "mixed_precision",
        None,
        ["float16", "bfloat16"],
        "Compute in this dtype with float32 variables and float32 loss math "
        "(float16 adds loss scaling). Unset: float32.",
    )
    define(
        flags.DEFINE_bool,
        "jit_compile",
        False,
        "Compile the pretraining forward and backward pass with XLA (one "
        "replica, no sync batch norm).",
    )
    define(
        flags.DEFINE_integer,
        "steps_per_loop",
        10,
        "Steps per tf.function call; one log line and summary per call.",
    )
    define(
        flags.DEFINE_integer,
        "checkpoint_every_steps",
        0,
        "Checkpoint interval in steps; 0 saves at the end of each epoch.",
    )
    define(
        flags.DEFINE_integer,
        "keep_checkpoints",
        3,
        "Checkpoints kept per phase.",
    )
    require_at_least("cpu_replicas", 1)
    require_at_least("global_batch_size", 1)
    require_at_least("steps_per_loop", 1)
    require_at_least("checkpoint_every_steps", 0)
    require_at_least("keep_checkpoints", 1)


def define_probe_flags() -> None:
    define(
        flags.DEFINE_integer,
        "eval_epochs",
        50,
        "Epochs of the classifier on the frozen encoder.",
    )
    define(
        flags.DEFINE_enum,
        "eval_head",
        "mlp",
        list(models.CLASSIFIER_HEADS),
        "mlp: the keras.io example's classifier (dropout 0.5, dense 512 "
        "relu, dropout 0.5); linear: a linear probe.",
    )
    define(
        flags.DEFINE_enum,
        "eval_augment",
        "none",
        list(augment.AUGMENT_MODES),
        "Augmentation while the probe trains. none runs the frozen encoder "
        "once and trains the head on cached features; any other mode runs "
        "the encoder on every step (the keras.io example uses "
        "keras_example).",
    )
    define_optimizer_flags("eval_", "frozen-encoder probe")
    define(
        flags.DEFINE_integer,
        "eval_every_epochs",
        0,
        "Also evaluate on the test split every this many probe epochs; "
        "0 evaluates only at the end.",
    )
    require_at_least("eval_epochs", 1)
    require_at_least("eval_every_epochs", 0)


def flag_values() -> dict[str, Any]:
    """The values of every flag the entry point defined, for results.json."""
    return {name: FLAGS[name].value for name in _DEFINED if name in FLAGS}


def _sync_batchnorm() -> bool:
    if FLAGS.sync_batchnorm is not None:
        return FLAGS.sync_batchnorm
    return FLAGS.strategy in ("mirrored", "multi_worker")


def data_config(*, num_views: int = 1) -> config_lib.DataConfig:
    return config_lib.DataConfig(
        dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir,
        image_size=FLAGS.image_size,
        max_train_examples=FLAGS.max_train_examples,
        max_test_examples=FLAGS.max_test_examples,
        augment=FLAGS.augment,
        num_views=num_views,
    )


def model_config(*, with_projection: bool) -> config_lib.ModelConfig:
    if not with_projection:
        return config_lib.ModelConfig(
            encoder=FLAGS.encoder, sync_batchnorm=_sync_batchnorm()
        )
    return config_lib.ModelConfig(
        encoder=FLAGS.encoder,
        projection_head=FLAGS.projection_head,
        projection_dim=FLAGS.projection_dim,
        sync_batchnorm=_sync_batchnorm(),
    )


def optimizer_config(prefix: str = "") -> config_lib.OptimizerConfig:
    settings = {
        "optimizer": FLAGS[prefix + "optimizer"].value,
        "learning_rate": FLAGS[prefix + "learning_rate"].value,
    }
    if not prefix:
        for name in (
            "momentum",
            "nesterov",
            "weight_decay",
            "schedule",
            "warmup_epochs",
            "scale_lr_by_batch",
            "clip_global_norm",
            "lars_trust_coefficient",
            "lars_epsilon",
        ):
            settings[name] = FLAGS[name].value
    return config_lib.OptimizerConfig(**settings)


def run_config() -> config_lib.RunConfig:
    return config_lib.RunConfig(
        model_dir=FLAGS.model_dir,
        strategy=FLAGS.strategy,
        cpu_replicas=FLAGS.cpu_replicas,
        cross_device_ops=FLAGS.cross_device_ops,
        tpu=FLAGS.tpu,
        global_batch_size=FLAGS.global_batch_size,
        seed=FLAGS.seed,
        deterministic=FLAGS.deterministic,
        mixed_precision=FLAGS.mixed_precision,
        jit_compile=FLAGS.jit_compile,
        steps_per_loop=_positive("steps_per_loop"),
        checkpoint_every_steps=FLAGS.checkpoint_every_steps,
        keep_checkpoints=_positive("keep_checkpoints"),
    )


def probe_config() -> config_lib.ClassifierConfig:
    return config_lib.ClassifierConfig(
        head=FLAGS.eval_head,
        epochs=FLAGS.eval_epochs,
        augment=FLAGS.eval_augment,
        optimizer=optimizer_config("eval_"),
        eval_every_epochs=FLAGS.eval_every_epochs,
    )


def _positive(name: str) -> int:
    value = FLAGS[name].value
    if value < 1:
        raise UsageError(f"--{name}={value} is invalid; use 1 or more.")
    return value


PRESETS_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "presets"
)
PRESETS = ("keras_example", "paper_cifar10")


def define_preset_flag() -> None:
    """Defines `--preset`, which `run` expands into the preset's flagfile."""
    define(
        flags.DEFINE_enum,
        "preset",
        None,
        list(PRESETS),
        "Load a whole recipe from experiments/presets/NAME.cfg; flags after "
        "--preset override it.",
    )


def expand_presets(argv: list[str]) -> list[str]:
    """Inserts `--flagfile=PATH` right after each `--preset=NAME`.

    absl reads a flagfile in place, so flags that follow the preset on the
    command line override the preset's values. An unknown name is left for
    the enum flag to reject.
    """
    expanded = []
    for arg in argv:
        expanded.append(arg)
        if arg.startswith("--preset=") and arg[9:] in PRESETS:
            path = os.path.join(PRESETS_DIR, arg[9:] + ".cfg")
            expanded.append(f"--flagfile={path}")
    return expanded


def run(job: Callable[[], None]) -> None:
    """Runs `job` under absl; a `UsageError` exits 2 with its message only."""

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(
                f"Unexpected arguments {' '.join(argv[1:])}; every setting "
                "is a --flag."
            )
        # TensorFlow's Python logger reports every collective it builds at
        # INFO; keep its warnings and our own INFO progress lines.
        tf.get_logger().setLevel("WARNING")
        try:
            job()
        except UsageError as error:
            sys.stderr.write(f"error: {error}\n")
            sys.exit(2)
        except KeyboardInterrupt:
            sys.stderr.write(
                "Interrupted. Rerun the same command to resume from the "
                "latest checkpoint.\n"
            )
            sys.exit(130)

    app.run(main, argv=expand_presets(sys.argv))
