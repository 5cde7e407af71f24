"""Frozen configuration objects: one per concern, grouped per job.

The entry points in `experiments/` turn flags into these; the library reads
nothing else. Every default reproduces the keras.io SupCon example's setup
(ResNet50V2, batch 265, Adam 1e-3, temperature 0.05, 50 + 50 epochs) with
the SupCon paper's loss on two augmented views.
"""

import dataclasses
import json
import math
from typing import Any

from supcon_tf.errors import UsageError

LOSSES = ("supcon", "simclr", "npairs")
OPTIMIZERS = ("adam", "sgd", "lars")
SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data source and the augmentation that makes training views."""

    dataset: str = "cifar10"
    data_dir: str | None = None
    image_size: int | None = None
    max_train_examples: int | None = None
    max_test_examples: int | None = None
    augment: str = "supcon"
    num_views: int = 2


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Encoder and heads; these fields fix the checkpoint's variables."""

    encoder: str = "resnet50v2"
    projection_head: str = "keras_example"
    projection_dim: int = 128
    sync_batchnorm: bool = False


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The contrastive objective."""

    loss: str = "supcon"
    temperature: float = 0.05


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule of one training phase."""

    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    scale_lr_by_batch: bool = False
    clip_global_norm: float = 0.0
    lars_trust_coefficient: float = 0.001
    lars_epsilon: float = 0.0


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """The classifier phase: frozen-encoder probe or end-to-end baseline."""

    head: str = "mlp"
    epochs: int = 50
    augment: str = "none"
    optimizer: OptimizerConfig = OptimizerConfig()
    eval_every_epochs: int = 0


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Output directory, strategy, batch size, seed and logging of a job."""

    model_dir: str = "/tmp/supcon_tf"
    strategy: str = "default"
    cpu_replicas: int = 1
    cross_device_ops: str | None = None
    tpu: str | None = None
    global_batch_size: int = 265
    seed: int = 0
    deterministic: bool = False
    mixed_precision: str | None = None
    jit_compile: bool = False
    steps_per_loop: int = 10
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 3


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    """Reports that pretraining writes besides its loss."""

    knn_every_epochs: int = 0
    knn_k: int = 200
    projector_examples: int = 2000
    histogram_every_steps: int = 0
    export: bool = True


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """SupCon or SimCLR pretraining followed by a frozen-encoder probe."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    run: RunConfig = RunConfig()
    epochs: int = 50
    probe: ClassifierConfig = ClassifierConfig()
    monitor: MonitorConfig = MonitorConfig()


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """Cross-entropy training of encoder and classifier end to end."""

    data: DataConfig = DataConfig(augment="keras_example", num_views=1)
    model: ModelConfig = ModelConfig()
    run: RunConfig = RunConfig()
    classifier: ClassifierConfig = ClassifierConfig()


def classifier_config_from_dict(values: dict[str, Any]) -> ClassifierConfig:
    values = dict(values)
    values["optimizer"] = OptimizerConfig(**values["optimizer"])
    return ClassifierConfig(**values)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def pretrain_config_from_dict(values: dict[str, Any]) -> PretrainConfig:
    """Rebuilds a `PretrainConfig` from `to_dict` output (e.g. JSON)."""
    return PretrainConfig(
        data=DataConfig(**values["data"]),
        model=ModelConfig(**values["model"]),
        loss=LossConfig(**values["loss"]),
        optimizer=OptimizerConfig(**values["optimizer"]),
        run=RunConfig(**values["run"]),
        epochs=values["epochs"],
        probe=classifier_config_from_dict(values["probe"]),
        monitor=MonitorConfig(**values.get("monitor", {})),
    )


def dumps(config: Any) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)


def _check_positive(value: float, flag: str, example: str) -> None:
    if not math.isfinite(value) or value <= 0:
        raise UsageError(
            f"{flag}={value} is invalid; use a positive number such as "
            f"{example}."
        )


def _check_at_least(value: int, minimum: int, flag: str) -> None:
    if value < minimum:
        raise UsageError(f"{flag}={value} is invalid; use {minimum} or more.")


def validate_optimizer(config: OptimizerConfig, prefix: str = "") -> None:
    if config.optimizer not in OPTIMIZERS:
        raise UsageError(
            f"--{prefix}optimizer={config.optimizer!r} is invalid; choose "
            f"one of {', '.join(OPTIMIZERS)}."
        )
    _check_positive(config.learning_rate, f"--{prefix}learning_rate", "1e-3")
    if not 0.0 <= config.momentum < 1.0:
        raise UsageError(
            f"--momentum={config.momentum} is invalid; use a value in "
            "[0, 1), such as 0.9."
        )
    if config.nesterov and config.optimizer == "adam":
        raise UsageError(
            "--nesterov applies to sgd and lars, not adam; drop it or set "
            "--optimizer=sgd."
        )
    if config.schedule not in SCHEDULES:
        raise UsageError(
            f"--{prefix}schedule={config.schedule!r} is invalid; choose one "
            f"of {', '.join(SCHEDULES)}."
        )
    for name in (
        "weight_decay",
        "warmup_epochs",
        "clip_global_norm",
        "lars_trust_coefficient",
        "lars_epsilon",
    ):
        value = getattr(config, name)
        if not math.isfinite(value) or value < 0:
            raise UsageError(
                f"--{prefix}{name}={value} is invalid; use 0 (off) or a "
                "positive number."
            )


def validate_run(run: RunConfig, model: ModelConfig) -> None:
    """Rejects run settings that cannot work together."""
    if run.mixed_precision not in (None, "float16", "bfloat16"):
        raise UsageError(
            f"--mixed_precision={run.mixed_precision!r} is invalid; choose "
            "float16 or bfloat16, or leave it unset."
        )
    if run.jit_compile and (
        run.strategy not in ("default", "one_device") or model.sync_batchnorm
    ):
        # TODO: XLA inside strategy.run fails on the cross-replica
        # all-reduces of sync batch norm and the loss, because they call
        # merge_call in a nested tf.function. Compile the whole replica
        # step instead.
        raise UsageError(
            "--jit_compile works with one replica only: use "
            "--strategy=default or one_device with --nosync_batchnorm."
        )


def validate_classifier(
    config: ClassifierConfig, *, epochs_flag: str, prefix: str
) -> None:
    _check_at_least(config.epochs, 1, epochs_flag)
    _check_at_least(config.eval_every_epochs, 0, "--eval_every_epochs")
    validate_optimizer(config.optimizer, prefix)


def validate_pretrain(config: PretrainConfig) -> None:
    """Rejects settings that are invalid or would train nothing useful."""
    loss, views = config.loss.loss, config.data.num_views
    _check_at_least(views, 1, "--views")
    if loss not in LOSSES:
        raise UsageError(
            f"--loss={loss!r} is invalid; choose one of {', '.join(LOSSES)}."
        )
    if loss == "npairs" and views != 1:
        raise UsageError(
            f"--loss=npairs compares one view per image, but --views={views};"
            " set --views=1 (the keras.io example also sets "
            "--augment=keras_example)."
        )
    if loss == "simclr" and views < 2:
        raise UsageError(
            "--loss=simclr needs two or more views per image (its only "
            f"positives are other views), but --views={views}; use --views=2."
        )
    _check_positive(config.loss.temperature, "--temperature", "0.05 or 0.1")
    _check_at_least(config.epochs, 1, "--pretrain_epochs")
    validate_optimizer(config.optimizer)
    if config.optimizer.warmup_epochs > config.epochs:
        raise UsageError(
            f"--warmup_epochs={config.optimizer.warmup_epochs} is longer than "
            f"--pretrain_epochs={config.epochs}; shorten the warm-up."
        )
    validate_run(config.run, config.model)
    monitor = config.monitor
    _check_at_least(monitor.knn_every_epochs, 0, "--knn_every_epochs")
    _check_at_least(monitor.knn_k, 1, "--knn_k")
    _check_at_least(monitor.projector_examples, 0, "--projector_examples")
    _check_at_least(monitor.histogram_every_steps, 0, "--histogram_every_steps")
    validate_classifier(
        config.probe, epochs_flag="--eval_epochs", prefix="eval_"
    )


def validate_baseline(config: BaselineConfig) -> None:
    validate_classifier(config.classifier, epochs_flag="--epochs", prefix="")
    validate_run(config.run, config.model)
