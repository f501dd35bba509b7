"""Stage copy_images: raw datasets + selected rows -> per-model class folders and held-out sets.

Outputs: data/datasets/ (class folders, manifest.csv, skipped.csv) and metrics/copy_images.json.
When too few images are usable, data/datasets/ holds only skipped.csv (every file left out and
why) and the stage fails with a message pointing to it.
"""

from __future__ import annotations

import logging

from covid_xray.config import Paths
from covid_xray.datasets import DatasetBuildError, build_datasets, write_skipped
from covid_xray.io import PipelineError, atomic_dir, run_stage, write_json
from covid_xray.params import load_params

log = logging.getLogger("covid_xray.copy_images")


def main() -> None:
    paths = Paths()
    params = load_params(paths.params)
    try:
        with atomic_dir(paths.datasets) as folder:
            build = build_datasets(paths.raw, paths.interim, folder, params.seed, params.copy)
    except DatasetBuildError as exc:
        with atomic_dir(paths.datasets) as folder:  # the old build is stale; DVC removes it too
            write_skipped(folder, exc.skipped, exc.raw_dir)
        raise PipelineError(f"{exc}: {paths.datasets / 'skipped.csv'}") from exc
    write_json(paths.metrics / "copy_images.json", build.report)
    log.info(build.summary())
    if build.skipped:
        log.warning("%d files skipped (not copied): see %s", len(build.skipped),
                    paths.datasets / "skipped.csv")


if __name__ == "__main__":
    run_stage(main)
