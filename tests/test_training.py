"""train: head on cached features, threshold on the val split, the saved full model, determinism."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_features import featurized_project

from covid_xray.config import Paths
from covid_xray.errors import PipelineError
from covid_xray.features import FeatureStore
from covid_xray.imaging import prepare_file
from covid_xray.modeling import Classifier
from covid_xray.params import load_params
from covid_xray.scores import Predictions
from covid_xray.splitting import read_split
from covid_xray.training import choose_threshold, train_model

# ---------------------------------------------------------------------------------------------
# Threshold rules (pure functions)


def test_youden_takes_the_middle_of_the_separating_gap() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.05, 0.10, 0.20, 0.60, 0.70, 0.90])
    choice = choose_threshold(y, scores, "youden")
    assert choice.threshold == pytest.approx(0.40)
    assert (choice.sensitivity, choice.specificity, choice.n) == (1.0, 1.0, 6)
    assert choice.note == ""


def test_youden_trades_errors_and_breaks_ties_towards_half() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.25, 0.6, 0.7, 0.9])
    choice = choose_threshold(y, scores, "youden")
    grid = np.linspace(0, 1, 10001)
    j = [((scores[y == 1] >= t).mean() + (scores[y == 0] < t).mean() - 1) for t in grid]
    assert (choice.sensitivity + choice.specificity - 1) == pytest.approx(max(j))
    # Two gaps reach the best J here: 0.225 (between 0.2 and 0.25) and 0.45 (0.3 / 0.6).
    assert choice.threshold == pytest.approx(0.45)


def test_target_sensitivity_is_the_highest_threshold_reaching_it() -> None:
    y = np.array([1] * 10 + [0] * 10)
    scores = np.concatenate([np.linspace(0.3, 0.95, 10), np.linspace(0.0, 0.5, 10)])
    choice = choose_threshold(y, scores, "target_sensitivity", target_sensitivity=0.8)
    assert choice.sensitivity == pytest.approx(0.8)
    # It sits in the gap just below the 8th-highest COVID score (no higher gap keeps 80%).
    eighth = np.sort(scores[y == 1])[::-1][7]
    below = scores[scores < eighth].max()
    assert below < choice.threshold < eighth
    full = choose_threshold(y, scores, "target_sensitivity", target_sensitivity=1.0)
    assert full.sensitivity == 1.0 and full.threshold <= scores[y == 1].min()


def test_argmax_and_fallbacks_say_what_happened() -> None:
    y, s = np.array([0, 1]), np.array([0.2, 0.9])
    assert choose_threshold(y, s, "argmax").threshold == 0.5
    empty = choose_threshold(np.zeros(0, int), np.zeros(0), "youden")
    assert empty.threshold == 0.5 and "fallback" in empty.note and empty.n == 0
    one_class = choose_threshold(np.ones(3, int), np.array([0.2, 0.4, 0.9]), "youden")
    assert one_class.threshold == 0.5 and "fallback" in one_class.note
    useless = choose_threshold(np.array([0, 1, 0, 1]), np.array([0.7, 0.7, 0.7, 0.7]), "youden")
    assert useless.threshold == 0.5 and "separate" in useless.note


# ---------------------------------------------------------------------------------------------
# Training on a tiny synthetic project


@pytest.fixture(scope="module")
def featurized(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Paths]:
    with featurized_project(tmp_path_factory.mktemp("train")) as paths:
        yield paths


@pytest.fixture(scope="module")
def trained(featurized: Paths) -> Paths:
    from stages.train import main

    assert Path(os.getcwd()) == featurized.root
    main(["covid_normal"])
    return featurized


def test_stage_saves_model_sidecar_and_dvclive_logs(trained: Paths) -> None:
    info = json.loads((trained.models / "covid_normal.json").read_text())
    assert info["class_names"] == ["covid", "normal"] and info["positive_class"] == "covid"
    assert info["img_size"] == 32 and info["backbone"] == "vgg16" and info["weights"] == "none"
    assert 0.0 < info["threshold"] < 1.0
    assert info["params"]["threshold_choice"]["rule"] == "youden"
    assert info["params"]["train"]["dropout"] == 0.5
    assert info["revision"]  # a short commit, or "unknown" outside git
    assert info["ood"]["method"] and info["ood"]["n_train"] > 0
    live = trained.metrics / "train" / "covid_normal"
    for side in ("train", "eval"):
        for metric in ("loss", "accuracy"):
            table = pd.read_csv(live / "plots" / "metrics" / side / f"{metric}.tsv", sep="\t")
            assert list(table["step"]) == [0, 1, 2]  # one row per epoch (epochs: 3)
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["threshold"]["value"] == pytest.approx(info["threshold"])
    assert summary["eval"]["accuracy"] > 0.7  # the synthetic classes are learnable
    assert not (trained.root / "dvc.yaml").exists()  # dvcyaml=False: nothing appended


def test_saved_full_model_scores_like_the_head_on_cached_features(trained: Paths) -> None:
    """Serving (full model on decoded pixels) and training (head on cached features) agree."""
    classifier = Classifier.load(trained.model_file("covid_normal"))
    store = FeatureStore.open(trained.features)
    split = read_split(trained.split_file("covid_normal"), "covid_normal")
    picked = split.groupby("split").head(2)
    rows, owner = store.rows(picked["sha256"].tolist())
    head = classifier.model.get_layer("head")
    cached = np.asarray(head(store.take(rows), training=False))[:, classifier.info.positive_index]
    images = np.stack([prepare_file(trained.datasets / p, 32)
                       for p in picked["path"].to_numpy()[owner]])
    full = classifier.covid_scores(images)
    np.testing.assert_allclose(full, cached, atol=1e-4)
    assert len(set(np.round(full, 3))) > 1  # not a constant model
    stored = Predictions.open(trained.predictions_dir("covid_normal"), "covid_normal")
    originals = store.index[store.index["copy"] == 0]
    assert stored.table["sha256"].tolist() == originals["sha256"].tolist()  # every cached image
    where = stored.positions(picked["sha256"].to_numpy()[owner])
    np.testing.assert_allclose(stored.scores_at(where), full, atol=1e-4)
    assert stored.cams.shape == (len(originals), 1, 1) and (stored.cams >= 0).all()


def test_two_runs_give_identical_metrics_and_weights(featurized: Paths) -> None:
    params = load_params(featurized.params)
    first = train_model("covid_pneumonia", featurized, params, verbose=0)
    weights = Classifier.load(first.model_path).model.get_layer("head").get_weights()
    summary = (featurized.metrics / "train" / "covid_pneumonia" / "metrics.json").read_text()
    second = train_model("covid_pneumonia", featurized, params, verbose=0)
    again = Classifier.load(second.model_path).model.get_layer("head").get_weights()
    assert first.history == second.history
    assert first.threshold == second.threshold
    assert all(np.array_equal(a, b) for a, b in zip(weights, again, strict=True))
    assert (featurized.metrics / "train" / "covid_pneumonia" / "metrics.json").read_text() \
        == summary


def test_training_rows_are_train_originals_plus_their_rotated_copies(featurized: Paths) -> None:
    params = load_params(featurized.params)
    result = train_model("covid_normal", featurized, params, verbose=0)
    split = read_split(featurized.split_file("covid_normal"), "covid_normal")
    n_train = int((split["split"] == "train").sum())
    assert result.n_train_images == n_train
    assert result.n_train_rows == n_train * (1 + params.featurize.augment_copies)
    assert result.n_val == int((split["split"] == "val").sum())
    assert result.n_test == int((split["split"] == "test").sum())


def test_without_val_rows_the_threshold_falls_back_to_half(featurized: Paths,
                                                          tmp_path: Path) -> None:
    split_file = featurized.split_file("covid_pneumonia")
    original = split_file.read_text()
    split = pd.read_csv(split_file)
    split.loc[split["split"] == "val", "split"] = "train"
    split.to_csv(split_file, index=False)
    try:
        result = train_model("covid_pneumonia", featurized, load_params(featurized.params),
                             verbose=0)
    finally:
        split_file.write_text(original)
    assert result.n_val == 0 and result.threshold.threshold == 0.5
    assert "fallback" in result.threshold.note
    info = json.loads((featurized.models / "covid_pneumonia.json").read_text())
    assert info["threshold"] == 0.5 and "fallback" in info["params"]["threshold_choice"]["note"]


def test_bad_inputs_are_clear_errors(featurized: Paths, tmp_path: Path) -> None:
    from stages.train import main

    with pytest.raises(PipelineError, match="usage"):
        main(["covid_cats"])
    bad = tmp_path / "bad.csv"
    split = pd.read_csv(featurized.split_file("covid_normal"))
    split.loc[0, "label"] = "cat"
    split.to_csv(bad, index=False)
    with pytest.raises(PipelineError, match="column label"):
        read_split(bad, "covid_normal")
    split.drop(columns=["split"]).to_csv(bad, index=False)
    with pytest.raises(PipelineError, match="missing column"):
        read_split(bad, "covid_normal")
    stale = load_params(featurized.params)
    stale = type(stale)(**{**stale.__dict__,
                           "model": type(stale.model)(**{**stale.model.__dict__, "img_size": 64,
                                                         "pool_size": 2})})
    with pytest.raises(PipelineError, match="re-run featurize"):
        train_model("covid_normal", featurized, stale, verbose=0)
