"""The three jobs: pretrain then probe, probe alone, and the baseline."""

import json
import os
from typing import Any

import keras
import tensorflow as tf
from absl import logging

from supcon_tf import config as config_lib
from supcon_tf import distribute, models, optim
from supcon_tf.config import (
    BaselineConfig,
    ClassifierConfig,
    DataConfig,
    ModelConfig,
    PretrainConfig,
    RunConfig,
)
from supcon_tf.data import pipeline, sources
from supcon_tf.errors import UsageError
from supcon_tf.training import steps
from supcon_tf.training.checkpoints import PhaseCheckpoint
from supcon_tf.training.classifier import (
    RunContext,
    checkpoint_path,
    train_classifier,
)
from supcon_tf.training.loop import Phase, PhaseStats, run_phase
from supcon_tf.training.results import write_results
from supcon_tf.training.summaries import SummaryWriters

CONFIG_FILE = "config.json"
# Fields that fix the variables in the checkpoint or the data they saw; a
# resumed run must keep them.
_RESUME_KEYS = ("model", "data.dataset", "data.image_size")


def _start(run: RunConfig, data: DataConfig, log_dir: str) -> RunContext:
    """Creates the strategy first (it must precede other TF work)."""
    strategy = distribute.make_strategy(
        run.strategy,
        cpu_replicas=run.cpu_replicas,
        cross_device_ops=run.cross_device_ops,
        tpu=run.tpu,
    )
    distribute.log_strategy(strategy)
    per_replica = distribute.check_global_batch_size(
        run.global_batch_size, strategy.num_replicas_in_sync
    )
    keras.utils.set_random_seed(run.seed)
    if run.deterministic:
        tf.config.experimental.enable_op_determinism()
    splits = sources.load_dataset(
        data.dataset,
        data.data_dir,
        image_size=data.image_size,
        max_train_examples=data.max_train_examples,
        max_test_examples=data.max_test_examples,
        seed=run.seed,
    )
    logging.info(
        "Data %s: %d train and %d test examples, %d classes, images %s; "
        "global batch %d, per-replica batch %d.",
        data.dataset,
        len(splits.train.labels),
        len(splits.test.labels),
        splits.num_classes,
        splits.train.images.shape[1:],
        run.global_batch_size,
        per_replica,
    )
    chief = distribute.is_chief(strategy)
    return RunContext(
        strategy=strategy,
        chief=chief,
        splits=splits,
        global_batch_size=run.global_batch_size,
        seed=run.seed,
        steps_per_loop=run.steps_per_loop,
        checkpoint_every_steps=run.checkpoint_every_steps,
        keep_checkpoints=run.keep_checkpoints,
        writers=SummaryWriters(log_dir, chief=chief),
    )


def _build_encoder(context: RunContext, model: ModelConfig) -> keras.Model:
    mean, std = sources.channel_stats(context.splits.train)
    with context.strategy.scope():
        encoder = models.build_encoder(
            model.encoder,
            image_shape=context.splits.train.images.shape[1:],
            channel_mean=mean,
            channel_std=std,
            sync_batchnorm=model.sync_batchnorm,
        )
    logging.info(
        "Encoder %s: %d parameters, %d-d embeddings.",
        model.encoder,
        encoder.count_params(),
        encoder.output_shape[-1],
    )
    return encoder


def _lookup(values: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        values = values[key]
    return values


def check_and_save_config(model_dir: str, config: PretrainConfig) -> None:
    """Saves `config.json`, or checks a resumed run against the saved one."""
    path = os.path.join(model_dir, CONFIG_FILE)
    current = config_lib.to_dict(config)
    if os.path.exists(path):
        with open(path) as stream:
            saved = json.load(stream)
        for key in _RESUME_KEYS:
            if _lookup(saved, key) != _lookup(current, key):
                raise UsageError(
                    f"--model_dir={model_dir} contains a run with {key}="
                    f"{_lookup(saved, key)}, but this command asks for "
                    f"{_lookup(current, key)}. Use a new --model_dir, or "
                    "repeat the original settings to resume that run."
                )
    os.makedirs(model_dir, exist_ok=True)
    with open(path, "w") as stream:
        stream.write(config_lib.dumps(config) + "\n")


def load_saved_config(model_dir: str) -> PretrainConfig:
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise UsageError(
            f"No {CONFIG_FILE} in --model_dir={model_dir}; point it at the "
            "directory of a run of `python -m experiments.pretrain`."
        )
    with open(path) as stream:
        return config_lib.pretrain_config_from_dict(json.load(stream))


def validate_pretrain_config(config: PretrainConfig) -> None:
    """Rejects flag combinations that would train something meaningless."""
    loss, views = config.loss.loss, config.data.num_views
    if views < 1:
        raise UsageError(f"--views={views} is invalid; use 1 or more.")
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
    if config.epochs < 1 or config.probe.epochs < 1:
        raise UsageError(
            f"--pretrain_epochs={config.epochs} and --eval_epochs="
            f"{config.probe.epochs} must both be 1 or more."
        )


def _pretrain_phase(context, config, encoder) -> tuple[Phase, Any]:
    strategy = context.strategy
    with strategy.scope():
        head = models.build_projection_head(
            config.model.projection_head,
            input_dim=encoder.output_shape[-1],
            output_dim=config.model.projection_dim,
        )
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    variables = encoder.trainable_variables + head.trainable_variables
    optimizer = optim.make_optimizer(config.optimizer, strategy, variables)
    checkpoint = tf.train.Checkpoint(
        encoder=encoder, projection_head=head, optimizer=optimizer, step=step
    )
    replica_step = steps.make_pretrain_step(
        encoder,
        head,
        optimizer,
        steps.make_contrastive_loss_fn(config.loss),
        config.run.global_batch_size,
    )
    splits = context.splits
    steps_per_epoch = pipeline.steps_per_epoch(
        len(splits.train.labels), config.run.global_batch_size
    )

    def dataset_fn_for_step(start_step: int):
        return pipeline.make_train_dataset_fn(
            splits.train,
            global_batch_size=config.run.global_batch_size,
            num_views=config.data.num_views,
            augment=config.data.augment,
            seed=config.run.seed,
            num_epochs=config.epochs,
            start_step=start_step,
        )

    phase = Phase(
        name="pretrain",
        strategy=strategy,
        train_loop=steps.make_train_loop(strategy, replica_step),
        dataset_fn_for_step=dataset_fn_for_step,
        step=step,
        checkpoint=PhaseCheckpoint(
            checkpoint_path(config.run.model_dir, "pretrain"),
            checkpoint,
            chief=context.chief,
            max_to_keep=config.run.keep_checkpoints,
        ),
        writers=context.writers,
        total_steps=steps_per_epoch * config.epochs,
        steps_per_epoch=steps_per_epoch,
        examples_per_step=config.run.global_batch_size,
        tags={
            "loss": f"loss/{config.loss.loss}",
            "lr": "lr",
            "steps_per_sec": "perf/steps_per_sec",
            "examples_per_sec": "perf/examples_per_sec",
        },
        learning_rate=lambda: optim.current_learning_rate(optimizer),
        steps_per_loop=config.run.steps_per_loop,
        checkpoint_every_steps=config.run.checkpoint_every_steps,
    )
    return phase, head


def _phase_results(prefix: str, stats: PhaseStats) -> dict[str, Any]:
    return {
        f"{prefix}_examples_per_second": stats.examples_per_second,
        f"{prefix}_first_call_seconds": stats.first_call_seconds,
        f"{prefix}_wall_seconds": stats.wall_seconds,
        f"{prefix}_steps": stats.end_step,
        f"{prefix}_final_metrics": stats.last_metrics,
    }


def _test_results(metrics: dict[str, float]) -> dict[str, Any]:
    return {
        "test_accuracy": metrics["top1"],
        "test_top5_accuracy": metrics["top5"],
        "test_loss": metrics["loss"],
        "test_examples": int(metrics["count"]),
    }


def run_pretraining(
    config: PretrainConfig, flag_values: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Pretrains the encoder, trains the frozen-encoder probe, evaluates.

    A rerun with the same `model_dir` resumes each phase from its latest
    checkpoint. Writes `model_dir/results.json` and returns its content.
    """
    validate_pretrain_config(config)
    model_dir = config.run.model_dir
    context = _start(config.run, config.data, model_dir)
    if context.chief:
        check_and_save_config(model_dir, config)
    encoder = _build_encoder(context, config.model)

    phase, _ = _pretrain_phase(context, config, encoder)
    pretrain_stats = run_phase(phase)
    if pretrain_stats.examples_per_second:
        logging.info(
            "pretrain: %.1f examples/s after the first call.",
            pretrain_stats.examples_per_second,
        )
    probe_stats, metrics = train_classifier(
        context,
        encoder,
        config.probe,
        train_encoder=False,
        checkpoint_dir=checkpoint_path(model_dir, "probe"),
        name="probe",
    )
    results = {
        "job": "pretrain",
        **_test_results(metrics),
        **_phase_results("pretrain", pretrain_stats),
        **_phase_results("probe", probe_stats),
        "config": config_lib.to_dict(config),
        "flags": flag_values or {},
    }
    _finish(context, model_dir, results)
    return results


def run_linear_eval(
    model_dir: str,
    probe: ClassifierConfig,
    *,
    output_dir: str,
    run_overrides: dict[str, Any] | None = None,
    flag_values: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Trains and evaluates a probe on the latest pretraining checkpoint.

    The data and encoder settings come from `model_dir/config.json`;
    `run_overrides` replaces fields of its run settings (strategy, batch).
    Results, summaries and probe checkpoints go to `output_dir`.
    """
    saved = load_saved_config(model_dir)
    run = config_lib.dataclasses.replace(saved.run, **(run_overrides or {}))
    context = _start(run, saved.data, output_dir)
    encoder = _build_encoder(context, saved.model)
    pretrain_dir = checkpoint_path(model_dir, "pretrain")
    latest = tf.train.latest_checkpoint(pretrain_dir)
    if latest is None:
        raise UsageError(
            f"No pretraining checkpoint in {pretrain_dir}; run "
            "`python -m experiments.pretrain` with this --model_dir first."
        )
    tf.train.Checkpoint(encoder=encoder).restore(latest).expect_partial()
    logging.info("Restored the encoder from %s.", latest)
    stats, metrics = train_classifier(
        context,
        encoder,
        probe,
        train_encoder=False,
        checkpoint_dir=checkpoint_path(output_dir, "probe"),
        name="probe",
    )
    results = {
        "job": "linear_eval",
        "pretrain_checkpoint": latest,
        **_test_results(metrics),
        **_phase_results("probe", stats),
        "probe_config": config_lib.to_dict(probe),
        "flags": flag_values or {},
    }
    _finish(context, output_dir, results)
    return results


def run_baseline(
    config: BaselineConfig, flag_values: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Trains encoder and classifier end to end with cross-entropy."""
    model_dir = config.run.model_dir
    context = _start(config.run, config.data, model_dir)
    encoder = _build_encoder(context, config.model)
    stats, metrics = train_classifier(
        context,
        encoder,
        config.classifier,
        train_encoder=True,
        checkpoint_dir=checkpoint_path(model_dir, "baseline"),
        name="baseline",
    )
    results = {
        "job": "baseline",
        **_test_results(metrics),
        **_phase_results("baseline", stats),
        "config": config_lib.to_dict(config),
        "flags": flag_values or {},
    }
    _finish(context, model_dir, results)
    return results


def _finish(context: RunContext, output_dir: str, results: dict) -> None:
    context.writers.close()
    if context.chief:
        path = os.path.join(output_dir, "results.json")
        write_results(path, results)
        logging.info("Wrote %s.", path)
