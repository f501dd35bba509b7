"""Stage copy_images: raw datasets + selected rows -> per-model class folders and held-out sets.

Outputs: data/datasets/ (class folders, manifest.csv, skipped.csv, excluded.csv) and
metrics/copy_images.json. Training images are kept clear of the held-out, Kermany test and
``validate.external`` sets by the audit's own criterion (``audit.phash_max_distance``).
Negatives come from the sources ``copy.negatives`` lists (Kermany, the collection's own non-COVID
rows, ``copy.folders``), counted per source in the metric. When too few images are usable,
data/datasets/ holds only skipped.csv and excluded.csv (every file left out and why) and the stage
fails with a message pointing to them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from covid_xray.config import Paths, resolve_path
from covid_xray.datasets import EXCLUDED_FILE, DatasetBuildError, build_datasets, write_skipped
from covid_xray.io import PipelineError, atomic_dir, run_stage, write_json
from covid_xray.params import load_params

log = logging.getLogger("covid_xray.copy_images")


def main() -> None:
    paths = Paths()
    params = load_params(paths.params)
    external: dict[str, Path] = {}
    for name, folder in sorted(params.validate.external.items()):
        location = resolve_path(folder, paths.root)
        if location.is_dir():
            external[name] = location
        else:  # as the audit does: only folders that exist are compared
            log.info("external set %s: %s does not exist; training not checked against it",
                     name, location)
    folders = {name: resolve_path(folder, paths.root)
               for name, folder in params.copy.folders.items()}
    try:
        with atomic_dir(paths.datasets) as folder:
            build = build_datasets(paths.raw, paths.interim, folder, params.seed, params.copy,
                                   max_distance=params.audit.phash_max_distance,
                                   external=external, folders=folders)
    except DatasetBuildError as exc:
        with atomic_dir(paths.datasets) as folder:  # the old build is stale; DVC removes it too
            write_skipped(folder, exc.skipped, exc.raw_dir)
            write_skipped(folder, exc.excluded, exc.raw_dir, EXCLUDED_FILE)
        raise PipelineError(f"{exc}: {paths.datasets / 'skipped.csv'}") from exc
    write_json(paths.metrics / "copy_images.json", build.report)
    log.info(build.summary())
    if build.skipped:
        log.warning("%d files skipped (not copied): see %s", len(build.skipped),
                    paths.datasets / "skipped.csv")
    if build.excluded:
        log.warning("%d training images left out to keep sets disjoint: see %s",
                    len(build.excluded), paths.datasets / EXCLUDED_FILE)


if __name__ == "__main__":
    run_stage(main)
