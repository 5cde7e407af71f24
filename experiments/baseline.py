"""Cross-entropy training of the encoder and classifier end to end.

    python -m experiments.baseline --strategy=mirrored --model_dir=/tmp/ce1

This is the keras.io SupCon example's first experiment: the same encoder
and classifier head trained together, with the example's augmentation.
"""

from absl import flags

from experiments import flags as job_flags
from supcon_tf import config as config_lib
from supcon_tf import models
from supcon_tf.training import jobs

FLAGS = flags.FLAGS

job_flags.define_data_flags(augment_default="keras_example", with_views=False)
job_flags.define_model_flags(with_projection=False)
job_flags.define_run_flags()
job_flags.define_optimizer_flags(phase="end-to-end training")
job_flags.define(flags.DEFINE_integer, "epochs", 50, "Training epochs.")
job_flags.require_at_least("epochs", 1)
job_flags.define(
    flags.DEFINE_enum,
    "classifier_head",
    "mlp",
    list(models.CLASSIFIER_HEADS),
    "mlp: the keras.io example's classifier; linear: one Dense.",
)

# List the shared flags under --help, not only under --helpfull.
flags.adopt_module_key_flags(job_flags)


def baseline() -> None:
    config = config_lib.BaselineConfig(
        data=job_flags.data_config(),
        model=job_flags.model_config(with_projection=False),
        run=job_flags.run_config(),
        classifier=config_lib.ClassifierConfig(
            head=FLAGS.classifier_head,
            epochs=FLAGS.epochs,
            augment=FLAGS.augment,
            optimizer=job_flags.optimizer_config(),
        ),
    )
    results = jobs.run_baseline(config, job_flags.flag_values())
    print(f"test_accuracy {results['test_accuracy']:.4f}")


if __name__ == "__main__":
    job_flags.run(baseline)
