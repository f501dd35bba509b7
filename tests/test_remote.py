"""Sharing a run: a DVC remote, the models as DVC artifacts, and queued experiments in parallel.

One real pipeline run (FAST_PARAMS) in a temporary git repository, pushed to a folder remote, is
the starting point of each test:

- a fresh ``git clone`` + ``dvc pull`` serves the pulled models at once, and ``dvc repro`` re-runs
  nothing but ``acquire`` (``data/raw`` is not cached: the demo data is regenerated, with the
  same hash, so every later stage is skipped);
- ``gto register`` + ``dvc artifacts get`` fetch a model and its sidecar that the server's loader
  accepts;
- two queued experiments (``dvc exp run --queue -S ...`` + ``dvc queue start -j 2``) run at the
  same time, reuse the cached features, and both appear in ``dvc exp show``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests
import yaml
from pipeline_helpers import FAST_PARAMS, make_repo_copy, run
from test_server_e2e import running_server

from covid_xray.config import MODEL_NAMES
from covid_xray.io import sha256_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

QUEUE_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> dict[str, Path]:
    """A complete run, committed, with a default folder remote that holds everything cached."""
    base = tmp_path_factory.mktemp("remote")
    origin = make_repo_copy(repo_root, base / "origin", FAST_PARAMS)
    run(["dvc", "repro"], origin)
    run(["git", "add", "-A"], origin)
    run(["git", "commit", "-qm", "pipeline run"], origin)
    run(["dvc", "remote", "add", "-d", "shared", str(base / "dvc-remote")], origin)
    run(["git", "commit", "-qam", "default remote: a shared folder"], origin)
    pushed = run(["dvc", "push"], origin)
    assert "pushed" in pushed.stdout, pushed.stdout
    return {"base": base, "origin": origin}


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines()
            if line.startswith("Running stage '")]


def test_a_fresh_clone_pulls_serves_and_reruns_nothing(shared: dict[str, Path],
                                                       tmp_path: Path) -> None:
    origin, fresh = shared["origin"], tmp_path / "fresh"
    run(["git", "clone", "-q", str(origin), str(fresh)], tmp_path)
    pulled = run(["dvc", "pull"], fresh)
    assert "models/covid_normal.keras" in pulled.stdout and "data/features/" in pulled.stdout

    # Served straight from the pull: the same model files, no training.
    with running_server(fresh / "models", tmp_path) as base:
        health = requests.get(f"{base}/healthz", timeout=10).json()
    for name in MODEL_NAMES:
        served = health["models"][name]["sha256"]
        assert sha256_file(origin / "models" / f"{name}.keras").startswith(served), health

    # Before repro, the only difference is the one output that is not cached: data/raw.
    status = json.loads(run(["dvc", "status", "--json"], fresh).stdout)
    changed = {path for changes in status.values() for change in changes
               if isinstance(change, dict) for group in change.values()
               for path in group}
    assert changed <= {"data/raw", "data/raw/covid-chestxray-dataset", "data/raw/chest_xray",
                       "data/raw/external"}, status

    repro = run(["dvc", "repro"], fresh)
    assert ran_stages(repro.stdout) == ["acquire"], repro.stdout
    for stage in ("featurize", "train@covid_normal", "evaluate", "validate", "report"):
        assert f"Stage '{stage}' didn't change, skipping" in repro.stdout
    # acquire regenerated data/raw with the recorded hash: dvc.lock and every file unchanged.
    assert run(["git", "status", "--porcelain"], fresh).stdout == ""
    after = json.loads(run(["dvc", "status", "--json"], fresh).stdout)
    assert set(after) <= {"acquire"} and all(c == "always changed" for c in
                                             after.get("acquire", [])), after


def test_models_are_artifacts_fetched_by_name(shared: dict[str, Path], tmp_path: Path) -> None:
    origin = shared["origin"]
    dvc_yaml = yaml.safe_load((origin / "dvc.yaml").read_text())
    assert {dvc_yaml["artifacts"][f"covid-{m}"]["type"] for m in ("normal", "pneumonia")} == {
        "model"}
    for name in ("covid-normal", "covid-normal-info"):
        run(["gto", "register", name, "--version", "v0.1.0"], origin)
    out = tmp_path / "fetched"
    out.mkdir()
    for name in ("covid-normal", "covid-normal-info"):
        run(["dvc", "artifacts", "get", str(origin), name, "-o", str(out)], tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["covid_normal.json", "covid_normal.keras"]
    for file in out.iterdir():
        assert file.read_bytes() == (origin / "models" / file.name).read_bytes()

    from covid_xray.modeling import Classifier

    classifier = Classifier.load(out / "covid_normal.keras")  # the server's loader: pair checked
    assert classifier.sha256 == sha256_file(origin / "models" / "covid_normal.keras")


def test_two_queued_experiments_run_in_parallel_on_the_cached_features(
        shared: dict[str, Path]) -> None:
    origin = shared["origin"]
    for dropout in ("0.3", "0.4"):
        run(["dvc", "exp", "run", "--queue", "-S", f"train.dropout={dropout}"], origin)
    run(["dvc", "queue", "start", "-j", "2"], origin)
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while True:
        status = run(["dvc", "queue", "status"], origin).stdout
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, f"queue not done after {QUEUE_TIMEOUT_S}s:\n{status}"
        time.sleep(3)
    tasks = [line.split() for line in status.splitlines()[1:]
             if line.split() and line.split()[0] != "Worker"]
    assert len(tasks) == 2 and all(task[-1] == "Success" for task in tasks), status

    shown = json.loads(run(["dvc", "exp", "show", "--json"], origin).stdout)
    baseline = next(entry for entry in shown if entry["rev"] != "workspace")
    features = baseline["data"]["outs"]["data/features"]["hash"]
    results = {}
    for experiment in baseline["experiments"]:
        data = experiment["revs"][0]["data"]
        dropout = data["params"]["params.yaml"]["data"]["train"]["dropout"]
        results[dropout] = data["metrics"]["metrics/evaluate.json"]["data"]
        assert data["outs"]["data/features"]["hash"] == features  # the baseline's features
    assert sorted(results) == [0.3, 0.4]
    assert all(isinstance(r[m]["roc_auc"], float) for r in results.values() for m in MODEL_NAMES)

    for task in tasks:
        log = run(["dvc", "queue", "logs", task[0]], origin).stdout
        assert "Stage 'featurize' didn't change, skipping" in log, log[-3000:]
        assert "featurize" not in ran_stages(log) and "train@covid_normal" in ran_stages(log)
