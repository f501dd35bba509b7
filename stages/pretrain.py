"""Stage pretrain: a backbone trained on Kermany NORMAL vs PNEUMONIA, for ``model.weights: xray``.

Outputs: models/pretrain/ (backbone.weights.h5, info.json: how it was trained and its Kermany test
ROC AUC, images.csv: every allowed Kermany training image and what became of it) and
metrics/pretrain/ (dvclive: per-epoch curves in plots/, metrics.json with the Kermany test AUC and
its interval).

Off by default: unless ``model.weights`` is ``xray`` the stage only writes a constant "not used"
info.json and empty metrics, without importing TensorFlow, so it costs nothing and its unchanged
output never re-runs featurize.
"""

from __future__ import annotations

import logging

from covid_xray.config import Paths
from covid_xray.io import run_stage
from covid_xray.params import load_params
from covid_xray.pretrain_data import write_not_used

log = logging.getLogger("covid_xray.pretrain")


def main() -> None:
    paths = Paths()
    params = load_params(paths.params)
    if not params.uses_pretrain:
        write_not_used(paths)
        log.info("model.weights=%s: no pretraining (set model.weights=xray to pretrain a "
                 "backbone on chest X-rays)", params.model.weights)
        return
    from covid_xray.pretraining import pretrain  # TensorFlow: only when the pretrain runs

    info = pretrain(paths, params)
    images, test = info["images"], info["kermany_test"]
    log.info("pretrained %s (%s init) at %d px on %s NORMAL / %s PNEUMONIA images (%s / %s "
             "val; %d left out, %d not drawn) in %.0f s (+%.0f s decoding): Kermany test ROC "
             "AUC %s [%s, %s] (%d images; %s at model.img_size %d)", info["architecture"],
             params.pretrain.init, params.pretrain.img_size, images["train"]["normal"],
             images["train"]["pneumonia"], images["val"]["normal"], images["val"]["pneumonia"],
             images["left_out"]["total"], images["not_drawn"], info["seconds"]["fit"],
             info["seconds"]["decode"],
             test["roc_auc"], test["roc_auc_ci_low"], test["roc_auc_ci_high"], test["n"],
             info["kermany_test_at_model_size"]["roc_auc"], params.model.img_size)


if __name__ == "__main__":
    run_stage(main)
