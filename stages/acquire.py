"""DVC stage ``acquire``: fill ``data/raw`` from ``data.source`` (demo | download | a folder).

Writes ``data/raw/covid-chestxray-dataset/``, ``data/raw/chest_xray/``, ``data/raw/external/``
(demo and download) and ``data/raw/SOURCE.json`` (what was acquired, with counts and checksums),
all built in a temporary folder and swapped in whole. DVC runs it every time (``always_changed``):
it leaves data/raw untouched while it still matches its source, so the stages after it re-run
only when the data really changed.
"""

from __future__ import annotations

import logging
import time

from covid_xray.acquire import describe, refresh
from covid_xray.config import Paths
from covid_xray.io import run_stage
from covid_xray.params import load_params

log = logging.getLogger("acquire")


def main() -> None:
    paths = Paths()
    params = load_params(paths.params)
    started = time.perf_counter()
    summary, rebuilt = refresh(params, paths)
    raw = paths.raw.relative_to(paths.root) if paths.raw.is_relative_to(paths.root) else paths.raw
    log.info(describe(summary, raw.as_posix(), time.perf_counter() - started, rebuilt))


if __name__ == "__main__":
    run_stage(main)
