"""Head-only experiment cost: full `dvc repro` vs `dvc exp run -S train.dropout=0.3`.

Runs the real pipeline in a temporary copy of the repository (default params: 224 px VGG16 on the
demo data, or smaller with --img-size) and prints both wall times, their ratio (target <= 10%),
and which stages each run executed; also a `dvc repro` with nothing changed (acquire always runs:
it checks that data/raw still matches data.source). The head-only experiment is repeated
(``--repeats``, each with another dropout, each re-running the same stages) and the median is the
figure to quote: single timings on a shared 2-core machine vary by a few seconds.

    python benchmarks/bench_pipeline.py [--img-size 224] [--repeats 3] [--keep]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from pipeline_helpers import make_repo_copy, run  # noqa: E402


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3,
                        help="head-only experiments to time (median reported)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args()

    params = {} if args.img_size == 224 else {
        "model": {"img_size": args.img_size, "pool_size": min(4, args.img_size // 32)}}
    workdir = Path(tempfile.mkdtemp(prefix="covid-xray-bench-"))
    try:
        repo = make_repo_copy(REPO_ROOT, workdir / "repo", params)
        started = time.perf_counter()
        full = run(["dvc", "repro"], repo)
        full_s = time.perf_counter() - started
        run(["git", "add", "-A"], repo)
        run(["git", "commit", "-qm", "baseline"], repo)

        print(f"img_size {args.img_size}: full dvc repro {full_s:.1f} s "
              f"({len(ran_stages(full.stdout))} stages)", flush=True)
        noop_times: list[float] = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            noop = run(["dvc", "repro"], repo)
            noop_times.append(time.perf_counter() - started)
        print(f"no-op dvc repro: median {statistics.median(noop_times):.2f} s "
              f"({', '.join(f'{t:.2f}' for t in noop_times)}), re-ran "
              f"{', '.join(ran_stages(noop.stdout)) or 'nothing'}", flush=True)
        head_times: list[float] = []
        for i in range(args.repeats):
            dropout = round(0.3 + 0.05 * i, 2)
            started = time.perf_counter()
            head = run(["dvc", "exp", "run", "-S", f"train.dropout={dropout}"], repo)
            head_times.append(time.perf_counter() - started)
            print(f"head-only experiment (train.dropout={dropout}): {head_times[-1]:.1f} s "
                  f"= {head_times[-1] / full_s:.1%}, re-ran {', '.join(ran_stages(head.stdout))}",
                  flush=True)
        median = statistics.median(head_times)
        print(f"ratio: median head-only {median:.1f} s = {median / full_s:.1%} of the full run "
              f"(target <= 10%)")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
