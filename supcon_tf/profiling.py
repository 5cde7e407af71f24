"""TensorFlow profiler traces and the op time they contain.

`trace` writes a profile that TensorBoard's Profile tab shows (with the
`tensorboard-plugin-profile` package). `op_seconds_by_type` reads the
trace back and sums the time of each op type, which shows whether a step
is bound by its convolutions, its elementwise ops or something else.
"""

import collections
import contextlib
import glob
import os
import re

import tensorflow as tf

# oneDNN builds of TensorFlow rename kernels, e.g. `_MklNativeConv2D`.
_ONEDNN_PREFIX = re.compile(r"^_Mkl(Native)?")


@contextlib.contextmanager
def trace(logdir: str):
    """Profiles everything TensorFlow runs inside the `with` block."""
    tf.profiler.experimental.start(logdir)
    try:
        yield
    finally:
        tf.profiler.experimental.stop()


def op_seconds_by_type(logdir: str) -> dict[str, float] | None:
    """Sums op durations by op type in the newest trace under `logdir`.

    Counts the op events on TensorFlow's inter-op threads (`tf_Compute`).
    An op that spreads its work over the intra-op thread pool counts its
    elapsed time once. Two ops that run at once both count, so the sum can
    exceed the elapsed time of the profiled steps. oneDNN prefixes are
    dropped from op types (`_MklNativeConv2D` counts as `Conv2D`).

    Returns:
      `{op_type: seconds}`, largest first, or None when this TensorFlow
      build lacks the trace format's Python module.

    Raises:
      FileNotFoundError: `logdir` contains no trace.
    """
    try:
        from tensorflow.tsl.profiler.protobuf import xplane_pb2
    except ImportError:
        return None
    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"No profiler trace (*.xplane.pb) in {logdir}")
    space = xplane_pb2.XSpace()
    with open(max(paths, key=os.path.getmtime), "rb") as stream:
        space.ParseFromString(stream.read())

    totals: collections.Counter = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                # Op events are named `op_name:OpType`; runtime events
                # such as `ExecutorState::Process` are not ops.
                if ":" not in name or "::" in name:
                    continue
                op_type = _ONEDNN_PREFIX.sub("", name.rsplit(":", 1)[1])
                totals[op_type] += event.duration_ps / 1e12
    return dict(totals.most_common())
