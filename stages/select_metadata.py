"""Stage select_metadata: metadata.csv -> training and held-out COVID rows, and why others went.

Outputs: data/interim/{covid_selected,covid_heldout}.csv (COVID rows),
data/interim/{negatives_selected,negatives_heldout}.csv (the collection's own non-COVID X-rays),
data/interim/dropped.csv and metrics/selection.json.
"""

from __future__ import annotations

import logging

from covid_xray.config import Paths
from covid_xray.io import atomic_dir, run_stage, write_json
from covid_xray.metadata import select_covid, write_selection
from covid_xray.params import load_params

log = logging.getLogger("covid_xray.select_metadata")


def main() -> None:
    paths = Paths()
    params = load_params(paths.params)
    selection = select_covid(paths.covid_dataset / "metadata.csv", params.select)
    with atomic_dir(paths.interim) as folder:
        write_selection(selection, folder)
    write_json(paths.metrics / "selection.json", selection.report)
    log.info(selection.summary())
    if selection.report["patients"]["both"]:
        log.warning("%d patients have images both in training and held out (dated on both "
                    "sides of %s)", selection.report["patients"]["both"],
                    params.select.heldout_from)


if __name__ == "__main__":
    run_stage(main)
