"""``params.preprocess``: one function from decoded image to model input, every option on small
images, and the defaults bit for bit the seed's recipe on real and demo files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import sample_dir

from covid_xray.demo import generate_demo
from covid_xray.errors import ParamsError
from covid_xray.imaging import (
    load_image,
    model_view,
    model_views,
    prepare_file,
    prepare_image,
    prepare_rgb,
    rotate,
    view_geometry,
)
from covid_xray.params import DemoParams, Preprocessing, parse_params, parse_preprocessing

OPTIONS: dict[str, Preprocessing] = {
    "grayscale": Preprocessing(grayscale=True),
    "hist": Preprocessing(equalize="hist"),
    "clahe": Preprocessing(equalize="clahe", clahe_clip=3.5, clahe_tile=4),
    "pad": Preprocessing(resize="pad"),
    "center_crop": Preprocessing(resize="center_crop"),
    "crop_border": Preprocessing(crop_border=0.1),
    "all": Preprocessing(grayscale=True, equalize="clahe", resize="pad", crop_border=0.05),
}


def seed_recipe(rgb: np.ndarray, size: int, angle_deg: float = 0.0) -> np.ndarray:
    """The seed's preprocessing as this project implemented it before ``preprocess`` existed,
    spelled out with OpenCV: stretch (area when shrinking), rotate with replicated edges, /255."""
    interpolation = cv2.INTER_AREA if min(rgb.shape[:2]) > size else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (size, size), interpolation=interpolation)
    if angle_deg:
        matrix = cv2.getRotationMatrix2D((size / 2.0, size / 2.0), angle_deg, 1.0)
        resized = cv2.warpAffine(resized, matrix, (size, size), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REPLICATE)
    return resized.astype(np.float32) / 255.0


def film(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth grey "film" with texture, uint8 RGB (R = G = B)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 200, (6, 6)).astype(np.float32)
    grey = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    grey = np.clip(grey + rng.normal(0, 4, grey.shape), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def tinted(rgb: np.ndarray) -> np.ndarray:
    return np.clip(rgb.astype(np.int16) + np.array([12, 0, -25], np.int16), 0, 255).astype(np.uint8)


def test_defaults_are_the_seeds_pixels_bit_for_bit_on_demo_and_real_files(
        tmp_path: Path) -> None:
    """The committed demo metrics cannot move: with the defaults (and without any
    ``preprocessing`` argument) every model input and rotated copy equals the seed's recipe."""
    generate_demo(tmp_path, DemoParams(covid_patients=6, kermany_train=6, kermany_test=1,
                                       max_side=320), seed=42, progress=False)
    files = sorted(p for p in tmp_path.rglob("*") if p.suffix in (".jpg", ".jpeg", ".png"))
    sample = sample_dir()
    if sample is not None:
        files += sorted(p for p in sample.rglob("*")
                        if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    assert len(files) > 20
    for path in files:
        rgb = load_image(path)
        for size in (32, 64, 224):
            for angle in (0.0, -7.3):
                expected = seed_recipe(rgb, size, angle)
                assert np.array_equal(prepare_rgb(rgb, size, angle_deg=angle), expected), path
                assert np.array_equal(prepare_rgb(rgb, size, Preprocessing(), angle), expected)
        assert np.array_equal(prepare_file(path, 64, angle_deg=4.0), seed_recipe(rgb, 64, 4.0))
        assert np.array_equal(prepare_image(path.read_bytes(), 32), seed_recipe(rgb, 32))


def test_the_committed_params_are_the_defaults(repo_root: Path) -> None:
    from covid_xray.params import load_params

    prep = load_params(repo_root / "params.yaml").preprocess
    assert prep == Preprocessing() and prep.is_default
    assert prep.describe() == ("decode->RGB->resize(img_size, INTER_AREA when shrinking)"
                               "->float32/255")  # what every sidecar said before


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_gives_a_square_uint8_rgb_view_and_rotates_after_the_resize(
        name: str) -> None:
    """The cached augmentation copies: the same view, rotated (edges replicated)."""
    prep = OPTIONS[name]
    rgb = tinted(film(40, 70, seed=1))
    view = model_view(rgb, 32, prep)
    assert view.shape == (32, 32, 3) and view.dtype == np.uint8
    assert np.array_equal(model_view(rgb, 32, prep, angle_deg=9.0), rotate(view, 9.0))
    model_input = prepare_rgb(rgb, 32, prep, angle_deg=9.0)
    assert model_input.dtype == np.float32
    assert np.array_equal(model_input, rotate(view, 9.0).astype(np.float32) / 255.0)
    assert not np.array_equal(view, model_view(rgb, 32))  # every option changes something here
    # several sizes at once (the probe) = one at a time
    small, large = model_views(rgb, (16, 48), prep)
    assert np.array_equal(small, model_view(rgb, 16, prep))
    assert np.array_equal(large, model_view(rgb, 48, prep))


def test_grayscale_is_one_luma_channel_replicated() -> None:
    rgb = tinted(film(36, 36, seed=2))
    view = model_view(rgb, 32, Preprocessing(grayscale=True))
    assert np.array_equal(view[..., 0], view[..., 1]) and np.array_equal(view[..., 1], view[..., 2])
    luma = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (32, 32),
                      interpolation=cv2.INTER_AREA)
    assert np.array_equal(view[..., 0], luma)
    # a grey film is its own luma: grayscale changes nothing
    grey = film(36, 36, seed=2)
    assert np.array_equal(model_view(grey, 32, Preprocessing(grayscale=True)),
                          model_view(grey, 32))


@pytest.mark.parametrize("equalize", ["hist", "clahe"])
def test_equalization_spreads_a_low_contrast_film_on_the_grey_level(equalize: str) -> None:
    grey = film(64, 64, seed=3)
    faint = (grey.astype(np.float32) * 0.2 + 100).astype(np.uint8)  # values ~108-140
    prep = Preprocessing(equalize=equalize)
    view = model_view(faint, 64, prep)
    assert int(np.ptp(view)) > 2 * int(np.ptp(faint))
    if equalize == "hist":  # a monotone remap of the grey levels: their order is kept
        order = np.argsort(faint[..., 0].ravel(), kind="stable")
        assert np.all(np.diff(view[..., 0].ravel()[order].astype(int)) >= 0)
    # a grey film: equalising Y (colour kept) or the grey channel gives the same pixels
    assert np.array_equal(view, model_view(faint, 64, Preprocessing(grayscale=True,
                                                                        equalize=equalize)))
    # a tinted one keeps its tint: only the luma is equalised
    colour = model_view(tinted(faint), 64, prep)
    assert np.abs(colour[..., 0].astype(int) - colour[..., 2]).mean() > 20


def test_clahe_clip_and_tiles_are_opencvs() -> None:
    grey = film(64, 96, seed=4)[..., 0]
    for clip, tile in ((1.0, 2), (4.0, 8)):
        expected = cv2.resize(cv2.createCLAHE(clip, (tile, tile)).apply(grey), (32, 32),
                              interpolation=cv2.INTER_AREA)
        view = model_view(np.repeat(grey[:, :, None], 3, 2), 32,
                          Preprocessing(grayscale=True, equalize="clahe", clahe_clip=clip,
                                        clahe_tile=tile))
        assert np.array_equal(view[..., 0], expected)
    low = model_view(film(64, 96, 4), 32, Preprocessing(equalize="clahe", clahe_clip=1.0))
    high = model_view(film(64, 96, 4), 32, Preprocessing(equalize="clahe", clahe_clip=6.0))
    assert not np.array_equal(low, high)


def test_pad_keeps_the_aspect_ratio_with_black_bars() -> None:
    white = np.full((40, 80, 3), 255, np.uint8)  # twice as wide as high
    view = model_view(white, 32, Preprocessing(resize="pad"))
    assert view[:8].max() == 0 and view[24:].max() == 0  # bars above and below
    assert view[8:24].min() == 255
    assert view_geometry(40, 80, 32, Preprocessing(resize="pad")).target == (8, 24, 0, 32)
    tall = model_view(np.full((90, 30, 3), 200, np.uint8), 30, Preprocessing(resize="pad"))
    assert tall[:, :10].max() == 0 and tall[:, 20:].max() == 0 and tall[:, 10:20].min() == 200
    # a disc stays a disc (stretching would make it an ellipse)
    disc = np.zeros((60, 120, 3), np.uint8)
    cv2.circle(disc, (60, 30), 20, (255, 255, 255), -1)
    rows, cols = np.nonzero(model_view(disc, 64, Preprocessing(resize="pad"))[..., 0] > 127)
    assert abs(np.ptp(rows) - np.ptp(cols)) <= 1
    rows, cols = np.nonzero(model_view(disc, 64)[..., 0] > 127)
    assert np.ptp(rows) > 1.5 * np.ptp(cols)


def test_center_crop_keeps_the_central_square() -> None:
    rgb = film(40, 80, seed=5)
    rgb[:, :15] = 255  # a bright strip along the left edge (a marker, a ruler)
    view = model_view(rgb, 32, Preprocessing(resize="center_crop"))
    assert np.array_equal(view, model_view(rgb[:, 20:60], 32))
    assert view.max() < 255
    assert view_geometry(40, 80, 32, Preprocessing(resize="center_crop")).source == (0, 40, 20, 60)


def test_crop_border_drops_a_burnt_in_frame() -> None:
    rgb = np.full((50, 60, 3), 90, np.uint8)
    rgb[:4], rgb[-4:], rgb[:, :4], rgb[:, -4:] = 250, 250, 250, 250
    assert model_view(rgb, 32).max() > 200
    view = model_view(rgb, 32, Preprocessing(crop_border=0.1))
    assert view.min() == view.max() == 90
    assert view_geometry(50, 60, 32, Preprocessing(crop_border=0.1)).source == (5, 45, 6, 54)
    # the largest crop on a tiny image still leaves pixels
    assert model_view(rgb[:3, :3], 8, Preprocessing(crop_border=0.4)).shape == (8, 8, 3)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"equalize": "sharpen"},
         "`preprocess.equalize` must be one of 'none', 'hist' or 'clahe'; got 'sharpen'"),
        ({"resize": "squash"},
         "`preprocess.resize` must be one of 'stretch', 'pad' or 'center_crop'; got 'squash'"),
        ({"crop_border": 0.5}, "`preprocess.crop_border` must be in [0, 0.4], got 0.5"),
        ({"clahe_tile": 0}, "`preprocess.clahe_tile` must be at least 1 and at most 64, got 0"),
        ({"clahe_clip": 0}, "`preprocess.clahe_clip` must be in (0, 100], got 0"),
        ({"grayscale": "yes"}, "`preprocess.grayscale` must be true or false, got 'yes'"),
        ({"gray": True}, "unknown key `preprocess.gray`; did you mean `preprocess.grayscale`?"),
    ],
)
def test_bad_settings_name_the_key_in_params_and_in_files(raw: dict, message: str,
                                                          tmp_path: Path) -> None:
    with pytest.raises(ParamsError) as info:
        parse_params({"preprocess": raw}, root=tmp_path)
    assert str(info.value) == f"params.yaml: {message}"
    with pytest.raises(ParamsError) as info:
        parse_preprocessing(raw, "models/covid_normal.json")
    assert str(info.value) == f"models/covid_normal.json: {message}"


def test_choices_ignore_case_and_missing_settings_mean_the_defaults() -> None:
    prep = parse_params({"preprocess": {"equalize": "CLAHE", "resize": "Pad"}}).preprocess
    assert (prep.equalize, prep.resize) == ("clahe", "pad")
    assert parse_preprocessing(None, "old sidecar") == Preprocessing()
    assert parse_preprocessing({}, "old sidecar").is_default
    assert parse_preprocessing(prep.as_dict(), "x") == prep and hash(prep) != hash(Preprocessing())
