"""A trained model's outputs for every cached image: written by train, read by evaluate/validate.

``data/predictions/<model>/`` holds, for every original (un-rotated) image in the feature cache
(training splits, held-out sets, external sets), in feature-row order:

- ``scores.csv``: ``sha256, path, score``, the COVID probability of the saved head on the cached
  backbone features: exactly the saved full model's output on the decoded image (the backbone
  weights are the ones the features came from; tests/test_training.py checks the two agree);
- ``gradcam.npy``: float32 ``(n, f, f)``, the COVID-class Grad-CAM map on the backbone's grid
  (ReLU applied, not yet upsampled or normalised: :func:`covid_xray.gradcam.heatmap_from_cam`).

Scoring once in train, where TensorFlow is already loaded, lets evaluate and validate run without
TensorFlow: a head-only experiment then pays the TensorFlow import in the two train processes only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covid_xray.config import POSITIVE_CLASS
from covid_xray.errors import PipelineError
from covid_xray.io import (
    atomic_dir,
    read_stage_csv,
    require_stage_file,
    write_csv,
)

SCORES_FILE = "scores.csv"
GRADCAM_FILE = "gradcam.npy"
SCORE_COLUMNS: tuple[str, ...] = ("sha256", "path", "score")


def covid_labels(labels: Sequence[str] | pd.Series | np.ndarray) -> np.ndarray:
    """1 for COVID, 0 for the negative class (what every metric counts as positive)."""
    return (np.asarray(labels, dtype=object) == POSITIVE_CLASS).astype(np.int64)


def write_predictions(folder: Path, sha256s: Sequence[str], paths: Sequence[str],
                      scores: np.ndarray, cams: np.ndarray) -> None:
    """Write ``scores.csv`` + ``gradcam.npy`` as one folder, atomically."""
    scores = np.asarray(scores, dtype=np.float32)
    cams = np.asarray(cams, dtype=np.float32)
    if not len(sha256s) == len(paths) == len(scores) == len(cams):
        raise ValueError(f"predictions of unequal length: {len(sha256s)} sha256, {len(paths)} "
                         f"paths, {len(scores)} scores, {len(cams)} Grad-CAM maps")
    with atomic_dir(folder) as tmp:
        # %.9g round-trips float32 exactly: reading gives back the very probabilities.
        write_csv(tmp / SCORES_FILE, SCORE_COLUMNS,
                  [(sha, path, f"{score:.9g}") for sha, path, score
                   in zip(sha256s, paths, scores.tolist(), strict=True)])
        np.save(tmp / GRADCAM_FILE, cams)


@dataclass
class Predictions:
    """One model's stored predictions, looked up by image content hash."""

    folder: Path
    table: pd.DataFrame
    cams: np.ndarray

    @classmethod
    def open(cls, folder: Path, model_name: str) -> Predictions:
        """Read ``data/predictions/<model>``; a clear error naming the file when it is unusable."""
        scores_file, cams_file = folder / SCORES_FILE, folder / GRADCAM_FILE
        stage = f"train@{model_name}"
        table = read_stage_csv(scores_file, SCORE_COLUMNS, stage)
        table["score"] = table["score"].astype(np.float64)
        require_stage_file(cams_file, stage)
        cams = np.load(cams_file)
        if cams.ndim != 3 or len(cams) != len(table):
            raise PipelineError(f"{cams_file}: shape {cams.shape} does not match the "
                                f"{len(table)} rows of {scores_file}; re-run "
                                f"`dvc repro train@{model_name}`")
        return cls(folder=folder, table=table, cams=cams)

    def positions(self, sha256s: Sequence[str]) -> np.ndarray:
        """Row of each image in the predictions, -1 where the image has none (undecodable at
        featurize, or not part of the cache)."""
        where = pd.Series(np.arange(len(self.table)), index=pd.Index(self.table["sha256"]))
        where = where[~where.index.duplicated()]
        return where.reindex(list(sha256s)).fillna(-1).to_numpy(dtype=np.int64)

    def scores_at(self, positions: np.ndarray) -> np.ndarray:
        """COVID probabilities (float64) at ``positions`` (all >= 0)."""
        return self.table["score"].to_numpy(dtype=np.float64)[positions]
