"""Variants of the pipeline side by side on one data folder: internal test, cross-source, external
and probe AUCs in one table, to choose a variant by how it does on sources it never saw.

Runs `dvc repro` once per variant in one temporary copy of the repository (the checkout is never
touched; stages a variant does not change are not re-run, so featurize is shared by variants with
the same preprocessing), then prints one table: per variant and model the internal test ROC AUC,
the pooled cross-source ROC AUC (stage cross_source: origins of the training collections held out,
no external set read), the median within-origin AUC, each external set's ROC AUC and the shortcut
probe's AUCs, all with their 95% intervals where there are some.

    python benchmarks/bench_variants.py /path/to/collections \\
        [--external actualmed=/path/to/actualmed ...] [--folder adult=/path/to/adult ...] \\
        [--set model.img_size=64 --set model.pool_size=2 ...]           (every variant) \\
        [--variant seed] \\
        [--variant multi --set copy.negatives.normal=[covid_collection,kermany] ...] \\
        [--variant harmonised --set preprocess.grayscale=true ...] \\
        [--workdir DIR] [--keep]

The source is a folder with ``covid-chestxray-dataset/`` and ``chest_xray/`` (``data.source``) or
``demo``. ``--set`` before any ``--variant`` applies to every variant; after one, to that variant.
Without ``--variant``: ``seed`` (the defaults) and ``multi_source`` (every label's negatives from
``covid_collection``, each ``--folder`` holding that label, and ``kermany``). Every variant's
params are validated before anything runs: an unknown key (``preprocess.*`` before that section
exists) stops with the params error. External sets (``--external``; the demo's own when the source
is ``demo``) are only ever scored: choose between variants by the cross-source column, never by
the external one (README, "Choosing a variant").
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
for folder in (REPO_ROOT, REPO_ROOT / "tests", REPO_ROOT / "benchmarks"):
    sys.path.insert(0, str(folder))

from bench_real_data import parse_setting, release  # noqa: E402
from pipeline_helpers import deep_update, git_env, make_repo_copy  # noqa: E402

from covid_xray.errors import ParamsError  # noqa: E402
from covid_xray.params import parse_params  # noqa: E402

MODELS = ("covid_normal", "covid_pneumonia")
METRIC_FILES = ("evaluate", "cross_source", "validate", "probe", "copy_images", "audit",
                "selection")


class _Variant(argparse.Action):
    """``--variant NAME``: the ``--set`` options after it belong to that variant."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        variants = getattr(namespace, "variants", None) or []
        if any(name == values for name, _ in variants):
            parser.error(f"--variant {values} given twice")
        variants.append((values, []))
        namespace.variants = variants


class _Set(argparse.Action):
    """``--set KEY=VALUE``: for the latest ``--variant``, or every variant before any."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        variants = getattr(namespace, "variants", None)
        target = variants[-1][1] if variants else namespace.common
        target.append(values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="folder with covid-chestxray-dataset/ and chest_xray/, "
                                       "or `demo`")
    parser.add_argument("--external", action="append", default=[], metavar="NAME=FOLDER",
                        help="an external test set (covid/ normal/ pneumonia/): scored only")
    parser.add_argument("--folder", action="append", default=[], metavar="NAME=FOLDER",
                        help="a labelled folder of negatives (normal/ pneumonia/): copy.folders")
    parser.add_argument("--variant", action=_Variant, metavar="NAME",
                        help="start a variant; the --set options after it are its own")
    parser.add_argument("--set", action=_Set, type=parse_setting, metavar="KEY=VALUE",
                        help="override a param (repeatable)")
    parser.add_argument("--workdir", type=Path, help="where to make the copy (kept)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.set_defaults(common=[], variants=None)
    return parser


def _named_folders(parser: argparse.ArgumentParser, items: list[str], option: str
                   ) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not Path(folder).is_dir():
            parser.error(f"{option} {item!r}: expected NAME=FOLDER with an existing folder")
        out[name] = str(Path(folder).resolve())
    return out


def default_variants(folders: dict[str, str]) -> list[tuple[str, list[dict[str, Any]]]]:
    """``seed`` (defaults) and ``multi_source``: per label the collection's own negatives, every
    folder with that label's subfolder, and Kermany."""
    settings = []
    for label in ("normal", "pneumonia"):
        sources = ["covid_collection",
                   *(name for name, folder in folders.items() if (Path(folder) / label).is_dir()),
                   "kermany"]
        settings.append({"copy": {"negatives": {label: sources}}})
    return [("seed", []), ("multi_source", settings)]


def variant_params(base: dict[str, Any], common: list[dict[str, Any]],
                   own: list[dict[str, Any]]) -> dict[str, Any]:
    """``base`` (the copy's params.yaml) with the common settings, then the variant's."""
    merged = copy.deepcopy(base)
    for setting in (*common, *own):
        deep_update(merged, copy.deepcopy(setting))
    return merged


def _auc(metrics: dict[str, Any] | None, key: str = "roc_auc") -> str:
    """``0.912 [0.85, 0.97]`` or ``n/a``."""
    if not metrics or metrics.get(key) is None:
        return "n/a"
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    ci = f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""
    return f"{metrics[key]:.3f}{ci}"


def probe_cell(probe: dict[str, Any] | None) -> str:
    """Every ``*_auc`` of a model's probe entry, nested views included (``raw.stats_auc`` ->
    ``raw stats``: the files; ``model_input.*``: what the model is given), ``name value``
    joined by commas."""
    def aucs(entry: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
        found = []
        for key, value in entry.items():
            if isinstance(value, dict):
                found += aucs(value, f"{prefix}{key} ")
            elif key.endswith("_auc") and isinstance(value, int | float):
                found.append((f"{prefix}{key.removesuffix('_auc')}", float(value)))
        return found

    items = sorted(aucs(probe)) if probe else []
    return ", ".join(f"{name} {value:.3f}" for name, value in items) or "n/a"


def variants_table(results: dict[str, dict[str, Any]]) -> str:
    """One markdown table: a row per variant and model (``results``: variant -> the metrics
    files of its run, by stage name)."""
    externals = sorted({name for run in results.values() for model in MODELS
                        for name in run.get("validate", {}).get(model, {}).get("external", {})})
    header = ["variant", "model", "negatives (by source)", "internal test AUC",
              "cross-source pooled AUC", "within-origin AUC (median, origins)",
              *(f"external {name} AUC" for name in externals), "probe AUCs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, run in results.items():
        for model in MODELS:
            cross = run.get("cross_source", {}).get(model, {})
            within = cross.get("within_origin_auc_median")
            sources = run.get("copy_images", {}).get("negative_sources", {}).get(model, {})
            external = run.get("validate", {}).get(model, {}).get("external", {})
            cells = [variant, model,
                     ", ".join(f"{s} {n}" for s, n in sources.items()) or "n/a",
                     _auc(run.get("evaluate", {}).get(model)),
                     _auc({k.removeprefix("pooled_"): v for k, v in cross.items()}),
                     "n/a" if within is None else
                     f"{within:.3f} ({cross.get('within_origin_folds', 0)})",
                     *(_auc(external.get(name)) for name in externals),
                     probe_cell(run.get("probe", {}).get(model))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_metrics(repo: Path) -> dict[str, Any]:
    """The metrics files the table reads, by stage (empty where a stage wrote none)."""
    out: dict[str, Any] = {}
    for name in METRIC_FILES:
        path = repo / "metrics" / f"{name}.json"
        out[name] = json.loads(path.read_text()) if path.is_file() else {}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    external = _named_folders(parser, args.external, "--external")
    folders = _named_folders(parser, args.folder, "--folder")
    if args.source != "demo" and not (Path(args.source) / "covid-chestxray-dataset").is_dir():
        parser.error(f"{args.source}: no covid-chestxray-dataset/ folder there (or use `demo`)")
    source = "demo" if args.source == "demo" else str(Path(args.source).resolve())
    variants = args.variants or default_variants(folders)

    base = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    deep_update(base, {"data": {"source": source}, "model": {"weights": "none"},
                       "copy": {"folders": folders}})
    if external or source != "demo":  # the given sets replace the demo's
        base["validate"]["external"] = external
    planned = {name: variant_params(base, args.common, own) for name, own in variants}
    for name, params in planned.items():  # every variant valid before anything runs
        try:
            parse_params(params, source=f"variant {name}", root=REPO_ROOT)
        except ParamsError as exc:
            raise SystemExit(str(exc)) from None

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="covid-xray-variants-"))
    repo = workdir / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    results: dict[str, dict[str, Any]] = {}
    try:
        make_repo_copy(REPO_ROOT, repo, {})
        for name, params in planned.items():
            (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            log = workdir / f"{name}.log"
            print(f"variant {name}: dvc repro in {repo} (log: {log})", flush=True)
            started = time.perf_counter()
            with log.open("w") as handle:
                result = subprocess.run(["dvc", "repro"], cwd=repo, env=git_env(),
                                        stdout=handle, stderr=subprocess.STDOUT)
            seconds = time.perf_counter() - started
            if result.returncode != 0:
                tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
                raise SystemExit(f"variant {name}: dvc repro failed ({result.returncode}) after "
                                 f"{seconds:.0f} s; the copy is kept at {repo}:\n{tail}")
            results[name] = {**read_metrics(repo), "seconds": round(seconds, 1)}
            print(f"variant {name}: {seconds:.0f} s", flush=True)
        (workdir / "results.json").write_text(json.dumps(results, indent=1))
        print()
        print(variants_table(results))
        print("\nChoose by the cross-source column (no external set was used to compute it); "
              "the external columns are the final check, never the criterion.")
    finally:
        release(workdir, keep=args.keep or args.workdir is not None)


if __name__ == "__main__":
    main()
