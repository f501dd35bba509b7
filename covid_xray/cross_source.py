"""Cross-source validation: does a model work on a source it never saw?

The internal test split shares its sources with training: a model that recognises where an image
came from (a paediatric hospital file vs a figure from a paper) scores well there without seeing
any disease. External sets measure it, but may only be scored once, at the end; choosing between
variants on them would turn them into training data. So this holds out whole *origins* of the
training collections instead (the manifest's ``origin``: a url domain of the COVID collection,
``kermany``, a ``copy.folders`` name):

- folds: every origin with at least ``cross_source.min_images`` images of the model's set, and one
  fold of all smaller origins together;
- for each fold, a fresh head (the train stage's :func:`~covid_xray.training.fit_head`, same params,
  on the cached features: cheap) is fitted on the ``train`` split of every *other* origin, its
  threshold chosen on their ``val`` split (``threshold.rule``), and it scores every image of the
  held-out origin (train, val and test splits alike: that model saw none of them);
- per fold: images, ROC AUC with a patient-group bootstrap CI where the fold holds both classes
  (an origin with COVID and non-COVID images, e.g. a radiology website's cases: a
  *within-origin* AUC, with no source cue to exploit), else the sensitivity or specificity at the
  threshold chosen on the training folds;
- pooled: one ROC AUC over every scored image (each scored by a model that never saw its origin),
  with a CI. Scores of different fold models are pooled, so this also asks their calibration to
  agree: read it beside the per-fold figures.

A fold whose removal leaves the training folds without one class (all negatives come from the
held-out origin, as Kermany in the seed's setup) cannot be validated this way; it is listed as
skipped with that reason, and the pooled AUC is undefined when no negative (or no COVID) image
could be scored. That is a finding, not a failure: single-source negatives cannot be checked
across sources.

Outputs: ``metrics/cross_source.json`` (a few keys per model, for ``dvc metrics``/``exp show``)
and ``reports/cross_source/`` (``folds.csv``: every fold's figures; ``scores.csv``: every
out-of-source score; ``summary.txt``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from covid_xray.config import MODEL_NAMES, NEGATIVE_CLASS, POSITIVE_CLASS, Paths, class_names
from covid_xray.errors import PipelineError
from covid_xray.evaluation import metrics_with_ci
from covid_xray.features import FeatureStore
from covid_xray.io import atomic_dir, write_csv, write_json, write_text
from covid_xray.params import Params
from covid_xray.scores import covid_labels
from covid_xray.splitting import read_manifest, read_split
from covid_xray.training import SplitRows, choose_threshold, fit_head, pooled_rows

log = logging.getLogger("covid_xray.cross_source")

OTHER_FOLD = "(smaller origins)"
"""The fold holding every origin with fewer than ``cross_source.min_images`` images."""
FOLD_COLUMNS: tuple[str, ...] = (
    "model", "fold", "origins", "n", "n_covid", "n_negative", "trained_on", "threshold",
    "roc_auc", "roc_auc_ci_low", "roc_auc_ci_high", "sensitivity", "sensitivity_ci_low",
    "sensitivity_ci_high", "specificity", "specificity_ci_low", "specificity_ci_high",
    "bootstrap_units", "skipped")
SCORE_COLUMNS: tuple[str, ...] = ("model", "fold", "path", "origin", "label", "split", "score")
METRIC_KEYS: tuple[str, ...] = ("roc_auc", "sensitivity", "specificity")


def plan_folds(origins: pd.Series, min_images: int) -> dict[str, list[str]]:
    """``{fold: [origins]}``: each origin with ``min_images`` images or more on its own (sorted),
    then one fold of the smaller ones (if any)."""
    counts = origins.value_counts()
    folds = {str(o): [str(o)] for o in sorted(counts.index) if counts[o] >= min_images}
    small = sorted(str(o) for o in counts.index if counts[o] < min_images)
    if small:
        folds[OTHER_FOLD] = small
    return folds


def rows_with_origin(split: pd.DataFrame, manifest: pd.DataFrame, model_name: str
                     ) -> pd.DataFrame:
    """The model's split rows with each image's ``origin`` from the manifest (by path)."""
    if "origin" not in manifest.columns:
        raise PipelineError("data/datasets/manifest.csv has no origin column (written before "
                            "cross-source validation existed); re-run `dvc repro copy_images`")
    origin = manifest[manifest["set"] == model_name].set_index("path")["origin"]
    merged = split.assign(origin=split["path"].map(origin))
    missing = merged[merged["origin"].isna()]
    if not missing.empty:
        raise PipelineError(f"data/splits/{model_name}.csv: {len(missing)} rows are not in the "
                            f"manifest's {model_name} set (e.g. {missing['path'].iloc[0]}); "
                            "re-run `dvc repro`")
    return merged.assign(origin=merged["origin"].replace("", "unknown"))


def _rows(store: FeatureStore, part: pd.DataFrame, with_copies: bool, what: str) -> SplitRows:
    """Feature rows (and labels) of ``part``'s images, plus rotated copies if asked."""
    rows, owner = store.rows(part["sha256"].tolist(), with_copies=with_copies, what=what)
    return SplitRows(rows=rows, is_covid=covid_labels(part["label"].to_numpy()[owner]),
                     sha256=part["sha256"].to_numpy()[owner])


def _scores(fitted_on_pooled: Any, store: FeatureStore, rows: np.ndarray, pool_size: int,
            positive_index: int) -> np.ndarray:
    if len(rows) == 0:
        return np.zeros(0, dtype=np.float64)
    probs = np.asarray(fitted_on_pooled(pooled_rows(store, rows, pool_size), training=False))
    return probs[:, positive_index].astype(np.float64)


@dataclass
class FoldResult:
    """One held-out origin (or group of small ones) of one model."""

    fold: str
    origins: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)
    trained_on: int = 0
    threshold: float | None = None
    skipped: str = ""
    scores: pd.DataFrame | None = None

    def row(self, model_name: str) -> dict[str, Any]:
        m = self.metrics
        out: dict[str, Any] = {"model": model_name, "fold": self.fold,
                               "origins": " ".join(self.origins), "n": m.get("n", 0),
                               "n_covid": m.get("n_covid", 0),
                               "n_negative": m.get("n_negative", 0),
                               "trained_on": self.trained_on, "threshold": self.threshold,
                               "bootstrap_units": m.get("bootstrap_units"),
                               "skipped": self.skipped}
        for key in METRIC_KEYS:
            for suffix in ("", "_ci_low", "_ci_high"):
                out[f"{key}{suffix}"] = m.get(f"{key}{suffix}")
        return out


def cross_validate(store: FeatureStore, rows: pd.DataFrame, params: Params,
                   model_name: str) -> tuple[list[FoldResult], dict[str, Any]]:
    """Leave-one-origin-out validation of one model; returns the folds and the pooled metrics
    (:func:`~covid_xray.evaluation.metrics_with_ci` on every out-of-source score, patient
    groups resampled)."""
    positive_index = class_names(model_name).index(POSITIVE_CLASS)
    negative = NEGATIVE_CLASS[model_name]
    resamples, seed = params.validate.bootstrap, params.seed
    results: list[FoldResult] = []
    for fold, origins in plan_folds(rows["origin"], params.cross_source.min_images).items():
        held_mask = rows["origin"].isin(origins)
        held, rest = rows[held_mask], rows[~held_mask]
        result = FoldResult(fold=fold, origins=origins)
        results.append(result)
        train = rest[rest["split"] == "train"]
        missing = [label for label in (POSITIVE_CLASS, negative)
                   if not (train["label"] == label).any()]
        if missing:
            result.skipped = (f"without {fold} the training folds have no {missing[0]} images "
                              f"({fold} holds all of them)")
            result.metrics = {"n": len(held), "n_covid": int((held["label"] == POSITIVE_CLASS)
                                                             .sum()),
                              "n_negative": int((held["label"] == negative).sum())}
            continue
        train_rows = _rows(store, train, True, f"training images without {fold}")
        val_rows = _rows(store, rest[rest["split"] == "val"], False,
                         f"val images without {fold}")
        fitted = fit_head(store, train_rows, val_rows, params)
        pool = params.model.pool_size
        val_scores = _scores(fitted.on_pooled, store, val_rows.rows, pool, positive_index)
        choice = choose_threshold(val_rows.is_covid, val_scores, params.threshold.rule,
                                  params.threshold.sensitivity)
        scored = _rows(store, held, False, f"images of {fold}")
        scores = _scores(fitted.on_pooled, store, scored.rows, pool, positive_index)
        by_sha = held.drop_duplicates("sha256").set_index("sha256")
        part = by_sha.loc[scored.sha256].reset_index()
        result.trained_on = int(np.unique(train_rows.sha256).size)
        result.threshold = round(float(choice.threshold), 6)
        result.metrics = metrics_with_ci(scored.is_covid, scores, choice.threshold, resamples,
                                         seed, patients=part["patient_group"].to_numpy(object))
        result.scores = pd.DataFrame({
            "model": model_name, "fold": fold, "path": part["path"], "origin": part["origin"],
            "label": part["label"], "split": part["split"], "score": np.round(scores, 6)})
        log.info("%s: held out %s (%d images): trained on %d; %s", model_name, fold,
                 len(part), result.trained_on, _describe(result.metrics))
    scored_parts = [r.scores for r in results if r.scores is not None]
    pooled_scores = (pd.concat(scored_parts, ignore_index=True) if scored_parts
                     else pd.DataFrame(columns=list(SCORE_COLUMNS)))
    groups = rows.drop_duplicates("path").set_index("path")["patient_group"]
    pooled = metrics_with_ci(covid_labels(pooled_scores["label"]),
                             pooled_scores["score"].to_numpy(dtype=np.float64), 0.5, resamples,
                             seed, patients=pooled_scores["path"].map(groups).to_numpy(object))
    return results, pooled


def _describe(metrics: dict[str, Any]) -> str:
    parts = []
    for key in METRIC_KEYS:
        value = metrics.get(key)
        if value is not None:
            low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
            ci = f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""
            parts.append(f"{key} {value:.3f}{ci}")
    return ", ".join(parts) or "no metric defined"


def summary_metrics(results: Sequence[FoldResult], pooled: dict[str, Any]) -> dict[str, Any]:
    """The compact ``metrics/cross_source.json`` entry of one model."""
    both = [r.metrics["roc_auc"] for r in results
            if not r.skipped and r.metrics.get("roc_auc") is not None]
    return {
        "pooled_roc_auc": pooled.get("roc_auc"),
        "pooled_roc_auc_ci_low": pooled.get("roc_auc_ci_low"),
        "pooled_roc_auc_ci_high": pooled.get("roc_auc_ci_high"),
        "images_scored": pooled.get("n", 0),
        "folds": len(results),
        "folds_skipped": sum(1 for r in results if r.skipped),
        "within_origin_folds": len(both),
        "within_origin_auc_median": round(float(np.median(both)), 6) if both else None,
    }


def summary_text(report: dict[str, Any], folds: Sequence[dict[str, Any]]) -> str:
    """Plain-text tables of the folds (:meth:`FoldResult.row`), per model, and the pooled
    line."""
    lines: list[str] = []
    for model_name, entry in report.items():
        lines += [f"{model_name}: leave-one-origin-out ({entry['folds']} folds, "
                  f"{entry['folds_skipped']} skipped)",
                  f"  {'held-out origin':<34} {'images (covid/neg)':>18}  "
                  f"{'trained on':>10}  metric"]
        for row in (r for r in folds if r["model"] == model_name):
            images = f"{row['n']} ({row['n_covid']}/{row['n_negative']})"
            metric = row["skipped"] or _describe(row)
            lines.append(f"  {row['fold']:<34} {images:>18}  {row['trained_on']:>10}  "
                         f"{metric}")
        pooled = entry["pooled_roc_auc"]
        low, high = entry["pooled_roc_auc_ci_low"], entry["pooled_roc_auc_ci_high"]
        lines += ["  pooled out-of-source ROC AUC: "
                  + ("n/a (the scored images hold one class only)" if pooled is None else
                     f"{pooled:.3f}" + (f" [{low:.2f}, {high:.2f}]" if low is not None else ""))
                  + f" on {entry['images_scored']} images", ""]
    return "\n".join(lines)


def cross_source(paths: Paths, params: Params) -> dict[str, Any]:
    """The cross_source stage: both models -> metrics/cross_source.json, reports/cross_source/."""
    store = FeatureStore.open(paths.features)
    store.check_matches(params)
    manifest = read_manifest(paths.manifest)
    report: dict[str, Any] = {}
    fold_rows: list[dict[str, Any]] = []
    score_parts: list[pd.DataFrame] = []
    for model_name in MODEL_NAMES:
        split = read_split(paths.split_file(model_name), model_name)
        rows = rows_with_origin(split, manifest, model_name)
        results, pooled = cross_validate(store, rows, params, model_name)
        report[model_name] = summary_metrics(results, pooled)
        fold_rows += [r.row(model_name) for r in results]
        score_parts += [r.scores for r in results if r.scores is not None]
    scores = (pd.concat(score_parts, ignore_index=True) if score_parts
              else pd.DataFrame(columns=list(SCORE_COLUMNS)))
    with atomic_dir(paths.reports / "cross_source") as folder:
        write_csv(folder / "folds.csv", FOLD_COLUMNS,
                  [tuple("" if row[c] is None else row[c] for c in FOLD_COLUMNS)
                   for row in fold_rows])
        write_csv(folder / "scores.csv", SCORE_COLUMNS,
                  list(scores[list(SCORE_COLUMNS)].itertuples(index=False, name=None)))
        write_text(folder / "summary.txt", summary_text(report, fold_rows))
    write_json(paths.metrics / "cross_source.json", report)
    return report
