"""featurize.engine=ray: a real two-node Ray cluster on this machine gives the local engine's bytes.

The cluster is Ray's own test cluster (``ray.cluster_utils.Cluster``): a head node and a second
node, each a real raylet with its own worker processes, connected like machines of a cluster. The
stage runs as DVC runs it (``python -m stages.featurize``, ``RAY_ADDRESS`` set), with each actor
asking for a GPU, and each node declaring one, so that the two actors land on the two nodes (the
GPUs are Ray's bookkeeping here: TensorFlow computes on the CPU, and the stage says so).

Ray is an optional extra (``pip install -e ".[ray]"``, pulled in by ``.[dev]``): without it these
tests skip, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from test_features import make_project

from covid_xray.errors import PipelineError
from covid_xray.params import FeaturizeParams, load_params

if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
    import ray  # CI installs .[dev], which includes the ray extra: a missing Ray must fail here
else:
    ray = pytest.importorskip("ray", reason="Ray not installed (pip install -e '.[ray]')")

from covid_xray.ray_featurize import check_resources, cluster_address

RAY_PROCESSES = ("raylet", "gcs_server", "plasma_store")

FEATURE_FILES = ("features.npy", "index.csv", "info.json", "backbone.weights.h5")


def ray_children() -> list[str]:
    """Ray daemons started by this test process (directly or through its children)."""
    names = []
    for child in psutil.Process().children(recursive=True):
        with_name = child.name() if child.is_running() else ""
        if any(daemon in with_name for daemon in RAY_PROCESSES):
            names.append(f"{with_name} (pid {child.pid})")
    return names


def set_featurize(root: Path, **values: object) -> None:
    params_file = root / "params.yaml"
    raw = yaml.safe_load(params_file.read_text())
    raw["featurize"].update(values)
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))


def run_stage(root: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                               env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                "TF_CPP_MIN_LOG_LEVEL": "2", **env_extra})
    env.pop("COVID_XRAY_ROOT", None)
    result = subprocess.run([sys.executable, "-m", "stages.featurize"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def feature_bytes(root: Path) -> dict[str, bytes]:
    return {name: (root / "data" / "features" / name).read_bytes() for name in FEATURE_FILES}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_node_cluster_writes_the_local_engines_bytes(tmp_path: Path) -> None:
    root = tmp_path / "project"
    paths = make_project(root, n_train=12, n_heldout=2, n_external=3)
    broken = paths.datasets / "heldout" / "covid" / "heldout-covid00.png"
    broken.write_bytes(broken.read_bytes()[:60])  # truncated: both engines must skip and list it
    set_featurize(root, batch_size=8)
    run_stage(root, {})
    local = feature_bytes(root)
    local_metrics = json.loads((root / "metrics" / "featurize.json").read_text())
    assert local_metrics["skipped"] == 1 and local_metrics["ray_nodes"] == 0

    from ray.cluster_utils import Cluster

    # One (logical) GPU per node and one per actor: the two actors must sit on different nodes,
    # and each is given its node's GPU, which this machine's CPU-only TensorFlow cannot use (the
    # stage says so). The nodes' spare CPUs run the decoding tasks.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "num_gpus": 1},
                      shutdown_at_exit=True)
    try:
        cluster.add_node(num_cpus=3, num_gpus=1)
        cluster.wait_for_nodes()
        address = cluster.address
        set_featurize(root, engine="ray", workers=2, cpus_per_worker=1.0, gpus_per_worker=1.0)
        result = run_stage(root, {"RAY_ADDRESS": address})
    finally:
        cluster.shutdown()
    assert not ray_children(), f"Ray processes left running: {ray_children()}"

    assert feature_bytes(root) == local  # features, index, info and weights: byte for byte
    metrics = json.loads((root / "metrics" / "featurize.json").read_text())
    assert metrics["ray_nodes"] == 2, metrics  # one actor per node: really two machines' work
    assert metrics["rows"] == local_metrics["rows"] and metrics["skipped"] == 1
    assert f"the Ray cluster at {address}" in result.stderr
    assert "engine ray, 2 node(s)" in result.stderr
    assert "an actor ran on the CPU, not the GPU 0 Ray gave this actor" in result.stderr
    assert "heldout/covid/heldout-covid00.png" in result.stderr  # the skipped file, listed


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_embedded_ray_matches_and_is_shut_down(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """No address anywhere: featurize starts its own Ray here, and stops it before returning."""
    from covid_xray.features import featurize

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    paths = make_project(tmp_path, n_train=6, n_heldout=1, n_external=2)
    local = featurize(paths, load_params(paths.params), progress=False)
    expected = feature_bytes(tmp_path)
    set_featurize(tmp_path, engine="ray", workers=1)
    report = featurize(paths, load_params(paths.params), progress=False)
    assert not ray.is_initialized()
    assert not ray_children(), f"Ray processes left running: {ray_children()}"
    assert feature_bytes(tmp_path) == expected
    assert (report["engine"], report["nodes"], report["devices"]) == ("ray", 1, local["devices"])


def test_address_comes_from_params_then_the_environment() -> None:
    assert cluster_address(FeaturizeParams(ray_address=" auto "), {"RAY_ADDRESS": "x:1"}) == "auto"
    assert cluster_address(FeaturizeParams(), {"RAY_ADDRESS": "10.0.0.5:6379"}) == "10.0.0.5:6379"
    assert cluster_address(FeaturizeParams(), {}) == ""  # embedded Ray


def test_a_pool_the_cluster_cannot_hold_is_refused_by_name() -> None:
    """Ray would wait forever for resources that never come; the stage names the params."""
    settings = FeaturizeParams(engine="ray", workers=4, cpus_per_worker=1.0)
    with pytest.raises(PipelineError, match=r"featurize.workers=4 x featurize.cpus_per_worker=1 "
                                            r".* need 5 logical CPUs; the test cluster has 4"):
        check_resources(settings, {"CPU": 4.0}, "the test cluster")
    check_resources(settings, {"CPU": 5.0}, "the test cluster")
    gpu = FeaturizeParams(engine="ray", workers=2, gpus_per_worker=1.0)
    with pytest.raises(PipelineError, match=r"featurize.gpus_per_worker=1 need 2 GPUs; .* has 0"):
        check_resources(gpu, {"CPU": 16.0}, "this machine")
    check_resources(gpu, {"CPU": 16.0, "GPU": 2.0}, "this machine")


def test_engine_ray_without_ray_installed_says_how_to_install_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from covid_xray.features import featurize

    monkeypatch.chdir(tmp_path)
    paths = make_project(tmp_path, n_train=6, n_heldout=1, n_external=2)
    set_featurize(tmp_path, engine="ray")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as on a machine without it
    monkeypatch.delitem(sys.modules, "covid_xray.ray_featurize", raising=False)
    with pytest.raises(PipelineError, match=r"featurize.engine=ray: Ray is not installed here; "
                                            r"`pip install -e \"\.\[ray\]\"`"):
        featurize(paths, load_params(paths.params), progress=False)
    assert not paths.features.exists()  # stopped before any work


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_images_missing_on_a_node_is_one_line_naming_node_and_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that does not see the data folder: the worker's own error reaches the stage as
    one line (not Ray's wrapped remote traceback), naming the node, the path and the fix."""
    from covid_xray.features import plan_rows, read_manifest
    from covid_xray.modeling import build_backbone
    from covid_xray.ray_featurize import compute_features_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    paths = make_project(tmp_path, n_train=3, n_heldout=1, n_external=1)
    set_featurize(tmp_path, engine="ray")
    plan = plan_rows(read_manifest(paths.manifest), 0, 15.0, seed=0)
    backbone = build_backbone("vgg16", 32, "none", seed=0)
    elsewhere = tmp_path / "not-mounted-here"
    with pytest.raises(PipelineError) as caught:
        compute_features_ray(plan, elsewhere, backbone, tmp_path / "features.npy",
                             load_params(paths.params), progress=False)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{elsewhere}: not found on Ray node ")
    assert "share data/datasets there" in message
    assert not ray.is_initialized() and not ray_children()
