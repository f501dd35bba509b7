"""Stage probe: can each model's classes be told apart without looking at disease?

Reads data/splits/<model>.csv (all rows: train, val and test) and the images in data/datasets;
writes metrics/probe.json (the verdict: both AUCs and whether it fired) and
reports/probe/details.json (everything, read by the report). A probe above
``probe.auc_threshold`` prints a WARNING; it never fails the pipeline (the finding belongs in the
report, not in a crash).
"""

from __future__ import annotations

import logging

import numpy as np

from covid_xray.audit import SPLIT_COLUMNS, read_table
from covid_xray.config import MODEL_NAMES, NEGATIVE_CLASS, POSITIVE_CLASS, Paths
from covid_xray.io import run_stage, write_json
from covid_xray.params import load_params
from covid_xray.probe import (
    describe_files,
    probe_img_size,
    probe_model,
    random_backbone_features,
    unique_records,
)

log = logging.getLogger("covid_xray.stages.probe")


def main() -> None:
    params = load_params()
    paths = Paths()
    tables = {model: read_table(paths.split_file(model), SPLIT_COLUMNS, f"split of {model}")
              for model in MODEL_NAMES}
    files = {model: [paths.datasets / row["path"] for row in rows]
             for model, rows in tables.items()}
    size = probe_img_size(params.model.img_size)

    # Each image is decoded once, and the random backbone runs once, for both models.
    records, skipped = describe_files([f for fs in files.values() for f in fs], size)
    for file, reason in skipped:
        log.warning("skipped %s: %s", file, reason)
    distinct = unique_records(records)
    features = random_backbone_features(
        np.stack([r.thumbnail for r in distinct]) if distinct
        else np.zeros((0, size, size, 3), np.uint8), params.model.backbone, params.seed)
    random_features = {r.sha256: row for r, row in zip(distinct, features, strict=True)}

    metrics, tracked = {}, {}
    for model, rows in tables.items():
        result = probe_model(
            model, files[model], [r["label"] for r in rows], [r["patient_id"] for r in rows],
            records, random_features, positive=POSITIVE_CLASS, negative=NEGATIVE_CLASS[model],
            threshold=params.probe.auc_threshold, folds=params.probe.folds, seed=params.seed,
            backbone=params.model.backbone, img_size=size)
        metrics[model], tracked[model] = result.metrics(), result.tracked()
        log.info("%s: %d images, trivial-statistics AUC %s, random-%s-features AUC %s "
                 "(threshold %.2f, %d folds%s)", model, result.images,
                 _fmt(result.trivial.auc), params.model.backbone, _fmt(result.random.auc),
                 result.threshold, result.trivial.folds,
                 ", grouped by patient" if result.trivial.grouped else "")
        for line in result.warnings():
            log.warning(line)
    write_json(paths.details("probe"), metrics)
    write_json(paths.metrics / "probe.json", tracked)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    run_stage(main)
