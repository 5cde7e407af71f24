"""The run's `results.json`: headline numbers, configuration, versions."""

import json
import os
import platform
import sys
from typing import Any

import keras
import numpy as np
import tensorflow as tf


def library_versions() -> dict[str, str]:
    import absl
    import tensorboard

    from supcon_tf import __version__

    return {
        "python": sys.version.split()[0],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "absl": getattr(absl, "__version__", "unknown"),
        "tensorboard": tensorboard.__version__,
        "supcon_tf": __version__,
    }


def machine_description() -> dict[str, Any]:
    gpus = tf.config.list_physical_devices("GPU")
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpus": [gpu.name for gpu in gpus],
    }


def write_results(path: str, results: dict[str, Any]) -> None:
    """Writes `results` plus versions and machine atomically to `path`."""
    payload = dict(results)
    payload["versions"] = library_versions()
    payload["machine"] = machine_description()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as stream:
        json.dump(payload, stream, indent=2, sort_keys=True)
        stream.write("\n")
    os.replace(temporary, path)
