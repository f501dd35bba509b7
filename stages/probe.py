"""Stage probe: can each model's classes be told apart without looking at disease?

Reads data/splits/<model>.csv (all rows: train, val and test) and the images in data/datasets;
measures the files and, through ``params.preprocess`` at ``model.img_size``, what the models are
given; writes metrics/probe.json (four AUCs and the verdict per model) and
reports/probe/details.json (threshold, flags, strongest statistics, counts, preprocessing). A probe
above ``probe.auc_threshold`` prints a WARNING; it never fails the pipeline (the finding belongs in
the report, not in a crash).
"""

from __future__ import annotations

import logging

from covid_xray.audit import SPLIT_COLUMNS, read_table
from covid_xray.config import MODEL_NAMES, NEGATIVE_CLASS, POSITIVE_CLASS, Paths
from covid_xray.io import run_stage, write_json
from covid_xray.params import load_params
from covid_xray.probe import (
    describe_files,
    probe_img_size,
    probe_model,
    probe_random_features,
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

    # Each image is decoded once, and the random backbone runs once per view, for both models.
    records, skipped = describe_files([f for fs in files.values() for f in fs], size,
                                      preprocessing=params.preprocess,
                                      model_size=params.model.img_size)
    for file, reason in skipped:
        log.warning("skipped %s: %s", file, reason)
    random_features = probe_random_features(unique_records(records), params.model.backbone,
                                            params.seed)

    metrics, details = {}, {}
    for model, rows in tables.items():
        result = probe_model(
            model, files[model], [r["label"] for r in rows], [r["patient_id"] for r in rows],
            records, random_features, positive=POSITIVE_CLASS, negative=NEGATIVE_CLASS[model],
            threshold=params.probe.auc_threshold, folds=params.probe.folds, seed=params.seed,
            backbone=params.model.backbone, img_size=size,
            model_img_size=params.model.img_size, preprocessing=params.preprocess)
        metrics[model] = result.metrics()
        details[model] = result.details()
        log.info("%s: %d images; statistics AUC %s (files) / %s (model input), random-%s AUC "
                 "%s / %s (threshold %.2f, %d folds%s)", model, result.images,
                 _fmt(result.raw.trivial.auc), _fmt(result.model_input.trivial.auc),
                 params.model.backbone, _fmt(result.raw.random.auc),
                 _fmt(result.model_input.random.auc), result.threshold,
                 result.raw.trivial.folds,
                 ", grouped by patient" if result.raw.trivial.grouped else "")
        for line in result.warnings():
            log.warning(line)
    write_json(paths.details("probe"), details)
    write_json(paths.metrics / "probe.json", metrics)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    run_stage(main)
