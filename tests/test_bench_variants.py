"""benchmarks/bench_variants.py: variants (each a list of --set) run by real DVC in one temporary
copy on the demo data, one table of internal test, cross-source, external and probe AUCs; the
multi-source variant's negatives, patient grouping, audit and cross-source outputs checked."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from pipeline_helpers import FAST_PARAMS, MANIFEST_HEADER, git_env

from covid_xray.demo import generate_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "bench_variants.py"


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_variants", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flat(params: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in params.items():
        if isinstance(value, dict):
            out += _flat(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={value}")
    return out


FAST_SETS = [arg for setting in _flat({**FAST_PARAMS,
                                        "data": {"demo": {**FAST_PARAMS["data"]["demo"],
                                                          "collection_negatives": 16}}})
             for arg in ("--set", setting)]


# ------------------------------------------------------------------------------------ unit checks
def test_set_options_belong_to_the_variant_before_them() -> None:
    bench = _bench()
    args = bench.build_parser().parse_args([
        "demo", "--set", "model.img_size=64", "--variant", "seed", "--variant", "multi",
        "--set", "copy.negatives.normal=[covid_collection,kermany]", "--set", "train.epochs=3"])
    assert args.common == [{"model": {"img_size": 64}}]
    assert args.variants == [("seed", []), ("multi", [
        {"copy": {"negatives": {"normal": ["covid_collection", "kermany"]}}},
        {"train": {"epochs": 3}}])]
    merged = bench.variant_params({"model": {"img_size": 224, "backbone": "vgg16"}},
                                  args.common, args.variants[1][1])
    assert merged["model"] == {"img_size": 64, "backbone": "vgg16"}
    assert merged["copy"]["negatives"]["normal"] == ["covid_collection", "kermany"]


def test_default_variants_are_the_seed_and_every_negative_source(tmp_path: Path) -> None:
    (tmp_path / "adult" / "normal").mkdir(parents=True)
    variants = _bench().default_variants({"adult": str(tmp_path / "adult")})
    assert variants == [("seed", []), ("multi_source", [
        {"copy": {"negatives": {"normal": ["covid_collection", "adult", "kermany"]}}},
        {"copy": {"negatives": {"pneumonia": ["covid_collection", "kermany"]}}}])]


def test_an_unknown_key_stops_every_variant_before_any_run(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        _bench().main(["demo", "--workdir", str(tmp_path / "w"), "--variant", "seed",
                       "--variant", "typo", "--set", "train.droput=0.3"])
    assert str(info.value) == ("variant typo: unknown key `train.droput`; did you mean "
                               "`train.dropout`?")
    assert not (tmp_path / "w").exists()  # nothing was copied or run


def test_table_has_a_row_per_variant_and_model_with_intervals() -> None:
    auc = {"roc_auc": 0.9, "roc_auc_ci_low": 0.8, "roc_auc_ci_high": 0.95}
    run = {"evaluate": {"covid_normal": auc},
           "cross_source": {"covid_normal": {"pooled_roc_auc": 0.61, "pooled_roc_auc_ci_low": 0.5,
                                             "pooled_roc_auc_ci_high": 0.7,
                                             "within_origin_auc_median": 0.55,
                                             "within_origin_folds": 4}},
           "validate": {"covid_normal": {"external": {"actualmed": auc}}},
           "probe": {"covid_normal": {"raw": {"stats_auc": 1.0, "backbone_auc": 0.99},
                                      "model_input": {"stats_auc": 0.62, "backbone_auc": 0.9},
                                      "fired": False}},
           "copy_images": {"negative_sources": {"covid_normal": {"kermany": 9,
                                                                 "covid_collection": 3}}}}
    table = _bench().variants_table({"seed": {}, "multi": run}).splitlines()
    assert table[0] == ("| variant | model | negatives (by source) | internal test AUC | "
                        "cross-source pooled AUC | within-origin AUC (median, origins) | "
                        "external actualmed AUC | probe AUCs |")
    assert len(table) == 2 + 4
    assert table[4] == ("| multi | covid_normal | kermany 9, covid_collection 3 | "
                        "0.900 [0.80, 0.95] | 0.610 [0.50, 0.70] | 0.550 (4) | "
                        "0.900 [0.80, 0.95] | model_input backbone 0.900, model_input stats 0.620, "
                        "raw backbone 0.990, raw stats 1.000 |")
    assert table[2].startswith("| seed | covid_normal | n/a | n/a | n/a | n/a | n/a | n/a |")


# ------------------------------------------------------------------------ the demo, end to end
@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The seed and multi-source variants (defaults of the script) on the tiny demo with a
    labelled folder of adult normals: two real `dvc repro` runs in one copy."""
    root = tmp_path_factory.mktemp("bench_variants")
    adult = root / "adult"
    generate_folder(adult, {"normal": 20}, seed=5, max_side=96)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "demo", "--folder", f"adult={adult}", *FAST_SETS,
         "--workdir", str(root / "work")],
        cwd=REPO_ROOT, env=git_env(), capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return {"stdout": result.stdout, "work": root / "work", "repo": root / "work" / "repo",
            "adult": adult,
            "results": json.loads((root / "work" / "results.json").read_text())}


@pytest.mark.slow
def test_seed_and_multi_source_negatives_are_balanced_grouped_and_audited(
        bench_run: dict[str, Any]) -> None:
    results = bench_run["results"]
    assert list(results) == ["seed", "multi_source"]
    for variant, run in results.items():
        images = run["copy_images"]["images"]
        sources = run["copy_images"]["negative_sources"]
        for model, label in (("covid_normal", "normal"), ("covid_pneumonia", "pneumonia")):
            assert sum(sources[model].values()) == images[model][label] == images[model]["covid"]
        assert run["audit"]["passed"] is True and run["audit"]["leaks"]["total"] == 0, variant
    assert results["seed"]["copy_images"]["negative_sources"]["covid_normal"] == {"kermany": 61}
    multi = results["multi_source"]["copy_images"]["negative_sources"]
    assert set(multi["covid_normal"]) == {"adult", "covid_collection", "kermany"}
    assert multi["covid_normal"]["adult"] == 20  # scarce sources give all they have
    assert set(multi["covid_pneumonia"]) == {"covid_collection", "kermany"}
    assert results["multi_source"]["selection"]["negatives"]["selected"]["normal"] > 0
    # the last variant's outputs: the manifest knows every image's origin and patient group
    manifest = pd.read_csv(bench_run["repo"] / "data" / "datasets" / "manifest.csv", dtype=str,
                           keep_default_na=False)
    assert list(manifest.columns) == MANIFEST_HEADER
    normals = manifest[(manifest["set"] == "covid_normal") & (manifest["label"] == "normal")]
    origins = set(normals["origin"])
    assert {"adult", "kermany"} <= origins and len(origins) >= 4  # + the demo's sites
    collection = normals[normals["patient_id"].str.startswith("covid-")]
    assert len(collection) == multi["covid_normal"]["covid_collection"]
    assert (collection["patient_group"] != "").all()
    assert normals[normals["origin"] == "adult"]["source"].str.startswith(
        str(bench_run["adult"])).all()


@pytest.mark.slow
def test_cross_source_needs_negatives_from_more_than_one_source(
        bench_run: dict[str, Any]) -> None:
    seed = bench_run["results"]["seed"]["cross_source"]
    multi = bench_run["results"]["multi_source"]["cross_source"]
    for model in ("covid_normal", "covid_pneumonia"):
        # all negatives from Kermany: holding it out leaves none to learn from
        assert seed[model]["folds_skipped"] == 1 and seed[model]["pooled_roc_auc"] is None
        assert seed[model]["within_origin_folds"] == 0
        assert multi[model]["folds_skipped"] == 0
        assert multi[model]["within_origin_folds"] >= 3
        low, high = multi[model]["pooled_roc_auc_ci_low"], multi[model]["pooled_roc_auc_ci_high"]
        assert low <= multi[model]["pooled_roc_auc"] <= high
    folds = pd.read_csv(bench_run["repo"] / "reports" / "cross_source" / "folds.csv",
                        keep_default_na=False)
    assert {"adult", "kermany"} <= set(folds["fold"])
    scores = pd.read_csv(bench_run["repo"] / "reports" / "cross_source" / "scores.csv")
    assert (scores.groupby(["model", "fold"])["origin"].nunique() == 1).all()
    report = (bench_run["repo"] / "reports" / "report.md").read_text()
    assert "## Cross-source validation" in report and "Pooled out-of-source ROC AUC" in report
    assert "Negatives by source (`copy.negatives`" in report
    card = (bench_run["repo"] / "models" / "covid_normal.card.md").read_text()
    assert "folder `adult` (20); the ieee8023 collection's own non-COVID X-rays" in card


@pytest.mark.slow
def test_the_table_compares_the_variants(bench_run: dict[str, Any]) -> None:
    lines = bench_run["stdout"].splitlines()
    rows = [line for line in lines if line.startswith("| seed |")
            or line.startswith("| multi_source |")]
    assert len(rows) == 4
    assert all("external demo_external AUC" in line for line in lines
               if line.startswith("| variant |"))
    seed_row = next(r for r in rows if r.startswith("| seed | covid_normal |"))
    assert "| kermany 61 |" in seed_row and "model_input stats" in seed_row
    assert "Choose by the cross-source column" in bench_run["stdout"]
    assert (bench_run["work"] / "seed.log").is_file()
