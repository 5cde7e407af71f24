"""Two worker processes on 127.0.0.1 train like one process.

Each worker is a real `python -m experiments.pretrain` process with its own
`TF_CONFIG`, talking gRPC over loopback ports picked at run time.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [
    "--encoder=small_cnn",
    "--global_batch_size=8",
    "--pretrain_epochs=1",
    "--eval_epochs=1",
    "--eval_head=linear",
    "--steps_per_loop=5",
    "--max_train_examples=80",
]


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _start(args, env_extra):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env_extra}
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.pretrain", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process, name):
    try:
        stdout, stderr = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, f"{name} failed:\n{stderr[-4000:]}"
    return stdout, stderr


def _loss_events(model_dir):
    accumulator = event_accumulator.EventAccumulator(
        os.path.join(model_dir, "train"),
        size_guidance={event_accumulator.TENSORS: 0},
    )
    accumulator.Reload()
    events = accumulator.Tensors("loss/supcon")
    steps = [event.step for event in events]
    values = [float(tf.make_ndarray(event.tensor_proto)) for event in events]
    return steps, values


def test_two_workers_match_one_process(tiny_cifar10, tmp_path):
    data = [f"--data_dir={tiny_cifar10}"]
    single_dir = str(tmp_path / "single")
    single = _start(
        [
            *data,
            *ARGS,
            f"--model_dir={single_dir}",
            "--strategy=mirrored",
            "--cpu_replicas=2",
        ],
        {},
    )
    _finish(single, "single process")

    workers_dir = str(tmp_path / "workers")
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    processes = []
    for index in range(2):
        config = {
            "cluster": cluster,
            "task": {"type": "worker", "index": index},
        }
        processes.append(
            _start(
                [
                    *data,
                    *ARGS,
                    f"--model_dir={workers_dir}",
                    "--strategy=multi_worker",
                ],
                {"TF_CONFIG": json.dumps(config)},
            )
        )
    outputs = [
        _finish(process, f"worker {index}")
        for index, process in enumerate(processes)
    ]

    single_steps, single_losses = _loss_events(single_dir)
    worker_steps, worker_losses = _loss_events(workers_dir)
    assert single_steps == [5, 10]
    assert worker_steps == single_steps
    np.testing.assert_allclose(worker_losses, single_losses, rtol=1e-5)

    with open(os.path.join(single_dir, "results.json")) as stream:
        single_results = json.load(stream)
    with open(os.path.join(workers_dir, "results.json")) as stream:
        worker_results = json.load(stream)
    assert worker_results["test_examples"] == 123
    assert worker_results["config"]["model"]["sync_batchnorm"] is True
    np.testing.assert_allclose(
        worker_results["pretrain_final_metrics"]["loss"],
        single_results["pretrain_final_metrics"]["loss"],
        rtol=1e-5,
    )

    # Every worker reports the same test accuracy; the chief (worker 0)
    # alone writes checkpoints into model_dir.
    accuracy = f"test_accuracy {worker_results['test_accuracy']:.4f}"
    assert accuracy in outputs[0][0]
    assert accuracy in outputs[1][0]
    checkpoints = os.listdir(
        os.path.join(workers_dir, "checkpoints", "pretrain")
    )
    assert "ckpt-10.index" in checkpoints
    assert not [
        name for name in os.listdir(workers_dir) if name.startswith("worker")
    ]
