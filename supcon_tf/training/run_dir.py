"""The files that make a model directory resumable: config.json, results.

A rerun in the same directory resumes only when it is the same kind of job
and repeats every setting that its checkpoints and data order depend on.
Any other rerun is rejected before the directory is touched.
"""

import json
import os
from collections.abc import Iterable
from typing import Any

from supcon_tf.errors import UsageError

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _differences(saved, current, resume_keys: Iterable[str]) -> list[str]:
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    names = sorted(set(saved_flat) | set(current_flat))
    differing = []
    for name in names:
        fixed = any(
            name == key or name.startswith(key + ".") for key in resume_keys
        )
        if fixed and saved_flat.get(name) != current_flat.get(name):
            differing.append(
                f"{name}={saved_flat.get(name)!r} (now "
                f"{current_flat.get(name)!r})"
            )
    return differing


def check_and_save_config(
    directory: str,
    job: str,
    config: dict[str, Any],
    resume_keys: Iterable[str],
    flag: str = "--model_dir",
) -> None:
    """Writes `directory/config.json`, or checks a rerun against it.

    Args:
      directory: The run's output directory.
      job: The job's name; another job's directory is rejected.
      config: The job's settings, as nested dicts.
      resume_keys: Dotted keys (a prefix covers its sub-keys) that must
        match the saved settings for a rerun to resume.
      flag: The flag that names `directory`, for the error messages.

    Raises:
      UsageError: the directory contains another job, or settings differ.
    """
    path = os.path.join(directory, CONFIG_FILE)
    current = {"job": job, **config}
    if os.path.exists(path):
        with open(path) as stream:
            saved = json.load(stream)
        saved_job = saved.get("job", "pretrain")
        if saved_job != job:
            raise UsageError(
                f"{flag}={directory} contains a {saved_job} run, and this is "
                f"a {job} run; give it a {flag} of its own."
            )
        differing = _differences(saved, current, resume_keys)
        if differing:
            raise UsageError(
                f"{flag}={directory} contains a run with other settings: "
                f"{'; '.join(differing[:4])}. Use a new {flag}, or repeat "
                "the original settings to resume that run."
            )
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as stream:
        json.dump(current, stream, indent=2, sort_keys=True)
        stream.write("\n")


def load_config(directory: str, job: str) -> dict[str, Any]:
    """Reads the settings a `job` run saved in `directory`."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise UsageError(
            f"No {CONFIG_FILE} in {directory}; point --model_dir at the "
            f"directory of a `python -m experiments.{job}` run."
        )
    with open(path) as stream:
        saved = json.load(stream)
    if saved.get("job", "pretrain") != job:
        raise UsageError(
            f"{directory} contains a {saved.get('job')} run, not a {job} "
            "run; point --model_dir at a pretraining run."
        )
    saved.pop("job", None)
    return saved


def load_previous_results(directory: str) -> dict[str, Any]:
    """Returns the results.json of an earlier attempt in `directory`, or {}."""
    path = os.path.join(directory, RESULTS_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as stream:
        return json.load(stream)
