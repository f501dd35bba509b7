"""The prediction service on real (tiny) models in the pipeline's format, loaded as the app does."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import XRAY_SAMPLE, film_sized, sample_dir
from sklearn.datasets import load_sample_image

from covid_xray import imaging
from covid_xray.config import MODEL_NAMES
from covid_xray.modeling import ModelLoadError
from covid_xray.predict import DISCLAIMER, InputError, LoadedModel, PredictionService
from covid_xray.testing import demo_images_by_class


@pytest.fixture(scope="module")
def xray_jpeg() -> bytes:
    """A chest X-ray JPEG: a real one from the sample when present, else a demo image."""
    sample = sample_dir()
    if sample is not None:
        return next(iter(sorted((sample / "chest_xray" / "test" / "NORMAL").glob("*.jpeg")))
                    ).read_bytes()
    rgb = film_sized(demo_images_by_class(per_class=1, seed=9)["normal"][0])
    return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def encode(rgb: np.ndarray, ext: str = ".png") -> bytes:
    return cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def trained_on(model: LoadedModel, source: str, text: str = "") -> LoadedModel:
    """The same loaded model, its sidecar saying it was trained on ``source``."""
    info = dataclasses.replace(model.info, training_source=source, training_data=text)
    return dataclasses.replace(model, classifier=dataclasses.replace(model.classifier, info=info))


def linked_copy(models_dir: Path, target: Path) -> Path:
    """A models folder whose .keras files link to the built ones and whose .json are copies."""
    target.mkdir()
    for name in MODEL_NAMES:
        (target / f"{name}.keras").symlink_to(models_dir / f"{name}.keras")
        shutil.copy(models_dir / f"{name}.json", target / f"{name}.json")
    return target


def test_load_detects_the_shared_backbone_and_reports_health(service: PredictionService) -> None:
    assert [m.name for m in service.models] == list(MODEL_NAMES)
    assert service.shared_backbone and len(service.groups) == 1
    health = service.health()
    assert health["status"] == "ok"
    for name in MODEL_NAMES:
        entry = health["models"][name]
        assert entry["img_size"] == 32
        assert len(entry["sha256"]) == 12 and entry["revision"] == "smoke-test"
        # what each model was trained on, from its sidecar (the stand-ins: demo + the sample)
        expected = "demo" if sample_dir() is None else f"local:{XRAY_SAMPLE.name}"
        assert entry["training_source"] == expected
        assert entry["training_data"].startswith("synthetic demo images")
    assert health["limits"] == {"max_pixels": imaging.MAX_PIXELS_DEFAULT,
                                "max_decoded_bytes": imaging.MAX_DECODED_BYTES_DEFAULT,
                                "decode_slots": 2}


def test_prediction_has_every_field_and_is_json(service: PredictionService,
                                                xray_jpeg: bytes) -> None:
    result = service.predict_bytes(xray_jpeg)
    json.dumps(result)
    assert result["in_distribution"] is True and result["message"] is None
    assert result["disclaimer"] == DISCLAIMER
    assert result["image"]["format"] == "jpeg" and result["image"]["bytes"] == len(xray_jpeg)
    assert result["timing_ms"]["total"] > 0
    for name, answer in result["models"].items():
        assert answer["label"] in ("POSITIVE", "NEGATIVE")
        probs = answer["probabilities"]
        assert set(probs) == {"covid", "normal" if name == "covid_normal" else "pneumonia"}
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert answer["covid_probability"] == probs["covid"]
        assert (answer["label"] == "POSITIVE") == (probs["covid"] >= answer["threshold"])
        assert answer["class"] == ("covid" if answer["label"] == "POSITIVE"
                                   else next(c for c in probs if c != "covid"))
        assert answer["version"]["file"] == f"{name}.keras"
        assert 0 <= answer["ood_distance"] <= 1 and answer["timing_ms"] > 0


def test_scores_equal_the_full_keras_models_on_the_training_preprocessing(
        service: PredictionService, xray_jpeg: bytes) -> None:
    """Sharing the backbone is a speed-up only: same numbers as each complete model."""
    result = service.predict_bytes(xray_jpeg)
    for model in service.models:
        batch = imaging.prepare_image(xray_jpeg, model.info.img_size)[np.newaxis]
        direct = float(model.classifier.covid_scores(batch)[0])  # the complete Keras model
        assert result["models"][model.name]["covid_probability"] == pytest.approx(direct,
                                                                                  abs=1e-5)


def test_unshared_service_gives_the_same_numbers(service: PredictionService,
                                                 xray_jpeg: bytes) -> None:
    separate = PredictionService(service.models, share_backbone=False)
    assert not separate.shared_backbone and len(separate.groups) == 2
    a, b = service.predict_bytes(xray_jpeg), separate.predict_bytes(xray_jpeg)
    for name in MODEL_NAMES:
        assert a["models"][name]["probabilities"] == pytest.approx(
            b["models"][name]["probabilities"], abs=1e-5)


def test_the_sidecar_threshold_decides_the_label(models_dir: Path, tmp_path: Path,
                                                 service: PredictionService,
                                                 xray_jpeg: bytes) -> None:
    before = service.predict_bytes(xray_jpeg)["models"]["covid_normal"]
    score = before["covid_probability"]
    # a threshold just on the other side of this image's score must flip the verdict
    threshold, label = ((min(1.0, score + 1e-3), "NEGATIVE") if before["label"] == "POSITIVE"
                        else (max(0.0, score - 1e-3), "POSITIVE"))
    copy = linked_copy(models_dir, tmp_path / "models")
    sidecar = copy / "covid_normal.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "threshold": threshold}))
    answer = PredictionService.load(copy, warm_up=False).predict_bytes(xray_jpeg)
    assert answer["models"]["covid_normal"]["threshold"] == threshold
    assert answer["models"]["covid_normal"]["label"] == label


def test_out_of_distribution_gives_no_verdict(service: PredictionService) -> None:
    result = service.predict_bytes(encode(load_sample_image("flower.jpg"), ".jpg"))
    assert result["in_distribution"] is False and result["refused_by"] == "colour"
    assert "colour" in result["message"]
    for answer in result["models"].values():
        assert answer["label"] is None and answer["probabilities"] is None
        assert answer["in_distribution"] is False


def test_feature_distance_refusal_gives_no_verdict(service: PredictionService,
                                                  xray_jpeg: bytes) -> None:
    """The features path of the check: a limit tightened below this image's distance refuses it.
    The models say they were trained on real data (on a clone without the sample the smoke
    models are demo-trained, whose refusal message is the next test's)."""
    distance = max(service.predict_bytes(xray_jpeg)["checks"]["features"].values())
    real = [trained_on(m, "local:collections") for m in service.models]
    strict = PredictionService(real, ood_tolerance=distance / 2)
    result = strict.predict_bytes(xray_jpeg)
    assert result["in_distribution"] is False and result["refused_by"] == "features"
    assert "unlike the chest X-rays" in result["message"]
    for answer in result["models"].values():
        assert answer["label"] is None and answer["probabilities"] is None
        assert answer["ood_distance"] > 0  # the distance is still reported
    lenient = PredictionService(real, ood_tolerance=distance * 1.01)
    assert lenient.predict_bytes(xray_jpeg)["in_distribution"] is True
    with pytest.raises(ValueError, match="ood_tolerance"):
        PredictionService(service.models, ood_tolerance=0)


def test_demo_models_refusal_names_the_demo_data_and_the_command(
        service: PredictionService, xray_jpeg: bytes) -> None:
    """Models trained on the synthetic demo data refuse real X-rays on the feature check: the
    message must say so and how to train on real data, not ask for a chest X-ray again."""
    distance = max(service.predict_bytes(xray_jpeg)["checks"]["features"].values())
    tolerance = distance / 2  # this X-ray is refused by the feature check

    def refusal(sources: dict[str, str]) -> str:
        models = [trained_on(m, sources[m.name]) for m in service.models]
        result = PredictionService(models, ood_tolerance=tolerance).predict_bytes(xray_jpeg)
        assert result["refused_by"] == "features" and result["in_distribution"] is False
        assert all(a["label"] is None for a in result["models"].values())
        assert "\n" not in result["message"]
        return result["message"]

    both = refusal({"covid_normal": "demo", "covid_pneumonia": "demo"})
    assert both.startswith("This image is unlike the synthetic demo images that these models were "
                           "trained on (data.source=demo)")
    assert "never seen a real X-ray" in both and "Upload a frontal" not in both
    assert "dvc exp run -S data.source=download" in both and "--ood-tolerance 2" in both
    one = refusal({"covid_normal": "download", "covid_pneumonia": "demo"})
    assert "model covid_pneumonia was trained on (data.source=demo)" in one
    real = refusal({"covid_normal": "download", "covid_pneumonia": "local:collections"})
    assert "demo" not in real and "Upload a frontal (PA) chest X-ray" in real
    # the image-level checks keep their own message, whatever the training source
    photo = PredictionService([trained_on(m, "demo") for m in service.models]).predict_bytes(
        encode(load_sample_image("flower.jpg"), ".jpg"))
    assert photo["refused_by"] == "colour" and "demo" not in photo["message"]


def test_gradcam_and_preview_are_jpeg_data_urls(service: PredictionService,
                                                xray_jpeg: bytes) -> None:
    result = service.predict_bytes(xray_jpeg, gradcam=True)
    urls = [result["preview"]] + [a["gradcam"] for a in result["models"].values()]
    for url in urls:
        assert url.startswith("data:image/jpeg;base64,")
        image = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8),
                             cv2.IMREAD_COLOR)
        assert image is not None and max(image.shape[:2]) == 384
    assert result["timing_ms"]["gradcam"] > 0
    plain = service.predict_bytes(xray_jpeg)
    assert "preview" not in plain and all("gradcam" not in a for a in plain["models"].values())


@pytest.mark.parametrize(("data", "status", "text"), [
    (b"", 400, "empty"),
    (b"hello, this is text", 415, "not an image"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 200, 415, "not an image"),
])
def test_bad_bytes_raise_input_errors(service: PredictionService, data: bytes, status: int,
                                      text: str) -> None:
    with pytest.raises(InputError, match=text) as caught:
        service.predict_bytes(data)
    assert caught.value.status == status


def test_truncated_jpeg_is_a_400(service: PredictionService, xray_jpeg: bytes) -> None:
    with pytest.raises(InputError, match="truncated") as caught:
        service.predict_bytes(xray_jpeg[: len(xray_jpeg) // 2])
    assert caught.value.status == 400


def test_pixel_cap_is_configurable(service: PredictionService, xray_jpeg: bytes) -> None:
    small_cap = PredictionService(service.models, max_pixels=10_000)
    with pytest.raises(InputError, match="above the limit") as caught:
        small_cap.predict_bytes(xray_jpeg)
    assert caught.value.status == 400


# -- start-up failures name the file -----------------------------------------------------------


def test_missing_models_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="nowhere"):
        PredictionService.load(tmp_path / "nowhere")


@pytest.mark.parametrize("missing", ["covid_pneumonia.keras", "covid_normal.json"])
def test_missing_model_file_is_named(models_dir: Path, tmp_path: Path, missing: str) -> None:
    copy = linked_copy(models_dir, tmp_path / "models")
    (copy / missing).unlink()
    with pytest.raises(ModelLoadError, match=missing.replace(".", r"\.")):
        PredictionService.load(copy, warm_up=False)


def test_corrupt_keras_file_is_named(models_dir: Path, tmp_path: Path) -> None:
    copy = linked_copy(models_dir, tmp_path / "models")
    (copy / "covid_normal.keras").unlink()
    (copy / "covid_normal.keras").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelLoadError, match=r"covid_normal\.keras"):
        PredictionService.load(copy, warm_up=False)


@pytest.mark.parametrize(("change", "text"), [
    ({"format_version": 99}, "format_version"),
    ({"img_size": 64}, "do not match"),
    ({"threshold": 1.5}, "threshold"),
    ({"ood": {"method": "other"}}, "out-of-distribution"),
])
def test_incompatible_sidecar_is_named(models_dir: Path, tmp_path: Path, change: dict,
                                       text: str) -> None:
    copy = linked_copy(models_dir, tmp_path / "models")
    sidecar = copy / "covid_pneumonia.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), **change}))
    with pytest.raises(ModelLoadError, match=text) as caught:
        PredictionService.load(copy, warm_up=False)
    assert "covid_pneumonia" in str(caught.value)


def test_sidecars_swapped_between_models_are_refused_naming_both(models_dir: Path,
                                                                 tmp_path: Path) -> None:
    """Same image size, classes and feature size: only the model_sha256 binding tells that
    covid_normal.keras now sits beside covid_pneumonia's sidecar (threshold, OOD statistics)."""
    copy = linked_copy(models_dir, tmp_path / "models")
    normal, pneumonia = copy / "covid_normal.json", copy / "covid_pneumonia.json"
    normal_text = normal.read_text()
    normal.write_text(pneumonia.read_text())
    pneumonia.write_text(normal_text)
    with pytest.raises(ModelLoadError, match="not from the same training run") as caught:
        PredictionService.load(copy, warm_up=False)
    assert str(copy / "covid_normal.keras") in str(caught.value)
    assert str(normal) in str(caught.value)


def test_ood_statistics_of_another_feature_size_are_refused(models_dir: Path,
                                                            tmp_path: Path) -> None:
    copy = linked_copy(models_dir, tmp_path / "models")
    sidecar = copy / "covid_normal.json"
    info = json.loads(sidecar.read_text())
    ood = info["ood"]
    ood.update(dim=4, mean=ood["mean"][:4], scale=ood["scale"][:4], centre=ood["centre"][:4],
               components=[row[:4] for row in ood["components"]])
    sidecar.write_text(json.dumps(info))
    with pytest.raises(ModelLoadError, match=r"covid_normal\.json.*do not belong together"):
        PredictionService.load(copy, warm_up=False)


def test_a_sidecar_without_ood_statistics_is_refused_at_load(models_dir: Path,
                                                              tmp_path: Path) -> None:
    """The train stage always writes them; an empty ``ood`` was edited by hand or is foreign, and
    serving it would give a verdict on any picture (it used to load with a warning)."""
    copy = linked_copy(models_dir, tmp_path / "models")
    sidecar = copy / "covid_pneumonia.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "ood": {}}))
    with pytest.raises(ModelLoadError) as caught:
        PredictionService.load(copy, warm_up=False)
    message = str(caught.value)
    assert message.startswith(f"{sidecar}: has no out-of-distribution statistics")
    assert "dvc repro train@covid_pneumonia" in message and "\n" not in message


# -- the whole check on held-out chest X-rays the models never saw --------------------------------


def test_heldout_demo_images_are_accepted(service: PredictionService) -> None:
    """Demo images of another seed: same generator as the training images, different patients."""
    heldout = demo_images_by_class(per_class=4, seed=21)
    for label, images in heldout.items():
        for rgb in images:
            answer = service.predict_bytes(encode(rgb, ".jpg"))
            assert answer["in_distribution"] is True, (label, answer["checks"])


def test_heldout_real_xrays_are_accepted(service: PredictionService) -> None:
    sample = sample_dir()
    if sample is None:
        pytest.skip(f"real X-ray sample not found at {XRAY_SAMPLE}")
    files = sorted((sample / "chest_xray" / "test").glob("*/*.jpeg"))  # not used for fitting
    assert len(files) >= 10
    for path in files:
        answer = service.predict_bytes(path.read_bytes())
        assert answer["in_distribution"] is True, (path.name, answer["checks"])
