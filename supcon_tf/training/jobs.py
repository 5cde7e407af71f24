"""The three jobs: pretrain then probe, probe alone, and the baseline.

Each job validates its settings, creates the strategy (before any other
TensorFlow work), loads the data and checks the output directory before it
writes anything there, so a rejected command leaves an existing run as it
was.
"""

import dataclasses
import os
import time
from typing import Any

import keras
import tensorflow as tf
from absl import logging

from supcon_tf import config as config_lib
from supcon_tf import distribute, models, precision
from supcon_tf.config import (
    BaselineConfig,
    ClassifierConfig,
    DataConfig,
    ModelConfig,
    PretrainConfig,
    RunConfig,
)
from supcon_tf.data import sources
from supcon_tf.errors import UsageError
from supcon_tf.training import monitor, run_dir
from supcon_tf.training.classifier import (
    RunContext,
    checkpoint_path,
    train_classifier,
)
from supcon_tf.training.loop import PhaseStats, run_phase
from supcon_tf.training.pretrain import make_pretrain_phase
from supcon_tf.training.results import library_versions, write_results
from supcon_tf.training.summaries import SummaryWriters

# Settings that the checkpoints, or the data order they were trained on,
# depend on; a rerun must repeat them to resume. Epochs, logging and the
# strategy may change (N replicas train like one).
_TRAINING_KEYS = ("model", "data", "run.seed", "run.global_batch_size")
_PRETRAIN_KEYS = _TRAINING_KEYS + (
    "loss",
    "probe.head",
    "probe.augment",
    "probe.optimizer",
)
_BASELINE_KEYS = _TRAINING_KEYS + (
    "classifier.head",
    "classifier.augment",
    "classifier.optimizer",
)
_LINEAR_EVAL_KEYS = (
    "pretrain_model_dir",
    "finetune",
    "probe.head",
    "probe.augment",
    "probe.optimizer",
    "run.seed",
    "run.global_batch_size",
)


def _start(run: RunConfig, data: DataConfig) -> RunContext:
    """Creates the strategy, then loads the data; writes nothing."""
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
    precision.set_policy(run.mixed_precision)
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
    return RunContext(
        strategy=strategy,
        chief=distribute.is_chief(strategy),
        splits=splits,
        global_batch_size=run.global_batch_size,
        seed=run.seed,
        steps_per_loop=run.steps_per_loop,
        checkpoint_every_steps=run.checkpoint_every_steps,
        keep_checkpoints=run.keep_checkpoints,
        writers=None,
        mixed_precision=run.mixed_precision,
        jit_compile=run.jit_compile,
    )


def _claim_directory(
    context: RunContext,
    directory: str,
    job: str,
    settings: dict[str, Any],
    keys: tuple[str, ...],
    flag: str = "--model_dir",
) -> dict[str, Any]:
    """Checks and saves config.json, then opens the summary writers.

    Returns:
      The results of an earlier attempt in `directory`, or {}.
    """
    previous = {}
    if context.chief:
        run_dir.check_and_save_config(directory, job, settings, keys, flag)
        previous = run_dir.load_previous_results(directory)
    context.writers = SummaryWriters(directory, chief=context.chief)
    return previous


def _begin(job: str, config, keys: tuple[str, ...]):
    """Starts a pretrain or baseline job up to its encoder.

    Returns:
      The library versions, the run context, the results of an earlier
      attempt in `config.run.model_dir` ({} if none) and the encoder.
    """
    versions = library_versions()
    context = _start(config.run, config.data)
    previous = _claim_directory(
        context,
        config.run.model_dir,
        job,
        config_lib.to_dict(config),
        keys,
    )
    return versions, context, previous, _build_encoder(context, config.model)


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


def _phase_results(
    prefix: str, stats: PhaseStats, previous: dict[str, Any]
) -> dict[str, Any]:
    """Returns the phase's numbers for results.json.

    A rerun that found the phase finished trains nothing, so it keeps the
    speed and time that the attempt which trained reported.
    """
    results = {
        f"{prefix}_examples_per_second": stats.examples_per_second,
        f"{prefix}_first_call_seconds": stats.first_call_seconds,
        f"{prefix}_rate_includes_tracing": stats.rate_includes_tracing,
        f"{prefix}_wall_seconds": stats.wall_seconds,
        f"{prefix}_steps": stats.end_step,
        f"{prefix}_final_metrics": stats.last_metrics,
    }
    if stats.end_step == stats.start_step:
        for key in results:
            if key in previous and key != f"{prefix}_steps":
                results[key] = previous[key]
    return results


def _test_results(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {
        "test_accuracy": metrics["top1"],
        "test_top5_accuracy": metrics["top5"],
        "test_loss": metrics["loss"],
        "test_examples": int(metrics["count"]),
        "test_per_class_accuracy": metrics["per_class_accuracy"],
        "test_confusion_matrix": metrics["confusion_matrix"],
        f"{prefix}_mode": metrics["mode"],
        f"{prefix}_feature_seconds": metrics["feature_seconds"],
    }


def run_pretraining(
    config: PretrainConfig, flag_values: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Pretrains the encoder, trains the frozen-encoder probe, evaluates.

    A rerun with the same `model_dir` resumes each phase from its latest
    checkpoint. Writes `model_dir/results.json` and returns its content.
    """
    config_lib.validate_pretrain(config)
    model_dir = config.run.model_dir
    versions, context, previous, encoder = _begin(
        "pretrain", config, _PRETRAIN_KEYS
    )
    monitor_config = config.monitor

    phase = make_pretrain_phase(context, config, encoder)
    phase.on_epoch_end = _knn_every(context, encoder, monitor_config, phase)
    phase.on_call_end = monitor.histogram_writer(
        context, [encoder], monitor_config.histogram_every_steps
    )
    if phase.checkpoint.latest() is None:
        monitor.write_view_pairs(
            context, config.data.augment, config.data.num_views, config.run.seed
        )
    pretrain_stats = run_phase(phase)
    if pretrain_stats.examples_per_second:
        logging.info(
            "pretrain: %.1f examples/s %s.",
            pretrain_stats.examples_per_second,
            "including tracing (one tf.function call ran every step)"
            if pretrain_stats.rate_includes_tracing
            else "after the first call",
        )

    started = time.perf_counter()
    caches = monitor.extract_train_and_test(context, encoder)
    feature_seconds = time.perf_counter() - started
    knn = monitor.knn_accuracy(
        context, encoder, monitor_config, pretrain_stats.end_step, caches
    )
    probe_stats, metrics = train_classifier(
        context,
        encoder,
        config.probe,
        train_encoder=False,
        checkpoint_dir=_probe_dir(model_dir, "probe", pretrain_stats.end_step),
        name="probe",
        features=caches,
        feature_seconds=feature_seconds,
    )
    if monitor_config.export:
        monitor.export_encoder(
            context, encoder, os.path.join(model_dir, "export", "encoder")
        )
    monitor.write_projector(
        context,
        caches[1],
        os.path.join(model_dir, "projector"),
        monitor_config.projector_examples,
    )
    results = {
        "job": "pretrain",
        **_test_results(metrics, "probe"),
        **_phase_results("pretrain", pretrain_stats, previous),
        **_phase_results("probe", probe_stats, previous),
        "knn_top1": knn["top1"],
        "knn_top5": knn["top5"],
        "config": config_lib.to_dict(config),
        "flags": flag_values or {},
    }
    monitor.write_hparams(context, model_dir, config, results)
    _finish(context, model_dir, results, versions)
    return results


def _probe_dir(directory: str, name: str, pretrain_step: int) -> str:
    """Checkpoints of a probe trained on the encoder at `pretrain_step`.

    A probe belongs to one encoder. Keying its checkpoints by the
    pretraining step means that a rerun after more pretraining trains a new
    head, while a rerun on the same encoder resumes the old one.
    """
    return checkpoint_path(directory, f"{name}_at_step_{pretrain_step}")


def _checkpoint_step(path: str) -> int:
    """Returns the step number of a checkpoint path such as `.../ckpt-45`."""
    return int(path.rsplit("-", 1)[1])


def _knn_every(context, encoder, monitor_config, phase):
    """Returns the epoch-end callback that runs the kNN monitor."""
    every = monitor_config.knn_every_epochs

    def on_epoch_end(epoch: int) -> None:
        step = epoch * phase.steps_per_epoch
        # The end of pretraining runs the monitor anyway.
        if every and epoch % every == 0 and step < phase.total_steps:
            monitor.knn_accuracy(context, encoder, monitor_config, step)

    return on_epoch_end


def run_linear_eval(
    model_dir: str,
    probe: ClassifierConfig,
    *,
    output_dir: str,
    run_overrides: dict[str, Any] | None = None,
    flag_values: dict[str, Any] | None = None,
    finetune: bool = False,
) -> dict[str, Any]:
    """Trains and evaluates a probe on the latest pretraining checkpoint.

    With `finetune`, the encoder trains too, starting from the checkpoint.

    The data and encoder settings come from `model_dir/config.json`;
    `run_overrides` replaces fields of its run settings (strategy, batch).
    Results, summaries and probe checkpoints go to `output_dir`, which a
    rerun with other probe settings may not reuse.
    """
    config_lib.validate_classifier(
        probe, epochs_flag="--eval_epochs", prefix="eval_"
    )
    versions = library_versions()
    saved = config_lib.pretrain_config_from_dict(
        run_dir.load_config(model_dir, "pretrain")
    )
    pretrain_dir = checkpoint_path(model_dir, "pretrain")
    latest = tf.train.latest_checkpoint(pretrain_dir)
    if latest is None:
        raise UsageError(
            f"No pretraining checkpoint in {pretrain_dir}; run "
            "`python -m experiments.pretrain` with this --model_dir first."
        )
    run = dataclasses.replace(saved.run, **(run_overrides or {}))
    context = _start(run, saved.data)
    settings = {
        "pretrain_model_dir": os.path.abspath(model_dir),
        "finetune": finetune,
        "probe": config_lib.to_dict(probe),
        "run": config_lib.to_dict(run),
    }
    previous = _claim_directory(
        context,
        output_dir,
        "linear_eval",
        settings,
        _LINEAR_EVAL_KEYS,
        flag="--eval_dir",
    )
    encoder = _build_encoder(context, saved.model)
    tf.train.Checkpoint(encoder=encoder).restore(latest).expect_partial()
    logging.info("Restored the encoder from %s.", latest)
    name = "finetune" if finetune else "probe"
    stats, metrics = train_classifier(
        context,
        encoder,
        probe,
        train_encoder=finetune,
        checkpoint_dir=_probe_dir(output_dir, name, _checkpoint_step(latest)),
        name=name,
    )
    results = {
        "job": "linear_eval",
        "finetune": finetune,
        "pretrain_checkpoint": latest,
        **_test_results(metrics, name),
        **_phase_results(name, stats, previous),
        "probe_config": config_lib.to_dict(probe),
        "flags": flag_values or {},
    }
    _finish(context, output_dir, results, versions)
    return results


def run_baseline(
    config: BaselineConfig, flag_values: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Trains encoder and classifier end to end with cross-entropy."""
    config_lib.validate_baseline(config)
    model_dir = config.run.model_dir
    versions, context, previous, encoder = _begin(
        "baseline", config, _BASELINE_KEYS
    )
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
        **_test_results(metrics, "baseline"),
        **_phase_results("baseline", stats, previous),
        "config": config_lib.to_dict(config),
        "flags": flag_values or {},
    }
    _finish(context, model_dir, results, versions)
    return results


def _finish(
    context: RunContext,
    output_dir: str,
    results: dict[str, Any],
    versions: dict[str, str],
) -> None:
    context.writers.close()
    if context.chief:
        path = os.path.join(output_dir, run_dir.RESULTS_FILE)
        write_results(path, results, versions)
        logging.info("Wrote %s.", path)
