"""Run the real DVC pipeline in a temporary copy of the repository (never in the checkout)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

# Tiny but complete: every stage runs, on 32 px images, in about a minute on 2 cores.
FAST_PARAMS: dict[str, Any] = {
    "data": {"demo": {"covid_patients": 40, "kermany_train": 90, "kermany_test": 8,
                      "max_side": 96}},
    "copy": {"heldout_normal": 6, "heldout_pneumonia": 6},
    "model": {"img_size": 32, "pool_size": 1, "dense_nodes": 16},
    "featurize": {"augment_copies": 1, "batch_size": 64},
    "train": {"epochs": 8, "batch_size": 16},
    "validate": {"gradcam_images": 1, "bootstrap": 50},
}

# The docs/contracts.md column lists, spelled out here rather than imported from the package, so
# that test projects written with them check the contract itself.
MANIFEST_HEADER = ["path", "set", "label", "patient_id", "sha256", "source", "width", "height",
                   "format", "patient_group", "origin"]
SPLIT_HEADER = ["path", "label", "patient_id", "sha256", "split", "patient_group"]

_SKIP = {".git", "data", "models", "metrics", "plots", "reports", "dvclive", ".pytest_cache",
         "dvc.lock",
         ".ruff_cache", "tests", "benchmarks", "__pycache__"}


def deep_update(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def git_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
                "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"})
    return env


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, env=git_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def make_repo_copy(repo_root: Path, target: Path, params: dict[str, Any]) -> Path:
    """Copy the code (not the generated data) into ``target``, apply params, commit it to git."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in repo_root.iterdir():
        if entry.name in _SKIP:
            continue
        if entry.is_dir():
            shutil.copytree(entry, target / entry.name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "tmp", "cache"))
        else:
            shutil.copy2(entry, target / entry.name)
    (target / "tests").mkdir()
    (target / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    params_file = target / "params.yaml"
    merged = deep_update(yaml.safe_load(params_file.read_text()), params)
    params_file.write_text(yaml.safe_dump(merged, sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], target)
    run(["git", "add", "-A"], target)
    run(["git", "commit", "-qm", "test copy"], target)
    return target


ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called"
"""TensorFlow 2.21 prints this (and oneDNN's INFO line) when it is imported, whatever
TF_CPP_MIN_LOG_LEVEL says: not DVC's, and not the pipeline's to silence."""


def dvc_warnings(output: str) -> list[str]:
    return [line for line in output.splitlines()
            if line.startswith("WARNING") and not line.startswith(ABSL_NOTICE)]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
