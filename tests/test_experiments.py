"""The entry points end to end, as a user runs them, in subprocesses."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = [
    "--encoder=small_cnn",
    "--global_batch_size=8",
    "--pretrain_epochs=2",
    "--eval_epochs=1",
    "--steps_per_loop=2",
]


def _run(module, *args, env=None, check=True):
    command = [sys.executable, "-m", f"experiments.{module}", *args]
    process = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
    )
    if check and process.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {process.returncode}:\n"
            f"{process.stderr[-4000:]}"
        )
    return process


def _scalars(log_dir):
    accumulator = event_accumulator.EventAccumulator(
        log_dir, size_guidance={event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    tags = accumulator.Tags()["tensors"] + accumulator.Tags()["scalars"]
    return accumulator, set(tags)


@pytest.fixture(scope="module")
def cifar_dir(tiny_cifar10):
    return tiny_cifar10


@pytest.fixture(scope="module")
def pretrain_run(cifar_dir, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("run"))
    process = _run(
        "pretrain",
        f"--data_dir={cifar_dir}",
        f"--model_dir={model_dir}",
        "--strategy=mirrored",
        "--cpu_replicas=2",
        *QUICK,
        "--knn_every_epochs=1",
        "--histogram_every_steps=20",
        "--projector_examples=50",
    )
    return model_dir, process


def test_pretrain_writes_results(pretrain_run):
    model_dir, process = pretrain_run
    with open(os.path.join(model_dir, "results.json")) as stream:
        results = json.load(stream)
    assert 0.0 <= results["test_accuracy"] <= 1.0
    assert results["test_examples"] == 123
    assert results["pretrain_steps"] == 2 * (200 // 8)
    assert results["pretrain_examples_per_second"] > 0
    assert results["flags"]["cpu_replicas"] == 2
    assert results["flags"]["encoder"] == "small_cnn"
    assert results["config"]["model"]["sync_batchnorm"] is True
    assert results["versions"]["tensorflow"]
    printed = f"test_accuracy {results['test_accuracy']:.4f}"
    assert printed in process.stdout


def test_pretrain_writes_event_files(pretrain_run):
    model_dir, _ = pretrain_run
    train, train_tags = _scalars(os.path.join(model_dir, "train"))
    _, eval_tags = _scalars(os.path.join(model_dir, "eval"))
    for tag in [
        "loss/supcon",
        "lr",
        "perf/examples_per_sec",
        "perf/steps_per_sec",
        "loss/probe",
    ]:
        assert tag in train_tags
    assert {"eval/top1", "eval/top5"} <= eval_tags
    for name in [
        "positive_cosine",
        "negative_cosine",
        "alignment",
        "uniformity",
        "feature_std",
    ]:
        assert f"diagnostics/{name}" in train_tags
    knn_steps = [
        event.step for event in _events(model_dir, "eval", "eval/knn_top1")
    ]
    # Epoch 1 from --knn_every_epochs=1, then the end of pretraining.
    assert knn_steps == [25, 50]
    images = _image_tags(os.path.join(model_dir, "train"))
    assert "augment/view_pairs" in images
    assert "eval/confusion_matrix" in _image_tags(
        os.path.join(model_dir, "eval")
    )
    histograms = [tag for tag in train_tags if tag.startswith("weights/")]
    assert histograms
    steps = [event.step for event in train.Tensors("loss/supcon")]
    # One event per tf.function call of 2 steps; a call never crosses the
    # end of an epoch (25 steps).
    expected = list(range(2, 25, 2)) + [25] + list(range(27, 50, 2)) + [50]
    assert steps == expected


def _events(model_dir, run, tag):
    accumulator, _ = _scalars(os.path.join(model_dir, run))
    return accumulator.Tensors(tag)


def _image_tags(log_dir):
    accumulator = event_accumulator.EventAccumulator(
        log_dir, size_guidance={event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    return {
        tag
        for tag in accumulator.Tags()["tensors"]
        if accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "images"
    }


def test_pretrain_exports_encoder_and_projector(pretrain_run):
    model_dir, _ = pretrain_run
    exported = tf.saved_model.load(os.path.join(model_dir, "export", "encoder"))
    images = tf.zeros([2, 32, 32, 3], tf.uint8)
    embeddings = exported.signatures["serving_default"](images=images)
    norms = np.linalg.norm(embeddings["embeddings"].numpy(), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    with open(os.path.join(model_dir, "projector", "metadata.tsv")) as f:
        assert len(f.read().splitlines()) == 50 + 1
    assert os.path.exists(
        os.path.join(model_dir, "projector", "projector_config.pbtxt")
    )
    # TensorBoard reads projector configs only next to an event file.
    assert glob.glob(os.path.join(model_dir, "projector", "events.out.*"))


def test_pretrain_reports_knn_and_per_class(pretrain_run):
    model_dir, _ = pretrain_run
    with open(os.path.join(model_dir, "results.json")) as stream:
        results = json.load(stream)
    assert 0.0 <= results["knn_top1"] <= 1.0
    assert results["probe_mode"] == "cached"
    assert results["probe_feature_seconds"] > 0
    assert len(results["test_per_class_accuracy"]) == 10
    matrix = np.array(results["test_confusion_matrix"])
    assert matrix.shape == (10, 10)
    assert matrix.sum() == 123
    assert np.trace(matrix) / 123 == pytest.approx(results["test_accuracy"])


def test_pretrain_writes_checkpoints(pretrain_run):
    model_dir, _ = pretrain_run
    pretrain = glob.glob(
        os.path.join(model_dir, "checkpoints", "pretrain", "ckpt-*.index")
    )
    probe = glob.glob(
        os.path.join(
            model_dir, "checkpoints", "probe_at_step_50", "ckpt-*.index"
        )
    )
    assert sorted(os.path.basename(p) for p in pretrain) == [
        "ckpt-25.index",
        "ckpt-50.index",
    ]
    assert [os.path.basename(p) for p in probe] == ["ckpt-25.index"]


def test_same_rerun_only_reevaluates(pretrain_run, cifar_dir):
    model_dir, _ = pretrain_run
    with open(os.path.join(model_dir, "results.json")) as stream:
        first = json.load(stream)
    process = _run(
        "pretrain",
        f"--data_dir={cifar_dir}",
        f"--model_dir={model_dir}",
        "--strategy=mirrored",
        "--cpu_replicas=2",
        *QUICK,
        "--knn_every_epochs=1",
        "--histogram_every_steps=20",
        "--projector_examples=50",
    )
    with open(os.path.join(model_dir, "results.json")) as stream:
        second = json.load(stream)
    assert "pretrain: already at step 50 of 50" in process.stderr
    assert "probe: already at step 25 of 25" in process.stderr
    assert second["test_accuracy"] == first["test_accuracy"]
    # Nothing trained this time, so the speeds are the first run's.
    assert (
        second["pretrain_examples_per_second"]
        == (first["pretrain_examples_per_second"])
    )
    assert (
        second["probe_examples_per_second"]
        == (first["probe_examples_per_second"])
    )
    assert second["probe_examples_per_second"] > 0


def test_rerun_resumes_instead_of_retraining(pretrain_run, cifar_dir):
    model_dir, _ = pretrain_run
    process = _run(
        "pretrain",
        f"--data_dir={cifar_dir}",
        f"--model_dir={model_dir}",
        "--strategy=mirrored",
        "--cpu_replicas=2",
        *QUICK,
        "--pretrain_epochs=3",
    )
    with open(os.path.join(model_dir, "results.json")) as stream:
        second = json.load(stream)
    assert "Restored checkpoint" in process.stderr
    assert "pretrain: step 52/75" in process.stderr
    assert "pretrain: step 2/75" not in process.stderr
    assert second["pretrain_steps"] == 75
    # The encoder changed, so a new probe trains on it from scratch.
    assert "probe: already at step" not in process.stderr
    assert second["probe_steps"] == 25
    assert glob.glob(
        os.path.join(
            model_dir, "checkpoints", "probe_at_step_75", "ckpt-25.index"
        )
    )


def test_linear_eval_reuses_pretraining(pretrain_run):
    model_dir, _ = pretrain_run
    _run(
        "linear_eval",
        f"--model_dir={model_dir}",
        "--eval_epochs=1",
        "--eval_head=linear",
    )
    with open(os.path.join(model_dir, "linear_eval", "results.json")) as f:
        results = json.load(f)
    assert results["job"] == "linear_eval"
    assert results["pretrain_checkpoint"].endswith("ckpt-75")
    assert os.path.isdir(
        os.path.join(
            model_dir, "linear_eval", "checkpoints", "probe_at_step_75"
        )
    )
    assert results["test_examples"] == 123
    assert results["probe_config"]["head"] == "linear"


def test_finetune_trains_the_encoder(pretrain_run):
    model_dir, _ = pretrain_run
    _run(
        "linear_eval",
        f"--model_dir={model_dir}",
        "--eval_epochs=1",
        "--eval_head=linear",
        "--finetune",
    )
    with open(os.path.join(model_dir, "finetune", "results.json")) as f:
        results = json.load(f)
    assert results["finetune"] is True
    assert results["finetune_mode"] == "recomputed"
    assert results["finetune_steps"] == 25
    reader = tf.train.load_checkpoint(
        os.path.join(
            model_dir, "finetune", "checkpoints", "finetune_at_step_75"
        )
    )
    # The checkpoint contains the encoder, which only a fine-tune saves.
    assert any(
        name.startswith("encoder/")
        for name in reader.get_variable_to_shape_map()
    )


def test_compare_writes_table(cifar_dir, tmp_path):
    _run(
        "compare",
        f"--model_dir={tmp_path}",
        f"--data_dir={cifar_dir}",
        "--encoder=small_cnn",
        "--global_batch_size=8",
        "--baseline_epochs=1",
        "--pretrain_epochs=1",
        "--eval_epochs=1",
    )
    with open(tmp_path / "compare.json") as stream:
        rows = json.load(stream)["rows"]
    assert [row["epochs"] for row in rows] == ["1", "1 + 1"]
    table = (tmp_path / "compare.md").read_text().splitlines()
    assert table[0].startswith("| experiment | test top-1")
    assert len(table) == 4
    assert f"{rows[0]['test_accuracy']:.4f}" in table[2]


def test_baseline_trains_end_to_end(cifar_dir, tmp_path):
    _run(
        "baseline",
        f"--data_dir={cifar_dir}",
        f"--model_dir={tmp_path}",
        "--encoder=small_cnn",
        "--global_batch_size=8",
        "--epochs=1",
    )
    with open(tmp_path / "results.json") as stream:
        results = json.load(stream)
    assert results["job"] == "baseline"
    assert results["baseline_steps"] == 25
    assert 0.0 <= results["test_accuracy"] <= 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [
                "--global_batch_size=9",
                "--strategy=mirrored",
                "--cpu_replicas=2",
            ],
            "use 8 or 10",
        ),
        (["--loss=npairs"], "set --views=1"),
        (["--temperature=0"], "--temperature=0.0 is invalid"),
        (["--dataset=folder"], "--data_dir"),
    ],
)
def test_bad_flags_exit_cleanly(cifar_dir, tmp_path, args, message):
    data_dir = [] if "--dataset=folder" in args else [f"--data_dir={cifar_dir}"]
    process = _run(
        "pretrain",
        f"--model_dir={tmp_path}",
        *data_dir,
        *QUICK,
        *args,
        check=False,
    )
    assert process.returncode == 2
    assert message in process.stderr
    assert "Traceback" not in process.stderr


def _snapshot(directory):
    """Every file under `directory` with its size and modification time."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            stat = os.stat(path)
            files[path] = (stat.st_size, stat.st_mtime_ns)
    return files


@pytest.mark.parametrize(
    "module, args, message",
    [
        (
            "pretrain",
            ["--encoder=resnet18_cifar"],
            "model.encoder='small_cnn' (now 'resnet18_cifar')",
        ),
        (
            "pretrain",
            ["--max_train_examples=100"],
            "data.max_train_examples=None (now 100)",
        ),
        ("pretrain", ["--seed=3"], "run.seed=0 (now 3)"),
        ("pretrain", ["--eval_head=linear"], "probe.head='mlp' (now 'linear')"),
        ("pretrain", ["--temperature=-0.1"], "--temperature=-0.1 is invalid"),
        ("pretrain", ["--learning_rate=nan"], "--learning_rate=nan is invalid"),
        ("pretrain", ["--nesterov"], "--nesterov applies to sgd and lars"),
        (
            "pretrain",
            ["--eval_learning_rate=0"],
            "--eval_learning_rate=0.0 is invalid",
        ),
        (
            "baseline",
            ["--epochs=1"],
            "contains a pretrain run, and this is a baseline run",
        ),
    ],
)
def test_rejected_rerun_leaves_run_untouched(
    pretrain_run, cifar_dir, module, args, message
):
    model_dir, _ = pretrain_run
    before = _snapshot(model_dir)
    quick = (
        QUICK
        if module == "pretrain"
        else ["--encoder=small_cnn", "--global_batch_size=8"]
    )
    process = _run(
        module,
        f"--data_dir={cifar_dir}",
        f"--model_dir={model_dir}",
        *quick,
        *args,
        check=False,
    )
    assert process.returncode == 2
    assert message in process.stderr
    assert "Traceback" not in process.stderr
    assert _snapshot(model_dir) == before


def test_linear_eval_rejects_other_probe_in_same_dir(pretrain_run):
    model_dir, _ = pretrain_run
    eval_dir = os.path.join(model_dir, "linear_eval")
    before = _snapshot(eval_dir)
    process = _run(
        "linear_eval",
        f"--model_dir={model_dir}",
        "--eval_epochs=1",
        "--eval_head=mlp",
        check=False,
    )
    assert process.returncode == 2
    assert "probe.head='linear' (now 'mlp')" in process.stderr
    assert "Use a new --eval_dir" in process.stderr
    assert _snapshot(eval_dir) == before


def _loss_values(model_dir, tag="loss/supcon"):
    accumulator, _ = _scalars(os.path.join(model_dir, "train"))
    return [
        float(tf.make_ndarray(event.tensor_proto))
        for event in accumulator.Tensors(tag)
    ]


def test_same_seed_repeats_losses_exactly(cifar_dir, tmp_path):
    runs = {}
    for name, seed in [("first", 0), ("again", 0), ("other", 1)]:
        model_dir = str(tmp_path / name)
        _run(
            "pretrain",
            f"--data_dir={cifar_dir}",
            f"--model_dir={model_dir}",
            *QUICK,
            "--pretrain_epochs=1",
            f"--seed={seed}",
        )
        runs[name] = _loss_values(model_dir) + _loss_values(
            model_dir, "loss/probe"
        )
    assert len(runs["first"]) == 13 + 13
    assert runs["again"] == runs["first"]
    assert runs["other"] != runs["first"]


@pytest.mark.slow
def test_real_cifar10_jpegs(tmp_path):
    data_dir = os.environ.get("SUPCON_CIFAR10_DIR")
    if not data_dir:
        pytest.skip(
            "SUPCON_CIFAR10_DIR is not set; .ci/run sets it to the "
            "unpacked CIFAR-10 JPEG archive"
        )
    _run(
        "pretrain",
        "--dataset=folder",
        f"--data_dir={data_dir}",
        f"--model_dir={tmp_path}",
        "--encoder=small_cnn",
        "--max_train_examples=2000",
        "--max_test_examples=1000",
        "--global_batch_size=100",
        "--pretrain_epochs=2",
        "--eval_epochs=3",
        "--eval_head=linear",
        "--eval_augment=none",
        "--eval_learning_rate=0.01",
        "--steps_per_loop=5",
        "--strategy=mirrored",
        "--cpu_replicas=2",
    )
    with open(tmp_path / "results.json") as stream:
        results = json.load(stream)
    assert results["test_examples"] == 1000
    # Ten balanced classes: chance is 0.10.
    assert results["test_accuracy"] > 0.15


def test_preset_loads_recipe_from_any_directory(cifar_dir, tmp_path):
    model_dir = tmp_path / "run"
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.pretrain",
            "--preset=paper_cifar10",
            f"--data_dir={cifar_dir}",
            f"--model_dir={model_dir}",
            *QUICK,
            "--pretrain_epochs=1",
            "--warmup_epochs=0",
            "--eval_epochs=1",
            "--dataset=cifar10",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO},
    )
    assert process.returncode == 0, process.stderr[-3000:]
    with open(model_dir / "config.json") as stream:
        config = json.load(stream)
    # From the preset, except what the command overrides after it.
    assert config["optimizer"]["optimizer"] == "sgd"
    assert config["optimizer"]["learning_rate"] == 0.5
    assert config["optimizer"]["schedule"] == "cosine"
    assert config["loss"]["temperature"] == 0.1
    assert config["run"]["global_batch_size"] == 8
