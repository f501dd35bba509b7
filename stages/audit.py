"""Stage audit: no patient, file or near-copy shared by sets that must be disjoint.

Reads data/splits/<model>.csv, data/datasets/manifest.csv (held-out sets) and the external folders
of ``validate.external`` that exist (and, with ``model.weights: xray``, the pretrain stage's
images); writes metrics/audit.json, data/audit/leaks.csv (every leak)
and data/audit/pairs.csv (every pair checked), then, with ``audit.fail_on_leak``, stops the
pipeline when anything leaked (the files are written first, so the full list can be read).
"""

from __future__ import annotations

import logging

from covid_xray.audit import (
    LEAKS_HEADER,
    PAIRS_HEADER,
    audit_dir,
    collect_groups,
    leak_error,
    run_audit,
)
from covid_xray.config import Paths
from covid_xray.errors import PipelineError
from covid_xray.io import run_stage, write_csv, write_json
from covid_xray.params import load_params
from covid_xray.pretrain_data import select_images

log = logging.getLogger("covid_xray.stages.audit")


def main() -> None:
    params = load_params()
    paths = Paths()
    pretrain = select_images(paths, params.pretrain).audited() if params.uses_pretrain else []
    groups = collect_groups(paths, params.validate.external, pretrain=pretrain)
    result = run_audit(groups, max_distance=params.audit.phash_max_distance)

    leaks_csv = audit_dir(paths) / "leaks.csv"
    write_csv(leaks_csv, LEAKS_HEADER, [leak.row() for leak in result.leaks])
    write_csv(audit_dir(paths) / "pairs.csv", PAIRS_HEADER, result.pair_rows())
    write_json(paths.metrics / "audit.json", result.summary(params.audit.fail_on_leak))

    counts = result.counts()
    log.info("audited %d images in %d groups, %d pairs: %d shared patients, %d identical files, "
             "%d near-duplicates (pHash distance <= %d)%s",
             result.files, len(result.group_sizes), len(result.pairs),
             counts["patient"], counts["identical"], counts["near_duplicate"],
             result.max_distance,
             f"; {len(result.unreadable)} undecodable (hashed by bytes only)"
             if result.unreadable else "")
    if result.leaks:
        message = leak_error(result, leaks_csv.relative_to(paths.root).as_posix())
        if params.audit.fail_on_leak:
            raise PipelineError(message)
        log.warning("%s\n(audit.fail_on_leak is false: continuing)", message)


if __name__ == "__main__":
    run_stage(main)
