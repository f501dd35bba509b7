"""Evaluation on the test split and validation on held-out and external sets, with honest CIs.

Every verdict uses the model's stored operating threshold (``models/<model>.json``), never 0.5 by
habit. Metrics count COVID as the positive class: sensitivity = COVID recall, specificity = recall
of the negative class. The test splits are tiny (tens of images), so each metric comes with a
bootstrap 95% interval, stratified by class and resampling patients with all their images (the
split is by patient; images of one patient are not independent): read the interval, not the
point.

Scores come from ``data/predictions/<model>/`` (:mod:`covid_xray.scores`): the saved head on the
cached backbone features of every image (test split, held-out sets, external sets), which is the
saved full model's output on the decoded image (tests/test_training.py checks that). So neither
stage imports TensorFlow; validate only decodes the few images it draws Grad-CAM overlays on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from covid_xray.config import MODEL_NAMES, NEGATIVE_CLASS, POSITIVE_CLASS, Paths, class_names
from covid_xray.datasets import EXTERNAL_LABELS, external_sets, kermany_patient_id
from covid_xray.errors import PipelineError
from covid_xray.gradcam import heatmap_from_cam, overlay
from covid_xray.imaging import DEFAULT_PREPROCESSING, ImageDecodeError, load_image, model_view
from covid_xray.io import atomic_dir, atomic_path, write_csv, write_json, write_text
from covid_xray.model_info import ModelInfo, info_path, read_model_info
from covid_xray.params import Params, Preprocessing
from covid_xray.scores import Predictions, covid_labels
from covid_xray.splitting import read_manifest, read_split

log = logging.getLogger("covid_xray.evaluation")

METRIC_NAMES: tuple[str, ...] = ("accuracy", "sensitivity", "specificity", "precision", "f1",
                                 "roc_auc")
HELDOUT_SETS: tuple[str, ...] = ("heldout", "kermany_test")
# What `dvc metrics show` / `dvc exp show` track: the figures compared across experiments. Every
# other figure (accuracy, precision, F1, counts, bootstrap units, score statistics per set) goes
# to reports/<stage>/details.json (Paths.details), which the report reads: hundreds of tracked
# columns would bury these.
TRACKED_TEST_KEYS: tuple[str, ...] = tuple(
    key for name in ("roc_auc", "sensitivity", "specificity")
    for key in (name, f"{name}_ci_low", f"{name}_ci_high"))
TRACKED_SET_KEYS: tuple[str, ...] = ("roc_auc", "roc_auc_ci_low", "roc_auc_ci_high",
                                     "sensitivity", "specificity")
SMALL_SAMPLE_NOTE = (
    "Test and held-out sets are small (see n_*): one image moves a metric by several points. "
    "Intervals are stratified bootstrap 95% percentile intervals that resample patients with "
    "all their images (bootstrap_unit: patient), as the split is by patient; where patients "
    "are unknown (bootstrap_unit: image) they resample images and may be too narrow. High "
    "scores here may reflect the data SOURCE (adult COVID images from papers vs paediatric "
    "Kermany images), not disease: compare the external sets.")


# ---------------------------------------------------------------------------------------------
# Metrics


def _weighted_metrics(is_covid: np.ndarray, scores: np.ndarray, threshold: float,
                      weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric once per row of ``weights`` ``(B, n)``: how often each image counts in that
    (re)sample (all ones: the set itself). NaN where a metric is undefined.

    Weights instead of gathered copies let a resample hold whole patients of any size, and the
    score order is the same in every resample, so ROC AUC (Mann-Whitney, ties counting half)
    needs one sort, not one per resample.
    """
    y = np.asarray(is_covid).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    predicted = scores >= threshold
    tp, fp = w[:, predicted & y].sum(axis=1), w[:, predicted & ~y].sum(axis=1)
    fn, tn = w[:, ~predicted & y].sum(axis=1), w[:, ~predicted & ~y].sum(axis=1)
    n_pos, n_neg = tp + fn, tn + fp

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)

    if len(scores) == 0:
        auc = np.full(len(w), np.nan)
    else:
        order = np.argsort(scores, kind="stable")
        ordered, w_sorted, y_sorted = scores[order], w[:, order], y[order]
        last_of_value = np.r_[np.flatnonzero(np.diff(ordered)), len(ordered) - 1]

        def per_score(values: np.ndarray) -> np.ndarray:  # weight per distinct score
            return np.diff(np.cumsum(values, axis=1)[:, last_of_value], axis=1, prepend=0.0)

        pos, neg = per_score(w_sorted * y_sorted), per_score(w_sorted * ~y_sorted)
        below = np.cumsum(neg, axis=1) - neg
        auc = ratio((pos * (below + 0.5 * neg)).sum(axis=1), n_pos * n_neg)
    return {
        "accuracy": ratio(tp + tn, n_pos + n_neg),
        "sensitivity": ratio(tp, n_pos),
        "specificity": ratio(tn, n_neg),
        "precision": ratio(tp, tp + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "roc_auc": auc,
    }


def _clean(value: float) -> float | None:
    """JSON-friendly: NaN (undefined, e.g. sensitivity without COVID images) becomes null."""
    return None if value is None or not np.isfinite(value) else round(float(value), 6)


def binary_metrics(is_covid: np.ndarray, scores: np.ndarray, threshold: float
                   ) -> dict[str, float | None]:
    """Accuracy, sensitivity, specificity, precision, F1 and ROC AUC at ``threshold``."""
    arrays = _weighted_metrics(is_covid, scores, threshold, np.ones((1, len(scores))))
    return {name: _clean(arrays[name][0]) for name in METRIC_NAMES}


def cluster_codes(patients: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Patient id per image -> cluster number 0..k-1 in order of first appearance.

    First appearance, not sorted ids: with one image per patient, cluster i is image i, so the
    patient bootstrap draws exactly what the image bootstrap draws. An empty id is its own
    patient (never lumps unrelated images together).
    """
    ids = [("unknown patient", i) if value is None or value == "" or value != value else value
           for i, value in enumerate(np.asarray(patients, dtype=object).tolist())]
    codes, _ = pd.factorize(pd.Series(ids, dtype=object))
    return codes.astype(np.int64)


def bootstrap_cis(is_covid: np.ndarray, scores: np.ndarray, threshold: float, resamples: int,
                  seed: int, patients: Sequence[Any] | np.ndarray | None = None,
                  level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals, resampling patients (all their images) within each class.

    ``patients``: a patient id per image (None: each image is its own patient, the image-level
    bootstrap). The split keeps a patient's images together, so images of one patient are not
    independent draws; resampling them one by one understates the spread. Stratified by the
    patients' class (a patient with both classes forms a third stratum), so every resample keeps
    the set's patient counts per class and sensitivity/specificity/AUC stay defined. ``None``
    where a metric is undefined or ``resamples`` is 0.
    """
    is_covid = np.asarray(is_covid, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if resamples <= 0 or len(scores) == 0:
        return {name: None for name in METRIC_NAMES}
    codes = cluster_codes(np.arange(len(scores)) if patients is None else patients)
    if len(codes) != len(scores):
        raise ValueError(f"{len(codes)} patient ids for {len(scores)} scores")
    n_clusters = int(codes.max()) + 1
    images = np.bincount(codes, minlength=n_clusters)
    covid = np.bincount(codes, weights=is_covid, minlength=n_clusters)
    stratum = np.where(covid == images, 1, np.where(covid == 0, 0, 2))
    rng = np.random.default_rng(seed)
    offsets = (np.arange(resamples) * n_clusters)[:, np.newaxis]
    counts = np.zeros(resamples * n_clusters, dtype=np.int64)
    for group in (1, 0, 2):  # COVID first: the order the image-level bootstrap always drew in
        members = np.flatnonzero(stratum == group)
        if members.size:
            draws = rng.choice(members, size=(resamples, members.size))
            counts += np.bincount((draws + offsets).ravel(), minlength=counts.size)
    weights = counts.reshape(resamples, n_clusters)[:, codes]
    arrays = _weighted_metrics(is_covid, scores, threshold, weights)
    tail = (1.0 - level) / 2.0 * 100.0
    out: dict[str, list[float] | None] = {}
    for name in METRIC_NAMES:
        values = arrays[name][np.isfinite(arrays[name])]
        if values.size == 0:
            out[name] = None
        else:
            low, high = np.percentile(values, [tail, 100.0 - tail])
            out[name] = [round(float(low), 6), round(float(high), 6)]
    return out


def metrics_with_ci(is_covid: np.ndarray, scores: np.ndarray, threshold: float, resamples: int,
                    seed: int, patients: Sequence[Any] | np.ndarray | None = None
                    ) -> dict[str, Any]:
    """``{metric: value, metric_ci_low, metric_ci_high, n, n_covid, n_negative, bootstrap_unit,
    bootstrap_units}`` for one set.

    ``bootstrap_unit`` says what the intervals resampled: ``patient`` (``patients`` given) or
    ``image``; ``bootstrap_units`` how many of them the set has. The interval is two scalar
    keys, not a list: `dvc metrics show/diff` and `dvc exp show` drop list values, and an
    interval nobody sees is no use.
    """
    is_covid = np.asarray(is_covid, dtype=np.int64)
    unit = "image" if patients is None else "patient"
    if len(is_covid) == 0:
        return {"n": 0, "n_covid": 0, "n_negative": 0, "bootstrap_unit": unit,
                "bootstrap_units": 0,
                **{key: None for name in METRIC_NAMES
                   for key in (name, f"{name}_ci_low", f"{name}_ci_high")}}
    point = binary_metrics(is_covid, scores, threshold)
    cis = bootstrap_cis(is_covid, scores, threshold, resamples, seed, patients=patients)
    units = len(is_covid) if patients is None else int(cluster_codes(patients).max()) + 1
    out: dict[str, Any] = {"n": len(is_covid), "n_covid": int(is_covid.sum()),
                           "n_negative": int(len(is_covid) - is_covid.sum()),
                           "bootstrap_unit": unit, "bootstrap_units": units}
    for name in METRIC_NAMES:
        out[name] = point[name]
        interval = cis[name] or [None, None]
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = interval
    return out


def ci_of(metrics: dict[str, Any], name: str) -> list[float] | None:
    """``[low, high]`` of a metric in a :func:`metrics_with_ci` dict, or None if undefined."""
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    return None if low is None or high is None else [low, high]


def score_summary(scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Per-set figures as the seed reported them: images, flagged positive, score centre."""
    scores = np.asarray(scores, dtype=np.float64)
    flagged = int((scores >= threshold).sum())
    return {"n": len(scores), "flagged_positive": flagged,
            "flagged_rate": _clean(flagged / len(scores)) if len(scores) else None,
            "mean_score": _clean(scores.mean()) if len(scores) else None,
            "median_score": _clean(np.median(scores)) if len(scores) else None}


def score_bin(score: float, bins: int = 10) -> str:
    """Label of the score's bin ("0.9-1.0"): lets DVC's confusion templates draw a histogram of
    scores per set (x: set, y: score_bin), which no built-in template does from raw scores."""
    low = min(int(score * bins), bins - 1) / bins
    return f"{low:.1f}-{low + 1 / bins:.1f}"


def confusion_rows(is_covid: np.ndarray, scores: np.ndarray, threshold: float,
                   negative: str) -> list[tuple[str, str]]:
    """``(actual, predicted)`` label names per image, for DVC's confusion template."""
    names = {1: POSITIVE_CLASS, 0: negative}
    return [(names[int(y)], names[int(s >= threshold)]) for y, s in zip(is_covid, scores,
                                                                       strict=True)]


def roc_points(is_covid: np.ndarray, scores: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` at every distinct score, highest first, from (0, 0) at ``inf``:
    what ``sklearn.metrics.roc_curve(..., drop_intermediate=False)`` returns (tested against it),
    without importing sklearn in this stage."""
    y = np.asarray(is_covid, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    ordered, y = scores[order], y[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(ordered)), len(ordered) - 1]
    tps = np.cumsum(y)[last_of_value]
    fps = last_of_value + 1 - tps
    return (np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]],
            np.r_[np.inf, ordered[last_of_value]])


def roc_rows(is_covid: np.ndarray, scores: np.ndarray) -> list[tuple[float, float, float]]:
    """``(fpr, tpr, threshold)`` points; the leading ``inf`` threshold is written as 1."""
    if len(set(np.asarray(is_covid).tolist())) < 2:
        return []
    fpr, tpr, thresholds = roc_points(is_covid, scores)
    return [(round(float(f), 6), round(float(t), 6), round(float(min(th, 1.0)), 6))
            for f, t, th in zip(fpr, tpr, thresholds, strict=True)]


def classification_table(actual: Sequence[str], predicted: Sequence[str],
                         labels: Sequence[str], digits: int = 4) -> str:
    """Per-class precision / recall / F1 / support with accuracy and averages, laid out as
    ``sklearn.metrics.classification_report(..., zero_division=0)`` prints it (tested against
    it), without importing sklearn in this stage."""
    actual_a, predicted_a = np.asarray(actual, dtype=object), np.asarray(predicted, dtype=object)
    rows: list[tuple[str, float, float, float, int]] = []
    for label in labels:
        tp = int(((predicted_a == label) & (actual_a == label)).sum())
        flagged, support = int((predicted_a == label).sum()), int((actual_a == label).sum())
        precision = tp / flagged if flagged else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append((label, precision, recall, f1, support))
    total = sum(r[4] for r in rows)
    width = max(len("weighted avg"), *(len(label) for label in labels), digits)
    head = f"{'':>{width}} " + "".join(f" {h:>9}" for h in ("precision", "recall", "f1-score",
                                                            "support"))
    lines = [head, ""]
    lines += [f"{label:>{width}} " + "".join(f" {v:>9.{digits}f}" for v in (p, r, f))
              + f" {support:>9}" for label, p, r, f, support in rows]
    accuracy = float((actual_a == predicted_a).mean()) if len(actual_a) else 0.0
    lines += ["", f"{'accuracy':>{width}} " + f" {'':>9} {'':>9} {accuracy:>9.{digits}f} "
              f"{total:>9}"]
    table = np.array([r[1:4] for r in rows], dtype=np.float64)
    supports = np.array([r[4] for r in rows], dtype=np.float64)
    for name, weights in (("macro avg", None), ("weighted avg", supports if total else None)):
        means = np.average(table, axis=0, weights=weights)  # as sklearn averages (same rounding)
        lines.append(f"{name:>{width}} " + "".join(f" {v:>9.{digits}f}" for v in means)
                     + f" {total:>9}")
    return "\n".join(lines) + "\n"


def report_text(model_name: str, is_covid: np.ndarray, scores: np.ndarray,
                threshold: float, metrics: dict[str, Any]) -> str:
    """The classification report at the stored threshold, with the CIs and the caveat."""
    negative = NEGATIVE_CLASS[model_name]
    actual = [POSITIVE_CLASS if y else negative for y in is_covid]
    predicted = [POSITIVE_CLASS if s >= threshold else negative for s in scores]
    table = classification_table(actual, predicted, [POSITIVE_CLASS, negative], digits=4)
    lines = [f"{model_name}: test split, threshold {threshold:.4f} (COVID if score >= threshold)",
             f"images: {metrics['n']} ({metrics['n_covid']} covid, {metrics['n_negative']} "
             f"{negative})", "", table,
             f"95% bootstrap intervals (resampling {metrics['bootstrap_units']} "
             f"{metrics['bootstrap_unit']}s):"]
    for name in METRIC_NAMES:
        ci = ci_of(metrics, name)
        value = metrics[name]
        lines.append(f"  {name:<12} {'n/a' if value is None else f'{value:.4f}'}  "
                     f"[{'n/a' if ci is None else f'{ci[0]:.4f}, {ci[1]:.4f}'}]")
    lines += ["", SMALL_SAMPLE_NOTE, ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclass
class ScoredSet:
    """Scores of one set of images under one model, with each image's patient."""

    is_covid: np.ndarray
    scores: np.ndarray
    patients: np.ndarray


@dataclass
class TrainedModel:
    """What evaluate and validate need of a trained model: its sidecar and its predictions."""

    info: ModelInfo
    predictions: Predictions

    @property
    def threshold(self) -> float:
        return float(self.info.threshold)


def load_trained(paths: Paths, model_name: str) -> TrainedModel:
    """The sidecar (threshold, class order) and stored predictions of one trained model."""
    sidecar = info_path(paths.model_file(model_name))
    info = read_model_info(sidecar)
    if info.class_names != class_names(model_name):
        raise PipelineError(f"{sidecar}: class order {info.class_names} is not "
                            f"{class_names(model_name)}; retrain with `dvc repro`")
    predictions = Predictions.open(paths.predictions_dir(model_name), model_name)
    return TrainedModel(info=info, predictions=predictions)


def score_split(model: TrainedModel, split: pd.DataFrame, name: str = "test") -> ScoredSet:
    """Stored scores of one split's images (in split-file order)."""
    part = split[split["split"] == name].drop_duplicates("sha256")
    where = model.predictions.positions(part["sha256"].tolist())
    if (where < 0).any():
        example = part["path"].to_numpy()[where < 0][0]
        raise PipelineError(f"{model.predictions.folder}: no prediction for "
                            f"{int((where < 0).sum())} image(s) of the {name} split (e.g. "
                            f"{example}); the predictions and the split disagree: re-run "
                            "`dvc repro`")
    return ScoredSet(is_covid=covid_labels(part["label"]),
                     scores=model.predictions.scores_at(where),
                     patients=part["patient_group"].to_numpy(dtype=object))


def evaluate_model(paths: Paths, params: Params, model_name: str
                   ) -> tuple[dict[str, Any], ScoredSet]:
    """Test-split metrics (with CIs) of one model at its stored threshold."""
    model = load_trained(paths, model_name)
    split = read_split(paths.split_file(model_name), model_name)
    scored = score_split(model, split, "test")
    if len(scored.scores) == 0:
        raise PipelineError(f"{paths.split_file(model_name)}: no rows with split == test; "
                            "check split.test_size")
    threshold = model.threshold
    metrics = metrics_with_ci(scored.is_covid, scored.scores, threshold,
                              params.validate.bootstrap, params.seed, patients=scored.patients)
    metrics.update({"threshold": threshold,
                    "threshold_rule": model.info.params.get("threshold", {}).get("rule"),
                    "n_test": metrics["n"], "bootstrap_resamples": params.validate.bootstrap})
    return metrics, scored


def evaluate(paths: Paths, params: Params) -> dict[str, Any]:
    """The evaluate stage: metrics/evaluate.json, plots/evaluate/, reports/evaluate/."""
    results: dict[str, Any] = {}
    plots: dict[str, tuple[list[Any], list[Any]]] = {}
    reports: dict[str, str] = {}
    for model_name in MODEL_NAMES:
        metrics, scored = evaluate_model(paths, params, model_name)
        threshold = metrics["threshold"]
        results[model_name] = metrics
        plots[model_name] = (confusion_rows(scored.is_covid, scored.scores, threshold,
                                            NEGATIVE_CLASS[model_name]),
                             roc_rows(scored.is_covid, scored.scores))
        reports[model_name] = report_text(model_name, scored.is_covid, scored.scores, threshold,
                                          metrics)
    with atomic_dir(paths.plots / "evaluate") as folder:
        for model_name, (confusion, roc) in plots.items():
            write_csv(folder / f"{model_name}_confusion.csv", ["actual", "predicted"], confusion)
            write_csv(folder / f"{model_name}_roc.csv", ["fpr", "tpr", "threshold"], roc)
    with atomic_dir(paths.reports / "evaluate") as folder:
        for model_name, text in reports.items():
            write_text(folder / f"{model_name}_classification_report.txt", text)
        write_json(folder / paths.details("evaluate").name, results)
    write_json(paths.metrics / "evaluate.json", tracked_evaluate(results))
    return results


def _pick(metrics: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {key: metrics.get(key) for key in keys}


def tracked_evaluate(results: dict[str, Any]) -> dict[str, Any]:
    """metrics/evaluate.json: per model, test ROC AUC, sensitivity and specificity with CIs."""
    return {model: _pick(metrics, TRACKED_TEST_KEYS) for model, metrics in results.items()}


def tracked_validate(results: dict[str, Any]) -> dict[str, Any]:
    """metrics/validate.json: per model, the held-out union and each external set's ROC AUC with
    its CI, sensitivity and specificity (the test split is evaluate's)."""
    return {model: {"heldout": _pick(result["heldout"], TRACKED_SET_KEYS),
                    "external": {name: _pick(metrics, TRACKED_SET_KEYS)
                                 for name, metrics in result["external"].items()}}
            for model, result in results.items() if isinstance(result, dict)}


# ---------------------------------------------------------------------------------------------
# Validation on held-out and external sets


def heldout_groups(manifest: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``{"<set>_<label>": rows}`` for the held-out sets (sorted by path: stable order)."""
    part = manifest[manifest["set"].isin(HELDOUT_SETS)].sort_values("path")
    return {f"{set_name}_{label}": rows
            for (set_name, label), rows in part.groupby(["set", "label"], sort=True)}


# The Grad-CAM grid: one PNG per model (rows: sets, columns: examples), so `dvc plots show` and
# the report show one image per model instead of one block per example.
GRID_TILE_MIN = 160   # px: a 32 px model's overlay is enlarged so that its caption fits
GRID_TILE_MAX = 256   # px: larger inputs are shrunk, the grid stays a few screens at most
GRID_CAPTION = 40     # px: two caption lines under each tile
GRID_TITLE = 46       # px: the two-line title band above the rows
GRID_GAP = 4          # px between tiles
_BACKGROUND = (255, 255, 255)
_CAPTION_BACKGROUND = (32, 32, 32)
_MISSING = (160, 160, 160)
_WRONG = (255, 160, 0)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass
class GradcamExample:
    """One tile of a model's Grad-CAM grid: an image of a scored set with its stored map."""

    set_name: str        # heldout, kermany_test, external:<name>
    label: str           # the true class
    path: Path
    cam: np.ndarray      # the stored map on the backbone grid
    score: float         # the model's COVID score


def grid_tile_size(img_size: int) -> int:
    """Side of a grid tile for a model input of ``img_size`` pixels."""
    return int(min(max(img_size, GRID_TILE_MIN), GRID_TILE_MAX))


def gradcam_overlay(image_path: Path, cam: np.ndarray, img_size: int, tile: int,
                    preprocessing: Preprocessing = DEFAULT_PREPROCESSING) -> np.ndarray:
    """Grad-CAM overlay (RGB uint8, ``tile`` x ``tile``) of a stored map on the model's own view
    of the image (its input, preprocessed: the map's geometry).

    Drawn at the model's input size, then resized (nearest neighbour when enlarged: the pixels
    the model saw, not a smoothed guess).
    """
    rgb = model_view(load_image(image_path), img_size, preprocessing)
    canvas = overlay(rgb, heatmap_from_cam(cam, img_size))
    interpolation = cv2.INTER_NEAREST if tile >= img_size else cv2.INTER_AREA
    return cv2.resize(canvas, (tile, tile), interpolation=interpolation)


def put_fitted_text(canvas: np.ndarray, text: str, x: int, baseline: int, max_width: int,
                    colour: tuple[int, int, int], scale: float = 0.45) -> None:
    """Draw ``text`` at ``(x, baseline)``, shrinking the font (down to 0.3) and then cutting the
    text (ending in "..") until it fits ``max_width`` pixels."""
    def width(value: str, size: float) -> int:
        return cv2.getTextSize(value, _FONT, size, 1)[0][0]

    while scale > 0.3 and width(text, scale) > max_width:
        scale = round(scale - 0.05, 2)
    while len(text) > 2 and width(text, scale) > max_width:
        text = text[:-3] + ".."
    cv2.putText(canvas, text, (x, baseline), _FONT, scale, colour, 1, cv2.LINE_AA)


def labelled_tile(picture: np.ndarray | None, lines: Sequence[str], tile: int,
                  wrong: bool = False) -> np.ndarray:
    """A ``tile`` x ``tile`` picture (None: a grey square, the image could not be read) above a
    dark caption band holding up to two lines of text; ``wrong``: the second line (the verdict)
    in orange, so misclassified examples stand out."""
    canvas = np.full((tile + GRID_CAPTION, tile, 3), _CAPTION_BACKGROUND, dtype=np.uint8)
    canvas[:tile] = _MISSING if picture is None else picture
    for i, line in enumerate(lines[:2]):
        colour = _WRONG if wrong and i == 1 else (255, 255, 255)
        put_fitted_text(canvas, line, 4, tile + 16 + 18 * i, tile - 8, colour)
    return canvas


def gradcam_grid(rows: Sequence[Sequence[np.ndarray]], title: Sequence[str]) -> np.ndarray:
    """Labelled tiles (all the same size) laid out one row per set, under a band with up to two
    title lines; rows with fewer examples than the longest row end in blank space."""
    if not rows or not any(rows):
        raise ValueError("a Grad-CAM grid needs at least one tile")
    height, width = next(tile for row in rows for tile in row).shape[:2]
    columns = max(len(row) for row in rows)
    grid = np.full((GRID_TITLE + len(rows) * (height + GRID_GAP),
                    columns * (width + GRID_GAP) + GRID_GAP, 3), _BACKGROUND, dtype=np.uint8)
    for i, line in enumerate(title[:2]):
        put_fitted_text(grid, line, GRID_GAP, 18 + 20 * i, grid.shape[1] - 2 * GRID_GAP,
                        (0, 0, 0), scale=0.5)
    for r, row in enumerate(rows):
        top = GRID_TITLE + r * (height + GRID_GAP)
        for c, tile in enumerate(row):
            left = GRID_GAP + c * (width + GRID_GAP)
            grid[top:top + height, left:left + width] = tile
    return grid


def draw_gradcam_grid(model_name: str, examples: Sequence[GradcamExample], img_size: int,
                      threshold: float,
                      preprocessing: Preprocessing = DEFAULT_PREPROCESSING) -> np.ndarray | None:
    """The model's Grad-CAM grid: a row per set (in ``examples`` order), each tile labelled with
    its set, true label, score and verdict at ``threshold`` (orange when wrong). None without
    examples. An image that cannot be read any more is a grey tile (and a warning naming it),
    never a silent gap."""
    tile = grid_tile_size(img_size)
    rows: dict[tuple[str, str], list[np.ndarray]] = {}
    for example in examples:
        verdict = POSITIVE_CLASS if example.score >= threshold else NEGATIVE_CLASS[model_name]
        lines = [f"{example.set_name} / {example.label}",
                 f"score {example.score:.2f} -> {verdict}"]
        try:
            picture = gradcam_overlay(example.path, example.cam, img_size, tile, preprocessing)
        except (ImageDecodeError, OSError) as exc:
            log.warning("grad-cam of %s: image unreadable, drawn as a grey tile: %s",
                        example.path, exc)
            picture = None
        rows.setdefault((example.set_name, example.label), []).append(
            labelled_tile(picture, lines, tile, wrong=verdict != example.label))
    if not rows:
        return None
    title = [f"{model_name}: Grad-CAM (red: most influence)",
             f"set / true label; score -> verdict (COVID if >= {threshold:.3f})"]
    return gradcam_grid(list(rows.values()), title)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """An RGB image as a PNG, atomically (temp file, then rename)."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise PipelineError(f"{path}: could not encode the PNG")
    with atomic_path(path, suffix=".png") as tmp:
        tmp.write_bytes(encoded.tobytes())


def _fmt(metrics: dict[str, Any], name: str) -> str:
    value, ci = metrics.get(name), ci_of(metrics, name)
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def validation_summary(results: dict[str, Any]) -> str:
    """Plain-text tables: per set flagged counts, then test vs held-out vs external metrics."""
    lines: list[str] = []
    for model_name, result in results.items():
        lines += [f"{model_name} (threshold {result['threshold']:.4f}; COVID if score >= it)",
                  f"  {'set':<34} {'images':>6} {'flagged':>8} {'mean':>7} {'median':>7}"]
        for key, s in result["sets"].items():
            mean = "n/a" if s["mean_score"] is None else f"{s['mean_score']:.3f}"
            median = "n/a" if s["median_score"] is None else f"{s['median_score']:.3f}"
            lines.append(f"  {key:<34} {s['n']:>6} {s['flagged_positive']:>8} {mean:>7} "
                         f"{median:>7}")
        columns = {"test split": result["test"], "held-out": result["heldout"],
                   **{f"external {n}": m for n, m in result["external"].items()}}
        lines += ["", f"  {'metric':<12} " + " ".join(f"{c:<24}" for c in columns)]
        lines.append(f"  {'images':<12} " + " ".join(
            f"{str(m['n']) + ' (' + str(m['n_covid']) + ' covid)':<24}" for m in columns.values()))
        for name in METRIC_NAMES:
            lines.append(f"  {name:<12} " + " ".join(f"{_fmt(m, name):<24}"
                                                   for m in columns.values()))
        lines.append("")
    lines += [SMALL_SAMPLE_NOTE, ""]
    return "\n".join(lines)


def file_patient_id(path: str) -> str:
    """The patient of an external file where its name encodes one (Kermany's ``person12_...``,
    ``IM-0115-...`` patterns), else ``""`` (unknown: the file counts as its own patient)."""
    name = Path(path).name
    derived = kermany_patient_id(name)
    return "" if derived == f"kermany-{Path(name).stem}" else derived


def scored_sets(paths: Paths, manifest: pd.DataFrame,
                externals: dict[str, pd.DataFrame]) -> dict[str, tuple[str, pd.DataFrame]]:
    """``{set key: (kind, rows with path/label/sha256/patient_id)}`` of every set validate scores.

    Kinds: ``heldout`` (held-out and Kermany test folders) or ``external:<name>``. Paths are made
    absolute (external ones already are), sorted for a stable order. Patients come from the
    manifest; for external files from their names where derivable, else ``""`` (unknown).
    """
    out: dict[str, tuple[str, pd.DataFrame]] = {}
    for key, rows in heldout_groups(manifest).items():
        # the resampled unit: the patient group (a patient id plus ids sharing a picture with it)
        rows = rows[["path", "label", "sha256", "patient_group"]].rename(
            columns={"patient_group": "patient_id"})
        rows["path"] = [str(paths.datasets / p) for p in rows["path"]]
        out[key] = ("heldout", rows.reset_index(drop=True))
    for name, files in externals.items():
        for label in EXTERNAL_LABELS:
            rows = files[files["label"] == label].sort_values("path").reset_index(drop=True)
            if len(rows):
                rows["patient_id"] = [file_patient_id(path) for path in rows["path"]]
                out[f"external_{name}_{label}"] = (f"external:{name}", rows)
    return out


@dataclass
class _Pooled:
    """Labels, scores and patients of the sets of one kind, collected set by set."""

    labels: list[np.ndarray]
    scores: list[np.ndarray]
    patients: list[np.ndarray]


def _union_metrics(pooled: dict[str, _Pooled], kind: str, threshold: float, resamples: int,
                   seed: int) -> dict[str, Any]:
    """Metrics with CIs on the union of one kind's sets, resampling patients where any is known
    (a file without one is its own patient), images where none is."""
    part = pooled.get(kind)
    if part is None:
        return metrics_with_ci(np.zeros(0, dtype=np.int64), np.zeros(0), threshold, resamples,
                               seed)
    patients = np.concatenate(part.patients)
    known = any(patient != "" for patient in patients)
    return metrics_with_ci(np.concatenate(part.labels), np.concatenate(part.scores), threshold,
                           resamples, seed, patients=patients if known else None)


def validate(paths: Paths, params: Params) -> dict[str, Any]:
    """The validate stage: held-out + external sets per model -> metrics/validate.json, plots.

    Per model: per set (held-out COVID/NORMAL/PNEUMONIA, Kermany test NORMAL/PNEUMONIA, each
    external set's classes) images, flagged positive, mean/median COVID score; metrics with CIs
    on the union of the held-out sets of the model's two classes, per external set, and on the
    internal test split side by side (all in ``reports/validate/details.json``; the figures
    compared across experiments in ``metrics/validate.json``); score-distribution plot data; a
    Grad-CAM grid per model (maps stored by train) of the first ``validate.gradcam_images``
    images (by path) of every set of the model's two classes. Images without a prediction
    (undecodable at featurize) are listed in ``reports/validate/skipped.csv``.
    """
    externals = external_sets(params.validate.external, paths.root)  # fail before any work
    models = {name: load_trained(paths, name) for name in MODEL_NAMES}
    sets_to_score = scored_sets(paths, read_manifest(paths.manifest), externals)
    resamples, seed = params.validate.bootstrap, params.seed

    skipped: list[dict[str, str]] = []
    first = next(iter(models.values()))
    for key, (_, rows) in sets_to_score.items():
        missing = first.predictions.positions(rows["sha256"].tolist()) < 0
        skipped.extend({"set": key, "path": path, "reason": "no cached features (undecodable "
                        "at featurize)"} for path in rows.loc[missing, "path"])

    results: dict[str, Any] = {}
    score_rows: dict[str, list[tuple[str, str, float]]] = {}
    gradcam_jobs: dict[str, list[GradcamExample]] = {}
    for model_name, model in models.items():
        threshold = model.threshold
        relevant = set(class_names(model_name))
        rows_out: list[tuple[str, str, float]] = []
        jobs: list[GradcamExample] = []
        sets: dict[str, Any] = {}
        pooled: dict[str, _Pooled] = {}
        for key, (kind, rows) in sets_to_score.items():
            where = model.predictions.positions(rows["sha256"].tolist())
            present, where = rows[where >= 0], where[where >= 0]
            scores = model.predictions.scores_at(where)
            labels = present["label"].to_numpy()
            sets[key] = score_summary(scores, threshold)
            rows_out.extend((key, label, round(float(v), 6))
                            for label, v in zip(labels, scores, strict=True))
            if labels.size and labels[0] in relevant:
                collected = pooled.setdefault(kind, _Pooled([], [], []))
                collected.labels.append(covid_labels(labels))
                collected.scores.append(scores)
                collected.patients.append(present["patient_id"].to_numpy(dtype=object))
                set_name = kind if kind != "heldout" else key.removesuffix(f"_{labels[0]}")
                jobs.extend(GradcamExample(set_name, str(labels[i]), Path(present["path"].iloc[i]),
                                           model.predictions.cams[where[i]], float(scores[i]))
                            for i in range(min(params.validate.gradcam_images, len(present))))

        split = read_split(paths.split_file(model_name), model_name)
        test = score_split(model, split, "test")
        rows_out.extend(("test", POSITIVE_CLASS if yy else NEGATIVE_CLASS[model_name],
                         round(float(v), 6)) for yy, v in zip(test.is_covid, test.scores,
                                                              strict=True))
        results[model_name] = {
            "threshold": threshold,
            "sets": sets,
            "heldout": _union_metrics(pooled, "heldout", threshold, resamples, seed),
            "external": {name: _union_metrics(pooled, f"external:{name}", threshold, resamples,
                                              seed) for name in externals},
            "test": metrics_with_ci(test.is_covid, test.scores, threshold, resamples, seed,
                                    patients=test.patients),
        }
        score_rows[model_name] = rows_out
        gradcam_jobs[model_name] = jobs

    with atomic_dir(paths.plots / "validate") as folder:
        for model_name, rows in score_rows.items():
            write_csv(folder / f"{model_name}_scores.csv", ["set", "label", "score", "score_bin"],
                      [(*row, score_bin(row[2])) for row in rows])
    with atomic_dir(paths.plots / "gradcam") as folder:
        for model_name, jobs in gradcam_jobs.items():
            info = models[model_name].info
            grid = draw_gradcam_grid(model_name, jobs, info.img_size, info.threshold,
                                     info.preprocess)
            if grid is not None:
                write_png(folder / f"{model_name}.png", grid)
    payload = {**results, "skipped_images": len(skipped)}
    with atomic_dir(paths.reports / "validate") as folder:
        write_csv(folder / "skipped.csv", ["set", "path", "reason"],
                  [(item["set"], item["path"], item["reason"]) for item in skipped])
        write_text(folder / "summary.txt", validation_summary(results))
        write_json(folder / paths.details("validate").name, payload)
    write_json(paths.metrics / "validate.json", tracked_validate(results))
    return payload
