"""Stage train@<model>: cached features -> the head trained, threshold chosen, full model saved.

    python -m stages.train covid_normal      (or covid_pneumonia)

Outputs: models/<model>.keras + models/<model>.json (sidecar: class order, threshold, OOD stats),
metrics/train/<model>/ (dvclive: per-epoch loss/accuracy on the training rows and the val split,
summary metrics), data/predictions/<model>/ (scores and Grad-CAM maps of every cached image).
"""

from __future__ import annotations

import logging
import sys

from covid_xray.config import MODEL_NAMES, Paths
from covid_xray.errors import PipelineError
from covid_xray.io import run_stage
from covid_xray.params import load_params
from covid_xray.training import train_model

log = logging.getLogger("covid_xray.train")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in MODEL_NAMES:
        raise PipelineError(f"usage: python -m stages.train <model>, model one of "
                            f"{', '.join(MODEL_NAMES)} (got {' '.join(args) or 'nothing'})")
    paths = Paths()
    params = load_params(paths.params)
    result = train_model(args[0], paths, params)
    choice = result.threshold
    log.info("%s: trained on %d rows (%d images + rotated copies), %d val, %d test; "
             "threshold %.4f (%s on %d val images%s) -> %s", args[0], result.n_train_rows,
             result.n_train_images, result.n_val, result.n_test, choice.threshold, choice.rule,
             choice.n, f"; {choice.note}" if choice.note else "", result.model_path)
    log.info("%s: seconds %s", args[0], result.seconds)


if __name__ == "__main__":
    run_stage(main)
