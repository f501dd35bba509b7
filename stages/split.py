"""Stage split: the manifest -> train/val/test lists per model, grouped by patient.

Reads data/datasets/manifest.csv (and excluded.csv, counted in the metric). Outputs:
data/splits/<model>.csv and metrics/split.json.
"""

from __future__ import annotations

import logging

from covid_xray.config import Paths
from covid_xray.io import atomic_dir, run_stage, write_json
from covid_xray.params import load_params
from covid_xray.splitting import (
    read_excluded,
    read_manifest,
    split_all,
    split_report,
    split_summary,
    write_splits,
)

log = logging.getLogger("covid_xray.split")


def main() -> None:
    paths = Paths()
    params = load_params(paths.params)
    splits = split_all(read_manifest(paths.manifest), params.split, params.seed)
    with atomic_dir(paths.splits) as folder:
        write_splits(splits, folder)
    report = split_report(splits, params.split, params.seed, read_excluded(paths.excluded))
    write_json(paths.metrics / "split.json", report)
    log.info(split_summary(report))


if __name__ == "__main__":
    run_stage(main)
