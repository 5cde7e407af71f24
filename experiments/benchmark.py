"""Benchmark harness: measured speed and memory, recorded with the machine.

    python -m experiments.benchmark --sections=loss --record

Each section prints its measurements; the last line printed is one JSON
object with every number. `--record` appends a row per measurement to
docs/benchmarks.md with the date, the machine and the command.
"""

import datetime
import json
import os
import platform
import sys

import tensorflow as tf
from absl import app, flags

from supcon_tf import benchmarks

FLAGS = flags.FLAGS

flags.DEFINE_list("sections", ["loss"], "Sections to run: loss.")
flags.DEFINE_list(
    "loss_rows",
    ["2048", "8192"],
    "Row counts (batch x views) for the loss section.",
)
flags.DEFINE_integer("loss_dim", 128, "Feature size for the loss section.")
flags.DEFINE_integer("repeats", 5, "Timed repeats after one warm-up call.")
flags.DEFINE_bool("quick", False, "One row count (2048) and 3 repeats.")
flags.DEFINE_bool("record", False, "Append the results to docs/benchmarks.md.")

SECTIONS = ("loss",)
RECORD_FILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "docs",
    "benchmarks.md",
)


def run_loss_section() -> dict:
    rows_list = [2048] if FLAGS.quick else [int(r) for r in FLAGS.loss_rows]
    repeats = 3 if FLAGS.quick else FLAGS.repeats
    results = []
    for rows in rows_list:
        timing = benchmarks.time_loss(rows, FLAGS.loss_dim, repeats=repeats)
        memory = benchmarks.loss_peak_memory(rows, FLAGS.loss_dim)
        results.append({**timing, **memory})
        print(
            f"loss rows={rows} dim={FLAGS.loss_dim}: forward+backward "
            f"median {timing['median_seconds'] * 1e3:.1f} ms "
            f"(min {timing['min_seconds'] * 1e3:.1f}, max "
            f"{timing['max_seconds'] * 1e3:.1f}); peak added memory "
            f"{memory['peak_added_bytes'] / 2**20:.0f} MiB = "
            f"{memory['rows_by_rows_float32_buffers']:.1f} [rows, rows] "
            "float32 buffers"
        )
    return {"loss": results}


def _machine() -> str:
    """Describes the processor, e.g. `Intel(R) Xeon(R) Processor, 2 CPUs`."""
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    gpus = tf.config.list_physical_devices("GPU")
    accelerator = f", {len(gpus)} GPU(s)" if gpus else ", no GPU"
    return f"{model}, {os.cpu_count()} CPUs{accelerator}, TF {tf.__version__}"


def record(results: dict) -> None:
    command = "python -m experiments.benchmark " + " ".join(sys.argv[1:])
    date = datetime.date.today().isoformat()
    lines = []
    for row in results.get("loss", []):
        lines.append(
            f"| {date} | {_machine()} | `{command}` | loss fwd+bwd, "
            f"{row['rows']} x {row['dim']} | median "
            f"{row['median_seconds'] * 1e3:.1f} ms; peak +"
            f"{row['peak_added_bytes'] / 2**20:.0f} MiB "
            f"({row['rows_by_rows_float32_buffers']:.1f} buffers) |"
        )
    with open(RECORD_FILE, "a") as stream:
        stream.write("\n".join(lines) + "\n")
    print(f"Appended {len(lines)} row(s) to {RECORD_FILE}.")


def main(argv) -> None:
    del argv
    unknown = set(FLAGS.sections) - set(SECTIONS)
    if unknown:
        sys.stderr.write(
            f"error: unknown --sections {', '.join(sorted(unknown))}; "
            f"choose from {', '.join(SECTIONS)}.\n"
        )
        sys.exit(2)
    results = {"machine": _machine()}
    if "loss" in FLAGS.sections:
        results.update(run_loss_section())
    if FLAGS.record:
        record(results)
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
