"""Stage evaluate: both models on their test split, at each model's stored threshold.

Outputs: reports/evaluate/details.json (accuracy, sensitivity, specificity, precision, F1, ROC
AUC, each with a bootstrap 95% interval, counts), metrics/evaluate.json (ROC AUC, sensitivity and
specificity with their intervals: what DVC tracks), plots/evaluate/<model>_{confusion,roc}.csv,
reports/evaluate/<model>_classification_report.txt.
"""

from __future__ import annotations

import logging

from covid_xray.config import MODEL_NAMES, Paths
from covid_xray.evaluation import evaluate
from covid_xray.io import run_stage
from covid_xray.params import load_params

log = logging.getLogger("covid_xray.evaluate")


def main() -> None:
    paths = Paths()
    params = load_params(paths.params)
    results = evaluate(paths, params)
    for model in MODEL_NAMES:
        m = results[model]
        log.info("%s: %d test images, threshold %.3f: accuracy %s, sensitivity %s, "
                 "specificity %s, ROC AUC %s", model, m["n_test"], m["threshold"],
                 m["accuracy"], m["sensitivity"], m["specificity"], m["roc_auc"])


if __name__ == "__main__":
    run_stage(main)
