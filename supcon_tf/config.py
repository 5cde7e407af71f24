"""Frozen configuration objects: one per concern, grouped per job.

The entry points in `experiments/` turn flags into these; the library reads
nothing else. Every default reproduces the keras.io SupCon example's setup
(ResNet50V2, batch 265, Adam 1e-3, temperature 0.05, 50 + 50 epochs) with
the SupCon paper's loss on two augmented views.
"""

import dataclasses
import json
from typing import Any

LOSSES = ("supcon", "simclr", "npairs")
OPTIMIZERS = ("adam", "sgd")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how training views are made."""

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
    """Optimizer of one training phase."""

    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """The classifier phase: frozen-encoder probe or end-to-end baseline."""

    head: str = "mlp"
    epochs: int = 50
    augment: str = "keras_example"
    optimizer: OptimizerConfig = OptimizerConfig()
    eval_every_epochs: int = 0


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where and how a job runs."""

    model_dir: str = "/tmp/supcon_tf"
    strategy: str = "default"
    cpu_replicas: int = 1
    cross_device_ops: str | None = None
    tpu: str | None = None
    global_batch_size: int = 265
    seed: int = 0
    deterministic: bool = False
    steps_per_loop: int = 10
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 3


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


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """Cross-entropy training of encoder and classifier end to end."""

    data: DataConfig = DataConfig(augment="keras_example", num_views=1)
    model: ModelConfig = ModelConfig()
    run: RunConfig = RunConfig()
    classifier: ClassifierConfig = ClassifierConfig()


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def pretrain_config_from_dict(values: dict[str, Any]) -> PretrainConfig:
    """Rebuilds a `PretrainConfig` from `to_dict` output (e.g. JSON)."""
    probe = dict(values["probe"])
    probe["optimizer"] = OptimizerConfig(**probe["optimizer"])
    return PretrainConfig(
        data=DataConfig(**values["data"]),
        model=ModelConfig(**values["model"]),
        loss=LossConfig(**values["loss"]),
        optimizer=OptimizerConfig(**values["optimizer"]),
        run=RunConfig(**values["run"]),
        epochs=values["epochs"],
        probe=ClassifierConfig(**probe),
    )


def dumps(config: Any) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)
