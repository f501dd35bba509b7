"""Shortcut probe: fires on a planted source artefact, stays quiet when only a disease-like pattern
differs, and the stage writes metrics/probe.json with clear warnings (never failing)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from covid_xray.errors import PipelineError
from covid_xray.probe import (
    CvResult,
    ProbeResult,
    border_mean,
    cross_validated_auc,
    describe_files,
    describe_image,
    probe_img_size,
    probe_model,
)

SPLIT_HEADER = ["path", "label", "patient_id", "sha256", "split"]
SIZES = [(64, 64), (60, 52), (52, 60)]  # (height, width)


def chest(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A crude chest film: random exposure, two darker lung fields, coarse texture, noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.full((height, width), rng.uniform(70, 150), np.float32)
    for cx in (0.32, 0.68):
        lung = np.exp(-(((xx - cx * width) / (0.15 * width)) ** 2
                        + ((yy - 0.5 * height) / (0.3 * height)) ** 2))
        image -= rng.uniform(30, 60) * lung
    coarse = rng.normal(0, rng.uniform(5, 20), (6, 6)).astype(np.float32)
    image += cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return image + rng.normal(0, 3, (height, width)).astype(np.float32)


def disease(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """A faint zero-mean mottled texture over the lungs: changes no size, format or exposure."""
    height, width = image.shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pattern = np.sin(xx * 1.3 + rng.uniform(0, 6)) * np.sin(yy * 1.1 + rng.uniform(0, 6))
    region = np.exp(-(((xx - 0.5 * width) / (0.3 * width)) ** 2
                      + ((yy - 0.5 * height) / (0.25 * height)) ** 2))
    return image + 8.0 * pattern * region


def make_image(rng: np.random.Generator, positive: bool, scenario: str) -> tuple[np.ndarray, str]:
    """One grey image and its file extension. Scenarios:

    - ``disease``: sizes and formats drawn from the same distribution for both classes; the
      positive class only carries :func:`disease`;
    - ``artefact``: positives are PNG, 56 x 64 and carry a bright corner marker (a source artefact);
      negatives are 64 x 64 JPEG;
    - ``marker``: as ``disease`` (same sizes and formats), but positives carry the corner marker.
    """
    height, width = SIZES[rng.integers(len(SIZES))]
    ext = (".jpeg", ".png")[rng.integers(2)]
    if scenario == "artefact":
        height, width, ext = (56, 64, ".png") if positive else (64, 64, ".jpeg")
    image = chest(rng, height, width)
    if positive and scenario == "disease":
        image = disease(rng, image)
    if positive and scenario in ("artefact", "marker"):
        image[0:10, 0:10] = 255.0
    return np.clip(image, 0, 255).astype(np.uint8), ext


def make_dataset(root: Path, scenario: str, per_class: int = 30, seed: int = 0) -> None:
    """data/datasets/<model>/<label>/ and data/splits/<model>.csv, as the data stages write them;
    the COVID images are shared by both models (one patient per image)."""
    rng = np.random.default_rng(seed)
    splits = rng.choice(["train", "val", "test"], p=[0.6, 0.2, 0.2], size=3 * per_class)
    datasets = root / "data" / "datasets"
    rows: dict[str, list[list[str]]] = {"covid_normal": [], "covid_pneumonia": []}
    for label, models in (("covid", ("covid_normal", "covid_pneumonia")),
                          ("normal", ("covid_normal",)), ("pneumonia", ("covid_pneumonia",))):
        for k in range(per_class):
            image, ext = make_image(rng, label == "covid", scenario)
            for model in models:
                rel = f"{model}/{label}/{label}{k}{ext}"
                (datasets / rel).parent.mkdir(parents=True, exist_ok=True)
                assert cv2.imwrite(str(datasets / rel), image)
                rows[model].append([rel, label, f"{label}-{k}", "", splits[k]])
    for model, model_rows in rows.items():
        split_csv = root / "data" / "splits" / f"{model}.csv"
        split_csv.parent.mkdir(parents=True, exist_ok=True)
        with split_csv.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(SPLIT_HEADER)
            writer.writerows(model_rows)


def trivial_probe(root: Path, model: str = "covid_normal", threshold: float = 0.8):
    """Probe (a) only (no backbone), straight from a fixture's split file."""
    with (root / "data" / "splits" / f"{model}.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    files = [root / "data" / "datasets" / row["path"] for row in rows]
    records, skipped = describe_files(files, thumb_size=32, progress=False)
    assert skipped == []
    return probe_model(model, files, [r["label"] for r in rows], [r["patient_id"] for r in rows],
                       records, None, positive="covid", negative=model.split("_")[1],
                       threshold=threshold, folds=5, seed=42, backbone="vgg16", img_size=32)


def test_border_mean_reads_the_outer_frame_only() -> None:
    image = np.zeros((100, 80), np.float32)
    image[:5, :] = 1.0  # top 5% rows
    assert border_mean(image) == pytest.approx(5 * 80 / (100 * 80 - 90 * 72))
    image[50, 40] = 1000.0  # the centre does not count
    assert border_mean(image) == pytest.approx(5 * 80 / (100 * 80 - 90 * 72))


def test_describe_image_reads_stored_format_and_channels() -> None:
    grey = np.full((30, 40), 100, np.uint8)
    colour = cv2.merge([grey, grey, np.full_like(grey, 200)])  # BGR: strong red in RGB
    png = describe_image(cv2.imencode(".png", grey)[1].tobytes(), 16)
    jpeg = describe_image(cv2.imencode(".jpg", colour)[1].tobytes(), 16)
    assert (png.format, png.stats["channels"], png.stats["width"], png.stats["height"]) == (
        "png", 1.0, 40.0, 30.0)
    assert png.stats["aspect"] == pytest.approx(40 / 30)
    assert png.stats["colour"] == 0.0 and png.stats["std"] == 0.0
    assert jpeg.format == "jpeg" and jpeg.stats["channels"] == 3.0
    assert jpeg.stats["colour"] > 0.3
    assert png.thumbnail.shape == (16, 16, 3) and png.thumbnail.dtype == np.uint8


def test_probe_img_size_is_capped() -> None:
    assert probe_img_size(224) == 64 and probe_img_size(32) == 32


def test_trivial_probe_fires_on_planted_source_artefact(tmp_path: Path) -> None:
    make_dataset(tmp_path, "artefact")
    result = trivial_probe(tmp_path)
    assert result.trivial.auc is not None and result.trivial.auc > 0.95
    assert result.fired and result.trivial_fired and result.trivial.grouped
    names = [name for name, _ in result.top_trivial]
    assert {"height", "aspect", "format=png", "format=jpeg", "border_mean"} & set(names[:3])
    [warning] = result.warnings()
    assert warning.startswith("WARNING covid_normal: image statistics alone separate covid from "
                              "normal (AUC ")
    assert "data SOURCE, not disease" in warning and "DeGrave et al. 2021" in warning
    metrics = result.metrics()
    assert metrics["fired"] is True and metrics["threshold"] == 0.8
    assert metrics["random_features_auc"] is None and metrics["images"] == 60


def test_trivial_probe_fires_on_a_corner_marker_alone(tmp_path: Path) -> None:
    make_dataset(tmp_path, "marker")
    result = trivial_probe(tmp_path)
    assert result.trivial_fired, result.trivial
    # the marker raises the frame's brightness and the image's contrast, nothing else
    assert {name for name, _ in result.top_trivial[:2]} == {"std", "border_mean"}
    assert all(coef > 0 for _, coef in result.top_trivial[:2])


def test_trivial_probe_stays_quiet_when_only_disease_differs(tmp_path: Path) -> None:
    make_dataset(tmp_path, "disease")
    result = trivial_probe(tmp_path)
    assert result.trivial.auc is not None and result.trivial.auc < 0.7
    assert not result.fired and result.warnings() == []
    assert result.metrics()["fired"] is False


def test_random_features_alone_warn_but_do_not_decide_the_verdict() -> None:
    """An untrained network also sees real lesions: its AUC is reported, not the verdict."""
    result = ProbeResult(model="covid_pneumonia", positive="covid", negative="pneumonia",
                         images=40, skipped=0, trivial=CvResult(0.62, 5, True),
                         random=CvResult(0.93, 5, True), top_trivial=[("width", 0.3)],
                         threshold=0.8, backbone="mobilenetv2", img_size=64)
    assert not result.fired and result.random_fired and not result.trivial_fired
    [warning] = result.warnings()
    assert warning.startswith("WARNING covid_pneumonia: an UNTRAINED mobilenetv2 (random "
                              "weights) separates covid from pneumonia (AUC 0.93 > 0.80)")
    metrics = result.metrics()
    assert (metrics["fired"], metrics["random_fired"], metrics["random_features_auc"]) == (
        False, True, 0.93)


def test_foreign_labels_are_a_clear_error() -> None:
    with pytest.raises(PipelineError, match=r"covid_normal: label\(s\) 'normal' are neither "
                                            r"'covid' nor 'pneumonia'"):
        probe_model("covid_normal", [], ["covid", "normal"], ["a", "b"], {}, None,
                    positive="covid", negative="pneumonia", threshold=0.8, folds=5, seed=0,
                    backbone="vgg16", img_size=32)


def test_cross_validation_adapts_to_few_patients() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(12, 3))
    labels = np.array([0] * 6 + [1] * 6)
    features[labels == 1, 0] += 5.0
    # three patients per class: three grouped folds, not five
    patients = [f"p{i // 2}" for i in range(12)]
    grouped = cross_validated_auc(features, labels, patients, folds=5, seed=1)
    assert grouped.grouped and grouped.folds == 3 and grouped.auc == 1.0
    # one patient holds every positive: grouping is impossible, plain stratified folds instead
    single = cross_validated_auc(features, labels, ["a"] * 6 + ["b"] * 6, folds=5, seed=1)
    assert not single.grouped and single.folds == 5
    assert cross_validated_auc(features[:7], labels[:7], patients[:7], 5, 1).auc is None


def run_probe_stage(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    from stages.probe import main

    (root / "params.yaml").write_text(yaml.safe_dump({
        "model": {"backbone": "vgg16", "img_size": 32, "pool_size": 1},
        "probe": {"auc_threshold": 0.8, "folds": 5}}))
    monkeypatch.delenv("COVID_XRAY_ROOT", raising=False)
    monkeypatch.chdir(root)
    main()
    tracked = json.loads((root / "metrics" / "probe.json").read_text())
    details = json.loads((root / "reports" / "probe" / "details.json").read_text())
    # DVC tracks the verdict only; the report reads the rest from the details
    assert tracked == {model: {key: entry[key] for key in ("trivial_stats_auc",
                                                           "random_features_auc", "fired")}
                       for model, entry in details.items()}
    return details


def test_stage_warns_with_artefact_and_not_without(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    make_dataset(tmp_path / "artefact", "artefact", per_class=24)
    metrics = run_probe_stage(tmp_path / "artefact", monkeypatch)
    assert set(metrics) == {"covid_normal", "covid_pneumonia"}
    for model in metrics.values():
        assert model["fired"] is True and model["trivial_stats_auc"] > 0.9
        assert model["random_features_auc"] > 0.8  # an untrained VGG16 sees the marker too
        assert model["images"] == 48 and model["probe_img_size"] == 32
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("WARNING covid_pneumonia: image statistics alone separate covid "
                            "from pneumonia") for w in warnings)
    assert any("an UNTRAINED vgg16 (random weights)" in w for w in warnings)

    caplog.clear()
    make_dataset(tmp_path / "clean", "disease", per_class=24)
    metrics = run_probe_stage(tmp_path / "clean", monkeypatch)
    for model in metrics.values():
        assert model["fired"] is False and model["trivial_stats_auc"] < 0.8
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_real_sample_sources_are_separable_from_statistics(xray_sample: Path) -> None:
    """The real collections differ in storage alone (the seed's shortcut, measured)."""
    covid = sorted((xray_sample / "covid-chestxray-dataset" / "images").iterdir())
    normal = sorted((xray_sample / "chest_xray").glob("*/NORMAL/*.jpeg"))
    files = covid + normal
    records, skipped = describe_files(files, thumb_size=32, progress=False)
    assert skipped == []
    labels = ["covid"] * len(covid) + ["normal"] * len(normal)
    result = probe_model("covid_normal", files, labels, [f.name for f in files], records, None,
                         positive="covid", negative="normal", threshold=0.8, folds=5, seed=42,
                         backbone="vgg16", img_size=32)
    assert result.trivial.auc is not None and result.trivial.auc > 0.8
    assert result.fired
