"""Trains and evaluates a classifier on a frozen, pretrained encoder.

    python -m experiments.linear_eval --model_dir=/tmp/run1

The encoder and data settings come from `model_dir/config.json`, written by
`experiments.pretrain`; results go to `--eval_dir`.
"""

import os

from absl import flags

from experiments import flags as job_flags
from supcon_tf import distribute
from supcon_tf.training import jobs

FLAGS = flags.FLAGS

job_flags.define(
    flags.DEFINE_string,
    "model_dir",
    None,
    "Directory of a run of experiments.pretrain.",
)
flags.mark_flag_as_required("model_dir")
job_flags.define(
    flags.DEFINE_string,
    "eval_dir",
    None,
    "Where the probe's checkpoints, events and results.json go; "
    "default MODEL_DIR/linear_eval, or MODEL_DIR/finetune with --finetune.",
)
job_flags.define(
    flags.DEFINE_enum,
    "strategy",
    None,
    list(distribute.STRATEGIES),
    "Override the pretraining run's strategy.",
)
job_flags.define(
    flags.DEFINE_integer,
    "cpu_replicas",
    None,
    "Override the pretraining run's logical CPU replicas.",
)
job_flags.define(
    flags.DEFINE_integer,
    "global_batch_size",
    None,
    "Override the pretraining run's global batch size.",
)
job_flags.define_probe_flags()
job_flags.define(
    flags.DEFINE_bool,
    "finetune",
    False,
    "Train the whole encoder with the new head, starting from the "
    "pretrained weights, instead of freezing it.",
)
job_flags.require_at_least("cpu_replicas", 1)
job_flags.require_at_least("global_batch_size", 1)

# List the shared flags under --help, not only under --helpfull.
flags.adopt_module_key_flags(job_flags)


def linear_eval() -> None:
    overrides = {
        name: FLAGS[name].value
        for name in ("strategy", "cpu_replicas", "global_batch_size")
        if FLAGS[name].value is not None
    }
    if "strategy" in overrides and "cpu_replicas" not in overrides:
        overrides["cpu_replicas"] = 1
    default_name = "finetune" if FLAGS.finetune else "linear_eval"
    eval_dir = FLAGS.eval_dir or os.path.join(FLAGS.model_dir, default_name)
    results = jobs.run_linear_eval(
        FLAGS.model_dir,
        job_flags.probe_config(),
        output_dir=eval_dir,
        run_overrides=overrides,
        flag_values=job_flags.flag_values(),
        finetune=FLAGS.finetune,
    )
    print(f"test_accuracy {results['test_accuracy']:.4f}")


if __name__ == "__main__":
    job_flags.run(linear_eval)
