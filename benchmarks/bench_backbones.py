"""Random vs chest-X-ray-pretrained (vs ImageNet) backbones, side by side, on a real data folder.

For each variant it runs ``dvc exp run`` in ONE temporary copy of the repository (the data stages
run once and stay cached; the checkout is never touched), then prints:

- the pretrain's own check: ROC AUC on Kermany's test folder, NORMAL vs PNEUMONIA (``xray`` only);
- the internal test split of both COVID models (ROC AUC, 95% interval);
- cross-source validation: the ``cross_source`` stage's pooled out-of-source ROC AUC per model
  (``metrics/cross_source.json``; ``n/a`` where a fold lacks a class);
- cost: pretrain seconds per epoch and total, featurize seconds;

and, once, after that comparison, the external sets (never used to choose anything). Variants:

- ``none``: the random frozen ``model.backbone`` (VGG16), today's offline default;
- ``smallcnn``: the small CNN with random weights (the ``xray`` architecture, untrained: the
  control that separates "pretrained" from "another architecture");
- ``xray``: the small CNN pretrained on Kermany NORMAL vs PNEUMONIA (``model.weights=xray``);
- ``imagenet``: ImageNet VGG16, where the weights are cached or downloadable (else
  ``unavailable``, with the reason).

    nice python benchmarks/bench_backbones.py /path/to/collections \\
        --external actualmed=/path/to/actualmed --external figure1=/path/to/figure1 \\
        --set model.img_size=128 [--variants none,smallcnn,xray,imagenet] [--workdir DIR]

Same arguments as bench_real_data.py (``--set KEY=VALUE`` applies to every variant).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from bench_real_data import add_arguments, git_env, real_copy, release

MODELS = ("covid_normal", "covid_pneumonia")
VARIANTS: dict[str, dict[str, str]] = {
    "none": {"model.weights": "none", "model.backbone": "vgg16"},
    "smallcnn": {"model.weights": "none", "model.backbone": "smallcnn"},
    "xray": {"model.weights": "xray", "model.backbone": "vgg16"},
    "imagenet": {"model.weights": "imagenet", "model.backbone": "vgg16"},
}
"""``-S`` settings of each variant (every one set each time: an experiment's params stay in the
workspace for the next)."""


def read(repo: Path, name: str) -> dict[str, Any]:
    path = repo / name
    return json.loads(path.read_text()) if path.is_file() else {}


def auc(metrics: dict[str, Any] | None) -> str:
    """``0.912 [0.85, 0.96] n=40`` from a metrics dict with roc_auc and its interval."""
    if not metrics or metrics.get("roc_auc") is None:
        return "n/a"
    low, high = metrics.get("roc_auc_ci_low"), metrics.get("roc_auc_ci_high")
    interval = f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""
    n = f" n={metrics['n']}" if metrics.get("n") is not None else ""
    return f"{metrics['roc_auc']:.3f}{interval}{n}"


def cross_source(repo: Path) -> str:
    """Per model, the pooled out-of-source ROC AUC (and the median within-origin AUC) of the
    cross_source stage's metrics/cross_source.json, or n/a without it."""
    found = read(repo, "metrics/cross_source.json")
    parts = []
    for model in MODELS:
        metrics = found.get(model) or {}
        if metrics.get("pooled_roc_auc") is None:
            continue
        pooled = auc({"roc_auc": metrics["pooled_roc_auc"],
                      "roc_auc_ci_low": metrics.get("pooled_roc_auc_ci_low"),
                      "roc_auc_ci_high": metrics.get("pooled_roc_auc_ci_high")})
        median = metrics.get("within_origin_auc_median")
        parts.append(f"{model} {pooled}" + (f", within-origin median {median:.3f}"
                                            if median is not None else ""))
    return "; ".join(parts) or "n/a"


def collect(repo: Path, seconds: float) -> dict[str, Any]:
    pretrain = read(repo, "metrics/pretrain/metrics.json")
    evaluate, validate = read(repo, "metrics/evaluate.json"), read(repo, "metrics/validate.json")
    return {
        "pretrain": auc(pretrain.get("kermany_test")),
        "pretrain_at_model_size": (f"{pretrain['kermany_test_at_model_size']['roc_auc']:.3f}"
                                   if pretrain.get("kermany_test_at_model_size") else "n/a"),
        "pretrain_seconds": pretrain.get("seconds", {}),
        "test": {m: auc(evaluate.get(m)) for m in MODELS},
        "cross_source": cross_source(repo),
        "external": {m: {name: auc(v) for name, v in validate.get(m, {}).get("external",
                                                                           {}).items()}
                     for m in MODELS},
        "featurize_seconds": read(repo, "metrics/featurize.json").get("seconds"),
        "run_seconds": round(seconds),
    }


def run_variant(repo: Path, name: str) -> dict[str, Any]:
    settings = [arg for key, value in VARIANTS[name].items() for arg in ("-S", f"{key}={value}")]
    print(f"\n=== {name}: dvc exp run {' '.join(settings)}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(["dvc", "exp", "run", *settings], cwd=repo, env=git_env(),
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log = result.stdout + result.stderr
    (repo.parent / f"{name}.log").write_text(log)
    if result.returncode != 0:
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        return {"unavailable": errors[-1] if errors else f"failed ({result.returncode}), see "
                f"{repo.parent / f'{name}.log'}", "run_seconds": round(seconds)}
    return collect(repo, seconds)


def print_tables(results: dict[str, dict[str, Any]]) -> None:
    print("\n## Backbones compared (internal data only)\n")
    print("| backbone | pretrain: Kermany test AUC (at model size) | covid_normal test AUC | "
          "covid_pneumonia test AUC | cross-source | pretrain s/epoch, total | featurize s | "
          "run s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "unavailable" in r:
            print(f"| {name} | unavailable: {r['unavailable']} | | | | | | {r['run_seconds']} |")
            continue
        cost = r["pretrain_seconds"]
        print(f"| {name} | {r['pretrain']} ({r['pretrain_at_model_size']}) | "
              f"{r['test']['covid_normal']} | {r['test']['covid_pneumonia']} | "
              f"{r['cross_source']} | "
              f"{cost.get('per_epoch', '-')}, {cost.get('fit', '-')} | "
              f"{r['featurize_seconds']} | {r['run_seconds']} |")
    print("\n## External sets (scored once, after the comparison; never used to choose)\n")
    print("| backbone | model | " + " | ".join(_external_names(results)) + " |")
    print("|---|---|" + "---|" * len(_external_names(results)))
    for name, r in results.items():
        if "unavailable" in r:
            continue
        for model in MODELS:
            cells = [r["external"][model].get(e, "n/a") for e in _external_names(results)]
            print(f"| {name} | {model} | " + " | ".join(cells) + " |")


def _external_names(results: dict[str, dict[str, Any]]) -> list[str]:
    return sorted({e for r in results.values() for m in r.get("external", {}).values()
                   for e in m})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from "
                     f"{', '.join(VARIANTS)}")
    workdir, repo = real_copy(parser, args)
    print(f"comparing {', '.join(variants)} in {repo} (data.source={args.source})", flush=True)
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in variants:
            results[name] = run_variant(repo, name)
            shown = {k: v for k, v in results[name].items() if k != "external"}  # at the end
            print(json.dumps(shown, indent=1), flush=True)
        print_tables(results)
    finally:
        release(workdir, keep=args.keep or args.workdir is not None)


if __name__ == "__main__":
    main()
