"""Stage featurize: class folders -> frozen-backbone features of every unique image, computed once.

Outputs: data/features/ (features.npy memmap, index.csv, backbone.weights.h5, info.json) and
metrics/featurize.json (counts, seconds, images/s: kept outside data/features so that a re-run
producing identical features leaves that output's hash, and everything downstream, unchanged).
Reads only model.{backbone, weights, img_size}, featurize.*, train.rotation_deg and base.seed, so a
head or training change (`dvc exp run -S train.dropout=0.3`) never re-runs it.
"""

from __future__ import annotations

import logging

from covid_xray.config import Paths
from covid_xray.features import backbone_weights, featurize, featurize_metrics
from covid_xray.io import run_stage, write_json
from covid_xray.modeling import check_backbone_weights
from covid_xray.params import load_params

log = logging.getLogger("covid_xray.featurize")


def main() -> None:
    paths = Paths()
    params = load_params(paths.params)
    # First, before any image is read: a weights file that cannot load into the backbone (or
    # ImageNet offline) stops here in one line naming the file and what was expected.
    check_backbone_weights(params.backbone, params.model.img_size,
                           backbone_weights(paths, params), paths.root)
    info = featurize(paths, params)
    write_json(paths.metrics / "featurize.json", featurize_metrics(info))
    log.info("featurized %d images -> %d rows (%d rotated copies) %s in %.1f s, %.2f images/s "
             "on %s (engine %s%s); %d skipped", info["images"], info["rows"],
             info["rotated_rows"], tuple(info["feature_shape"]), info["seconds"],
             info["images_per_s"], ", ".join(info["devices"]), info["engine"],
             f", {info['nodes']} node(s)" if info["engine"] == "ray" else "",
             len(info["skipped"]))
    for item in info["skipped"]:
        log.warning("skipped %s: %s", item["path"], item["reason"])


if __name__ == "__main__":
    run_stage(main)
