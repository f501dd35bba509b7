"""Evaluation on the test split and validation on held-out and external sets, with honest CIs.

Every verdict uses the model's stored operating threshold (``models/<model>.json``), never 0.5 by
habit. Metrics count COVID as the positive class: sensitivity = COVID recall, specificity = recall
of the negative class. The test splits are tiny (tens of images), so each metric comes with a
stratified bootstrap 95% interval: read the interval, not the point.

Scores on the test split and on the held-out sets come from the saved model's head applied to the
cached backbone features (the full model is exactly backbone then head, and the backbone weights
are the ones the features came from: see tests/test_training.py). External folders are not
featurized: their images go through the full saved model, decoded by the shared imaging code.
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
from scipy.stats import rankdata
from sklearn.metrics import classification_report, roc_curve
from tqdm import tqdm

from covid_xray.config import MODEL_NAMES, NEGATIVE_CLASS, POSITIVE_CLASS, Paths
from covid_xray.features import FeatureStore, read_manifest
from covid_xray.gradcam import gradcam_heatmap, overlay
from covid_xray.imaging import ImageDecodeError, load_image, resize_square, to_model_input
from covid_xray.io import PipelineError, atomic_dir, write_csv, write_json, write_text
from covid_xray.modeling import Classifier
from covid_xray.params import Params
from covid_xray.training import class_names, covid_labels, head_scores, read_split, split_rows

log = logging.getLogger("covid_xray.evaluation")

METRIC_NAMES: tuple[str, ...] = ("accuracy", "sensitivity", "specificity", "precision", "f1",
                                 "roc_auc")
HELDOUT_SETS: tuple[str, ...] = ("heldout", "kermany_test")
EXTERNAL_LABELS: tuple[str, ...] = ("covid", "normal", "pneumonia")
SMALL_SAMPLE_NOTE = (
    "Test and held-out sets are small (see n_*): one image moves a metric by several points. "
    "Intervals are stratified bootstrap 95% percentile intervals over images (not patients), "
    "so they are if anything too narrow. High scores here may reflect the data SOURCE (adult "
    "COVID images from papers vs paediatric Kermany images), not disease: compare the external "
    "sets.")


# ---------------------------------------------------------------------------------------------
# Metrics


def _metric_arrays(is_covid: np.ndarray, scores: np.ndarray, threshold: float
                   ) -> dict[str, np.ndarray]:
    """All metrics for a batch of samples (rows of ``(B, n)`` arrays); NaN where undefined."""
    y = is_covid.astype(bool)
    predicted = scores >= threshold
    tp = (predicted & y).sum(axis=1).astype(np.float64)
    fp = (predicted & ~y).sum(axis=1).astype(np.float64)
    fn = (~predicted & y).sum(axis=1).astype(np.float64)
    tn = (~predicted & ~y).sum(axis=1).astype(np.float64)
    n_pos, n_neg = tp + fn, tn + fp

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / np.maximum(den, 1), np.nan)

    ranks = rankdata(scores, axis=1)  # average ranks for ties: the Mann-Whitney AUC
    rank_sum = np.where(y, ranks, 0.0).sum(axis=1)
    auc = ratio(rank_sum - n_pos * (n_pos + 1) / 2.0, n_pos * n_neg)
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
    arrays = _metric_arrays(np.asarray(is_covid)[np.newaxis], np.asarray(scores)[np.newaxis],
                            threshold)
    return {name: _clean(arrays[name][0]) for name in METRIC_NAMES}


def bootstrap_cis(is_covid: np.ndarray, scores: np.ndarray, threshold: float, resamples: int,
                  seed: int, level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals, resampling images within each class (stratified).

    Stratified so every resample keeps the set's class counts and sensitivity/specificity/AUC stay
    defined; ``None`` where a metric is undefined or ``resamples`` is 0.
    """
    is_covid = np.asarray(is_covid, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if resamples <= 0 or len(scores) == 0:
        return {name: None for name in METRIC_NAMES}
    rng = np.random.default_rng(seed)
    parts = [rng.choice(np.flatnonzero(is_covid == c), size=(resamples, int((is_covid == c).sum())))
             for c in (1, 0) if (is_covid == c).any()]
    index = np.concatenate(parts, axis=1)
    arrays = _metric_arrays(is_covid[index], scores[index], threshold)
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
                    seed: int) -> dict[str, Any]:
    """``{metric: value, metric_ci_low, metric_ci_high, n, n_covid, n_negative}`` for one set.

    The interval is two scalar keys, not a list: `dvc metrics show/diff` and `dvc exp show`
    drop list values, and an interval nobody sees is no use.
    """
    is_covid = np.asarray(is_covid, dtype=np.int64)
    if len(is_covid) == 0:
        return {"n": 0, "n_covid": 0, "n_negative": 0,
                **{key: None for name in METRIC_NAMES
                   for key in (name, f"{name}_ci_low", f"{name}_ci_high")}}
    point = binary_metrics(is_covid, scores, threshold)
    cis = bootstrap_cis(is_covid, scores, threshold, resamples, seed)
    out: dict[str, Any] = {"n": len(is_covid), "n_covid": int(is_covid.sum()),
                           "n_negative": int(len(is_covid) - is_covid.sum())}
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


def roc_rows(is_covid: np.ndarray, scores: np.ndarray) -> list[tuple[float, float, float]]:
    """``(fpr, tpr, threshold)`` points; sklearn's leading ``inf`` threshold is written as 1."""
    if len(set(np.asarray(is_covid).tolist())) < 2:
        return []
    fpr, tpr, thresholds = roc_curve(is_covid, scores, drop_intermediate=False)
    return [(round(float(f), 6), round(float(t), 6), round(float(min(th, 1.0)), 6))
            for f, t, th in zip(fpr, tpr, thresholds, strict=True)]


def report_text(model_name: str, is_covid: np.ndarray, scores: np.ndarray,
                threshold: float, metrics: dict[str, Any]) -> str:
    """sklearn's classification report at the stored threshold, with the CIs and the caveat."""
    negative = NEGATIVE_CLASS[model_name]
    actual = [POSITIVE_CLASS if y else negative for y in is_covid]
    predicted = [POSITIVE_CLASS if s >= threshold else negative for s in scores]
    table = classification_report(actual, predicted, labels=[POSITIVE_CLASS, negative],
                                  digits=4, zero_division=0)
    lines = [f"{model_name}: test split, threshold {threshold:.4f} (COVID if score >= threshold)",
             f"images: {metrics['n']} ({metrics['n_covid']} covid, {metrics['n_negative']} "
             f"{negative})", "", table, "95% bootstrap intervals:"]
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
    """Scores of one set of images under one model."""

    paths: list[str]
    is_covid: np.ndarray
    scores: np.ndarray


def load_classifier(paths: Paths, model_name: str) -> Classifier:
    """The saved model with its sidecar (threshold, class order)."""
    classifier = Classifier.load(paths.model_file(model_name))
    if classifier.info.class_names != class_names(model_name):
        raise PipelineError(f"{classifier.path}: class order {classifier.info.class_names} is "
                            f"not {class_names(model_name)}; retrain with `dvc repro`")
    return classifier


def score_split(classifier: Classifier, store: FeatureStore, split: pd.DataFrame,
                name: str = "test") -> ScoredSet:
    """Scores of one split's original images: the saved head on the cached features."""
    rows = split_rows(store, split, name)
    by_sha = split.drop_duplicates("sha256").set_index("sha256")["path"]
    scores = head_scores(classifier.model.get_layer("head"), store, rows.rows)
    return ScoredSet(paths=by_sha.loc[rows.sha256].tolist(), is_covid=rows.is_covid,
                     scores=scores)


def evaluate_model(paths: Paths, params: Params, model_name: str, store: FeatureStore,
                   ) -> tuple[dict[str, Any], ScoredSet, Classifier]:
    """Test-split metrics (with CIs) of one model at its stored threshold."""
    classifier = load_classifier(paths, model_name)
    split = read_split(paths.split_file(model_name), model_name)
    scored = score_split(classifier, store, split, "test")
    if len(scored.scores) == 0:
        raise PipelineError(f"{paths.split_file(model_name)}: no rows with split == test; "
                            "check split.test_size")
    threshold = classifier.info.threshold
    metrics = metrics_with_ci(scored.is_covid, scored.scores, threshold,
                              params.validate.bootstrap, params.seed)
    metrics.update({"threshold": threshold,
                    "threshold_rule": classifier.info.params.get("threshold", {}).get("rule"),
                    "n_test": metrics["n"], "bootstrap_resamples": params.validate.bootstrap})
    return metrics, scored, classifier


def evaluate(paths: Paths, params: Params) -> dict[str, Any]:
    """The evaluate stage: metrics/evaluate.json, plots/evaluate/, reports/evaluate/."""
    store = FeatureStore.open(paths.features)
    store.check_matches(params)
    results: dict[str, Any] = {}
    plots: dict[str, tuple[list[Any], list[Any]]] = {}
    reports: dict[str, str] = {}
    for model_name in MODEL_NAMES:
        metrics, scored, _ = evaluate_model(paths, params, model_name, store)
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
    write_json(paths.metrics / "evaluate.json", results)
    return results


# ---------------------------------------------------------------------------------------------
# Validation on held-out and external sets


def heldout_groups(manifest: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``{"<set>_<label>": rows}`` for the held-out sets (sorted by path: stable order)."""
    part = manifest[manifest["set"].isin(HELDOUT_SETS)].sort_values("path")
    return {f"{set_name}_{label}": rows
            for (set_name, label), rows in part.groupby(["set", "label"], sort=True)}


def external_files(name: str, folder: str, root: Path) -> pd.DataFrame:
    """Files of one external set (``path``, ``label``) from its class subfolders."""
    location = Path(folder).expanduser()
    location = location if location.is_absolute() else root / location
    if not location.is_dir():
        raise PipelineError(f"params.yaml `validate.external.{name}`: folder {folder!r} not found "
                            f"({location}); create it with covid/, normal/ or pneumonia/ "
                            f"subfolders of images, or remove the entry")
    ignored = sorted(p.name for p in location.iterdir()
                     if p.is_dir() and p.name not in EXTERNAL_LABELS)
    if ignored:
        log.warning("validate.external.%s: ignoring subfolder(s) %s of %s (only %s are read)",
                    name, ", ".join(ignored), location, "/".join(EXTERNAL_LABELS))
    rows = [(str(path), label) for label in EXTERNAL_LABELS if (location / label).is_dir()
            for path in sorted((location / label).rglob("*"))
            if path.is_file() and not path.name.startswith(".")]
    if not rows:
        raise PipelineError(f"params.yaml `validate.external.{name}`: {location} has no images "
                            f"in covid/, normal/ or pneumonia/ subfolders")
    return pd.DataFrame(rows, columns=["path", "label"])


def same_backbone(classifiers: Sequence[Classifier]) -> bool:
    """True when all models share identical backbone weights (then one forward pass serves all)."""
    first = classifiers[0].model.get_layer("backbone").get_weights()
    for other in classifiers[1:]:
        weights = other.model.get_layer("backbone").get_weights()
        if len(weights) != len(first) or not all(
                a.shape == b.shape and np.array_equal(a, b)
                for a, b in zip(first, weights, strict=True)):
            return False
    return True


ScoredFiles = tuple[dict[str, np.ndarray], list[int], list[dict[str, str]]]


def score_files(classifiers: dict[str, Classifier], files: Sequence[str], batch_size: int = 16,
                desc: str = "score") -> ScoredFiles:
    """Full-model COVID scores of image files for every model, decoding each file once.

    Returns ``(scores per model, indices of the scored files, skipped files with reasons)``.
    When the models' backbones are identical (the pipeline's case) the backbone runs once per
    image and each head on its output: the same computation as each full model.
    """
    models = list(classifiers.values())
    sizes = {c.info.img_size for c in models}
    if len(sizes) != 1:
        raise PipelineError(f"models disagree on img_size ({sorted(sizes)}); retrain both")
    size = sizes.pop()
    shared = same_backbone(models)
    scores: dict[str, list[np.ndarray]] = {name: [] for name in classifiers}
    kept: list[int] = []
    skipped: list[dict[str, str]] = []
    for start in tqdm(range(0, len(files), batch_size), desc=desc, unit="batch",
                      mininterval=2.0):
        batch, batch_kept = [], []
        for i in range(start, min(start + batch_size, len(files))):
            try:
                batch.append(to_model_input(resize_square(load_image(files[i]), size)))
            except (ImageDecodeError, OSError) as exc:
                skipped.append({"path": str(files[i]), "reason": str(exc)})
                continue
            batch_kept.append(i)
        if not batch:
            continue
        images = np.stack(batch)
        if shared:
            features = models[0].model.get_layer("backbone")(images, training=False)
            for name, c in classifiers.items():
                probs = np.asarray(c.model.get_layer("head")(features, training=False))
                scores[name].append(probs[:, c.info.positive_index].astype(np.float64))
        else:
            for name, c in classifiers.items():
                scores[name].append(c.covid_scores(images))
        kept.extend(batch_kept)
    return ({name: np.concatenate(parts) if parts else np.zeros(0)
             for name, parts in scores.items()}, kept, skipped)


def gradcam_image(classifier: Classifier, image_path: Path, score: float) -> np.ndarray:
    """Grad-CAM overlay (RGB uint8) with the score and verdict written in the corner."""
    rgb = resize_square(load_image(image_path), classifier.info.img_size)
    heatmap = gradcam_heatmap(classifier, to_model_input(rgb))
    canvas = overlay(rgb, heatmap)
    scale = max(1, canvas.shape[0] // 128)
    if canvas.shape[0] < 160:
        canvas = cv2.resize(canvas, (160, 160), interpolation=cv2.INTER_NEAREST)
        scale = 1
    verdict = "COVID" if classifier.is_positive(score) else "neg."
    cv2.putText(canvas, f"{verdict} {score:.2f}", (4, 14 * scale), cv2.FONT_HERSHEY_SIMPLEX,
                0.45 * scale, (255, 255, 255), max(1, scale), cv2.LINE_AA)
    return canvas


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


def _safe_name(text: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)
    return keep[:80] or "image"


def validate(paths: Paths, params: Params) -> dict[str, Any]:
    """The validate stage: held-out + external sets per model -> metrics/validate.json, plots.

    Per model: per set (held-out COVID/NORMAL/PNEUMONIA, Kermany test NORMAL/PNEUMONIA, each
    external set's classes) images, flagged positive, mean/median COVID score; metrics with CIs
    on the union of the held-out sets of the model's two classes, per external set, and on the
    internal test split side by side; score-distribution plot data; Grad-CAM overlays of the
    first ``validate.gradcam_images`` images (by path) of every set of the model's two classes.
    """
    externals = {name: external_files(name, folder, paths.root)
                 for name, folder in params.validate.external.items()}  # fail before any work
    store = FeatureStore.open(paths.features)
    store.check_matches(params)
    manifest = read_manifest(paths.manifest)
    groups = heldout_groups(manifest)
    classifiers = {name: load_classifier(paths, name) for name in MODEL_NAMES}
    resamples, seed = params.validate.bootstrap, params.seed

    external_scores: dict[str, tuple[pd.DataFrame, dict[str, np.ndarray]]] = {}
    skipped: list[dict[str, str]] = []
    for name, files in externals.items():
        scores, kept, bad = score_files(classifiers, files["path"].tolist(), desc=name)
        external_scores[name] = (files.iloc[kept].reset_index(drop=True), scores)
        skipped.extend({"set": f"external_{name}", **item} for item in bad)

    results: dict[str, Any] = {}
    score_rows: dict[str, list[tuple[str, str, float]]] = {}
    gradcam_jobs: dict[str, list[tuple[str, Path, float]]] = {}
    for model_name, classifier in classifiers.items():
        threshold = classifier.info.threshold
        relevant = set(class_names(model_name))
        head = classifier.model.get_layer("head")
        rows_out: list[tuple[str, str, float]] = []
        jobs: list[tuple[str, Path, float]] = []
        sets: dict[str, Any] = {}
        union_y: list[np.ndarray] = []
        union_s: list[np.ndarray] = []
        for key, group in groups.items():
            present = group[group["sha256"].isin(store.index["sha256"])]
            for path in group.loc[~group.index.isin(present.index), "path"]:
                if not any(s["path"] == path for s in skipped):
                    skipped.append({"set": key, "path": path, "reason": "no cached features "
                                    "(undecodable at featurize)"})
            rows, owner = store.rows(present["sha256"].tolist(), what=f"{key} images")
            scores = head_scores(head, store, rows)
            labels = present["label"].to_numpy()[owner]
            image_paths = present["path"].to_numpy()[owner]
            sets[key] = score_summary(scores, threshold)
            rows_out.extend((key, label, round(float(s), 6))
                            for label, s in zip(labels, scores, strict=True))
            if labels.size and labels[0] in relevant:
                union_y.append(covid_labels(labels))
                union_s.append(scores)
                order = np.argsort(image_paths, kind="stable")[:params.validate.gradcam_images]
                jobs.extend((key, paths.datasets / image_paths[i], float(scores[i]))
                            for i in order)
        y = np.concatenate(union_y) if union_y else np.zeros(0, dtype=np.int64)
        s = np.concatenate(union_s) if union_s else np.zeros(0)
        heldout_metrics = metrics_with_ci(y, s, threshold, resamples, seed)

        external_metrics: dict[str, Any] = {}
        for name, (files, scores_by_model) in external_scores.items():
            scores = scores_by_model[model_name]
            labels = files["label"].to_numpy()
            for label in EXTERNAL_LABELS:
                mask = labels == label
                if mask.any():
                    key = f"external_{name}_{label}"
                    sets[key] = score_summary(scores[mask], threshold)
                    rows_out.extend((key, label, round(float(v), 6)) for v in scores[mask])
                    if label in relevant:
                        picked = np.flatnonzero(mask)[:params.validate.gradcam_images]
                        jobs.extend((key, Path(files["path"].iloc[i]), float(scores[i]))
                                    for i in picked)
            mask = np.isin(labels, list(relevant))
            external_metrics[name] = metrics_with_ci(covid_labels(labels[mask]), scores[mask],
                                                     threshold, resamples, seed)

        split = read_split(paths.split_file(model_name), model_name)
        test = score_split(classifier, store, split, "test")
        rows_out.extend(("test", POSITIVE_CLASS if yy else NEGATIVE_CLASS[model_name],
                         round(float(v), 6)) for yy, v in zip(test.is_covid, test.scores,
                                                              strict=True))
        results[model_name] = {
            "threshold": threshold,
            "sets": sets,
            "heldout": heldout_metrics,
            "external": external_metrics,
            "test": metrics_with_ci(test.is_covid, test.scores, threshold, resamples, seed),
        }
        score_rows[model_name] = rows_out
        gradcam_jobs[model_name] = jobs

    with atomic_dir(paths.plots / "validate") as folder:
        for model_name, rows in score_rows.items():
            write_csv(folder / f"{model_name}_scores.csv", ["set", "label", "score", "score_bin"],
                      [(*row, score_bin(row[2])) for row in rows])
    with atomic_dir(paths.plots / "gradcam") as folder:
        for model_name, jobs in gradcam_jobs.items():
            target = folder / model_name
            target.mkdir()
            for key, image_path, score in tqdm(jobs, desc=f"grad-cam {model_name}",
                                               unit="img", mininterval=2.0):
                try:
                    picture = gradcam_image(classifiers[model_name], image_path, score)
                except (ImageDecodeError, OSError) as exc:
                    log.warning("grad-cam skipped %s: %s", image_path, exc)
                    continue
                name = f"{key}-{_safe_name(image_path.stem)}.png"
                if not cv2.imwrite(str(target / name), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
                    raise PipelineError(f"{target / name}: could not write the PNG")
    with atomic_dir(paths.reports / "validate") as folder:
        write_csv(folder / "skipped.csv", ["set", "path", "reason"],
                  [(item["set"], item["path"], item["reason"]) for item in skipped])
        write_text(folder / "summary.txt", validation_summary(results))
    payload = {**results, "skipped_images": len(skipped)}
    write_json(paths.metrics / "validate.json", payload)
    return payload
