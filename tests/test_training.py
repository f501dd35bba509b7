"""train: head on cached features, threshold on the val split, the saved full model, determinism."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_features import featurized_project

from covid_xray.config import Paths
from covid_xray.errors import PipelineError
from covid_xray.features import FeatureStore
from covid_xray.imaging import prepare_file
from covid_xray.modeling import Classifier, ModelLoadError
from covid_xray.params import load_params
from covid_xray.scores import Predictions, covid_labels
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


def test_per_epoch_eval_curves_are_the_val_split_never_the_test_split(trained: Paths) -> None:
    """Keras's validation data is the val carve-out: dvclive's last ``eval`` row is the saved
    model's loss and accuracy on the val images, not on the test images (which only the evaluate
    stage scores, once, from the predictions written after training).

    Both are recomputed from the stored probabilities alone: the training loss is the
    cross-entropy of the softmax probabilities (``training.LOSS``), -log p(true class).
    """
    curves = trained.metrics / "train" / "covid_normal" / "plots" / "metrics" / "eval"
    eval_loss = float(pd.read_csv(curves / "loss.tsv", sep="\t")["loss"].iloc[-1])
    eval_accuracy = float(pd.read_csv(curves / "accuracy.tsv", sep="\t")["accuracy"].iloc[-1])
    stored = Predictions.open(trained.predictions_dir("covid_normal"), "covid_normal")
    split = read_split(trained.split_file("covid_normal"), "covid_normal")

    def loss_and_accuracy(side: str) -> tuple[float, float]:
        part = split[split["split"] == side]
        covid = covid_labels(part["label"]).astype(bool)
        score = stored.scores_at(stored.positions(part["sha256"].tolist()))
        p_true = np.clip(np.where(covid, score, 1.0 - score), 1e-7, 1.0)
        accuracy = float(np.mean((score > 0.5) == covid))  # Keras's argmax accuracy
        return float(np.mean(-np.log(p_true))), accuracy

    val_loss, val_accuracy = loss_and_accuracy("val")
    test_loss, _ = loss_and_accuracy("test")
    assert eval_loss == pytest.approx(val_loss, rel=1e-3)  # float32 sums in other batches
    assert eval_accuracy == pytest.approx(val_accuracy, abs=1e-6)
    assert eval_loss != pytest.approx(test_loss, rel=2e-2)  # the test split's is another number


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


def test_sidecars_swapped_between_two_trained_runs_are_refused(
        trained: Paths, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two real runs of covid_pneumonia (threshold rule youden vs argmax, so the sidecars carry
    different thresholds); a .keras file beside the other run's sidecar used to load with the
    wrong threshold. Now the loader, the app and the CLI refuse the pair, naming both files."""
    from covid_xray.cli import main as cli_main
    from covid_xray.serving.app import create_app

    raw = yaml.safe_load(trained.params.read_text())
    raw["threshold"]["rule"] = "argmax"
    argmax_file = tmp_path / "params-argmax.yaml"
    argmax_file.write_text(yaml.safe_dump(raw))
    runs: dict[str, Path] = {}
    for rule, params in (("youden", load_params(trained.params)),
                         ("argmax", load_params(argmax_file))):
        result = train_model("covid_pneumonia", trained, params, verbose=0)
        folder = tmp_path / rule
        folder.mkdir()
        for name in ("covid_normal", "covid_pneumonia"):
            for ext in (".keras", ".json"):
                shutil.copy(trained.model_file(name).with_suffix(ext), folder / f"{name}{ext}")
        assert Classifier.load(folder / "covid_pneumonia.keras").info.threshold == \
            result.threshold.threshold  # each run's own pair loads
        runs[rule] = folder
    assert Classifier.load(runs["argmax"] / "covid_pneumonia.keras").info.threshold == 0.5
    assert Classifier.load(runs["youden"] / "covid_pneumonia.keras").info.threshold != 0.5

    youden_sidecar = (runs["youden"] / "covid_pneumonia.json").read_bytes()
    (runs["youden"] / "covid_pneumonia.json").write_bytes(
        (runs["argmax"] / "covid_pneumonia.json").read_bytes())
    (runs["argmax"] / "covid_pneumonia.json").write_bytes(youden_sidecar)
    image = trained.datasets / split_path(trained, "covid_pneumonia", "test")
    for folder in runs.values():
        model, sidecar = folder / "covid_pneumonia.keras", folder / "covid_pneumonia.json"
        with pytest.raises(ModelLoadError) as caught:
            Classifier.load(model)
        assert str(model) in str(caught.value) and str(sidecar) in str(caught.value)
        assert "dvc repro train@covid_pneumonia" in str(caught.value)
        with pytest.raises(ModelLoadError, match="not from the same training run"):
            create_app({"MODELS_DIR": str(folder)})
        assert cli_main(["predict", str(image), "--models-dir", str(folder)]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1  # one line, no verdict printed
        assert str(model) in err and str(sidecar) in err


def split_path(paths: Paths, model_name: str, side: str) -> str:
    split = read_split(paths.split_file(model_name), model_name)
    return str(split.loc[split["split"] == side, "path"].iloc[0])
