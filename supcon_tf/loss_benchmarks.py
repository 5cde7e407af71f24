"""Loss measurements for the benchmark harness: time and peak memory.

Both run one forward and backward pass of `supcon_loss` on random
features, `rows` rows in all (batch size times views).
"""

import resource
import statistics
import time
from typing import Any

import numpy as np
import tensorflow as tf

from supcon_tf import losses
from supcon_tf.benchmarks import peak_rss_bytes, run_isolated


def _loss_step(rows: int, dim: int, num_views: int, temperature: float):
    """Builds a traced forward-and-backward pass of `supcon_loss`."""
    batch_size = rows // num_views
    rng = np.random.default_rng(0)
    features = tf.constant(
        rng.normal(size=(batch_size, num_views, dim)).astype("float32")
    )
    labels = tf.constant(rng.integers(0, 100, batch_size))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(features)
            loss = tf.reduce_mean(
                losses.supcon_loss(features, labels, temperature=temperature)
            )
        return loss, tape.gradient(loss, features)

    return step


def time_loss(
    rows: int,
    dim: int = 128,
    *,
    num_views: int = 2,
    temperature: float = 0.1,
    repeats: int = 5,
) -> dict[str, Any]:
    """Times one forward and backward pass of the loss on `rows` rows."""
    step = _loss_step(rows, dim, num_views, temperature)
    step()  # Trace and warm up.
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        loss, gradient = step()
        gradient.numpy()
        seconds.append(time.perf_counter() - started)
    return {
        "rows": rows,
        "dim": dim,
        "median_seconds": statistics.median(seconds),
        "min_seconds": min(seconds),
        "max_seconds": max(seconds),
        "repeats": repeats,
        "loss": float(loss),
    }


def _resident_bytes() -> int:
    with open("/proc/self/statm") as stream:
        pages = int(stream.read().split()[1])
    return pages * resource.getpagesize()


def _added_loss_memory(rows, dim, num_views, temperature) -> int:
    step = _loss_step(rows, dim, num_views, temperature)
    concrete = step.get_concrete_function()  # Trace before measuring.
    before = _resident_bytes()
    concrete()[1].numpy()
    return peak_rss_bytes() - before


def loss_peak_memory(
    rows: int, dim: int = 128, *, num_views: int = 2, temperature: float = 0.1
) -> dict[str, Any]:
    """Measures the host memory one forward and backward pass adds.

    Returns:
      The added bytes, and the same figure in units of one
      `[rows, rows]` float32 buffer.

    NOTE: Linux only (it reads /proc/self/statm).
    """
    added = run_isolated(_added_loss_memory, rows, dim, num_views, temperature)
    buffer_bytes = rows * rows * 4
    return {
        "rows": rows,
        "dim": dim,
        "peak_added_bytes": added,
        "rows_by_rows_float32_buffers": added / buffer_bytes,
    }
