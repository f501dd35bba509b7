"""Serving sees exactly the pixels training saw, for every ``preprocess`` option: the service
reads the settings from each model's sidecar (never from params.yaml) and feeds the model the
same array featurize computed, bit for bit; the app and the CLI give the numbers of the full
Keras model on that input; models with different preprocessing are served side by side."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import sample_dir
from test_preprocessing import OPTIONS, film, tinted

from covid_xray.cli import main
from covid_xray.config import MODEL_NAMES
from covid_xray.evaluation import gradcam_overlay
from covid_xray.features import iter_batches
from covid_xray.imaging import DEFAULT_PREPROCESSING, prepare_file
from covid_xray.modeling import Classifier, ModelLoadError
from covid_xray.params import Preprocessing
from covid_xray.predict import PredictionService, heatmap_on_image
from covid_xray.serving.app import create_app
from covid_xray.testing import build_smoke_models, demo_images_by_class

IMG_SIZE = 32  # the session's smoke models (conftest ``models_dir``)
# The smoke models' feature check is fitted on a few images (demo ones on a clone without the
# real sample), and a restyled upload falls outside it; the check has its own tests, and here
# every upload must get a verdict so that the numbers can be compared.
OOD_TOLERANCE = 100.0


@pytest.fixture(scope="module")
def uploads(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A colour-tinted, framed, wide demo chest film (every option changes its model input) and
    a real X-ray from the sample when present."""
    folder = tmp_path_factory.mktemp("uploads")
    chest = demo_images_by_class(per_class=1, max_side=160, seed=7)["covid"][0]
    wide = cv2.resize(chest, (180, 120), interpolation=cv2.INTER_LINEAR)
    wide[:6], wide[-6:], wide[:, :6], wide[:, -6:] = 235, 235, 235, 235
    path = folder / "framed.png"
    assert cv2.imwrite(str(path), cv2.cvtColor(tinted(wide), cv2.COLOR_RGB2BGR))
    files = [path]
    sample = sample_dir()
    if sample is not None:
        files.append(sorted((sample / "chest_xray" / "test" / "NORMAL").glob("*.jpeg"))[0])
    return files


def with_preprocessing(models_dir: Path, target: Path,
                       settings: dict[str, Preprocessing | None]) -> Path:
    """The smoke models, their sidecars rewritten with these settings (None: the field removed,
    as in a sidecar written before it existed). The .keras files are links, so the SHA-256
    binding still holds."""
    target.mkdir()
    for name in MODEL_NAMES:
        (target / f"{name}.keras").symlink_to(models_dir / f"{name}.keras")
        sidecar = json.loads((models_dir / f"{name}.json").read_text())
        sidecar.pop("preprocess", None)
        if settings.get(name) is not None:
            sidecar["preprocess"] = settings[name].as_dict()
        (target / f"{name}.json").write_text(json.dumps(sidecar))
    return target


def featurize_inputs(files: list[Path], preprocessing: Preprocessing) -> np.ndarray:
    """The model inputs featurize computes for these files (its own batch code)."""
    root = Path(os.path.commonpath([f.parent for f in files]))
    plan = pd.DataFrame({"row": range(len(files)),
                         "path": [os.path.relpath(f, root) for f in files], "angle": 0.0})
    [batch] = list(iter_batches(plan, root, IMG_SIZE, len(files), preprocessing))
    assert batch.skipped == [] and batch.plan_rows == list(range(len(files)))
    return batch.images


@pytest.mark.parametrize("name", list(OPTIONS))
def test_service_inputs_equal_featurize_inputs_bit_for_bit(name: str, models_dir: Path,
                                                           tmp_path: Path,
                                                           uploads: list[Path]) -> None:
    prep = OPTIONS[name]
    service = PredictionService.load(
        with_preprocessing(models_dir, tmp_path / "models", dict.fromkeys(MODEL_NAMES, prep)),
        warm_up=False, ood_tolerance=OOD_TOLERANCE)
    assert len(service.groups) == 1 and service.groups[0].preprocessing == prep
    expected = featurize_inputs(uploads, prep)
    for i, path in enumerate(uploads):
        data = path.read_bytes()
        rgb, _ = service.decode(data)
        served = service.groups[0].prepare(rgb)
        assert served.dtype == expected.dtype == np.float32
        assert np.array_equal(served[0], expected[i]), path
        answer = service.predict_bytes(data, gradcam=True)
        for model in service.models:
            direct = float(model.classifier.covid_scores(expected[i:i + 1])[0])
            assert answer["models"][model.name]["covid_probability"] == pytest.approx(
                direct, abs=1e-5)
            assert answer["models"][model.name]["gradcam"].startswith("data:image/jpeg;base64,")
    # the sidecar's settings were applied, not the seed's
    assert not np.array_equal(expected[0], prepare_file(uploads[0], IMG_SIZE))


def test_models_with_different_preprocessing_are_served_side_by_side(
        models_dir: Path, tmp_path: Path, uploads: list[Path]) -> None:
    """Same backbone weights, different inputs: two groups, each model fed its own input."""
    settings = {"covid_normal": OPTIONS["grayscale"], "covid_pneumonia": OPTIONS["all"]}
    service = PredictionService.load(with_preprocessing(models_dir, tmp_path / "models",
                                                        settings), warm_up=False,
                                     ood_tolerance=OOD_TOLERANCE)
    assert len(service.groups) == 2 and not service.shared_backbone
    health = service.health()["models"]
    for name, prep in settings.items():
        assert health[name]["preprocessing"] == prep.describe()
    data = uploads[0].read_bytes()
    answer = service.predict_bytes(data, gradcam=True)
    for model in service.models:
        own = featurize_inputs(uploads[:1], settings[model.name])
        assert answer["models"][model.name]["covid_probability"] == pytest.approx(
            float(model.classifier.covid_scores(own)[0]), abs=1e-5)


def test_sidecars_without_preprocess_mean_the_seeds_recipe(models_dir: Path, tmp_path: Path,
                                                           uploads: list[Path]) -> None:
    copy = with_preprocessing(models_dir, tmp_path / "models", {})
    classifier = Classifier.load(copy / "covid_normal.keras")
    assert classifier.info.preprocess == DEFAULT_PREPROCESSING
    service = PredictionService.load(copy, warm_up=False)
    rgb, _ = service.decode(uploads[0].read_bytes())
    assert np.array_equal(service.groups[0].prepare(rgb)[0], prepare_file(uploads[0], IMG_SIZE))


@pytest.mark.parametrize(("value", "message"), [
    ({"equalize": "sharpen"}, "`preprocess.equalize` must be one of"),
    ({"crop_border": 0.9}, "`preprocess.crop_border` must be in [0, 0.4], got 0.9"),
    ({"grey": True}, "unknown key `preprocess.grey`"),
    ("grayscale", "`preprocess` must be a mapping of settings"),
])
def test_bad_preprocess_in_a_sidecar_is_named(models_dir: Path, tmp_path: Path, value: object,
                                              message: str) -> None:
    copy = with_preprocessing(models_dir, tmp_path / "models", {})
    sidecar = copy / "covid_pneumonia.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "preprocess": value}))
    with pytest.raises(ModelLoadError) as caught:
        PredictionService.load(copy, warm_up=False)
    assert str(caught.value).startswith(f"{sidecar}: ")
    assert message in str(caught.value)


@pytest.fixture(scope="module")
def harmonised_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Smoke models trained on inputs preprocessed with every option at once, the settings
    saved in their sidecars as the train stage does."""
    images = demo_images_by_class(per_class=6, max_side=96, seed=2)
    return build_smoke_models(tmp_path_factory.mktemp("harmonised"), images, img_size=IMG_SIZE,
                              epochs=2, preprocessing=OPTIONS["all"])


def test_saved_sidecars_carry_the_preprocessing(harmonised_models: Path) -> None:
    for name in MODEL_NAMES:
        raw = json.loads((harmonised_models / f"{name}.json").read_text())
        assert raw["preprocess"] == OPTIONS["all"].as_dict()
        assert raw["preprocessing"] == OPTIONS["all"].describe()
        assert Classifier.load(harmonised_models / f"{name}.keras").info.preprocess == \
            OPTIONS["all"]


def test_app_and_cli_apply_the_sidecars_preprocessing(harmonised_models: Path,
                                                      uploads: list[Path],
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    path = uploads[0]
    expected = {}
    for name in MODEL_NAMES:
        classifier = Classifier.load(harmonised_models / f"{name}.keras")
        expected[name] = float(classifier.covid_scores(
            prepare_file(path, IMG_SIZE, preprocessing=OPTIONS["all"])[np.newaxis])[0])
    app = create_app({"MODELS_DIR": str(harmonised_models), "TESTING": True,
                      "OOD_TOLERANCE": OOD_TOLERANCE})
    response = app.test_client().post("/api/predict", data={"file": (path.open("rb"),
                                                                      path.name)})
    assert response.status_code == 200, response.get_json()
    status = main(["predict", str(path), "--models-dir", str(harmonised_models),
                   "--ood-tolerance", str(OOD_TOLERANCE)])
    cli_answer = json.loads(capsys.readouterr().out.splitlines()[0])
    assert status == 0
    for answer in (response.get_json(), cli_answer):
        for name in MODEL_NAMES:
            assert answer["models"][name]["covid_probability"] == pytest.approx(
                expected[name], abs=1e-5)


# -- Grad-CAM lines up with the part of the image the model saw ---------------------------------


def test_heatmap_maps_back_onto_what_the_model_saw() -> None:
    heat = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    plain = heatmap_on_image(heat, (120, 180), (60, 90), DEFAULT_PREPROCESSING)
    assert np.array_equal(plain, cv2.resize(heat, (90, 60), interpolation=cv2.INTER_LINEAR))
    cropped = heatmap_on_image(heat, (120, 180), (60, 90), Preprocessing(crop_border=0.1))
    assert cropped[:6].max() == cropped[-6:].max() == cropped[:, :9].max() == 0.0
    assert cropped[6:54, 9:81].min() > 0.0
    centre = heatmap_on_image(heat, (120, 180), (60, 90), Preprocessing(resize="center_crop"))
    assert centre[:, :15].max() == centre[:, 75:].max() == 0.0 and centre[:, 15:75].min() > 0
    bars = np.zeros((32, 32), np.float32)
    bars[:5], bars[-5:] = 1.0, 1.0  # heat only in pad's bars: nothing of the image
    assert heatmap_on_image(bars, (120, 180), (60, 90), Preprocessing(resize="pad")).max() == 0


def test_validate_overlays_are_drawn_on_the_models_view(tmp_path: Path) -> None:
    wide = film(60, 120, seed=3)
    path = tmp_path / "wide.png"
    assert cv2.imwrite(str(path), wide)
    cam = np.zeros((1, 1), np.float32)
    stretched = gradcam_overlay(path, cam, 32, 32)
    padded = gradcam_overlay(path, cam, 32, 32, Preprocessing(resize="pad"))
    # a 60 x 120 image padded to 32 x 32: black bars fill the top and bottom quarter
    bottom = padded[-8:]
    assert (bottom == bottom[0, 0]).all()
    assert not (stretched[-8:] == stretched[-8, 0]).all()
