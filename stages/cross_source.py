"""Stage cross_source: each model retrained without one origin at a time, scored on it.

Outputs: metrics/cross_source.json (per model: pooled out-of-source ROC AUC with its CI, folds,
within-origin AUCs) and reports/cross_source/ (folds.csv, scores.csv, summary.txt). Only the
training collections' origins are held out: external sets are never read here.
"""

from __future__ import annotations

import logging

from covid_xray.config import MODEL_NAMES, Paths
from covid_xray.cross_source import cross_source
from covid_xray.io import run_stage
from covid_xray.params import load_params

log = logging.getLogger("covid_xray.cross_source")


def main() -> None:
    paths = Paths()
    params = load_params(paths.params)
    report = cross_source(paths, params)
    for model in MODEL_NAMES:
        m = report[model]
        log.info("%s: pooled out-of-source ROC AUC %s [%s, %s] on %d images; %d folds, %d "
                 "skipped, median within-origin AUC %s", model, m["pooled_roc_auc"],
                 m["pooled_roc_auc_ci_low"], m["pooled_roc_auc_ci_high"], m["images_scored"],
                 m["folds"], m["folds_skipped"], m["within_origin_auc_median"])
    log.info("details: %s", paths.reports / "cross_source" / "summary.txt")


if __name__ == "__main__":
    run_stage(main)
