"""Stage report: the run's metrics -> reports/report.md (+ figures) and models/<model>.card.md."""

from __future__ import annotations

import logging

from covid_xray.config import Paths
from covid_xray.io import run_stage
from covid_xray.report import build_report

log = logging.getLogger("covid_xray.report")


def main() -> None:
    paths = Paths()
    summary = build_report(paths)
    log.info("wrote %s with %d figures and a model card per model%s",
             paths.reports / "report.md", summary["figures"],
             f"; shortcut probe FIRED for {', '.join(summary['probe_fired'])}"
             if summary["probe_fired"] else "")


if __name__ == "__main__":
    run_stage(main)
