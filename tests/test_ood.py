"""The out-of-distribution check: real and demo X-rays pass; photos, pages and noise are refused."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_sample_image

from covid_xray import imaging, ood
from covid_xray.modeling import build_backbone, pooled_features
from covid_xray.testing import demo_images_by_class

IMG_SIZE = 32


# -- images that are not chest X-rays ----------------------------------------------------------


def colour_photographs() -> list[np.ndarray]:
    """Real photographs shipped with scikit-learn (a temple and a flower)."""
    return [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]


def text_page(seed: int = 0, paper: int = 255) -> np.ndarray:
    """A scanned page of text: dark strokes on (near-)white paper."""
    rng = np.random.default_rng(seed)
    page = np.full((800, 600, 3), paper, np.uint8)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "lorem",
             "ipsum", "dolor", "sit", "amet"]
    for y in range(50, 770, 28):
        line = " ".join(rng.choice(words, 5))
        cv2.putText(page, line, (30, y), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (25, 25, 25), 2,
                    cv2.LINE_AA)
    return page


def random_noise(seed: int = 0, grey: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if grey:
        return np.repeat(rng.integers(0, 256, (300, 300, 1), dtype=np.uint8), 3, axis=2)
    return rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)


def grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


# -- real X-rays ---------------------------------------------------------------------------------


def sample_xrays(sample: Path) -> dict[str, list[Path]]:
    """All X-ray files of the sample (by metadata modality), split as the test models use them."""
    covid_dir = sample / "covid-chestxray-dataset"
    table = pd.read_csv(covid_dir / "metadata.csv", dtype=str).fillna("")
    xray = table[table["modality"].str.strip() == "X-ray"]["filename"]
    covid = sorted(p for p in (covid_dir / "images" / f for f in xray) if p.is_file())
    return {
        "train": sorted((sample / "chest_xray" / "train").glob("*/*.jpeg")) + covid[::2],
        "heldout": sorted((sample / "chest_xray" / "test").glob("*/*.jpeg")) + covid[1::2],
    }


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("vgg16", IMG_SIZE, "none", seed=0)


@pytest.fixture(scope="module")
def sample_images(xray_sample: Path) -> dict[str, dict[str, np.ndarray]]:
    """Decoded once: {"train"|"heldout": {file name: RGB}}."""
    return {part: {p.name: imaging.load_image(p) for p in paths}
            for part, paths in sample_xrays(xray_sample).items()}


@pytest.fixture(scope="module")
def sample_stats(backbone, sample_images) -> ood.OodStats:
    """OOD statistics fitted on the sample's 'training' X-rays, as the train stage fits them."""
    train = features_of(backbone, list(sample_images["train"].values()))
    return ood.OodStats(ood.fit_ood_stats(train, seed=0))


def features_of(backbone, images: list[np.ndarray]) -> np.ndarray:
    batch = np.stack([imaging.to_model_input(imaging.resize_square(im, IMG_SIZE))
                      for im in images])
    return pooled_features(np.asarray(backbone.predict(batch, verbose=0)), 1)


# -- fit_ood_stats ------------------------------------------------------------------------------


def test_fit_ood_stats_is_json_and_scores_training_like_points_below_one() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(60, 40)) * rng.uniform(0.5, 3, size=40) + 5
    stats = ood.fit_ood_stats(train)
    assert json.loads(json.dumps(stats)) == stats  # survives the ModelInfo sidecar
    assert stats["method"] == ood.OOD_FORMAT and stats["dim"] == 40 and stats["threshold"] > 0
    same_distribution = rng.normal(size=(200, 40)) * np.std(train, axis=0) + train.mean(axis=0)
    scores = ood.feature_scores(stats, same_distribution)
    assert np.mean(scores <= 1.0) >= 0.97
    far = same_distribution[:20] + 6 * np.std(train, axis=0)
    assert (ood.feature_scores(stats, far) > 1.0).all()


def test_fit_ood_stats_threshold_is_cross_validated_not_in_sample() -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(size=(40, 30))
    stats = ood.fit_ood_stats(train, margin=1.0, quantile=0.5)
    in_sample = ood.feature_scores(stats, train)
    # A training point is its own nearest neighbour in-sample; the threshold must not be fitted
    # on those optimistic distances, so training points sit well below it.
    assert np.median(in_sample) < 0.9


def test_groups_keep_copies_of_one_image_in_one_fold() -> None:
    rng = np.random.default_rng(2)
    originals = rng.normal(size=(30, 20))
    copies = np.concatenate([originals, originals + rng.normal(scale=0.01, size=originals.shape)])
    groups = np.tile(np.arange(30), 2)
    naive = ood.fit_ood_stats(copies, quantile=0.5, margin=1.0)["threshold"]
    grouped = ood.fit_ood_stats(copies, groups=groups, quantile=0.5, margin=1.0)["threshold"]
    assert grouped > 1.3 * naive  # near-duplicates across folds make the naive one too tight


@pytest.mark.parametrize("bad", [np.zeros((2, 5)), np.zeros(5), np.full((5, 3), np.nan)])
def test_fit_ood_stats_rejects_unusable_input(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="fit_ood_stats"):
        ood.fit_ood_stats(bad)


def test_scores_reject_wrong_dimension_and_unknown_format() -> None:
    stats = ood.fit_ood_stats(np.random.default_rng(3).normal(size=(10, 8)))
    with pytest.raises(ValueError, match="dimensions"):
        ood.feature_scores(stats, np.zeros((1, 9)))
    with pytest.raises(ValueError, match="unknown OOD statistics format"):
        ood.OodStats({**stats, "method": "something-else"})


# -- image-level checks -------------------------------------------------------------------------


@pytest.mark.parametrize("image", colour_photographs(), ids=["china", "flower"])
def test_colour_photographs_are_refused(image: np.ndarray) -> None:
    result = ood.check_image(image)
    assert not result.ok and result.reason == "colour"
    assert "colour" in result.message


@pytest.mark.parametrize("paper", [255, 215], ids=["white", "greyish-scan"])
def test_scanned_text_page_is_refused(paper: int) -> None:
    result = ood.check_image(text_page(paper=paper))
    assert not result.ok and result.reason == "document"


@pytest.mark.parametrize("grey_noise", [False, True], ids=["rgb", "grey"])
def test_random_noise_is_refused(grey_noise: bool) -> None:
    assert not ood.check_image(random_noise(grey=grey_noise)).ok


def test_uniform_image_is_refused() -> None:
    result = ood.check_image(np.full((64, 64, 3), 90, np.uint8))
    assert not result.ok and result.reason == "blank"


def test_all_real_xrays_of_the_sample_pass_the_image_checks(sample_images) -> None:
    images = {**sample_images["train"], **sample_images["heldout"]}
    assert len(images) >= 40
    results = {name: ood.check_image(rgb) for name, rgb in images.items()}
    assert {name: r.measures for name, r in results.items() if not r.ok} == {}


def test_demo_chest_images_pass_the_image_checks() -> None:
    images = demo_images_by_class(per_class=6, seed=3)
    results = [ood.check_image(im) for ims in images.values() for im in ims]
    assert len(results) >= 15
    assert all(r.ok for r in results), [r.measures for r in results if not r.ok]


def test_annotated_xray_with_coloured_arrows_passes() -> None:
    """Papers mark findings with red arrows; a few coloured pixels are not a colour photo."""
    xray = demo_images_by_class(per_class=1, seed=5)["covid"][0].copy()
    height, width = xray.shape[:2]
    for k in range(3):
        start = (width // 5 + k * width // 4, height // 3)
        cv2.arrowedLine(xray, start, (start[0] + width // 12, start[1] + height // 12),
                        (230, 30, 30), max(2, width // 100))
    assert ood.check_image(xray).ok


# -- the feature-distance check, on a real (tiny) backbone --------------------------------------


def test_feature_check_accepts_heldout_real_xrays(backbone, sample_images, sample_stats) -> None:
    heldout = sample_images["heldout"]
    scores = sample_stats.scores(features_of(backbone, list(heldout.values())))
    assert len(scores) >= 20
    assert (scores <= 1.0).all(), dict(zip(heldout, scores, strict=True))


def test_feature_check_refuses_a_grey_photograph_the_image_checks_miss(
        backbone, sample_stats) -> None:
    """Why the features matter: a grey photograph has X-ray-like grey statistics."""
    photo = grey(load_sample_image("china.jpg"))
    assert ood.check_image(photo).ok  # grey, not a page, not noise: only features can tell
    result = ood.check_features(sample_stats, features_of(backbone, [photo])[0], "covid_normal")
    assert not result.ok and result.reason == "features"
    assert "no verdict" in result.message


def test_check_features_reports_the_distance_ratio() -> None:
    rng = np.random.default_rng(4)
    stats = ood.OodStats(ood.fit_ood_stats(rng.normal(size=(30, 16))))
    ok = ood.check_features(stats, rng.normal(size=16), "m")
    assert ok.ok and 0 < ok.measures["feature_distance_ratio"] <= 1
    far = ood.check_features(stats, rng.normal(size=16) + 25, "m")
    assert not far.ok and far.measures["feature_distance_ratio"] > 1


def test_mean_nearest_distance_matches_the_direct_computation() -> None:
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(300, 32)) * 5
    queries = np.vstack([rng.normal(size=(40, 32)) * 5, reference[:5]])  # 5 exact matches
    diff = queries[:, np.newaxis, :] - reference[np.newaxis, :, :]
    direct = np.sort(np.sqrt((diff ** 2).sum(axis=2)), axis=1)
    for k in (1, 3, 400):
        expected = direct[:, :min(k, 300)].mean(axis=1)
        got = ood.mean_nearest_distance(queries, reference, k, chunk=7)  # several chunks
        assert np.allclose(got, expected, rtol=1e-9, atol=1e-6), k
    assert np.allclose(ood.mean_nearest_distance(reference[:5], reference, 1), 0.0, atol=1e-6)


def test_large_training_sets_are_sampled_by_whole_groups() -> None:
    rng = np.random.default_rng(4)
    features = rng.normal(size=(90, 12))
    groups = np.repeat(np.arange(30), 3)  # an image and its two rotated copies
    stats = ood.fit_ood_stats(features, groups=groups, max_reference=40, seed=1)
    assert stats["n_train"] == 90 and stats["n_reference"] == 39  # 13 whole groups of 3
    used = np.asarray(stats["coords"])
    assert used.shape == (39, min(32, 12))
    again = ood.fit_ood_stats(features, groups=groups, max_reference=40, seed=1)
    assert again == stats  # seeded
    far = ood.feature_scores(stats, features + 50.0)
    assert (far > 1.0).all()
