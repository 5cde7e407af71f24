"""The run's `results.json`: headline numbers, configuration, versions."""

import importlib.metadata
import json
import os
import platform
import sys
from typing import Any

import keras
import numpy as np
import tensorflow as tf


def library_versions() -> dict[str, str]:
    """Versions of Python and the installed packages a run depends on."""
    installed = {}
    for package in ("absl-py", "tensorboard", "supcon_tf"):
        try:
            installed[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            installed[package] = "not installed"
    return {
        "python": sys.version.split()[0],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        **installed,
    }


def machine_description() -> dict[str, Any]:
    gpus = tf.config.list_physical_devices("GPU")
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpus": [gpu.name for gpu in gpus],
    }


def write_results(
    path: str, results: dict[str, Any], versions: dict[str, str]
) -> None:
    """Writes `results` plus versions and machine atomically to `path`."""
    payload = dict(results)
    payload["versions"] = versions
    payload["machine"] = machine_description()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as stream:
        json.dump(payload, stream, indent=2, sort_keys=True)
        stream.write("\n")
    os.replace(temporary, path)
