"""SupCon (or SimCLR, npairs) pretraining, then a frozen-encoder probe.

    python -m experiments.pretrain --strategy=mirrored --model_dir=/tmp/run1

With no other flags this is the keras.io SupCon example's setup on CIFAR-10
(ResNet50V2, global batch 265, Adam 1e-3, temperature 0.05, 50 pretraining
and 50 probe epochs) with the SupCon paper's loss on two views per image.
"""

from absl import flags

from experiments import flags as job_flags
from supcon_tf import config as config_lib
from supcon_tf.training import jobs

FLAGS = flags.FLAGS

job_flags.define_data_flags(augment_default="supcon", with_views=True)
job_flags.define_model_flags(with_projection=True)
job_flags.define_run_flags()
job_flags.define_optimizer_flags(phase="pretraining")
job_flags.define(
    flags.DEFINE_enum,
    "loss",
    "supcon",
    list(config_lib.LOSSES),
    "supcon: the SupCon paper's L_out; simclr: the same loss "
    "with each image its own class; npairs: the keras.io "
    "example's objective (one view).",
)
job_flags.define(
    flags.DEFINE_float,
    "temperature",
    0.05,
    "Softmax temperature of the contrastive loss.",
)
job_flags.define(
    flags.DEFINE_integer,
    "pretrain_epochs",
    50,
    "Epochs of contrastive pretraining.",
)
job_flags.define_probe_flags()
job_flags.define_preset_flag()
job_flags.define(
    flags.DEFINE_integer,
    "knn_every_epochs",
    0,
    "Also measure kNN test accuracy every this many pretraining epochs "
    "(it always runs at the end); 0 only at the end.",
)
job_flags.define(
    flags.DEFINE_integer,
    "knn_k",
    200,
    "Neighbours of the kNN monitor (cosine similarity, weighted votes).",
)
job_flags.define(
    flags.DEFINE_integer,
    "projector_examples",
    2000,
    "Test embeddings exported for TensorBoard's projector; 0 is off.",
)
job_flags.define(
    flags.DEFINE_integer,
    "histogram_every_steps",
    0,
    "Write weight histograms every this many steps; 0 is off.",
)
job_flags.define(
    flags.DEFINE_bool,
    "export",
    True,
    "Write MODEL_DIR/export/encoder, a SavedModel from images to "
    "L2-normalised embeddings.",
)
for _name in ("views", "projection_dim", "pretrain_epochs", "knn_k"):
    job_flags.require_at_least(_name, 1)
for _name in (
    "knn_every_epochs",
    "projector_examples",
    "histogram_every_steps",
):
    job_flags.require_at_least(_name, 0)

# List the shared flags under --help, not only under --helpfull.
flags.adopt_module_key_flags(job_flags)


def pretrain() -> None:
    config = config_lib.PretrainConfig(
        data=job_flags.data_config(num_views=FLAGS.views),
        model=job_flags.model_config(with_projection=True),
        loss=config_lib.LossConfig(
            loss=FLAGS.loss, temperature=FLAGS.temperature
        ),
        optimizer=job_flags.optimizer_config(),
        run=job_flags.run_config(),
        epochs=FLAGS.pretrain_epochs,
        probe=job_flags.probe_config(),
        monitor=config_lib.MonitorConfig(
            knn_every_epochs=FLAGS.knn_every_epochs,
            knn_k=FLAGS.knn_k,
            projector_examples=FLAGS.projector_examples,
            histogram_every_steps=FLAGS.histogram_every_steps,
            export=FLAGS.export,
        ),
    )
    results = jobs.run_pretraining(config, job_flags.flag_values())
    print(f"test_accuracy {results['test_accuracy']:.4f}")


if __name__ == "__main__":
    job_flags.run(pretrain)
