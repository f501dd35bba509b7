"""Shortcut probe: can the classes be told apart without looking at disease?

The seed's COVID images are adults' X-rays collected from papers and websites; its NORMAL and
PNEUMONIA images are children's X-rays from one hospital. A model can score perfectly by recognising
the SOURCE (DeGrave et al., Nature Machine Intelligence 2021). Two cheap linear probes measure how
easy that is, per model, on all of the model's images (train + val + test):

(a) ``trivial``: logistic regression on per-image statistics that say nothing about lungs: stored
    width, height, aspect ratio, file format (one-hot), bit depth, channel count, colourfulness,
    mean and standard deviation of intensity, mean intensity of the outer 5% frame;
(b) ``random``: logistic regression on globally average-pooled features of the model's backbone
    with RANDOM weights (never trained: whatever it separates is low-level appearance).

Both are standardised and scored by cross-validated ROC AUC, grouped by patient when possible.

Each probe runs twice: on the FILES (``raw``: the statistics above; the backbone on the seed's
stretched image) and on what the MODEL SEES (``model_input``: the output of
``imaging.model_view`` with ``params.preprocess`` at ``model.img_size``; its statistics are the
pixel ones, colourfulness, mean, spread and border mean, since size, format, bit depth and
channels no longer exist there). A harmonisation that works (``preprocess.grayscale`` against
colour-tinted storage, ``crop_border`` against burnt-in frames) shows as a lower model-input AUC,
while the raw AUC, a property of the collections, stays.

(a) is blind to disease by construction, so it decides ``fired``, on the model input: above the
threshold, the labels are predictable from acquisition/source in what the model is given, and the
stage log says so (the raw AUC gets its own line). (b) is reported beside it (``random_fired``,
and its own warning) but cannot tell source from disease: an untrained network also sees a strong
disease pattern. On the demo data without the planted artefact, raw (a) is 0.70 / 0.64 and (b)
0.90 / 0.89 (the synthetic lesions are plain to see); on the real data the issue measured (b) at
0.999.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from covid_xray.errors import PipelineError
from covid_xray.imaging import (
    DEFAULT_PREPROCESSING,
    ImageDecodeError,
    decode_image,
    model_views,
    read_image_info,
    resize_square,
    to_model_input,
)
from covid_xray.params import Preprocessing

log = logging.getLogger(__name__)

PROBE_MAX_IMG_SIZE = 64
"""The random backbone sees images at min(model.img_size, 64) px: a random network's low-level
features need no detail, and VGG16 at 64 px costs 1/12 of 224 px (seconds on demo data)."""
BORDER_FRACTION = 0.05
PIXEL_FEATURES: tuple[str, ...] = ("colour", "mean", "std", "border_mean")
"""Statistics of the pixels alone: all the model-input probe has (its size and format are fixed)."""
NUMERIC_FEATURES: tuple[str, ...] = ("width", "height", "aspect", "bit_depth", "channels",
                                     *PIXEL_FEATURES)
RAW, MODEL_INPUT = "raw", "model_input"
DEGRAVE = "See DeGrave et al. 2021 (Nature Machine Intelligence, doi:10.1038/s42256-021-00338-7)."


def probe_img_size(model_img_size: int) -> int:
    """The random backbone's input size: the model's, capped at :data:`PROBE_MAX_IMG_SIZE`."""
    return min(model_img_size, PROBE_MAX_IMG_SIZE)


@dataclass(frozen=True)
class ImageRecord:
    """What the probes need from one file: its trivial statistics and small RGB thumbnails, of
    the file as stored and of the model's input."""

    sha256: str
    stats: dict[str, float]
    format: str
    thumbnail: np.ndarray
    """uint8 RGB ``(S, S, 3)``, resized with the pipeline's own :func:`resize_square` (the
    seed's stretch, nothing else)."""
    model_stats: dict[str, float]
    """:data:`PIXEL_FEATURES` of the model input (``model_view`` at the model's size)."""
    model_thumbnail: np.ndarray
    """The model input at the thumbnail size (``model_view`` with the run's preprocessing);
    equal to ``thumbnail`` with the default preprocessing."""


def border_mean(grey: np.ndarray, fraction: float = BORDER_FRACTION) -> float:
    """Mean of the outer frame (``fraction`` of each side, at least 1 px): markers, film edges,
    letterboxing and scanner borders live there, disease does not."""
    height, width = grey.shape
    dy, dx = max(1, round(height * fraction)), max(1, round(width * fraction))
    mask = np.ones_like(grey, dtype=bool)
    mask[dy:height - dy, dx:width - dx] = False
    return float(grey[mask].mean())


def pixel_stats(rgb: np.ndarray) -> dict[str, float]:
    """:data:`PIXEL_FEATURES` of a uint8 RGB image: colourfulness (mean channel differences),
    mean and spread of the grey level, mean of the outer frame; all in [0, 1] units."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    channels = rgb.astype(np.int16)
    colour = float(np.abs(channels[..., 0] - channels[..., 1]).mean()
                   + np.abs(channels[..., 1] - channels[..., 2]).mean()) / 255.0
    return {"colour": colour, "mean": float(grey.mean()), "std": float(grey.std()),
            "border_mean": border_mean(grey)}


def describe_image(data: bytes, thumb_size: int, sha256: str | None = None,
                   preprocessing: Preprocessing = DEFAULT_PREPROCESSING,
                   model_size: int | None = None) -> ImageRecord:
    """Trivial statistics and thumbnails of one image: of the file (header + decoded pixels)
    and of the model input (``preprocessing`` at ``model_size``, default ``thumb_size``)."""
    info = read_image_info(data)
    rgb = decode_image(data)
    stats = {
        "width": float(info.width),
        "height": float(info.height),
        "aspect": info.width / info.height,
        "bit_depth": float(info.bit_depth),
        "channels": float(Image.getmodebands(info.mode)),
        **pixel_stats(rgb),
    }
    model_size = model_size or thumb_size
    model_view, model_thumbnail = model_views(rgb, (model_size, thumb_size), preprocessing)
    return ImageRecord(sha256=sha256 or hashlib.sha256(data).hexdigest(), stats=stats,
                       format=info.format, thumbnail=resize_square(rgb, thumb_size),
                       model_stats=pixel_stats(model_view), model_thumbnail=model_thumbnail)


def describe_files(files: Sequence[Path], thumb_size: int, progress: bool = True,
                   preprocessing: Preprocessing = DEFAULT_PREPROCESSING,
                   model_size: int | None = None
                   ) -> tuple[dict[Path, ImageRecord], list[tuple[Path, str]]]:
    """:func:`describe_image` for every file; undecodable ones are skipped and returned.

    Files with identical bytes (the COVID images both models use) are decoded once and share
    one record, so callers can run the backbone once per distinct image (:func:`unique_records`).
    """
    records: dict[Path, ImageRecord] = {}
    by_sha: dict[str, ImageRecord] = {}
    skipped: list[tuple[Path, str]] = []
    for file in tqdm(sorted(set(files)), desc="probe: image statistics", unit="img",
                     disable=not progress):
        try:
            data = file.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            if sha not in by_sha:
                by_sha[sha] = describe_image(data, thumb_size, sha256=sha,
                                             preprocessing=preprocessing, model_size=model_size)
            records[file] = by_sha[sha]
        except (ImageDecodeError, OSError) as exc:
            skipped.append((file, str(exc)))
    return records, skipped


def unique_records(records: Mapping[Path, ImageRecord]) -> list[ImageRecord]:
    """One record per distinct content (SHA-256), in a stable order."""
    return [r for _, r in sorted({r.sha256: r for r in records.values()}.items())]


def trivial_matrix(records: Sequence[ImageRecord], what: str = RAW
                   ) -> tuple[np.ndarray, list[str]]:
    """Rows of trivial statistics: of the files (``raw``: :data:`NUMERIC_FEATURES` plus one-hot
    file format columns, ``format=png``...) or of the model inputs (``model_input``:
    :data:`PIXEL_FEATURES`)."""
    if what == MODEL_INPUT:
        rows = [[record.model_stats[name] for name in PIXEL_FEATURES] for record in records]
        return (np.asarray(rows, dtype=np.float64).reshape(len(records), len(PIXEL_FEATURES)),
                list(PIXEL_FEATURES))
    formats = sorted({record.format for record in records})
    names = [*NUMERIC_FEATURES, *(f"format={fmt}" for fmt in formats)]
    rows = [[record.stats[name] for name in NUMERIC_FEATURES]
            + [float(record.format == fmt) for fmt in formats] for record in records]
    return np.asarray(rows, dtype=np.float64).reshape(len(records), len(names)), names


def random_backbone_features(thumbnails: np.ndarray, backbone: str, seed: int,
                             batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Globally average-pooled feature maps of ``backbone`` with random weights drawn from ``seed``.

    ``thumbnails``: uint8 RGB ``(n, S, S, 3)``; the backbone is built at S px.
    """
    from covid_xray.modeling import build_backbone  # TensorFlow only when this probe runs

    size = int(thumbnails.shape[1])
    model = build_backbone(backbone, size, "none", seed)
    batches = []
    for start in tqdm(range(0, len(thumbnails), batch_size), desc="probe: random features",
                      unit="batch", disable=not progress):
        batch = to_model_input(thumbnails[start:start + batch_size])
        maps = np.asarray(model(batch, training=False))
        batches.append(maps.mean(axis=(1, 2)))
    channels = int(model.output_shape[-1])
    return np.concatenate(batches) if batches else np.zeros((0, channels), dtype=np.float32)


@dataclass(frozen=True)
class CvResult:
    """A cross-validated ROC AUC (None when the data cannot be cross-validated)."""

    auc: float | None
    folds: int
    grouped: bool


def _probe_classifier() -> Any:
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))


def cross_validated_auc(features: np.ndarray, labels: np.ndarray, groups: Sequence[str],
                        folds: int, seed: int) -> CvResult:
    """Mean ROC AUC over folds of a standardised logistic regression.

    Folds keep a patient's images together (StratifiedGroupKFold) when every class has at least
    two patients; fewer folds are used when a class has fewer patients than ``folds``; without
    enough patients, plain stratified folds. Folds whose test part holds one class are skipped.
    """
    labels = np.asarray(labels, dtype=int)
    groups = np.asarray(groups)
    per_class_groups = [len(set(groups[labels == c])) for c in (0, 1)]
    per_class_images = [int((labels == c).sum()) for c in (0, 1)]
    if min(per_class_groups) >= 2:
        n_splits = min(folds, *per_class_groups)
        splitter: Any = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        grouped = True
    elif min(per_class_images) >= 2:
        n_splits = min(folds, *per_class_images)
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        grouped = False
    else:
        return CvResult(auc=None, folds=0, grouped=False)
    aucs = []
    parts = (splitter.split(features, labels, groups) if grouped
             else splitter.split(features, labels))
    for train, test in parts:
        if len(set(labels[test])) < 2 or len(set(labels[train])) < 2:
            continue
        classifier = _probe_classifier().fit(features[train], labels[train])
        aucs.append(roc_auc_score(labels[test], classifier.predict_proba(features[test])[:, 1]))
    return CvResult(auc=float(np.mean(aucs)) if aucs else None, folds=len(aucs), grouped=grouped)


def top_features(features: np.ndarray, labels: np.ndarray, names: Sequence[str],
                 k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` standardised coefficients of largest magnitude (fit on all images): what the
    trivial probe leans on; positive means "more of it -> positive class"."""
    if len(set(labels.tolist())) < 2:
        return []
    classifier = _probe_classifier().fit(features, labels)
    coefficients = classifier[-1].coef_[0]
    order = np.argsort(-np.abs(coefficients), kind="stable")[:k]
    return [(names[i], float(coefficients[i])) for i in order if coefficients[i] != 0.0]


@dataclass(frozen=True)
class Probes:
    """Both probes on one view of the images (the files, or the model inputs)."""

    trivial: CvResult
    random: CvResult
    top_trivial: list[tuple[str, float]]


@dataclass(frozen=True)
class ProbeResult:
    """Both probes of one model, on the files and on the model inputs, against the threshold."""

    model: str
    positive: str
    negative: str
    images: int
    skipped: int
    raw: Probes
    model_input: Probes
    threshold: float
    backbone: str
    img_size: int
    """The backbone's input size (:func:`probe_img_size`)."""
    model_img_size: int
    preprocessing: Preprocessing = DEFAULT_PREPROCESSING

    def _above(self, result: CvResult) -> bool:
        return result.auc is not None and result.auc > self.threshold

    @property
    def raw_fired(self) -> bool:
        """The files' statistics separate the classes (a property of the collections)."""
        return self._above(self.raw.trivial)

    @property
    def trivial_fired(self) -> bool:
        """The model inputs' statistics separate the classes."""
        return self._above(self.model_input.trivial)

    @property
    def random_fired(self) -> bool:
        """An untrained backbone separates the classes on the model inputs."""
        return self._above(self.model_input.random)

    @property
    def fired(self) -> bool:
        """The shortcut verdict: disease-blind statistics of what the model is given separate
        the classes."""
        return self.trivial_fired

    def metrics(self) -> dict[str, Any]:
        """One entry of metrics/probe.json: four AUCs and the verdict (rounded: estimates on few
        images); the rest is in :meth:`details`."""
        return {
            RAW: {"stats_auc": _round(self.raw.trivial.auc),
                  "backbone_auc": _round(self.raw.random.auc)},
            MODEL_INPUT: {"stats_auc": _round(self.model_input.trivial.auc),
                          "backbone_auc": _round(self.model_input.random.auc)},
            "fired": self.fired,
        }

    def details(self) -> dict[str, Any]:
        """What the report and a reader need beyond the metrics (``reports/probe/details.json``)."""
        return {
            **self.metrics(),
            "threshold": self.threshold,
            "raw_fired": self.raw_fired,
            "random_fired": self.random_fired,
            "raw_random_fired": self._above(self.raw.random),
            "top_raw_features": [name for name, _ in self.raw.top_trivial],
            "top_model_input_features": [name for name, _ in self.model_input.top_trivial],
            "images": self.images,
            "skipped": self.skipped,
            "folds": self.raw.trivial.folds,
            "grouped_by_patient": self.raw.trivial.grouped,
            "backbone": self.backbone,
            "probe_img_size": self.img_size,
            "model_img_size": self.model_img_size,
            "preprocess": self.preprocessing.as_dict(),
            "preprocessing": self.preprocessing.describe(),
        }

    def warnings(self) -> list[str]:
        """The lines the stage log must show when a probe fires."""
        lines = []
        if self.trivial_fired:
            top = ", ".join(f"{name} ({coef:+.2f})"
                            for name, coef in self.model_input.top_trivial[:3])
            lines.append(
                f"WARNING {self.model}: image statistics alone separate {self.positive} from "
                f"{self.negative} in the model's input (AUC {self.model_input.trivial.auc:.2f} > "
                f"{self.threshold:.2f}; strongest: {top}): the model may be learning the data "
                f"SOURCE, not disease. {DEGRAVE}")
        if self.raw_fired:
            top = ", ".join(f"{name} ({coef:+.2f})" for name, coef in self.raw.top_trivial[:3])
            seen = ("and the model's input still shows it" if self.trivial_fired else
                    f"but the model's input does not (AUC {_fmt(self.model_input.trivial.auc)}): "
                    "the preprocessing hides those statistics")
            lines.append(
                f"WARNING {self.model}: the FILES of {self.positive} and {self.negative} differ "
                f"in storage and exposure (statistics AUC {self.raw.trivial.auc:.2f} > "
                f"{self.threshold:.2f}; strongest: {top}), {seen}.")
        if self.random_fired:
            lines.append(
                f"WARNING {self.model}: an UNTRAINED {self.backbone} (random weights) separates "
                f"{self.positive} from {self.negative} in the model's input (AUC "
                f"{self.model_input.random.auc:.2f} > {self.threshold:.2f}): the classes differ in "
                "appearance a network sees without any training (source or disease: this probe "
                f"cannot tell which), so a high test score alone is no evidence of disease "
                f"detection. {DEGRAVE}")
        return lines


def _round(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 4)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


NO_RESULT = CvResult(auc=None, folds=0, grouped=False)


def probe_model(model: str, files: Sequence[Path], labels: Sequence[str],
                patients: Sequence[str], records: Mapping[Path, ImageRecord],
                random_features: Mapping[str, Mapping[str, np.ndarray]] | None, *,
                positive: str, negative: str, threshold: float, folds: int, seed: int,
                backbone: str, img_size: int, model_img_size: int | None = None,
                preprocessing: Preprocessing = DEFAULT_PREPROCESSING) -> ProbeResult:
    """Run both probes on one model's images, on the files and on the model inputs (files
    missing from ``records`` were undecodable).

    ``random_features`` maps ``raw`` and ``model_input`` to {record SHA-256: pooled
    random-backbone features}; None skips probe (b) (its AUCs are then None).
    """
    unknown = sorted(set(labels) - {positive, negative})
    if unknown:
        raise PipelineError(f"{model}: label(s) {', '.join(map(repr, unknown))} are neither "
                            f"{positive!r} nor {negative!r}; the split file does not belong to "
                            "this model (re-run the split stage)")
    keep = [i for i, file in enumerate(files) if file in records]
    kept = [records[files[i]] for i in keep]
    y = np.array([labels[i] == positive for i in keep], dtype=int)
    # an image without a patient id is its own group
    groups = [patients[i] or f"file:{os.fspath(files[i])}" for i in keep]

    def probes(what: str) -> Probes:
        x_trivial, names = trivial_matrix(kept, what)
        trivial = cross_validated_auc(x_trivial, y, groups, folds, seed)
        random = NO_RESULT
        if random_features is not None and kept:
            x_random = np.stack([random_features[what][r.sha256] for r in kept])
            random = cross_validated_auc(x_random.astype(np.float64), y, groups, folds, seed)
        return Probes(trivial=trivial, random=random,
                      top_trivial=top_features(x_trivial, y, names))

    return ProbeResult(model=model, positive=positive, negative=negative, images=len(keep),
                       skipped=len(files) - len(keep), raw=probes(RAW),
                       model_input=probes(MODEL_INPUT), threshold=threshold, backbone=backbone,
                       img_size=img_size, model_img_size=model_img_size or img_size,
                       preprocessing=preprocessing)


def probe_random_features(records: Sequence[ImageRecord], backbone: str, seed: int,
                          progress: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Pooled random-backbone features of each distinct record, of its file's thumbnail
    (``raw``) and of its model input (``model_input``); one pass when both are the same pixels
    (the default preprocessing)."""
    def run(thumbnails: list[np.ndarray]) -> dict[str, np.ndarray]:
        if not thumbnails:
            return {}
        rows = random_backbone_features(np.stack(thumbnails), backbone, seed, progress=progress)
        return {r.sha256: row for r, row in zip(records, rows, strict=True)}

    raw = run([r.thumbnail for r in records])
    same = all(np.array_equal(r.thumbnail, r.model_thumbnail) for r in records)
    return {RAW: raw, MODEL_INPUT: raw if same else run([r.model_thumbnail for r in records])}
