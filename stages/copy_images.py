"""Stage copy_images: raw datasets + selected rows -> per-model class folders and held-out sets.

Outputs: data/datasets/ (class folders, manifest.csv, skipped.csv) and metrics/copy_images.json.
"""

from __future__ import annotations

import logging

from covid_xray.config import Paths
from covid_xray.datasets import build_datasets
from covid_xray.io import atomic_dir, run_stage, write_json
from covid_xray.params import load_params

log = logging.getLogger("covid_xray.copy_images")


def main() -> None:
    paths = Paths()
    params = load_params(paths.params)
    with atomic_dir(paths.datasets) as folder:
        build = build_datasets(paths.raw, paths.interim, folder, params.seed, params.copy)
    write_json(paths.metrics / "copy_images.json", build.report)
    log.info(build.summary())
    if build.skipped:
        log.warning("%d files skipped (not copied): see %s", len(build.skipped),
                    paths.datasets / "skipped.csv")


if __name__ == "__main__":
    run_stage(main)
