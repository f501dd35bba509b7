"""Shared fixtures: repository paths and the real X-ray sample (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
XRAY_SAMPLE = Path(os.environ.get("COVID_XRAY_SAMPLE",
                                  REPO_ROOT.parent / "shared" / "data" / "xray-sample"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def xray_sample() -> Path:
    """The small real sample of both public datasets; tests using it skip on a user's clone."""
    if not (XRAY_SAMPLE / "covid-chestxray-dataset" / "metadata.csv").is_file():
        pytest.skip(f"real X-ray sample not found at {XRAY_SAMPLE}")
    return XRAY_SAMPLE


def film_sized(rgb: np.ndarray) -> np.ndarray:
    """A small demo image at the size and grain of a real scan (for when the sample is absent)."""
    big = cv2.resize(rgb, (640, 480), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    grain = np.random.default_rng(0).normal(0.0, 6.0, big.shape[:2])[:, :, None]
    return np.clip(big + grain, 0, 255).astype(np.uint8)


def sample_dir() -> Path | None:
    """The real sample's folder, or None on a clone without it (tests then use demo images)."""
    return XRAY_SAMPLE if (XRAY_SAMPLE / "chest_xray").is_dir() else None


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny real models (32 px VGG16, random frozen backbone), built once per test session."""
    from covid_xray.testing import ensure_smoke_models

    return ensure_smoke_models(tmp_path_factory.getbasetemp() / "smoke-models", sample_dir())


@pytest.fixture(scope="module")
def service(models_dir: Path):
    """Both smoke models loaded into the one prediction service the app and CLI use."""
    from covid_xray.predict import PredictionService

    return PredictionService.load(models_dir)
