"""Stage validate: both models on the held-out sets and on every external set from params.

Outputs: reports/validate/details.json (per set: images, flagged positive, mean/median COVID
score; metrics with CIs on the held-out union, per external set and on the test split side by
side), metrics/validate.json (held-out and external ROC AUC with its interval, sensitivity,
specificity: what DVC tracks), plots/validate/<model>_scores.csv, plots/gradcam/<model>.png (a
Grad-CAM grid per model), reports/validate/{summary.txt,skipped.csv}.
"""

from __future__ import annotations

import logging

from covid_xray.config import MODEL_NAMES, Paths
from covid_xray.evaluation import validate
from covid_xray.io import run_stage
from covid_xray.params import load_params

log = logging.getLogger("covid_xray.validate")


def main() -> None:
    paths = Paths()
    params = load_params(paths.params)
    results = validate(paths, params)
    for model in MODEL_NAMES:
        m = results[model]
        flagged = ", ".join(f"{key} {s['flagged_positive']}/{s['n']}"
                            for key, s in m["sets"].items())
        log.info("%s (threshold %.3f): flagged COVID: %s", model, m["threshold"], flagged)
        log.info("%s: held-out AUC %s, test AUC %s, external AUC %s", model,
                 m["heldout"]["roc_auc"], m["test"]["roc_auc"],
                 {name: e["roc_auc"] for name, e in m["external"].items()})
    if results["skipped_images"]:
        log.warning("%d images skipped (listed in reports/validate/skipped.csv)",
                    results["skipped_images"])


if __name__ == "__main__":
    run_stage(main)
