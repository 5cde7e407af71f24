"""The keras.io example's two experiments side by side, on one budget.

    python -m experiments.compare --model_dir=/tmp/compare --strategy=mirrored

Runs `experiments.baseline` (cross-entropy end to end) and
`experiments.pretrain` (SupCon, then the frozen-encoder probe) one after
the other as subprocesses with the same data, encoder, batch and
strategy, then writes MODEL_DIR/compare.md (a Markdown table of test
accuracy and time) and MODEL_DIR/compare.json. Each run lives in its own
sub-directory, so a rerun resumes both.
"""

import json
import os
import subprocess
import sys
import time

from absl import flags

from experiments import flags as job_flags

FLAGS = flags.FLAGS

flags.DEFINE_string("model_dir", None, "Root directory of both runs.")
flags.mark_flag_as_required("model_dir")
flags.DEFINE_integer("baseline_epochs", 50, "Epochs of the baseline.")
flags.DEFINE_integer("pretrain_epochs", 50, "SupCon pretraining epochs.")
flags.DEFINE_integer("eval_epochs", 50, "Epochs of the frozen-encoder probe.")
flags.DEFINE_enum(
    "loss",
    "supcon",
    ["supcon", "simclr", "npairs"],
    "Contrastive loss of the second experiment.",
)
flags.DEFINE_integer("views", 2, "Views per image for the contrastive run.")
flags.DEFINE_multi_string(
    "shared",
    [],
    "A flag passed to both runs, e.g. --shared=--encoder=resnet18_cifar; "
    "repeat it for several.",
)
for _name in ("baseline_epochs", "pretrain_epochs", "eval_epochs", "views"):
    job_flags.require_at_least(_name, 1)

_FORWARDED = (
    "dataset",
    "data_dir",
    "encoder",
    "global_batch_size",
    "strategy",
    "cpu_replicas",
    "max_train_examples",
    "max_test_examples",
    "seed",
    "mixed_precision",
)
for _name, _default, _help in [
    ("dataset", "cifar10", "Data set of both runs."),
    ("data_dir", None, "Data directory of both runs."),
    ("encoder", "resnet50v2", "Encoder of both runs."),
    ("global_batch_size", "265", "Global batch size of both runs."),
    ("strategy", "default", "Strategy of both runs."),
    ("cpu_replicas", None, "Logical CPU replicas of both runs."),
    ("max_train_examples", None, "Training subset of both runs."),
    ("max_test_examples", None, "Test subset of both runs."),
    ("seed", "0", "Seed of both runs."),
    ("mixed_precision", None, "Mixed precision of both runs."),
]:
    flags.DEFINE_string(_name, _default, _help)


def _common_args() -> list[str]:
    args = [
        f"--{name}={FLAGS[name].value}"
        for name in _FORWARDED
        if FLAGS[name].value is not None
    ]
    return args + list(FLAGS.shared)


def _run(module: str, args: list[str], model_dir: str) -> dict:
    command = [
        sys.executable,
        "-m",
        f"experiments.{module}",
        f"--model_dir={model_dir}",
        *args,
    ]
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    process = subprocess.run(command, check=False)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        sys.stderr.write(
            f"error: experiments.{module} exited with status "
            f"{process.returncode}; see its output above. Rerun this command "
            "to resume.\n"
        )
        sys.exit(process.returncode)
    with open(os.path.join(model_dir, "results.json")) as stream:
        results = json.load(stream)
    results["command_seconds"] = seconds
    return results


def _table(rows: list[dict]) -> str:
    lines = [
        "| experiment | test top-1 | test top-5 | epochs | training time (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['test_accuracy']:.4f} | "
            f"{row['test_top5_accuracy']:.4f} | {row['epochs']} | "
            f"{row['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def compare() -> None:
    root = FLAGS.model_dir
    os.makedirs(root, exist_ok=True)
    common = _common_args()
    baseline = _run(
        "baseline",
        [*common, f"--epochs={FLAGS.baseline_epochs}"],
        os.path.join(root, "baseline"),
    )
    contrastive = _run(
        "pretrain",
        [
            *common,
            f"--loss={FLAGS.loss}",
            f"--views={FLAGS.views}",
            f"--pretrain_epochs={FLAGS.pretrain_epochs}",
            f"--eval_epochs={FLAGS.eval_epochs}",
        ],
        os.path.join(root, "pretrain"),
    )
    rows = [
        {
            "name": "cross-entropy (end to end)",
            **_summary(baseline),
            "epochs": f"{FLAGS.baseline_epochs}",
        },
        {
            "name": f"{FLAGS.loss} + frozen-encoder probe",
            **_summary(contrastive),
            "epochs": f"{FLAGS.pretrain_epochs} + {FLAGS.eval_epochs}",
        },
    ]
    table = _table(rows)
    with open(os.path.join(root, "compare.md"), "w") as stream:
        stream.write(table)
    with open(os.path.join(root, "compare.json"), "w") as stream:
        json.dump({"rows": rows, "shared_flags": common}, stream, indent=2)
    print(table)


def _summary(results: dict) -> dict:
    """Returns the table's numbers from one run's results.json.

    The time is the training phases' wall time as results.json reports it,
    so a rerun that only re-evaluates keeps the time of the run that
    trained.
    """
    phases = ("baseline", "pretrain", "probe")
    seconds = sum(
        results.get(f"{phase}_wall_seconds") or 0.0 for phase in phases
    )
    return {
        "test_accuracy": results["test_accuracy"],
        "test_top5_accuracy": results["test_top5_accuracy"],
        "seconds": seconds,
        "results": results,
    }


if __name__ == "__main__":
    job_flags.run(compare)
