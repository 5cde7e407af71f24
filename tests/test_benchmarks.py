"""The benchmark harness: its measurements, JSON output and record rows.

No test here asserts a wall-clock time or a speed ratio; they check what
the harness computes from its measurements and how it reports them.
"""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from supcon_tf import benchmarks, config, keras_fit_baseline, loss_benchmarks
from supcon_tf.errors import UsageError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_FILE = os.path.join(REPO_ROOT, "docs", "benchmarks.md")
SMALL_RUN_FLAGS = [
    "--quick",
    "--sections=pretrain,keras_fit,matmul,probe",
    "--encoder=small_cnn",
    "--global_batch_size=16",
    "--steps=2",
    "--repeats=1",
    "--matmul_size=256",
]


def _run_harness(*flags: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", *flags],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """Runs the harness once on small_cnn, recording to a copy of the file.

    Returns:
      `(results, record_before, record_after)`: the parsed last stdout
      line and the record file's lines before and after the run.
    """
    record_file = tmp_path_factory.mktemp("record") / "benchmarks.md"
    profile_dir = tmp_path_factory.mktemp("profile")
    shutil.copyfile(RECORD_FILE, record_file)
    before = record_file.read_text().splitlines()
    completed = _run_harness(
        *SMALL_RUN_FLAGS,
        "--record",
        f"--record_file={record_file}",
        f"--profile_dir={profile_dir}",
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    last_line = completed.stdout.strip().splitlines()[-1]
    after = record_file.read_text().splitlines()
    return json.loads(last_line), before, after


def test_harness_json_has_headline_numbers(small_run):
    results, _, _ = small_run
    for key in (
        "examples_per_second",
        "keras_fit_examples_per_second",
        "speedup_vs_keras_fit",
        "mfu",
        "keras_fit_mfu",
        "matmul_peak_gflops_per_second",
    ):
        assert isinstance(results[key], float), key
        assert results[key] > 0, key
    assert results["speedup_vs_keras_fit"] == (
        results["examples_per_second"]
        / results["keras_fit_examples_per_second"]
    )
    low, high = results["speedup_vs_keras_fit_range"]
    assert low <= results["speedup_vs_keras_fit"] <= high
    assert results["machine"]
    assert results["command"].startswith("python -m experiments.benchmark")
    assert "--encoder=small_cnn" in results["command"]


def test_harness_mfu_from_flops_and_peak(small_run):
    results, _, _ = small_run
    pretrain = results["pretrain"]
    peak = results["matmul"]["float32"]["gflops_per_second"] * 1e9
    assert results["matmul_peak_gflops_per_second"] * 1e9 == peak
    assert results["mfu"] == (
        pretrain["flops_per_example"] * pretrain["examples_per_second"] / peak
    )
    # Both sides train the same encoder and head on one view.
    assert (
        pretrain["flops_per_example"]
        == (results["keras_fit"]["flops_per_example"])
    )


def test_harness_sections_report_measurements(small_run):
    results, _, _ = small_run
    for section in ("pretrain", "keras_fit"):
        assert results[section]["repeats"] == 1
        assert results[section]["steps"] == 2
        assert results[section]["peak_rss_bytes"] > 0
        assert results[section]["warmup_seconds"] > 0
    assert set(results["matmul"]) == {"float32", "bfloat16"}
    probe = results["probe"]
    assert probe["epochs_timed"] == 1
    assert probe["steps_per_epoch"] == 1024 // 16
    assert probe["cached_epoch_seconds"] > 0
    assert probe["recomputed_over_cached"] == (
        probe["recomputed_epoch_seconds"] / probe["cached_epoch_seconds"]
    )


def test_record_appends_one_row_per_measurement(small_run):
    _, before, after = small_run
    assert after[: len(before)] == before
    added = after[len(before) :]
    # pretrain, its profile, keras_fit, matmul float32 and bfloat16, probe.
    assert len(added) == 6
    header_cells = [c.strip() for c in before[-1].strip("|").split("|")]
    assert len(header_cells) == 5
    for row in added:
        assert row.startswith("| "), row
        assert row.endswith(" |"), row
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 5, row
        assert cells[2].startswith("`python -m experiments.benchmark ")
    measured = [row.split(" | ")[3] for row in added]
    assert measured[0] == (
        "our train step: small_cnn, batch 16, 1 view(s), float32, "
        "keras_example augmentation, fused batch norm"
    )
    assert measured[1] == "our train step, op time per step by type"
    assert measured[2] == (
        "keras.io model.fit: small_cnn, batch 16, 1 view(s), float32, "
        "example augmentation"
    )
    assert measured[3] == "matmul 256x256 float32"
    assert measured[4] == "matmul 256x256 bfloat16"
    assert measured[5] == "probe epoch, 1024 examples"
    assert "Conv2D" in added[1]


def test_harness_profiles_our_step(small_run):
    results, _, _ = small_run
    profile = results["pretrain"]["profile"]
    assert profile["steps"] == 2
    per_step = profile["op_seconds_per_step"]
    # small_cnn's step runs convolutions forward and backward. A build
    # may fuse a convolution with what follows it (FusedConv2D).
    assert any(name.endswith("Conv2D") for name in per_step)
    assert per_step["Conv2DBackpropFilter"] > 0
    assert per_step["Conv2DBackpropInput"] > 0
    traces = list(pathlib.Path(profile["dir"]).rglob("*.xplane.pb"))
    assert len(traces) == 1


def test_keras_fit_runs_the_example_augmentation(small_run):
    results, _, _ = small_run
    assert results["keras_fit"]["augmentation"] == "example"
    assert results["settings"]["fused_batchnorm"] is True


def test_unknown_section_exits_2():
    completed = _run_harness("--sections=pretrain,warp_drive")
    assert completed.returncode == 2
    assert "unknown --sections warp_drive" in completed.stderr
    assert "choose from pretrain, keras_fit, matmul, probe, loss" in (
        completed.stderr
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sections="], "--sections is empty; choose from pretrain"),
        (
            ["--strategy=mirrored", "--cpu_replicas=0"],
            "--cpu_replicas=0 is invalid; use 1 or more.",
        ),
        (
            ["--strategy=mirrored", "--cpu_replicas=2"],
            "--global_batch_size=265 must be divisible by --cpu_replicas=2; "
            "use a multiple such as --global_batch_size=264.",
        ),
        (
            ["--sections=loss", "--loss_rows=abc"],
            "--loss_rows entry 'abc' is invalid",
        ),
        (["--matmul_size=-5"], "--matmul_size=-5 is invalid"),
        (
            ["--profile_dir=" + os.path.abspath(__file__)],
            "is a file; pass a folder",
        ),
        (["--image_size=16"], "--image_size=16 is too small for resnet50v2"),
        (
            ["--record", "--record_file=/nonexistent-folder/rows.md"],
            "--record_file=/nonexistent-folder/rows.md cannot be created",
        ),
    ],
)
def test_invalid_flags_exit_2_before_measuring(flags, message):
    completed = _run_harness(*flags)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr
    assert completed.stdout == ""


def test_quick_keeps_explicit_loss_rows():
    completed = _run_harness(
        "--sections=loss", "--quick", "--loss_rows=64", "--loss_dim=8"
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert [row["rows"] for row in results["loss"]] == [64]
    assert [row["repeats"] for row in results["loss"]] == [3]


def test_forward_flops_match_hand_count():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, activation="relu"),
            keras.layers.Dense(2, use_bias=False),
        ]
    )
    # Multiply-adds count 2: 2*4*3 + 3 bias adds + 2*3*2; ReLU counts 0.
    assert benchmarks.count_forward_flops(model, (4,)) == 39


def test_training_flops_are_three_forwards_per_view():
    encoder = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    head = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    forward = 2 * 4 * 3 + 3 + 2 * 3 * 2 + 2
    assert benchmarks.training_flops_per_example(encoder, head, 1) == (
        3 * forward
    )
    assert benchmarks.training_flops_per_example(encoder, head, 2) == (
        6 * forward
    )


def test_training_flops_at_a_given_image_shape():
    # An encoder that takes any image size counts FLOPs at the shape given.
    encoder = keras.Sequential(
        [
            keras.Input((None, None, 1)),
            keras.layers.Conv2D(1, 1, use_bias=False),
            keras.layers.GlobalAveragePooling2D(),
        ]
    )
    head = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    small = benchmarks.training_flops_per_example(
        encoder, head, 1, image_shape=(2, 2, 1)
    )
    large = benchmarks.training_flops_per_example(
        encoder, head, 1, image_shape=(4, 4, 1)
    )
    # Per pixel: a 1x1 convolution (2) and a pooling add (1); head 3.
    assert small == 3 * (4 * 3 + 3)
    assert large == 3 * (16 * 3 + 3)


def _axis_sizes(layer, images, calls):
    return [tuple(layer(images, training=True).shape) for _ in range(calls)]


def test_random_axis_resize_draws_one_size_per_batch():
    images = np.full((5, 32, 32, 3), 7.0, "float32")
    width = keras_fit_baseline.RandomAxisResize(0.2, axis=2, seed=1)
    shapes = _axis_sizes(width, images, 40)
    widths = {shape[2] for shape in shapes}
    # int(scale * 32) for a scale in [0.8, 1.2): 25 to 38 pixels.
    assert min(widths) >= 25
    assert max(widths) <= 38
    assert len(widths) > 5
    assert {shape[:2] + shape[3:] for shape in shapes} == {(5, 32, 3)}
    height = keras_fit_baseline.RandomAxisResize(0.2, axis=1, seed=1)
    resized = height(images, training=True)
    assert resized.shape[2] == 32
    assert 25 <= resized.shape[1] <= 38
    # Bilinear resizing keeps a constant image constant.
    np.testing.assert_allclose(resized, 7.0, rtol=1e-6)
    # Outside training the batch passes through.
    assert height(images, training=False).shape == images.shape
    # The same seed repeats the sizes.
    again = keras_fit_baseline.RandomAxisResize(0.2, axis=2, seed=1)
    assert _axis_sizes(again, images, 40) == shapes


def test_keras_fit_augmentation_shapes():
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3))
    images = images.astype("float32")
    example = keras_fit_baseline.build_augmentation(images, "example", 0)
    fixed = keras_fit_baseline.build_augmentation(images, "fixed_shape", 0)
    names = [layer.__class__.__name__ for layer in example.layers]
    assert names == [
        "Normalization",
        "RandomFlip",
        "RandomRotation",
        "RandomAxisResize",
        "RandomAxisResize",
    ]
    assert fixed.layers[-1].__class__.__name__ == "RandomZoom"
    shapes = {example(images, training=True).shape[1:3] for _ in range(20)}
    assert len(shapes) > 1
    # Width and height draw their scales independently.
    assert any(height != width for height, width in shapes)
    assert fixed(images, training=True).shape == images.shape
    # The Normalization layer was adapted to these images.
    standardized = example(images, training=False).numpy()
    np.testing.assert_allclose(standardized.mean(axis=(0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(standardized.std(axis=(0, 1, 2)), 1, atol=1e-3)
    with pytest.raises(ValueError, match="choose one of example, fixed"):
        keras_fit_baseline.build_augmentation(images, "shear")


def test_summarize_seconds_median_and_spread():
    summary = benchmarks.summarize_seconds([2.0, 1.0, 4.0], examples=8)
    assert summary["median_seconds"] == 2.0
    assert summary["min_seconds"] == 1.0
    assert summary["max_seconds"] == 4.0
    assert summary["examples_per_second"] == 4.0
    assert summary["min_examples_per_second"] == 2.0
    assert summary["max_examples_per_second"] == 8.0
    assert summary["repeats"] == 3


def test_synthetic_split_shape_and_labels():
    settings = benchmarks.ThroughputSettings(global_batch_size=300)
    split = benchmarks.synthetic_split(settings)
    assert split.images.shape == (1200, 32, 32, 3)
    assert split.images.dtype == "uint8"
    assert sorted(set(split.labels.tolist())) == list(range(10))


def test_run_isolated_raises_child_error():
    with pytest.raises(RuntimeError, match="math domain error"):
        benchmarks.run_isolated(math.sqrt, -1.0)


def test_run_isolated_reraises_usage_error():
    # A bad setting found in the child reaches the parent as UsageError,
    # which the harness reports without a traceback.
    with pytest.raises(UsageError, match="--optimizer='rmsprop' is invalid"):
        benchmarks.run_isolated(
            config.validate_optimizer, config.OptimizerConfig("rmsprop")
        )


def test_loss_memory_stays_rows_by_rows():
    # A [rows, rows, dim] tensor at dim 128 would alone be 128 buffers of
    # [rows, rows] float32; the loss must stay within a few.
    measured = loss_benchmarks.loss_peak_memory(1024, 128)
    assert measured["rows"] == 1024
    assert 0.5 < measured["rows_by_rows_float32_buffers"] < 16


def test_time_loss_reports_repeats():
    timing = loss_benchmarks.time_loss(64, 16, repeats=2)
    assert timing["repeats"] == 2
    assert timing["min_seconds"] <= timing["median_seconds"]
    assert timing["median_seconds"] <= timing["max_seconds"]
    assert timing["loss"] > 0.0
