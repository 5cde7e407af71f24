"""Benchmark harness: measured speed, MFU and memory, with the machine.

    python -m experiments.benchmark --quick --mixed_precision=bfloat16

Sections, all measured in one run on one machine:

- pretrain: examples/s of our train step and tf.data pipeline.
- keras_fit: examples/s of the keras.io example's `model.fit` pipeline.
- matmul: GFLOP/s of a large matmul in float32 and bfloat16, the
  practical peak that MFU divides by.
- probe: seconds per probe epoch on cached features against recomputing
  the frozen encoder on every step.
- loss: forward and backward time and peak memory of `supcon_loss`.

pretrain, keras_fit and probe each run in a fresh process. The last line
printed to stdout is one JSON object with every number, the machine and
the command. `--record` then appends one row per measurement to
`--record_file`.
"""

import dataclasses
import datetime
import json
import os
import platform
import sys

import tensorflow as tf
from absl import app, flags

from supcon_tf import (
    benchmarks,
    keras_fit_baseline,
    layers,
    loss_benchmarks,
    models,
    precision,
)
from supcon_tf.data import augment
from supcon_tf.errors import UsageError

FLAGS = flags.FLAGS

SECTIONS = ("pretrain", "keras_fit", "matmul", "probe", "loss")

flags.DEFINE_list(
    "sections", list(SECTIONS), f"Sections to run: {', '.join(SECTIONS)}."
)
flags.DEFINE_enum("encoder", "resnet50v2", models.ENCODERS, "Encoder.")
flags.DEFINE_integer(
    "global_batch_size", 265, "Examples per step over all replicas."
)
flags.DEFINE_integer("image_size", 32, "Height and width of the images.")
flags.DEFINE_enum(
    "augment",
    "keras_example",
    augment.AUGMENT_MODES,
    "Augmentation of our pipeline; keras_example matches keras_fit's.",
)
flags.DEFINE_enum(
    "loss",
    "npairs",
    ["npairs", "supcon"],
    "Loss of our step: npairs with 1 view (the example's), or supcon with "
    "2 views. keras_fit always uses npairs with 1 view.",
)
flags.DEFINE_enum(
    "mixed_precision",
    None,
    precision.MIXED_PRECISION,
    "Compute dtype of our step; unset for float32.",
)
flags.DEFINE_bool(
    "fused_batchnorm",
    True,
    "Train our encoder's batch norm with the fused kernel.",
)
flags.DEFINE_bool(
    "float32_filter_grad",
    True,
    "Compute our encoder's convolution filter gradients in float32 under "
    "--mixed_precision=bfloat16 on a machine without GPUs or TPUs.",
)
flags.DEFINE_enum(
    "keras_fit_mixed_precision",
    None,
    precision.MIXED_PRECISION,
    "Compute dtype of the model.fit pipeline; unset for float32, as in "
    "the example.",
)
flags.DEFINE_enum(
    "keras_fit_augmentation",
    "example",
    keras_fit_baseline.AUGMENTATIONS,
    "Augmentation of the model.fit pipeline: example resizes every batch "
    "to a random shape as the example does; fixed_shape zooms instead.",
)
flags.DEFINE_bool(
    "jit_compile",
    False,
    "Compile our train step and the model.fit step with XLA.",
)
flags.DEFINE_enum(
    "strategy", "default", ["default", "mirrored"], "Distribution strategy."
)
flags.DEFINE_integer(
    "cpu_replicas", 1, "Logical CPU replicas for --strategy=mirrored."
)
flags.DEFINE_integer(
    "steps_per_loop", 10, "Steps of our loop per tf.function call."
)
flags.DEFINE_integer("steps", 20, "Timed train steps per repeat.")
flags.DEFINE_integer(
    "repeats",
    5,
    "Timed repeats after the warm-up (probe: epochs; matmul: at least 3).",
)
flags.DEFINE_integer(
    "matmul_size", 0, "Matmul side; 0 picks 4096 on CPU, 8192 on a GPU."
)
flags.DEFINE_list(
    "loss_rows",
    ["2048", "8192"],
    "Row counts (batch x views) for the loss section.",
)
flags.DEFINE_integer("loss_dim", 128, "Feature size for the loss section.")
flags.DEFINE_bool(
    "quick",
    False,
    "Unless set explicitly: --steps=2, --repeats=2, and the loss section "
    "at 2048 rows only.",
)
flags.DEFINE_string(
    "profile_dir",
    None,
    "Profiles one more timed repeat of our train step into this directory "
    "(TensorBoard's Profile tab reads it) and prints the op types that "
    "took the most time.",
)
flags.DEFINE_bool("record", False, "Append the results to --record_file.")
flags.DEFINE_string(
    "record_file",
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "docs",
        "benchmarks.md",
    ),
    "Markdown table that --record appends rows to.",
)

QUICK_STEPS = 2
QUICK_REPEATS = 2


def _quick_or_flag(name: str, quick_value: int) -> int:
    if FLAGS.quick and not FLAGS[name].present:
        return quick_value
    return FLAGS[name].value


def throughput_settings() -> benchmarks.ThroughputSettings:
    """Reads the flags shared by pretrain, keras_fit and probe."""
    return benchmarks.ThroughputSettings(
        encoder=FLAGS.encoder,
        global_batch_size=FLAGS.global_batch_size,
        image_size=FLAGS.image_size,
        augment=FLAGS.augment,
        loss=FLAGS.loss,
        mixed_precision=FLAGS.mixed_precision,
        fused_batchnorm=FLAGS.fused_batchnorm,
        float32_filter_grad=FLAGS.float32_filter_grad,
        jit_compile=FLAGS.jit_compile,
        strategy=FLAGS.strategy,
        cpu_replicas=FLAGS.cpu_replicas,
        steps_per_loop=FLAGS.steps_per_loop,
        profile_dir=FLAGS.profile_dir,
        steps=_quick_or_flag("steps", QUICK_STEPS),
        repeats=_quick_or_flag("repeats", QUICK_REPEATS),
    )


def _print_throughput(name: str, result: dict) -> None:
    print(
        f"{name}: median {result['examples_per_second']:.1f} examples/s "
        f"(min {result['min_examples_per_second']:.1f}, max "
        f"{result['max_examples_per_second']:.1f}) over "
        f"{result['repeats']} x {result['steps']} steps; warm-up "
        f"{result['warmup_seconds']:.1f} s; "
        f"{result['flops_per_example'] / 1e9:.3f} GFLOP/example; peak RSS "
        f"{result['peak_rss_bytes'] / 2**20:.0f} MiB"
    )


PROFILE_TOP_OPS = 8


def _profile_shares(per_step: dict) -> str:
    """Formats the op time per step and its largest op types."""
    total = sum(per_step.values())
    top = list(per_step.items())[:PROFILE_TOP_OPS]
    shares = ", ".join(
        f"{op_type} {seconds * 1e3:.0f} ms ({100 * seconds / total:.0f}%)"
        for op_type, seconds in top
    )
    # Ops that run at the same time both count, so the total can exceed
    # the step's elapsed time.
    return (
        f"{total * 1e3:.0f} ms of op time per step, summed over concurrent "
        f"ops; top op types: {shares}"
    )


def _print_profile(profile: dict) -> None:
    per_step = profile["op_seconds_per_step"]
    if per_step is None:
        print(
            f"profile: trace written to {profile['dir']}; this TensorFlow "
            "build cannot read it back, so open it in TensorBoard's Profile "
            "tab (pip install tensorboard-plugin-profile)."
        )
        return
    print(
        f"profile of {profile['steps']} steps, trace in {profile['dir']}: "
        f"{_profile_shares(per_step)}"
    )


def run_pretrain_section(settings) -> dict:
    result = benchmarks.run_isolated(benchmarks.pretrain_throughput, settings)
    _print_throughput("pretrain (our loop)", result)
    if result["profile"]:
        _print_profile(result["profile"])
    return result


def keras_fit_settings(settings):
    """Our settings with the model.fit pipeline's own compute dtype."""
    return dataclasses.replace(
        settings, mixed_precision=FLAGS.keras_fit_mixed_precision
    )


def run_keras_fit_section(settings) -> dict:
    result = benchmarks.run_isolated(
        keras_fit_baseline.keras_fit_throughput,
        keras_fit_settings(settings),
        FLAGS.keras_fit_augmentation,
    )
    _print_throughput("keras_fit (model.fit)", result)
    return result


def run_matmul_section(repeats: int) -> dict:
    size = FLAGS.matmul_size
    if size == 0:
        size = 8192 if tf.config.list_physical_devices("GPU") else 4096
    dtypes = ["float32", "bfloat16"]
    if "float16" in (FLAGS.mixed_precision, FLAGS.keras_fit_mixed_precision):
        dtypes.append("float16")
    results = {}
    for dtype in dtypes:
        result = benchmarks.matmul_throughput(size, dtype, repeats)
        results[dtype] = result
        print(
            f"matmul {size}x{size} {dtype}: "
            f"{result['gflops_per_second']:.1f} GFLOP/s (median of "
            f"{repeats}, {result['median_seconds'] * 1e3:.0f} ms each)"
        )
    return results


def run_probe_section(settings) -> dict:
    result = benchmarks.run_isolated(benchmarks.probe_epoch_seconds, settings)
    print(
        f"probe: {result['examples']} examples, feature cache "
        f"{result['feature_cache_seconds']:.2f} s once; epoch on cached "
        f"features {result['cached_epoch_seconds']:.3f} s, recomputing the "
        f"encoder {result['recomputed_epoch_seconds']:.3f} s "
        f"({result['recomputed_over_cached']:.1f}x)"
    )
    return result


def run_loss_section() -> list:
    rows_list = [int(rows) for rows in FLAGS.loss_rows]
    if FLAGS.quick and not FLAGS["loss_rows"].present:
        rows_list = [2048]
    repeats = _quick_or_flag("repeats", 3)
    results = []
    for rows in rows_list:
        timing = loss_benchmarks.time_loss(
            rows, FLAGS.loss_dim, repeats=repeats
        )
        memory = loss_benchmarks.loss_peak_memory(rows, FLAGS.loss_dim)
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
    return results


def _our_dtype() -> str:
    return FLAGS.mixed_precision or "float32"


def _keras_fit_dtype() -> str:
    return FLAGS.keras_fit_mixed_precision or "float32"


def _mfu_text(mfu: float | None, dtype: str) -> str:
    if mfu is None:
        return "MFU n/a (no matmul section)"
    return f"MFU {100 * mfu:.1f}% of the {dtype} matmul peak"


def _print_summary(results: dict) -> None:
    """Prints the speedup and each side's MFU, when both were measured."""
    if results["speedup_vs_keras_fit"] is not None:
        low, high = results["speedup_vs_keras_fit_range"]
        print(
            f"our step / model.fit: {results['speedup_vs_keras_fit']:.2f}x "
            f"(from the repeats' slowest and fastest: {low:.2f}x to "
            f"{high:.2f}x)"
        )
    if results["mfu"] is not None:
        print(f"our step: {_mfu_text(results['mfu'], _our_dtype())}")
    if results["keras_fit_mfu"] is not None:
        print(
            "model.fit: "
            f"{_mfu_text(results['keras_fit_mfu'], _keras_fit_dtype())}"
        )


def add_summary(results: dict) -> None:
    """Adds the headline numbers: examples/s, speedup and MFU.

    MFU is training FLOPs per example times examples/s over the matmul
    peak of that side's compute dtype (float32 unless --mixed_precision
    or --keras_fit_mixed_precision is set).
    """
    ours = results.get("pretrain") or {}
    theirs = results.get("keras_fit") or {}
    matmul = results.get("matmul") or {}
    peak = matmul.get(_our_dtype())
    fit_peak = matmul.get(_keras_fit_dtype())
    summary = {
        "examples_per_second": ours.get("examples_per_second"),
        "keras_fit_examples_per_second": theirs.get("examples_per_second"),
        "speedup_vs_keras_fit": None,
        "speedup_vs_keras_fit_range": None,
        "matmul_peak_gflops_per_second": peak and peak["gflops_per_second"],
        "keras_fit_matmul_peak_gflops_per_second": (
            fit_peak and fit_peak["gflops_per_second"]
        ),
        "mfu": None,
        "keras_fit_mfu": None,
    }
    if ours and theirs:
        summary["speedup_vs_keras_fit"] = (
            ours["examples_per_second"] / theirs["examples_per_second"]
        )
        summary["speedup_vs_keras_fit_range"] = [
            ours["min_examples_per_second"] / theirs["max_examples_per_second"],
            ours["max_examples_per_second"] / theirs["min_examples_per_second"],
        ]
    for key, result, side_peak in (
        ("mfu", ours, peak),
        ("keras_fit_mfu", theirs, fit_peak),
    ):
        if result and side_peak:
            summary[key] = (
                result["flops_per_example"]
                * result["examples_per_second"]
                / (side_peak["gflops_per_second"] * 1e9)
            )
    results.update(summary)


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


def _throughput_row(
    name: str, variant: str, result: dict, mfu_text: str
) -> tuple:
    description = (
        f"{name}: {FLAGS.encoder}, batch {FLAGS.global_batch_size}, "
        f"{result['num_views']} view(s), {variant}"
    )
    return description, (
        f"median {result['examples_per_second']:.1f} examples/s (min "
        f"{result['min_examples_per_second']:.1f}, max "
        f"{result['max_examples_per_second']:.1f}; {result['repeats']} x "
        f"{result['steps']} steps); {mfu_text}; peak RSS "
        f"{result['peak_rss_bytes'] / 2**20:.0f} MiB"
    )


def _our_variant() -> str:
    batch_norm = "fused" if FLAGS.fused_batchnorm else "Keras"
    variant = (
        f"{_our_dtype()}, {FLAGS.augment} augmentation, {batch_norm} batch norm"
    )
    if FLAGS.mixed_precision == "bfloat16":
        float32_grads = (
            FLAGS.float32_filter_grad and not layers.has_accelerator()
        )
        filter_dtype = "float32" if float32_grads else "bfloat16"
        variant += f", {filter_dtype} filter gradients"
    return variant


def _keras_fit_variant() -> str:
    return f"{_keras_fit_dtype()}, {FLAGS.keras_fit_augmentation} augmentation"


def record_rows(results: dict) -> list[tuple[str, str]]:
    """Returns the `what` and `result` cells of one row per measurement."""
    rows = []
    if "pretrain" in results:
        description, text = _throughput_row(
            "our train step",
            _our_variant(),
            results["pretrain"],
            _mfu_text(results["mfu"], _our_dtype()),
        )
        speedup = results["speedup_vs_keras_fit"]
        if speedup is not None:
            text += f"; {speedup:.2f}x keras_fit"
        rows.append((description, text))
    profile = results.get("pretrain", {}).get("profile")
    if profile and profile["op_seconds_per_step"]:
        rows.append(
            (
                "our train step, op time per step by type",
                _profile_shares(profile["op_seconds_per_step"]),
            )
        )
    if "keras_fit" in results:
        rows.append(
            _throughput_row(
                "keras.io model.fit",
                _keras_fit_variant(),
                results["keras_fit"],
                _mfu_text(results["keras_fit_mfu"], _keras_fit_dtype()),
            )
        )
    for dtype, row in results.get("matmul", {}).items():
        rows.append(
            (
                f"matmul {row['size']}x{row['size']} {dtype}",
                f"{row['gflops_per_second']:.1f} GFLOP/s (median of "
                f"{row['repeats']})",
            )
        )
    if "probe" in results:
        probe = results["probe"]
        rows.append(
            (
                f"probe epoch, {probe['examples']} examples",
                f"cached {probe['cached_epoch_seconds']:.3f} s, recomputed "
                f"{probe['recomputed_epoch_seconds']:.3f} s "
                f"({probe['recomputed_over_cached']:.1f}x); cache built "
                f"once in {probe['feature_cache_seconds']:.2f} s",
            )
        )
    for row in results.get("loss", []):
        rows.append(
            (
                f"loss fwd+bwd, {row['rows']} x {row['dim']}",
                f"median {row['median_seconds'] * 1e3:.1f} ms; peak +"
                f"{row['peak_added_bytes'] / 2**20:.0f} MiB "
                f"({row['rows_by_rows_float32_buffers']:.1f} buffers)",
            )
        )
    return rows


def record(results: dict, path: str) -> None:
    """Appends one table row per measurement to the Markdown file `path`."""
    prefix = f"| {results['date']} | {results['machine']} | "
    prefix += f"`{results['command']}` | "
    lines = [
        f"{prefix}{description} | {text} |"
        for description, text in record_rows(results)
    ]
    with open(path, "a") as stream:
        stream.write("\n".join(lines) + "\n")
    sys.stderr.write(f"Appended {len(lines)} row(s) to {path}.\n")


def _check_flags() -> str | None:
    """Returns an error message for an invalid flag combination, or None."""
    if not FLAGS.sections:
        return f"--sections is empty; choose from {', '.join(SECTIONS)}."
    unknown = set(FLAGS.sections) - set(SECTIONS)
    if unknown:
        return (
            f"unknown --sections {', '.join(sorted(unknown))}; choose from "
            f"{', '.join(SECTIONS)}."
        )
    for name in (
        "steps",
        "repeats",
        "steps_per_loop",
        "global_batch_size",
        "cpu_replicas",
        "image_size",
        "loss_dim",
    ):
        if FLAGS[name].value < 1:
            return f"--{name}={FLAGS[name].value} is invalid; use 1 or more."
    if FLAGS.encoder == "resnet50v2" and FLAGS.image_size < 32:
        return (
            f"--image_size={FLAGS.image_size} is too small for resnet50v2, "
            "which needs 32 or more."
        )
    if FLAGS.matmul_size < 0:
        return (
            f"--matmul_size={FLAGS.matmul_size} is invalid; use 0 (pick by "
            "device) or a positive size."
        )
    for rows in FLAGS.loss_rows:
        if not rows.isdigit() or int(rows) < 2 or int(rows) % 2:
            return (
                f"--loss_rows entry {rows!r} is invalid; use even row counts "
                "(batch size x 2 views), such as 2048,8192."
            )
    if FLAGS.cpu_replicas != 1 and FLAGS.strategy != "mirrored":
        return "--cpu_replicas applies to --strategy=mirrored only."
    if FLAGS.global_batch_size % FLAGS.cpu_replicas:
        divisible = FLAGS.global_batch_size
        divisible -= divisible % FLAGS.cpu_replicas
        return (
            f"--global_batch_size={FLAGS.global_batch_size} must be "
            f"divisible by --cpu_replicas={FLAGS.cpu_replicas}; use a "
            f"multiple such as --global_batch_size="
            f"{max(divisible, FLAGS.cpu_replicas)}."
        )
    if FLAGS.profile_dir and os.path.exists(FLAGS.profile_dir):
        if not os.path.isdir(FLAGS.profile_dir):
            return (
                f"--profile_dir={FLAGS.profile_dir} is a file; pass a folder "
                "(it is created if missing)."
            )
    if FLAGS.record:
        return _check_record_file(FLAGS.record_file)
    return None


def _check_record_file(path: str) -> str | None:
    """Checks before measuring that --record can append to `path`."""
    if os.path.exists(path):
        if os.path.isfile(path) and os.access(path, os.W_OK):
            return None
        return f"--record_file={path} is not a writable file."
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(folder) and os.access(folder, os.W_OK):
        return None
    return (
        f"--record_file={path} cannot be created: {folder} is missing or "
        "not writable. Pass an existing file or a path in a writable "
        "folder."
    )


def run_sections(settings) -> dict:
    """Runs the selected sections; returns their results and the summary."""
    results = {
        "command": "python -m experiments.benchmark " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": _machine(),
        "settings": {**vars(settings), "num_views": settings.num_views},
    }
    sections = FLAGS.sections
    if "pretrain" in sections:
        results["pretrain"] = run_pretrain_section(settings)
    if "keras_fit" in sections:
        results["keras_fit"] = run_keras_fit_section(settings)
    if "matmul" in sections:
        results["matmul"] = run_matmul_section(max(settings.repeats, 3))
    if "probe" in sections:
        results["probe"] = run_probe_section(settings)
    if "loss" in sections:
        results["loss"] = run_loss_section()
    add_summary(results)
    return results


def main(argv) -> None:
    del argv
    error = _check_flags()
    if error:
        sys.stderr.write(f"error: {error}\n")
        sys.exit(2)
    try:
        results = run_sections(throughput_settings())
    except UsageError as usage_error:
        sys.stderr.write(f"error: {usage_error}\n")
        sys.exit(2)
    _print_summary(results)
    # The numbers reach stdout before the record file is touched.
    print(json.dumps(results, sort_keys=True), flush=True)
    if FLAGS.record:
        record(results, FLAGS.record_file)


if __name__ == "__main__":
    app.run(main)
