"""Profiler traces read back into op time by type."""

import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import profiling


def test_op_seconds_by_type_finds_traced_ops(tmp_path):
    a = tf.constant(
        np.random.default_rng(0).normal(size=(256, 256)), tf.float32
    )

    @tf.function
    def multiply(x):
        return tf.nn.relu(tf.matmul(x, x))

    multiply(a).numpy()  # Traces outside the profile.
    with profiling.trace(str(tmp_path)):
        for _ in range(5):
            multiply(a).numpy()
    op_seconds = profiling.op_seconds_by_type(str(tmp_path))
    assert op_seconds is not None
    # oneDNN builds name the kernel _MklMatMul; the prefix is dropped.
    assert op_seconds["MatMul"] > 0
    assert "Relu" in op_seconds
    assert not any(name.startswith("_Mkl") for name in op_seconds)
    assert not any("::" in name for name in op_seconds)
    assert list(op_seconds.values()) == sorted(
        op_seconds.values(), reverse=True
    )


def test_op_seconds_by_type_without_trace(tmp_path):
    with pytest.raises(FileNotFoundError, match="No profiler trace"):
        profiling.op_seconds_by_type(str(tmp_path))
