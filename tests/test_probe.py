"""Shortcut probe: fires on a planted source artefact, stays quiet when only a disease-like pattern
differs, measures the files and the model inputs side by side (a harmonisation that works lowers
the model-input AUC), and the stage writes metrics/probe.json with clear warnings (never
failing)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from covid_xray import ood
from covid_xray.demo import generate_demo
from covid_xray.errors import PipelineError
from covid_xray.imaging import model_view
from covid_xray.params import DemoParams, Preprocessing
from covid_xray.probe import (
    CvResult,
    ProbeResult,
    Probes,
    border_mean,
    cross_validated_auc,
    describe_files,
    describe_image,
    pixel_stats,
    probe_img_size,
    probe_model,
    probe_random_features,
    unique_records,
)
from covid_xray.testing import demo_images_by_class

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


def probe_files(files: list[Path], labels: list[str], preprocessing: Preprocessing,
                backbone: bool = True, size: int = 32) -> ProbeResult:
    """Both probes, files and model inputs, as the stage runs them (one patient per file)."""
    records, skipped = describe_files(files, thumb_size=size, progress=False,
                                      preprocessing=preprocessing, model_size=size)
    assert skipped == []
    features = (probe_random_features(unique_records(records), "vgg16", seed=0, progress=False)
                if backbone else None)
    return probe_model("covid_normal", files, labels, [f.name for f in files], records, features,
                       positive="covid", negative="normal", threshold=0.8, folds=5, seed=42,
                       backbone="vgg16", img_size=size, model_img_size=size,
                       preprocessing=preprocessing)


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
    # with the default preprocessing the model sees the seed's stretch: the same thumbnail
    assert np.array_equal(png.model_thumbnail, png.thumbnail)


def test_model_input_statistics_are_those_of_what_the_model_sees() -> None:
    """Measured on ``model_view`` at the model's size, not on the file: no size, format or
    channel count left, and a cropped frame is gone."""
    grey = np.full((60, 80), 90, np.uint8)
    grey[:6, :] = 250  # a bright burnt-in band along the top
    colour = cv2.merge([grey, grey, np.clip(grey.astype(int) + 40, 0, 255).astype(np.uint8)])
    data = cv2.imencode(".png", colour)[1].tobytes()
    prep = Preprocessing(grayscale=True, crop_border=0.15)
    record = describe_image(data, 16, preprocessing=prep, model_size=48)
    view = model_view(cv2.cvtColor(colour, cv2.COLOR_BGR2RGB), 48, prep)
    assert record.model_stats == pixel_stats(view)
    assert set(record.model_stats) == {"colour", "mean", "std", "border_mean"}
    assert record.model_stats["colour"] == 0.0 and record.stats["colour"] > 0.1
    assert record.model_stats["std"] < 1e-6 < 0.1 < record.stats["std"]  # the band is cut off
    assert np.array_equal(record.model_thumbnail,
                          model_view(cv2.cvtColor(colour, cv2.COLOR_BGR2RGB), 16, prep))
    assert not np.array_equal(record.model_thumbnail, record.thumbnail)


def test_probe_img_size_is_capped() -> None:
    assert probe_img_size(224) == 64 and probe_img_size(32) == 32


def test_trivial_probe_fires_on_planted_source_artefact(tmp_path: Path) -> None:
    make_dataset(tmp_path, "artefact")
    result = trivial_probe(tmp_path)
    assert result.raw.trivial.auc is not None and result.raw.trivial.auc > 0.95
    assert result.raw_fired and result.raw.trivial.grouped
    names = [name for name, _ in result.raw.top_trivial]
    assert {"height", "aspect", "format=png", "format=jpeg", "border_mean"} & set(names[:3])
    # the stretched model input still shows the marker: the verdict fires
    assert result.fired and result.trivial_fired and result.model_input.trivial.auc > 0.95
    model_warning, files_warning = result.warnings()
    assert model_warning.startswith("WARNING covid_normal: image statistics alone separate covid "
                                    "from normal in the model's input (AUC ")
    assert "data SOURCE, not disease" in model_warning and "DeGrave et al. 2021" in model_warning
    assert files_warning.startswith("WARNING covid_normal: the FILES of covid and normal differ")
    assert files_warning.endswith("and the model's input still shows it.")
    metrics = result.metrics()
    assert metrics["fired"] is True and metrics["raw"]["backbone_auc"] is None
    details = result.details()
    assert details["threshold"] == 0.8 and details["images"] == 60
    assert details["preprocess"] == Preprocessing().as_dict()


def test_trivial_probe_fires_on_a_corner_marker_alone(tmp_path: Path) -> None:
    make_dataset(tmp_path, "marker")
    result = trivial_probe(tmp_path)
    assert result.raw_fired and result.trivial_fired, result
    # the marker raises the frame's brightness and the image's contrast, nothing else
    for probes in (result.raw, result.model_input):
        assert {name for name, _ in probes.top_trivial[:2]} == {"std", "border_mean"}
        assert all(coef > 0 for _, coef in probes.top_trivial[:2])


def test_trivial_probe_stays_quiet_when_only_disease_differs(tmp_path: Path) -> None:
    make_dataset(tmp_path, "disease")
    result = trivial_probe(tmp_path)
    for probes in (result.raw, result.model_input):
        assert probes.trivial.auc is not None and probes.trivial.auc < 0.7
    assert not result.fired and result.warnings() == []
    assert result.metrics()["fired"] is False


def _result(raw: tuple[float, float], seen: tuple[float, float]) -> ProbeResult:
    return ProbeResult(model="covid_pneumonia", positive="covid", negative="pneumonia",
                       images=40, skipped=0,
                       raw=Probes(CvResult(raw[0], 5, True), CvResult(raw[1], 5, True),
                                  [("channels", 1.2), ("width", 0.3)]),
                       model_input=Probes(CvResult(seen[0], 5, True), CvResult(seen[1], 5, True),
                                          [("mean", 0.2)]),
                       threshold=0.8, backbone="mobilenetv2", img_size=64, model_img_size=224)


def test_random_features_alone_warn_but_do_not_decide_the_verdict() -> None:
    """An untrained network also sees real lesions: its AUC is reported, not the verdict."""
    result = _result(raw=(0.62, 0.95), seen=(0.6, 0.93))
    assert not result.fired and result.random_fired and not result.trivial_fired
    [warning] = result.warnings()
    assert warning.startswith("WARNING covid_pneumonia: an UNTRAINED mobilenetv2 (random "
                              "weights) separates covid from pneumonia in the model's input "
                              "(AUC 0.93 > 0.80)")
    assert result.metrics() == {"raw": {"stats_auc": 0.62, "backbone_auc": 0.95},
                                "model_input": {"stats_auc": 0.6, "backbone_auc": 0.93},
                                "fired": False}
    assert result.details()["random_fired"] is True


def test_files_that_differ_only_in_storage_warn_without_firing() -> None:
    """The files' statistics separate the classes, the model's input does not: the collections
    are confounded, the preprocessing hides it; the verdict is about what the model sees."""
    result = _result(raw=(0.99, 0.7), seen=(0.61, 0.7))
    assert result.raw_fired and not result.fired
    [warning] = result.warnings()
    assert warning == ("WARNING covid_pneumonia: the FILES of covid and pneumonia differ in "
                       "storage and exposure (statistics AUC 0.99 > 0.80; strongest: channels "
                       "(+1.20), width (+0.30)), but the model's input does not (AUC 0.61): the "
                       "preprocessing hides those statistics.")
    assert result.metrics()["fired"] is False and result.details()["raw_fired"] is True


def tinted(rgb: np.ndarray) -> np.ndarray:
    """A warm colour cast of about the same luma (a figure copied from a paper), mild enough
    for the server's colour check to accept it as an X-ray."""
    return np.clip(rgb.astype(np.int16) + np.array([8, 0, -18], np.int16), 0, 255).astype(np.uint8)


def test_grayscale_lowers_the_model_input_auc_when_only_colour_storage_differs(
        tmp_path: Path) -> None:
    """Demo chests: every COVID image stored colour-tinted, every NORMAL one grey (the real
    collections' RGB-vs-grey difference). The files stay separable; with ``grayscale`` the
    model's input no longer is."""
    images = demo_images_by_class(per_class=24, max_side=96, seed=5)
    files, labels = [], []
    for label in ("covid", "normal"):
        for k, rgb in enumerate(images[label]):
            pixels = tinted(rgb) if label == "covid" else rgb[:, :, 0]
            assert ood.check_image(tinted(rgb)).ok
            path = tmp_path / f"{label}{k}.png"
            assert cv2.imwrite(str(path), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
                               if pixels.ndim == 3 else pixels)
            files.append(path)
            labels.append(label)
    seed_recipe = probe_files(files, labels, Preprocessing())
    grey = probe_files(files, labels, Preprocessing(grayscale=True))
    for result in (seed_recipe, grey):  # the files do not change
        assert result.raw.trivial.auc > 0.95 and result.raw_fired
    assert seed_recipe.model_input.trivial.auc > 0.95 and seed_recipe.fired
    assert seed_recipe.model_input.top_trivial[0][0] == "colour"
    assert grey.model_input.trivial.auc < 0.75 and not grey.fired
    assert grey.model_input.random.auc < seed_recipe.model_input.random.auc - 0.15


def test_crop_border_lowers_the_model_input_auc_on_the_planted_artefact_demo(
        tmp_path: Path) -> None:
    """``data.demo.plant_artifact``: a light frame and a corner label burnt into every COVID
    image. Cutting 15% off each side removes both from the model's input."""
    generate_demo(tmp_path, DemoParams(covid_patients=24, kermany_train=24, kermany_test=1,
                                       max_side=96, plant_artifact=True), seed=3, progress=False)
    with (tmp_path / "covid-chestxray-dataset" / "metadata.csv").open(encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["finding"].strip().endswith("COVID-19")
                and r["view"] == "PA" and r["modality"] == "X-ray"]
    covid = [p for r in rows if (p := tmp_path / "covid-chestxray-dataset" / r["folder"]
                                 / r["filename"]).is_file()]
    normal = sorted((tmp_path / "chest_xray" / "train" / "NORMAL").iterdir())
    files, labels = covid + normal, ["covid"] * len(covid) + ["normal"] * len(normal)
    seed_recipe = probe_files(files, labels, Preprocessing())
    cropped = probe_files(files, labels, Preprocessing(crop_border=0.15))
    assert seed_recipe.model_input.trivial.auc > 0.95 and seed_recipe.fired
    assert seed_recipe.model_input.top_trivial[0][0] == "border_mean"
    assert cropped.raw.trivial.auc > 0.95  # the files still carry the marker
    assert cropped.model_input.trivial.auc < 0.7 and not cropped.fired
    assert cropped.model_input.random.auc < seed_recipe.model_input.random.auc - 0.1


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


def run_probe_stage(root: Path, monkeypatch: pytest.MonkeyPatch,
                    preprocess: dict | None = None) -> dict:
    from stages.probe import main

    (root / "params.yaml").write_text(yaml.safe_dump({
        "model": {"backbone": "vgg16", "img_size": 32, "pool_size": 1},
        "preprocess": preprocess or {}, "probe": {"auc_threshold": 0.8, "folds": 5}}))
    monkeypatch.delenv("COVID_XRAY_ROOT", raising=False)
    monkeypatch.chdir(root)
    main()
    tracked = json.loads((root / "metrics" / "probe.json").read_text())
    details = json.loads((root / "reports" / "probe" / "details.json").read_text())
    # DVC tracks the verdict only; the report reads the rest from the details
    assert tracked == {model: {key: entry[key] for key in ("raw", "model_input", "fired")}
                       for model, entry in details.items()}
    return tracked


def test_stage_warns_with_artefact_and_not_without(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    make_dataset(tmp_path / "artefact", "artefact", per_class=24)
    metrics = run_probe_stage(tmp_path / "artefact", monkeypatch)
    assert set(metrics) == {"covid_normal", "covid_pneumonia"}
    details = json.loads((tmp_path / "artefact" / "reports" / "probe" / "details.json")
                         .read_text())
    for name, model in metrics.items():
        assert set(model) == {"raw", "model_input", "fired"}  # compact: the rest is in details
        assert model["fired"] is True
        for view in ("raw", "model_input"):
            assert model[view]["stats_auc"] > 0.9
            assert model[view]["backbone_auc"] > 0.8  # an untrained VGG16 sees the marker too
        # the default preprocessing IS the seed's stretch: one backbone pass, the same AUC
        assert model["raw"]["backbone_auc"] == model["model_input"]["backbone_auc"]
        assert details[name]["images"] == 48 and details[name]["probe_img_size"] == 32
        assert details[name]["preprocess"] == Preprocessing().as_dict()
        assert {k: details[name][k] for k in model} == model
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("WARNING covid_pneumonia: image statistics alone separate covid "
                            "from pneumonia") for w in warnings)
    assert any("an UNTRAINED vgg16 (random weights)" in w for w in warnings)

    caplog.clear()
    make_dataset(tmp_path / "clean", "disease", per_class=24)
    metrics = run_probe_stage(tmp_path / "clean", monkeypatch)
    for model in metrics.values():
        assert model["fired"] is False
        assert model["raw"]["stats_auc"] < 0.8 and model["model_input"]["stats_auc"] < 0.8
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_stage_measures_the_model_input_with_params_preprocess(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The corner marker is inside the outer 20%: ``crop_border`` takes it out of the model's
    input, and only the model-input AUCs fall."""
    make_dataset(tmp_path, "marker", per_class=24)
    seed_recipe = run_probe_stage(tmp_path, monkeypatch)
    cropped = run_probe_stage(tmp_path, monkeypatch, {"crop_border": 0.2, "grayscale": True})
    details = json.loads((tmp_path / "reports" / "probe" / "details.json").read_text())
    assert details["covid_normal"]["preprocess"]["crop_border"] == 0.2
    for name in seed_recipe:
        assert cropped[name]["raw"] == seed_recipe[name]["raw"]
        assert seed_recipe[name]["model_input"]["stats_auc"] > 0.9
        assert cropped[name]["model_input"]["stats_auc"] < 0.75
        assert (cropped[name]["model_input"]["backbone_auc"]
                < seed_recipe[name]["model_input"]["backbone_auc"] - 0.1)


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
    assert result.raw.trivial.auc is not None and result.raw.trivial.auc > 0.8
    assert result.raw_fired


def test_report_puts_the_model_input_aucs_beside_the_files(tmp_path: Path) -> None:
    from covid_xray.report import RunMetrics, probe_lines, render_model_card

    result = _result(raw=(0.99, 0.97), seen=(0.61, 0.83))
    details = {**result.details(), "preprocessing": Preprocessing(grayscale=True).describe()}
    run = RunMetrics(selection={}, copy_images={}, split={}, audit={},
                     probe={"covid_pneumonia": details}, evaluate={}, validate={},
                     models={}, source={})
    [line, recipe] = probe_lines(run)
    assert ("image-statistics AUC 0.990 on the files, 0.610 on the model's input; "
            "untrained-backbone AUC 0.970 / 0.830 (threshold 0.80): below the threshold") in line
    assert "channels, width (files), mean (model input)" in line
    assert "An untrained network with random weights also separates them (AUC 0.830)" in line
    assert recipe.startswith("- Model input: `decode->RGB->grey(luma)->") and "224 px" in recipe
    card = render_model_card(run, "covid_pneumonia")
    assert ("image-statistics AUC 0.990 / 0.610, untrained-backbone AUC 0.970 / 0.830." in card)
    fired = RunMetrics(selection={}, copy_images={}, split={}, audit={},
                       probe={"covid_pneumonia": {**details, "fired": True}}, evaluate={},
                       validate={}, models={}, source={})
    assert "not disease**. An untrained network" in probe_lines(fired)[0]  # one full stop
