"""``dvc exp run -S preprocess.grayscale=true`` through featurize, train and probe (32 px): the
setting reaches the feature store, the model's sidecar and the probe, and the served model
computes the very features featurize cached for the same file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pipeline_helpers import FAST_PARAMS, make_repo_copy, read_json, run

from covid_xray.features import FeatureStore
from covid_xray.params import Preprocessing
from covid_xray.predict import PredictionService

pytestmark = pytest.mark.slow


def test_grayscale_runs_through_featurize_train_and_probe(tmp_path: Path,
                                                          repo_root: Path) -> None:
    repo = make_repo_copy(repo_root, tmp_path / "repo", FAST_PARAMS)
    run(["dvc", "exp", "run", "-S", "preprocess.grayscale=true", "train@covid_normal", "probe"],
        repo)
    grey = Preprocessing(grayscale=True)
    store = FeatureStore.open(repo / "data" / "features")
    assert store.info["preprocess"] == grey.as_dict() and store.preprocessing == grey
    sidecar = read_json(repo / "models" / "covid_normal.json")
    assert sidecar["preprocess"] == grey.as_dict()
    assert sidecar["params"]["preprocess"]["grayscale"] is True
    probe = read_json(repo / "metrics" / "probe.json")
    details = read_json(repo / "reports" / "probe" / "details.json")
    for model in ("covid_normal", "covid_pneumonia"):
        assert probe[model]["model_input"]["stats_auc"] is not None
        assert details[model]["preprocess"] == grey.as_dict()

    # serving = training: the served model's backbone on the uploaded file gives the features
    # featurize cached for it (the backbone sees the same grey input)
    service = PredictionService.load(repo / "models", names=["covid_normal"], warm_up=False)
    [group] = service.groups
    assert group.preprocessing == grey
    backbone = group.models[0].classifier.model.get_layer("backbone")
    originals = store.index[store.index["copy"] == 0].head(6)
    for row, path in originals[["row", "path"]].itertuples(index=False, name=None):
        rgb, _ = service.decode((repo / "data" / "datasets" / path).read_bytes())
        batch = group.prepare(rgb)
        assert np.array_equal(batch[..., 0], batch[..., 2])  # one grey channel, replicated
        served = np.asarray(backbone(batch, training=False))
        np.testing.assert_allclose(served, store.take(np.array([row])), rtol=1e-4, atol=1e-5)
