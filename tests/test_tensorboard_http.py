"""A real TensorBoard server reads back the event files of a short run."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from supcon_tf.training import visuals
from supcon_tf.training.summaries import SummaryWriters

TENSORBOARD = os.path.join(os.path.dirname(sys.executable), "tensorboard")
STARTUP_TIMEOUT_S = 60
# Binary fractions, so the float32 values that TensorBoard returns are
# exactly these.
LOSSES = [4.5, 3.25, 2.75]
LEARNING_RATES = [0.125, 0.0625, 0.0]
TRAIN_SCALARS = {"loss/supcon", "lr"}
EVAL_SCALARS = {"eval/top1", "eval/knn_top1"}
EMBEDDINGS = np.arange(12, dtype=np.float32).reshape(4, 3)
EMBEDDING_KEY = "test_embeddings/.ATTRIBUTES/VARIABLE_VALUE"
HPARAMS = {"encoder": "small_cnn", "temperature": 0.5}


def _write_short_run(log_dir):
    """Writes what a three-step pretraining run would log."""
    writers = SummaryWriters(log_dir, chief=True)
    for step, (loss, lr) in enumerate(zip(LOSSES, LEARNING_RATES, strict=True)):
        writers.write_train({"loss/supcon": loss, "lr": lr}, step)
    writers.write_eval({"eval/top1": 0.5, "eval/knn_top1": 0.375}, 2)

    views = np.random.default_rng(0).random((4, 2, 8, 8, 3))
    visuals.write_view_pairs(writers.train, views, step=0)
    visuals.write_histograms(
        writers.train, {"weights/dense/kernel": np.ones([3, 4])}, step=2
    )
    visuals.write_confusion_matrix(
        writers.eval, np.diag([3, 4]), ["cat", "dog"], step=2
    )
    writers.close()

    visuals.write_projector(log_dir, EMBEDDINGS, [0, 1, 1, 0], ["cat", "dog"])
    visuals.write_hparams(log_dir, HPARAMS, {"eval/top1": 0.5})


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get_bytes(port, path, **query):
    url = f"http://127.0.0.1:{port}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def _get_json(port, path, **query):
    return json.loads(_get_bytes(port, path, **query))


def _post_json(port, path, body):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _scalar_tags_or_none(port):
    """Returns the scalar tags once the server responds, else None."""
    try:
        _get_json(port, "/data/runs")
        return _get_json(port, "/data/plugin/scalars/tags")
    except OSError:  # URLError, refused or reset connections, timeouts.
        return None


def _wait_for_scalars(server, port, stderr_path):
    """Polls until both runs list their scalar tags, at most 60 s."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    tags = None
    while time.monotonic() < deadline and server.poll() is None:
        tags = _scalar_tags_or_none(port)
        loaded = tags and TRAIN_SCALARS <= set(tags.get("train", {}))
        if loaded and EVAL_SCALARS <= set(tags.get("eval", {})):
            return
        time.sleep(0.5)
    with open(stderr_path) as stream:
        stderr = stream.read()
    pytest.fail(
        f"TensorBoard on port {port} did not list the scalar tags within "
        f"{STARTUP_TIMEOUT_S} s (exit code {server.poll()}, last tags "
        f"{tags}). Its stderr:\n{stderr[-4000:]}"
    )


@pytest.fixture(scope="module")
def server_port(tmp_path_factory):
    """Port of a TensorBoard server on a short run, stopped afterwards."""
    log_dir = str(tmp_path_factory.mktemp("tensorboard_run"))
    _write_short_run(log_dir)
    stderr_path = tmp_path_factory.mktemp("tensorboard_server") / "stderr"
    port = _free_port()
    command = [
        TENSORBOARD,
        f"--logdir={log_dir}",
        "--host=127.0.0.1",
        f"--port={port}",
    ]
    with open(stderr_path, "w") as stderr:
        server = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
    try:
        _wait_for_scalars(server, port, stderr_path)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_runs_listed(server_port):
    runs = _get_json(server_port, "/data/runs")

    assert {"train", "eval"} <= set(runs)


def test_scalar_tags(server_port):
    tags = _get_json(server_port, "/data/plugin/scalars/tags")

    assert set(tags["train"]) == TRAIN_SCALARS
    assert set(tags["eval"]) == EVAL_SCALARS


def test_image_tags(server_port):
    tags = _get_json(server_port, "/data/plugin/images/tags")

    assert set(tags["train"]) == {"augment/view_pairs"}
    assert set(tags["eval"]) == {"eval/confusion_matrix"}


def test_loss_series(server_port):
    series = _get_json(
        server_port,
        "/data/plugin/scalars/scalars",
        run="train",
        tag="loss/supcon",
    )

    # Each point is [wall_time, step, value].
    assert [point[1] for point in series] == [0, 1, 2]
    assert [point[2] for point in series] == LOSSES


def test_lr_series(server_port):
    series = _get_json(
        server_port, "/data/plugin/scalars/scalars", run="train", tag="lr"
    )

    assert [point[2] for point in series] == LEARNING_RATES


def test_eval_series(server_port):
    series = _get_json(
        server_port,
        "/data/plugin/scalars/scalars",
        run="eval",
        tag="eval/knn_top1",
    )

    assert [(point[1], point[2]) for point in series] == [(2, 0.375)]


def test_histogram_series(server_port):
    series = _get_json(
        server_port,
        "/data/plugin/histograms/histograms",
        run="train",
        tag="weights/dense/kernel",
    )

    # Each point is [wall_time, step, [[left, right, count], ...]].
    ((_, step, buckets),) = series
    assert step == 2
    assert sum(bucket[2] for bucket in buckets) == 12


def test_projector_serves_embeddings(server_port):
    # The projector also reads its configs in a background thread, so its
    # first responses can omit the run. Poll for a bounded time.
    deadline = time.monotonic() + 20
    runs = _get_json(server_port, "/data/plugin/projector/runs")
    while "." not in runs and time.monotonic() < deadline:
        time.sleep(0.5)
        runs = _get_json(server_port, "/data/plugin/projector/runs")
    assert "." in runs

    config = _get_json(server_port, "/data/plugin/projector/info", run=".")
    (embedding,) = config["embeddings"]
    assert embedding["tensorName"] == EMBEDDING_KEY
    assert embedding["tensorShape"] == [4, 3]

    query = {"run": ".", "name": EMBEDDING_KEY}
    data = _get_bytes(server_port, "/data/plugin/projector/tensor", **query)
    values = np.frombuffer(data, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(values, EMBEDDINGS)
    metadata = _get_bytes(
        server_port, "/data/plugin/projector/metadata", **query
    ).decode()
    assert metadata.splitlines() == [
        "label\tclass",
        "0\tcat",
        "1\tdog",
        "1\tdog",
        "0\tcat",
    ]


def test_hparams_session(server_port):
    experiment = _post_json(
        server_port,
        "/data/plugin/hparams/experiment",
        {"experimentName": ""},
    )
    groups = _post_json(
        server_port,
        "/data/plugin/hparams/session_groups",
        {
            "experimentName": "",
            "allowedStatuses": ["STATUS_UNKNOWN"],
            "colParams": [],
            "startIndex": 0,
            "sliceSize": 10,
        },
    )

    names = {info["name"] for info in experiment["hparamInfos"]}
    assert names == set(HPARAMS)
    metric_tags = [info["name"]["tag"] for info in experiment["metricInfos"]]
    assert metric_tags == ["eval/top1"]
    (group,) = groups["sessionGroups"]
    assert group["hparams"] == HPARAMS
    (metric,) = group["metricValues"]
    assert metric["name"]["tag"] == "eval/top1"
    assert metric["value"] == 0.5
