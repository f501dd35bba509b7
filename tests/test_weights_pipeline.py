"""``model.weights=<file>`` end to end: the path of a user with pre-placed backbone weights.

One temporary repository (real DVC, FAST_PARAMS) whose data comes from a local folder without an
external set, as a user's would. Files that cannot load stop ``dvc repro`` at featurize's first
step with one line naming the file and what was expected; a Keras VGG16 notop file written with
``save_weights`` runs the whole pipeline without a DVC warning, the sidecar records the file and
its SHA-256, and the cached features are that file's backbone's (not the seeded random one's); the
Keras 2 layout of the same weights (the published ``..._notop.h5`` files) gives the same features.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pipeline_helpers import FAST_PARAMS, dvc_warnings, make_repo_copy, read_json, run
from test_modeling import notop, write_keras2_weights

from covid_xray.io import sha256_file

pytestmark = pytest.mark.slow

KERAS3 = "weights/vgg16_notop.weights.h5"
KERAS2 = "weights/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
MOBILENET = "weights/mobilenet_v2_notop.weights.h5"
TRUNCATED = "weights/truncated.weights.h5"
VGG16_EXPECTED = "expected VGG16 notop weights: 13 layers with weights, first kernel 3x3x3x64"


def set_params(repo: Path, section: str, **values: Any) -> None:
    params_file = repo / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params[section].update(values)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def errors(result: Any) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Path:
    from covid_xray.demo import generate_demo
    from covid_xray.params import DemoParams

    base = tmp_path_factory.mktemp("weights-pipeline")
    folder = base / "collections"  # both dataset layouts, no external/ (like most real folders)
    generate_demo(folder, DemoParams(**FAST_PARAMS["data"]["demo"]), seed=42, progress=False)
    shutil.rmtree(folder / "external")
    params = copy.deepcopy(FAST_PARAMS)
    params["data"]["source"] = str(folder)
    repo = make_repo_copy(repo_root, base / "repo", params)
    set_params(repo, "validate", external={})

    (repo / "weights").mkdir()
    vgg16 = notop("vgg16", seed=11)
    vgg16.save_weights(repo / KERAS3)
    write_keras2_weights(vgg16, repo / KERAS2)
    notop("mobilenetv2", seed=12).save_weights(repo / MOBILENET)
    data = (repo / KERAS3).read_bytes()
    (repo / TRUNCATED).write_bytes(data[:len(data) // 3])
    return repo


def test_a_file_of_another_architecture_stops_repro_at_featurizes_first_step(repo: Path) -> None:
    set_params(repo, "model", weights=MOBILENET)
    result = run(["dvc", "repro"], repo, check=False)
    assert result.returncode != 0
    assert "Running stage 'featurize'" in result.stdout
    assert errors(result) == [
        f"error: model.weights: {repo / MOBILENET}: {VGG16_EXPECTED}; the file has 104 layers "
        "with weights, first kernel 3x3x3x32 (these are MobileNetV2 notop weights: set "
        "model.backbone=mobilenetv2, or use a VGG16 file)"], result.stderr
    assert "featurize:" not in result.stderr  # no image went through the backbone
    assert not (repo / "data" / "features").exists()
    assert not list((repo / "data").glob(".features*"))  # nothing half-written either


def test_a_truncated_file_stops_featurize_naming_what_was_expected(repo: Path) -> None:
    set_params(repo, "model", weights=TRUNCATED)
    result = run(["dvc", "repro", "featurize"], repo, check=False)
    assert result.returncode != 0
    [line] = errors(result)
    assert line.startswith(f"error: model.weights: {repo / TRUNCATED} is not a readable Keras "
                           "weights file (")
    assert "truncated" in line and line.endswith(VGG16_EXPECTED)
    assert not (repo / "data" / "features").exists()


def test_a_vgg16_weights_file_runs_end_to_end_and_the_sidecar_records_it(repo: Path) -> None:
    set_params(repo, "model", weights=KERAS3)
    result = run(["dvc", "repro"], repo)
    output = result.stdout + result.stderr
    assert "Running stage 'report'" in result.stdout
    # a normal run on a local folder: no DVC warning ("'data/raw/external' is empty" was one)
    assert dvc_warnings(output) == [], output
    digest = sha256_file(repo / KERAS3)
    assert read_json(repo / "data" / "features" / "info.json")["weights_sha256"] == digest
    for model in ("covid_normal", "covid_pneumonia"):
        sidecar = read_json(repo / "models" / f"{model}.json")
        assert sidecar["weights"] == KERAS3 and sidecar["weights_sha256"] == digest
        assert sidecar["training_source"] == "local:collections"
        assert "collections/" in sidecar["training_data"]


def test_the_features_are_the_files_backbones(repo: Path) -> None:
    """The file was really used: one cached image's features equal those of a backbone loaded
    from the file, and differ from the seeded random backbone's (``weights: none``)."""
    from covid_xray.features import FeatureStore
    from covid_xray.imaging import prepare_file
    from covid_xray.modeling import build_backbone

    store = FeatureStore.open(repo / "data" / "features")
    row = store.index[store.index["copy"] == 0].iloc[0]
    image = prepare_file(repo / "data" / "datasets" / row["path"], 32)[np.newaxis]
    cached = store.take(np.array([row["row"]]))
    from_file = np.asarray(build_backbone("vgg16", 32, str(repo / KERAS3), seed=0)(image))
    random = np.asarray(build_backbone("vgg16", 32, "none", seed=42)(image))

    def relative(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).max() / np.abs(a).max())

    assert relative(cached, from_file) < 1e-4
    assert relative(cached, random) > 0.1


def test_the_keras2_layout_of_the_same_weights_gives_the_same_features(repo: Path) -> None:
    before = np.load(repo / "data" / "features" / "features.npy")
    set_params(repo, "model", weights=KERAS2)
    run(["dvc", "repro", "featurize"], repo)
    assert np.array_equal(np.load(repo / "data" / "features" / "features.npy"), before)
    info = read_json(repo / "data" / "features" / "info.json")
    assert info["weights"] == KERAS2 and info["weights_sha256"] == sha256_file(repo / KERAS2)


def test_a_weights_file_replaced_at_the_same_path_is_noticed_by_train(repo: Path) -> None:
    """DVC re-runs featurize when the path in params.yaml changes, not the file at it."""
    set_params(repo, "model", weights=KERAS3)
    run(["dvc", "repro", "featurize"], repo)
    notop("vgg16", seed=13).save_weights(repo / KERAS3)
    result = run(["dvc", "repro", "-f", "-s", "train@covid_normal"], repo, check=False)
    assert result.returncode != 0
    [line] = errors(result)
    assert line.startswith(f"error: model.weights: {repo / KERAS3} changed since featurize "
                           "computed the features")
    assert "`dvc repro -f -s featurize`" in line
