"""evaluate / validate: metrics and bootstrap intervals, plot data, held-out and external sets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import f1_score, precision_score, roc_auc_score
from test_features import featurized_project, make_project

from covid_xray.config import MODEL_NAMES, Paths
from covid_xray.datasets import external_files
from covid_xray.errors import PipelineError
from covid_xray.evaluation import (
    GRID_CAPTION,
    GRID_GAP,
    GRID_TILE_MIN,
    GRID_TITLE,
    METRIC_NAMES,
    GradcamExample,
    binary_metrics,
    bootstrap_cis,
    classification_table,
    draw_gradcam_grid,
    file_patient_id,
    metrics_with_ci,
    roc_points,
    score_bin,
)
from covid_xray.gradcam import gradcam_heatmap, heatmap_from_cam
from covid_xray.imaging import prepare_file
from covid_xray.modeling import Classifier
from covid_xray.params import load_params
from covid_xray.scores import Predictions
from covid_xray.training import train_model

# ---------------------------------------------------------------------------------------------
# Metric arithmetic


def test_metrics_match_hand_counts_and_sklearn() -> None:
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.4, 0.3, 0.35, 0.1, 0.2, 0.6, 0.05, 0.3])
    m = binary_metrics(y, s, threshold=0.5)  # TP 2, FN 2, FP 1, TN 5
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["sensitivity"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["precision"] == pytest.approx(precision_score(y, s >= 0.5))
    assert m["f1"] == pytest.approx(f1_score(y, s >= 0.5))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, s))  # includes a tied pair (0.3)
    lower = binary_metrics(y, s, threshold=0.25)
    assert lower["sensitivity"] == 1.0 and lower["specificity"] < m["specificity"]


def test_numpy_auc_roc_and_report_equal_sklearn() -> None:
    """The stages avoid importing sklearn (seconds per process); the NumPy versions must give
    exactly what it gives, ties included."""
    from sklearn.metrics import classification_report, roc_curve

    rng = np.random.default_rng(3)
    for _ in range(100):
        n = int(rng.integers(2, 40))
        values = np.round(rng.random((4, n)), 1)  # many ties
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        assert binary_metrics(y, values[2], 0.5)["roc_auc"] == pytest.approx(
            roc_auc_score(y, values[2]), abs=1e-6)
        for ours, theirs in zip(roc_points(y, values[0]),
                                roc_curve(y, values[0], drop_intermediate=False), strict=True):
            np.testing.assert_allclose(ours, theirs)
        actual = np.where(y == 1, "covid", "normal")
        predicted = np.where(values[1] >= 0.5, "covid", "normal")
        predicted[:2] = ["normal", "covid"]  # both classes on both sides (sklearn then prints
        # integer supports; with an empty class it switches to floats, a quirk not copied)
        assert classification_table(actual, predicted, ["covid", "normal"]) == \
            classification_report(actual, predicted, labels=["covid", "normal"], digits=4,
                                  zero_division=0)


def test_undefined_metrics_are_null_not_nan() -> None:
    only_negatives = binary_metrics(np.zeros(4, int), np.array([0.1, 0.2, 0.7, 0.3]), 0.5)
    assert only_negatives["sensitivity"] is None and only_negatives["roc_auc"] is None
    assert only_negatives["specificity"] == 0.75
    none_flagged = binary_metrics(np.array([1, 0]), np.array([0.1, 0.2]), 0.5)
    assert none_flagged["precision"] is None and none_flagged["f1"] == 0.0
    empty = metrics_with_ci(np.zeros(0, int), np.zeros(0), 0.5, 20, 0)
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["accuracy_ci_low"] is None
    json.dumps(empty, allow_nan=False)


def test_score_bins_cover_zero_to_one() -> None:
    assert [score_bin(v) for v in (0.0, 0.05, 0.1, 0.5, 0.99, 1.0)] == [
        "0.0-0.1", "0.0-0.1", "0.1-0.2", "0.5-0.6", "0.9-1.0", "0.9-1.0"]


def test_bootstrap_intervals_are_seeded_stratified_and_shrink_with_n() -> None:
    rng = np.random.default_rng(1)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat([1, 0], n // 2)
        return y, np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)

    y, s = sample(30)
    a = bootstrap_cis(y, s, 0.5, 300, seed=7)
    assert a == bootstrap_cis(y, s, 0.5, 300, seed=7)
    assert a != bootstrap_cis(y, s, 0.5, 300, seed=8)
    point = binary_metrics(y, s, 0.5)
    for name in METRIC_NAMES:
        low, high = a[name]
        assert 0.0 <= low <= point[name] <= high <= 1.0
    big_y, big_s = sample(3000)
    b = bootstrap_cis(big_y, big_s, 0.5, 300, seed=7)
    assert (b["accuracy"][1] - b["accuracy"][0]) < (a["accuracy"][1] - a["accuracy"][0]) / 3
    assert bootstrap_cis(y, s, 0.5, 0, seed=7)["accuracy"] is None
    # Stratified: even one COVID image among many keeps sensitivity defined in every resample.
    rare = bootstrap_cis(np.array([1] + [0] * 20), np.linspace(1, 0, 21), 0.5, 200, seed=0)
    assert rare["sensitivity"] == [1.0, 1.0] and rare["roc_auc"] == [1.0, 1.0]


def _auc_pairs(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mann-Whitney AUC of every resample (last axis = images), straight from its definition."""
    greater = (pos[..., :, np.newaxis] > neg[..., np.newaxis, :]).mean(axis=(-2, -1))
    tied = (pos[..., :, np.newaxis] == neg[..., np.newaxis, :]).mean(axis=(-2, -1))
    return greater + 0.5 * tied


def test_image_level_intervals_equal_scipy_bootstrap_percentile() -> None:
    """Fixed data, the same generator and seed: scipy.stats.bootstrap resamples each sample
    (COVID scores, then negative scores) independently with ``rng.integers(0, n, (B, n))``,
    which is what our class-stratified image bootstrap draws, so the percentile intervals must
    agree to the 1e-6 rounding of the metrics files, not just statistically."""
    from scipy.stats import bootstrap

    rng = np.random.default_rng(11)
    pos = np.round(np.clip(rng.normal(0.65, 0.2, 23), 0, 1), 2)  # rounded: ties across classes
    neg = np.round(np.clip(rng.normal(0.4, 0.2, 31), 0, 1), 2)
    y = np.r_[np.ones(len(pos), int), np.zeros(len(neg), int)]
    scores = np.r_[pos, neg]
    threshold, resamples, seed = 0.5, 2000, 5
    ours = bootstrap_cis(y, scores, threshold, resamples, seed)
    statistics = {
        "sensitivity": lambda p, n, axis: (p >= threshold).mean(axis=axis),
        "specificity": lambda p, n, axis: (n < threshold).mean(axis=axis),
        "accuracy": lambda p, n, axis: ((p >= threshold).sum(axis=axis)
                                        + (n < threshold).sum(axis=axis)) / (len(pos) + len(neg)),
        "roc_auc": lambda p, n, axis: _auc_pairs(p, n),
    }
    for name, statistic in statistics.items():
        theirs = bootstrap((pos, neg), statistic, paired=False, vectorized=True,
                           n_resamples=resamples, method="percentile",
                           rng=np.random.default_rng(seed)).confidence_interval
        assert ours[name] == pytest.approx([theirs.low, theirs.high], abs=1e-6), name


def test_one_image_per_patient_gives_the_image_level_intervals() -> None:
    rng = np.random.default_rng(2)
    y = rng.permutation(np.repeat([1, 0], [17, 25]))
    scores = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    patients = [f"patient-{code}" for code in rng.permutation(1000)[:len(y)]]  # unsorted ids
    assert bootstrap_cis(y, scores, 0.5, 500, seed=3, patients=patients) == \
        bootstrap_cis(y, scores, 0.5, 500, seed=3)


def test_patient_intervals_are_wider_when_a_patients_images_agree() -> None:
    """Six images per patient with near-identical scores carry about one patient's worth of
    information: resampling the images one by one pretends they are six times as many."""
    rng = np.random.default_rng(4)
    n_patients, per_patient = 16, 6
    y_patient = np.repeat([1, 0], n_patients // 2)
    effect = np.clip(rng.normal(0.4 + 0.25 * y_patient, 0.2), 0, 1)
    y = np.repeat(y_patient, per_patient)
    scores = np.clip(np.repeat(effect, per_patient) + rng.normal(0, 0.01, len(y)), 0, 1)
    patients = np.repeat([f"p{i}" for i in range(n_patients)], per_patient)
    by_patient = bootstrap_cis(y, scores, 0.5, 1000, seed=0, patients=patients)
    by_image = bootstrap_cis(y, scores, 0.5, 1000, seed=0)
    for name in ("accuracy", "sensitivity", "specificity", "roc_auc"):
        wide = by_patient[name][1] - by_patient[name][0]
        narrow = by_image[name][1] - by_image[name][0]
        assert wide > 1.5 * narrow, (name, by_patient[name], by_image[name])
    with_unit = metrics_with_ci(y, scores, 0.5, 200, 0, patients=patients)
    assert (with_unit["bootstrap_unit"], with_unit["bootstrap_units"]) == ("patient", 16)
    assert metrics_with_ci(y, scores, 0.5, 200, 0)["bootstrap_unit"] == "image"


def test_patients_with_both_classes_and_unknown_patients() -> None:
    y = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    scores = np.array([0.9, 0.2, 0.8, 0.7, 0.3, 0.6, 0.4, 0.1])
    mixed = ["a", "a", "b", "c", "d", "e", "", ""]  # patient a has both; two unknown patients
    cis = bootstrap_cis(y, scores, 0.5, 300, seed=1, patients=mixed)
    point = binary_metrics(y, scores, 0.5)
    for name in ("accuracy", "roc_auc"):
        assert cis[name][0] <= point[name] <= cis[name][1]
    assert metrics_with_ci(y, scores, 0.5, 50, 1, patients=mixed)["bootstrap_units"] == 7
    assert file_patient_id("/x/person12_bacteria_3.jpeg") == "kermany-person12"
    assert file_patient_id("/x/CR.1.2.840.113564.1.png") == ""  # unknown: its own patient


def test_gradcam_grid_has_a_row_per_set_and_marks_wrong_and_unreadable_examples(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    image = tmp_path / "chest.png"
    ramp = np.tile(np.linspace(0, 255, 48, dtype=np.uint8), (48, 1))
    assert cv2.imwrite(str(image), np.dstack([ramp, ramp.T, ramp]))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cam = np.array([[0.0, 1.0], [0.5, 0.0]], dtype=np.float32)
    examples = [GradcamExample("heldout", "covid", image, cam, 0.9),
                GradcamExample("heldout", "covid", image, cam, 0.2),  # missed: wrong verdict
                GradcamExample("heldout", "covid", image, cam, 0.8),
                GradcamExample("external:b", "normal", broken, cam, 0.1)]
    with caplog.at_level("WARNING"):
        grid = draw_gradcam_grid("covid_normal", examples, 32, threshold=0.5)
    assert str(broken) in caplog.text  # never a silent gap
    tile, row = GRID_TILE_MIN, GRID_TILE_MIN + GRID_CAPTION + GRID_GAP
    assert grid.shape == (GRID_TITLE + 2 * row, 3 * (tile + GRID_GAP) + GRID_GAP, 3)

    def cell(r: int, c: int) -> tuple[np.ndarray, np.ndarray]:
        top, left = GRID_TITLE + r * row, GRID_GAP + c * (tile + GRID_GAP)
        return (grid[top:top + tile, left:left + tile],
                grid[top + tile:top + tile + GRID_CAPTION, left:left + tile])

    def orange(band: np.ndarray) -> int:
        return int(((band[..., 0] > 200) & (band[..., 1] > 100) & (band[..., 1] < 200)
                    & (band[..., 2] < 80)).sum())

    assert cell(0, 0)[0].std() > 10  # the overlay
    assert orange(cell(0, 1)[1]) > 20 and orange(cell(0, 0)[1]) == orange(cell(0, 2)[1]) == 0
    unreadable, caption = cell(1, 0)
    assert (unreadable == 160).all() and (caption.max(axis=2) > 200).sum() > 50
    assert (cell(1, 1)[0] == 255).all() and (cell(1, 2)[1] == 255).all()  # short row: blank
    assert draw_gradcam_grid("covid_normal", [], 32, 0.5) is None


# ---------------------------------------------------------------------------------------------
# The stages on a tiny synthetic project


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Paths]:
    with featurized_project(tmp_path_factory.mktemp("evaluate")) as paths:
        params = load_params(paths.params)
        for model in MODEL_NAMES:
            train_model(model, paths, params, verbose=0)
        yield paths


def test_evaluate_writes_metrics_plots_and_reports(trained: Paths) -> None:
    from stages.evaluate import main

    for model in MODEL_NAMES:  # copy_images merged pairs of test patients (shared pictures)
        split = pd.read_csv(trained.split_file(model), dtype=str)
        test = split.index[split["split"] == "test"]
        split.loc[test[1::2], "patient_group"] = split.loc[test[0::2], "patient_group"].to_numpy()[
            : len(test[1::2])]
        split.to_csv(trained.split_file(model), index=False)
    main()
    first = trained.details("evaluate").read_text()
    results = json.loads(first)
    tracked = json.loads((trained.metrics / "evaluate.json").read_text())
    assert set(tracked) == set(MODEL_NAMES)
    for model in MODEL_NAMES:
        m = results[model]
        # DVC tracks the test ROC AUC, sensitivity and specificity with their CIs, nothing else
        assert tracked[model] == {key: m[key] for name in ("roc_auc", "sensitivity",
                                                           "specificity")
                                  for key in (name, f"{name}_ci_low", f"{name}_ci_high")}
        info = json.loads((trained.models / f"{model}.json").read_text())
        assert m["threshold"] == info["threshold"] and m["threshold_rule"] == "youden"
        split = pd.read_csv(trained.split_file(model))
        assert m["n_test"] == int((split["split"] == "test").sum()) == m["n_covid"] + \
            m["n_negative"]
        for name in METRIC_NAMES:
            assert m[name] is not None
            assert m[f"{name}_ci_low"] <= m[f"{name}_ci_high"]
        assert m["roc_auc"] > 0.8 and m["accuracy"] > 0.7  # clearly above chance
        test_rows = split[split["split"] == "test"]
        assert m["bootstrap_unit"] == "patient"
        assert m["bootstrap_units"] == test_rows["patient_group"].nunique() < test_rows[
            "patient_id"].nunique()  # the group is the unit the split kept together
        confusion = pd.read_csv(trained.plots / "evaluate" / f"{model}_confusion.csv")
        assert list(confusion.columns) == ["actual", "predicted"]
        assert len(confusion) == m["n_test"]
        agree = (confusion["actual"] == confusion["predicted"]).mean()
        assert agree == pytest.approx(m["accuracy"])
        roc = pd.read_csv(trained.plots / "evaluate" / f"{model}_roc.csv")
        assert list(roc.columns) == ["fpr", "tpr", "threshold"]
        assert roc["fpr"].is_monotonic_increasing and roc["tpr"].iloc[-1] == 1.0
        report = (trained.reports / "evaluate" / f"{model}_classification_report.txt").read_text()
        assert f"threshold {m['threshold']:.4f}" in report and "small" in report
    main()  # seeded: the same inputs give the same file
    assert trained.details("evaluate").read_text() == first


def test_validate_scores_heldout_and_external_sets(trained: Paths) -> None:
    from stages.validate import main

    main()
    results = json.loads(trained.details("validate").read_text())
    tracked = json.loads((trained.metrics / "validate.json").read_text())
    assert results["skipped_images"] == 0
    set_keys = ("roc_auc", "roc_auc_ci_low", "roc_auc_ci_high", "sensitivity", "specificity")
    assert tracked == {model: {"heldout": {key: results[model]["heldout"][key]
                                           for key in set_keys},
                               "external": {"ext": {key: results[model]["external"]["ext"][key]
                                                    for key in set_keys}}}
                       for model in MODEL_NAMES}
    for model, negative in (("covid_normal", "normal"), ("covid_pneumonia", "pneumonia")):
        m = results[model]
        assert set(m["sets"]) == {"heldout_covid", "heldout_normal", "heldout_pneumonia",
                                  "kermany_test_normal", "kermany_test_pneumonia",
                                  "external_ext_covid", "external_ext_normal"}
        for s in m["sets"].values():
            assert s["n"] > 0 and 0 <= s["flagged_positive"] <= s["n"]
            assert 0 <= s["median_score"] <= 1
        assert m["sets"]["heldout_covid"]["flagged_positive"] >= 3  # 4 learnable COVID images
        assert m["heldout"]["n"] == 4 + 4 + 4  # covid + heldout negative + kermany_test negative
        assert m["heldout"]["n_covid"] == 4 and m["heldout"]["roc_auc"] > 0.8
        assert m["test"]["n"] > 0 and m["test"]["roc_auc_ci_low"] is not None
        assert m["test"]["bootstrap_unit"] == m["heldout"]["bootstrap_unit"] == "patient"
        assert m["heldout"]["bootstrap_units"] == 12  # one image per patient in this project
        ext = m["external"]["ext"]
        assert ext["n_covid"] == 6 and ext["n_negative"] == (6 if negative == "normal" else 0)
        assert ext["bootstrap_unit"] == "image"  # ext-covid00.png: no patient in the name
        scores = pd.read_csv(trained.plots / "validate" / f"{model}_scores.csv")
        assert list(scores.columns) == ["set", "label", "score", "score_bin"]
        low = scores["score_bin"].str.slice(0, 3).astype(float)
        assert ((low <= scores["score"]) & (scores["score"] <= low + 0.1)).all()
        assert {"test", "heldout_covid", "external_ext_covid"} <= set(scores["set"])
        # one grid per model: a row per set of its two classes, one tile each (gradcam_images
        # is 1), 32 px maps enlarged to the smallest tile
        grid = cv2.imread(str(trained.plots / "gradcam" / f"{model}.png"))
        rows, tile = (5 if negative == "normal" else 4), GRID_TILE_MIN
        assert grid.shape == (GRID_TITLE + rows * (tile + GRID_CAPTION + GRID_GAP),
                              tile + 2 * GRID_GAP, 3)
        for r in range(rows):  # each tile: an overlay above a dark band with white captions
            top = GRID_TITLE + r * (tile + GRID_CAPTION + GRID_GAP)
            band = grid[top + tile:top + tile + GRID_CAPTION, GRID_GAP:GRID_GAP + tile]
            assert (band.max(axis=2) > 200).sum() > 100 and np.median(band) < 50
            assert grid[top:top + tile, GRID_GAP:GRID_GAP + tile].std() > 10
    assert sorted(p.name for p in (trained.plots / "gradcam").iterdir()) == [
        "covid_normal.png", "covid_pneumonia.png"]
    summary = (trained.reports / "validate" / "summary.txt").read_text()
    assert "external ext" in summary and "held-out" in summary


def test_stored_external_predictions_equal_the_full_saved_models(trained: Paths) -> None:
    """validate reads scores and Grad-CAM maps stored by train; they are what the saved full
    model (the one the app serves) computes from the decoded external image."""
    files = external_files("ext", "data/raw/external", trained.root).iloc[:4]
    images = np.stack([prepare_file(p, 32) for p in files["path"]])
    for model in MODEL_NAMES:
        classifier = Classifier.load(trained.model_file(model))
        stored = Predictions.open(trained.predictions_dir(model), model)
        where = stored.positions(files["sha256"].tolist())
        assert (where >= 0).all()
        np.testing.assert_allclose(stored.scores_at(where), classifier.covid_scores(images),
                                   atol=1e-5)
        for i, image in enumerate(images):
            live = gradcam_heatmap(classifier, image)
            np.testing.assert_allclose(heatmap_from_cam(stored.cams[where[i]], 32), live,
                                       atol=1e-3)


def test_validate_lists_images_without_features_as_skipped(trained: Paths) -> None:
    from stages.validate import main

    broken = trained.root / "data" / "raw" / "external" / "normal" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")  # added after featurize: no prediction
    try:
        main()
    finally:
        broken.unlink()
    results = json.loads(trained.details("validate").read_text())
    skipped = pd.read_csv(trained.reports / "validate" / "skipped.csv")
    assert results["skipped_images"] == 1 and skipped["path"].tolist() == [str(broken)]
    assert skipped["set"].tolist() == ["external_ext_normal"]
    assert results["covid_normal"]["sets"]["external_ext_normal"]["n"] == 6


def test_evaluate_and_validate_do_not_import_tensorflow(trained: Paths) -> None:
    """The head-only experiment budget: only the train stages pay TensorFlow's import."""
    import subprocess
    import sys

    code = ("import sys, stages.evaluate, stages.validate, stages.report; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_external_folder_names_the_params_key(trained: Paths) -> None:
    from stages.validate import main

    params = yaml.safe_load(trained.params.read_text())
    original = trained.params.read_text()
    params["validate"]["external"] = {"hospital_b": "data/raw/nowhere"}
    trained.params.write_text(yaml.safe_dump(params))
    before = (trained.metrics / "validate.json").stat().st_mtime_ns \
        if (trained.metrics / "validate.json").exists() else None
    try:
        with pytest.raises(PipelineError, match=r"validate\.external\.hospital_b.*nowhere"):
            main()
    finally:
        trained.params.write_text(original)
    after = (trained.metrics / "validate.json").stat().st_mtime_ns \
        if (trained.metrics / "validate.json").exists() else None
    assert before == after  # failed before writing anything
    empty = trained.root / "empty_ext"
    (empty / "covid").mkdir(parents=True)
    with pytest.raises(PipelineError, match="no images"):
        external_files("empty", str(empty), Path("/"))


def test_evaluate_without_models_says_what_to_run(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    paths = make_project(tmp_path, n_train=10, n_heldout=1, n_external=1)
    monkeypatch.chdir(tmp_path)
    from stages.evaluate import main

    with pytest.raises(PipelineError, match=r"covid_normal\.json.*dvc repro"):
        main()
    assert not (paths.metrics / "evaluate.json").exists()
