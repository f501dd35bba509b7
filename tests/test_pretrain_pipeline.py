"""`dvc exp run -S model.weights=xray`, end to end with real DVC on the demo data (tiny sizes):
the pretrain stage trains the small CNN, featurize uses it, the models, sidecars, cards, CLI and
audit all carry it, and no held-out, Kermany-test, val or test patient reached it."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from pipeline_helpers import FAST_PARAMS, deep_update, make_repo_copy, read_json, run

pytestmark = pytest.mark.slow

XRAY_PARAMS = deep_update(copy.deepcopy(FAST_PARAMS), {
    # pretrained at 64 px, used at model.img_size 32: the weights move between sizes
    "pretrain": {"img_size": 64, "epochs": 2, "batch_size": 16, "max_per_class": 40}})
STAGES = {"acquire", "select_metadata", "copy_images", "split", "audit", "probe", "pretrain",
          "featurize", "train@covid_normal", "train@covid_pneumonia", "evaluate", "validate",
          "report", "cross_source"}


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def xray(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> dict:
    repo = make_repo_copy(repo_root, tmp_path_factory.mktemp("xray") / "repo", XRAY_PARAMS)
    result = run(["dvc", "exp", "run", "-S", "model.weights=xray"], repo)
    return {"repo": repo, "output": result.stdout + result.stderr}


def test_exp_run_pretrains_and_every_stage_uses_it(xray: dict) -> None:
    repo = xray["repo"]
    assert ran(xray["output"]) == STAGES
    info = read_json(repo / "models/pretrain/info.json")
    assert info["used"] is True and info["architecture"] == "smallcnn"
    assert info["images"]["train"]["normal"] > 0 and info["images"]["train"]["pneumonia"] > 0
    assert info["kermany_test"]["n"] == 16  # demo kermany_test: 8 NORMAL + 8 PNEUMONIA
    assert 0.0 <= info["kermany_test"]["roc_auc"] <= 1.0
    at_size = info["kermany_test_at_model_size"]
    assert at_size["img_size"] == 32 and 0.0 <= at_size["roc_auc"] <= 1.0
    # dvclive curves (2 epochs) and the Kermany test AUC in the tracked metrics
    loss = (repo / "metrics/pretrain/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert len(loss) == 1 + 2
    assert (repo / "metrics/pretrain/plots/metrics/eval/loss.tsv").is_file()
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    tracked = metrics[""]["data"]["metrics/pretrain/metrics.json"]["data"]
    assert tracked["kermany_test"]["roc_auc"] == info["kermany_test"]["roc_auc"]

    # the backbone really trained: its weights are not the seeded random ones it started from
    check = ("import sys, numpy as np\n"
             "from covid_xray.modeling import build_backbone\n"
             "a = build_backbone('smallcnn', 32, 'none', seed=42).get_weights()\n"
             "b = build_backbone('smallcnn', 32, sys.argv[1], seed=42).get_weights()\n"
             "print(sum(not np.array_equal(x, y) for x, y in zip(a, b)), len(a))\n")
    changed, total = map(int, subprocess.run(
        [sys.executable, "-c", check, str(repo / "models/pretrain/backbone.weights.h5")],
        capture_output=True, text=True, check=True).stdout.split())
    assert changed == total == 10  # 5 conv blocks, kernel + bias each

    features = read_json(repo / "data/features/info.json")
    assert (features["backbone"], features["weights"]) == ("smallcnn", "xray")
    assert features["pretrain"]["weights_sha256"] == info["weights_sha256"]
    for model in ("covid_normal", "covid_pneumonia"):
        sidecar = read_json(repo / f"models/{model}.json")
        assert (sidecar["backbone"], sidecar["weights"]) == ("smallcnn", "xray")
        assert sidecar["params"]["pretrain"]["kermany_test"] == info["kermany_test"]
        card = (repo / f"models/{model}.card.md").read_text()
        assert "Backbone pretrained by this pipeline's `pretrain` stage: smallcnn" in card
        assert f"ROC AUC {info['kermany_test']['roc_auc']:.3f}" in card


def test_the_cli_serves_the_pretrained_models(xray: dict) -> None:
    """The classifier files hold the whole backbone: the CLI (and app) work unchanged."""
    repo = xray["repo"]
    image = next((repo / "data/datasets/heldout/covid").iterdir())
    result = subprocess.run([sys.executable, "-m", "covid_xray.cli", "predict", str(image),
                             "--models-dir", str(repo / "models")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert {answer["models"][m]["label"] for m in ("covid_normal", "covid_pneumonia")} <= {
        "POSITIVE", "NEGATIVE", None}
    assert 0.0 <= answer["models"]["covid_normal"]["covid_probability"] <= 1.0
    assert answer["shared_backbone"] is True  # both models hold the one pretrained backbone


def test_pretrain_saw_no_held_out_test_or_val_patient_and_the_audit_checked(xray: dict) -> None:
    repo = xray["repo"]
    images = pd.read_csv(repo / "models/pretrain/images.csv", dtype=str, keep_default_na=False)
    chosen = images[images["use"].isin(["train", "val"])]
    manifest = pd.read_csv(repo / "data/datasets/manifest.csv", dtype=str,
                           keep_default_na=False)
    held = manifest[manifest["set"].isin(["heldout", "kermany_test"])]
    for model in ("covid_normal", "covid_pneumonia"):
        split = pd.read_csv(repo / f"data/splits/{model}.csv", dtype=str, keep_default_na=False)
        held = pd.concat([held, split[split["split"].isin(["val", "test"])]])
    assert not set(chosen["patient_group"]) & set(held["patient_group"])
    assert not set(chosen["patient_id"]) & set(held["patient_id"])
    assert not set(chosen["sha256"]) & set(held["sha256"])
    left_out = images[images["use"].str.startswith("left_out")]
    assert len(left_out) > 0  # the demo's val/test negatives are in the pool: left out
    audit = read_json(repo / "metrics/audit.json")
    assert audit["passed"]
    pairs = pd.read_csv(repo / "data/audit/pairs.csv")
    pretrain_pairs = pairs[pairs["group_a"].str.startswith("pretrain/")]
    assert {"kermany_test/normal", "heldout/covid", "covid_normal/test",
            "covid_pneumonia/val"} <= set(pretrain_pairs["group_b"])
    per_label = chosen.groupby("label").size().to_dict()
    for label, count in per_label.items():
        assert set(pretrain_pairs.loc[pretrain_pairs["group_a"] == f"pretrain/{label}",
                                      "images_a"]) == {count}


def test_pretrain_is_reproducible_and_then_up_to_date(xray: dict) -> None:
    repo = xray["repo"]
    assert yaml.safe_load((repo / "params.yaml").read_text())["model"]["weights"] == "xray"
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "xray run"], repo)
    def backbone_hash() -> str:
        lock = yaml.safe_load((repo / "dvc.lock").read_text())
        return next(out["md5"] for out in lock["stages"]["pretrain"]["outs"]
                    if out["path"] == "models/pretrain")

    weights_before = backbone_hash()
    again = run(["dvc", "repro"], repo)
    assert ran(again.stdout) == {"acquire"}
    run(["dvc", "repro", "-f", "-s", "pretrain"], repo)
    assert backbone_hash() == weights_before  # same params, same backbone (seeded, deterministic)
    assert ran(run(["dvc", "repro"], repo).stdout) == {"acquire"}  # featurize still current
