"""The whole pipeline on a real data folder, and the report's table: internal test, held-out,
Kermany test and external sets with their confidence intervals, the audit and the probe.

Runs `dvc repro` in a temporary copy of the repository (the checkout is never touched) with
``data.source`` set to the folder and each ``--external NAME=FOLDER`` listed under
``validate.external`` (external sets are only ever scored: never trained, thresholded or tuned on),
then prints the report's results, audit and probe sections and how long the run took.

    python benchmarks/bench_real_data.py /path/to/collections \\
        --external actualmed=/path/to/actualmed --external figure1=/path/to/figure1 \\
        [--set model.img_size=224] [--workdir DIR] [--keep]

``/path/to/collections`` holds ``covid-chestxray-dataset/`` and ``chest_xray/`` (the layout that
``data.source`` reads; ``../shared/tools/assemble_real_data.py`` builds it from public snapshots).
``--set KEY=VALUE`` (repeatable) overrides any param, e.g. ``--set preprocess.grayscale=true``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from pipeline_helpers import deep_update, git_env, make_repo_copy  # noqa: E402

SECTIONS = ("## Data", "## Results", "## Leakage audit", "## Shortcut probe")
"""Report sections printed, up to the next top-level (``## ``) heading."""


def parse_setting(text: str) -> dict[str, Any]:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": value}}}`` (value parsed as YAML: 0.3, true, x)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    nested: dict[str, Any] = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(value)
    return nested


def report_sections(report: str) -> str:
    """The report's data, results, audit and probe sections (headings included)."""
    blocks = re.split(r"(?m)^(?=## )", report)
    return "\n".join(b.rstrip() + "\n" for b in blocks if b.startswith(SECTIONS))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every real-data benchmark takes (this one and bench_backbones.py)."""
    parser.add_argument("source", type=Path, help="folder with covid-chestxray-dataset/ and "
                        "chest_xray/ (data.source)")
    parser.add_argument("--external", action="append", default=[], metavar="NAME=FOLDER",
                        help="an external test set: folder with covid/ normal/ pneumonia/")
    parser.add_argument("--set", action="append", default=[], type=parse_setting,
                        metavar="KEY=VALUE", help="override a param (repeatable)")
    parser.add_argument("--workdir", type=Path, help="where to make the copy (kept)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")


def release(workdir: Path, keep: bool) -> None:
    """At the end of a benchmark: keep the copy and say where (``--keep``, ``--workdir``), or
    delete it."""
    if keep:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def real_copy(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Path, Path]:
    """Check the arguments, make the repository copy for ``args.source``; ``(workdir, repo)``."""
    external = {}
    for item in args.external:
        name, sep, folder = item.partition("=")
        if not sep or not Path(folder).is_dir():
            parser.error(f"--external {item!r}: expected NAME=FOLDER with an existing folder")
        external[name] = str(Path(folder).resolve())
    if not (args.source / "covid-chestxray-dataset").is_dir():
        parser.error(f"{args.source}: no covid-chestxray-dataset/ folder there")
    params: dict[str, Any] = {"data": {"source": str(args.source.resolve())},
                              "model": {"weights": "none"},
                              "validate": {"external": external}}
    for override in args.set:
        deep_update(params, override)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="covid-xray-real-"))
    repo = workdir / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    make_repo_copy(REPO_ROOT, repo, params)
    # validate.external replaces the committed demo set rather than adding to it
    params_file = repo / "params.yaml"
    merged = yaml.safe_load(params_file.read_text())
    merged["validate"]["external"] = external
    params_file.write_text(yaml.safe_dump(merged, sort_keys=False))
    # committed, so that `dvc exp run` (bench_backbones.py) starts from these params
    subprocess.run(["git", "commit", "-qam", "real data"], cwd=repo, env=git_env(), check=False,
                   capture_output=True)
    return workdir, repo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    workdir, repo = real_copy(parser, args)
    try:
        print(f"running dvc repro in {repo} (data.source={args.source})", flush=True)
        started = time.perf_counter()
        result = subprocess.run(["dvc", "repro"], cwd=repo, env=git_env())
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"dvc repro failed ({result.returncode}) after {seconds:.0f} s; "
                             f"the copy is kept at {repo}")
        report = (repo / "reports" / "report.md").read_text(encoding="utf-8")
        print(f"\ndvc repro: {seconds:.0f} s\n")
        print(report_sections(report))
    finally:
        release(workdir, keep=args.keep or args.workdir is not None)


if __name__ == "__main__":
    main()
