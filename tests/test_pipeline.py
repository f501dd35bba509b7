"""The real pipeline, run with real DVC in a temporary copy of the repository.

One module-scoped `dvc repro` (tiny images, few epochs) feeds every test here: up-to-date
checks, dvc dag/metrics/params/plots, a head-only experiment, determinism, bad params, and the
generated report checked against the metrics files.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import FAST_PARAMS, dvc_warnings, make_repo_copy, read_json, run

pytestmark = pytest.mark.slow

ALL_STAGES = {"acquire", "select_metadata", "copy_images", "split", "audit", "probe",
              "pretrain", "featurize", "cross_source", "train@covid_normal",
              "train@covid_pneumonia", "evaluate", "validate", "report"}


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> dict:
    repo = make_repo_copy(repo_root, tmp_path_factory.mktemp("pipeline") / "repo", FAST_PARAMS)
    first = run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "first run"], repo)
    return {"repo": repo, "first": first.stdout + first.stderr}


def test_repro_runs_every_stage_then_is_up_to_date(pipeline: dict) -> None:
    repo = pipeline["repo"]
    assert ran(pipeline["first"]) == ALL_STAGES
    assert dvc_warnings(pipeline["first"]) == [], pipeline["first"]  # a normal run: none
    for output in ("models/covid_normal.keras", "models/covid_pneumonia.keras",
                   "models/covid_normal.json", "models/covid_normal.card.md",
                   "data/features/features.npy", "data/datasets/manifest.csv",
                   "metrics/selection.json", "metrics/evaluate.json", "metrics/validate.json",
                   "reports/report.md"):
        assert (repo / output).is_file(), output
    again = run(["dvc", "repro"], repo)
    # acquire always runs (a data.source folder can change unseen) and found data/raw current
    assert ran(again.stdout) == {"acquire"}
    assert ", unchanged (" in again.stderr
    for stage in ALL_STAGES - {"acquire"}:
        assert f"Stage '{stage}' didn't change, skipping" in again.stdout, stage
    # every output is either ignored (DVC-cached) or committed (metrics, plots, reports)
    assert run(["git", "status", "--porcelain"], repo).stdout == ""


def test_dvc_dag_metrics_and_plots_work(pipeline: dict) -> None:
    repo = pipeline["repo"]
    dag = run(["dvc", "dag", "--md"], repo).stdout
    for stage in ("acquire", "select_metadata", "copy_images", "split", "featurize", "evaluate"):
        assert stage in dag
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    files = metrics[""]["data"]
    data = files["metrics/data.json"]["data"]
    selection = read_json(repo / "metrics/selection.json")
    assert data["covid_rows"]["selected"] == selection["rows_selected"] > 0
    assert "covid_normal" in files["metrics/evaluate.json"]["data"]
    plots = run(["dvc", "plots", "show", "--json"], repo).stdout
    assert "ROC curve, test split" in plots and "gradcam" in plots


def flat_keys(tree: object, prefix: str = "") -> list[str]:
    """Dotted leaf keys of nested dicts (what `dvc metrics show` makes columns of)."""
    if not isinstance(tree, dict):
        return [prefix]
    return [key for name, value in tree.items()
            for key in flat_keys(value, f"{prefix}.{name}" if prefix else name)]


MAX_TRACKED_METRICS = 100  # tens, not the ~400 of every count and score statistic


def test_dvc_tracks_tens_of_metrics_not_hundreds(pipeline: dict) -> None:
    """`dvc metrics show` / `dvc exp show` get the figures compared across experiments: per
    model the test ROC AUC, sensitivity and specificity with CIs, held-out and external ROC AUC
    with CI, sensitivity and specificity, the probe's and the audit's verdicts; the rest stays in
    files the report reads."""
    repo = pipeline["repo"]
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)[""]["data"]
    keys = {f"{path}:{key}" for path, content in shown.items()
            for key in flat_keys(content["data"])}
    assert len(keys) <= MAX_TRACKED_METRICS, sorted(keys)
    for model in ("covid_normal", "covid_pneumonia"):
        for name in ("roc_auc", "sensitivity", "specificity"):
            for suffix in ("", "_ci_low", "_ci_high"):
                assert f"metrics/evaluate.json:{model}.{name}{suffix}" in keys
        for key in ("roc_auc", "roc_auc_ci_low", "roc_auc_ci_high", "sensitivity",
                    "specificity"):
            assert f"metrics/validate.json:{model}.heldout.{key}" in keys
        assert f"metrics/validate.json:{model}.external.demo_external.sensitivity" in keys
        assert f"metrics/probe.json:{model}.fired" in keys
        assert f"metrics/probe.json:{model}.model_input.stats_auc" in keys
    assert {"metrics/data.json:audit.passed", "metrics/data.json:audit.leaks"} <= keys
    # every figure is still written, for the report: in the details files
    details = read_json(repo / "reports/validate/details.json")
    assert details["covid_normal"]["sets"]["heldout_covid"]["n"] > 0
    assert "f1_ci_low" in read_json(repo / "reports/evaluate/details.json")["covid_normal"]
    assert "top_raw_features" in read_json(repo / "reports/probe/details.json")["covid_normal"]


def test_plots_page_shows_the_curves_then_one_gradcam_grid_per_model(
        pipeline: dict, tmp_path: Path) -> None:
    repo = pipeline["repo"]
    run(["dvc", "plots", "show", "-o", str(tmp_path / "page")], repo)
    page = (tmp_path / "page" / "index.html").read_text()
    body = page[page.index("<body>"):]
    blocks = re.findall(r'<div id = "([^"]+)"|<img src="static/workspace_([^"]+)"', body)
    curves = [curve for curve, image in blocks if curve]
    images = [image for curve, image in blocks if image]
    titles = [next(iter(entry)) for entry in yaml.safe_load((repo / "dvc.yaml").read_text())[
        "plots"] if isinstance(entry, dict)]
    assert curves == [re.sub(r"\W", "_", title) for title in titles]  # dvc.yaml's order
    assert blocks[:len(curves)] == [(curve, "") for curve in curves]  # every curve first
    figures = sorted(p.name for p in (repo / "reports/figures").glob("*.png"))
    assert images == ["plots_gradcam_covid_normal.png", "plots_gradcam_covid_pneumonia.png",
                      *(f"reports_figures_{name}" for name in figures)]
    assert len(images) == 7  # 2 Grad-CAM grids + 5 report figures (was one per example)


def readme_exp_show_commands(repo_root: Path) -> list[list[str]]:
    """The `dvc exp show --keep ...` command lines the README's Experiments section shows."""
    readme = (repo_root / "README.md").read_text()
    section = readme[readme.index("## Experiments"):]
    section = section[:section.index("\n## ", 3)]
    return [shlex.split(line, comments=True) for line in section.splitlines()
            if line.startswith("dvc exp show") and "--keep" in line]


def test_readme_exp_show_commands_give_a_narrow_side_by_side(pipeline: dict,
                                                             repo_root: Path) -> None:
    repo = pipeline["repo"]
    commands = readme_exp_show_commands(repo_root)
    assert len(commands) == 2
    tables = []
    for command in commands:
        output = run([*command, "--no-pager"], repo).stdout
        header = [cell.strip() for cell in output.splitlines()[0].strip("|").split("|")]
        tables.append(header)
        assert header[0] == "Experiment" and "main" in output
    auc_columns = {f"{model}.{name}roc_auc" for model in ("covid_normal", "covid_pneumonia")
                   for name in ("", "heldout.")} | {"covid_normal.external.demo_external.roc_auc"}
    # covid_pneumonia has no AUC on the demo's external set (no pneumonia images in it)
    assert set(tables[0]) == {"Experiment", "train.dropout"} | auc_columns
    assert set(tables[1]) == {"Experiment"} | {
        f"{model}.roc_auc{suffix}" for model in ("covid_normal", "covid_pneumonia")
        for suffix in ("", "_ci_low", "_ci_high")}


def test_data_stages_are_sound(pipeline: dict) -> None:
    repo = pipeline["repo"]
    selection = read_json(repo / "metrics/selection.json")
    assert selection["dropped"]["modality"] > 0 and selection["dropped"]["view"] > 0
    assert selection["missing_files"] > 0 and selection["rows_heldout"] > 0
    split = read_json(repo / "metrics/split.json")
    assert all(split[m]["patient_overlap"] == 0 for m in ("covid_normal", "covid_pneumonia"))
    audit = read_json(repo / "metrics/audit.json")
    assert audit["passed"] and audit["leaks"]["total"] == 0


def test_models_beat_chance_on_held_out_sets(pipeline: dict) -> None:
    validate = read_json(pipeline["repo"] / "reports/validate/details.json")
    normal = validate["covid_normal"]
    assert normal["heldout"]["roc_auc"] > 0.7
    assert normal["external"]["demo_external"]["n"] > 0  # external set scored


def test_head_only_experiment_skips_featurize(pipeline: dict) -> None:
    repo = pipeline["repo"]
    result = run(["dvc", "exp", "run", "-S", "train.dropout=0.3"], repo)
    assert ran(result.stdout) == {"acquire", "cross_source", "train@covid_normal",
                                  "train@covid_pneumonia", "evaluate", "validate", "report"}
    diff = run(["dvc", "metrics", "diff", "--json"], repo).stdout
    assert "metrics/evaluate.json" in diff
    assert "train.dropout" in run(["dvc", "params", "diff"], repo).stdout
    show = run(["dvc", "exp", "show", "--no-pager", "--csv"], repo).stdout
    assert "train.dropout" in show and "0.3" in show
    run(["git", "checkout", "--", "."], repo)
    run(["dvc", "checkout", "--force"], repo)


def test_pretrain_params_cost_nothing_while_it_is_off(pipeline: dict) -> None:
    """model.weights is not xray: a pretrain param re-runs only the pretrain's constant marker
    (no TensorFlow), whose unchanged hash leaves featurize and everything after it skipped."""
    repo = pipeline["repo"]
    result = run(["dvc", "exp", "run", "-S", "pretrain.epochs=3",
                  "-S", "pretrain.architecture=vgg16"], repo)
    assert ran(result.stdout) == {"acquire", "pretrain"}
    assert "Stage 'featurize' didn't change, skipping" in result.stdout
    assert "no pretraining" in result.stderr
    run(["git", "checkout", "--", "."], repo)
    run(["dvc", "checkout", "--force"], repo)


def test_same_params_give_identical_metrics(pipeline: dict) -> None:
    repo = pipeline["repo"]
    before = (repo / "metrics/evaluate.json").read_text()
    lock_before = yaml.safe_load((repo / "dvc.lock").read_text())
    run(["dvc", "repro", "-f", "-s", "featurize"], repo)
    run(["dvc", "repro", "-f", "-s", "train@covid_normal"], repo)
    run(["dvc", "repro", "-f", "-s", "train@covid_pneumonia"], repo)
    run(["dvc", "repro", "-f", "-s", "evaluate"], repo)
    lock_after = yaml.safe_load((repo / "dvc.lock").read_text())

    def features_hash(lock: dict) -> str:
        return lock["stages"]["featurize"]["outs"][0]["md5"]

    assert features_hash(lock_after) == features_hash(lock_before)
    assert (repo / "metrics/evaluate.json").read_text() == before


def test_bad_params_fail_before_work_naming_the_key(pipeline: dict) -> None:
    repo = pipeline["repo"]
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    try:
        for key, value in (("train.dropout", "1.5"), ("train.batch_size", "0"),
                           ("model.backbone", "resnet9000"), ("model.weights", "nowhere.h5")):
            section, name = key.split(".")
            params = yaml.safe_load(original)
            params[section][name] = yaml.safe_load(value)
            params_file.write_text(yaml.safe_dump(params, sort_keys=False))
            result = run(["dvc", "repro"], repo, check=False)
            assert result.returncode != 0
            assert f"`{key}`" in result.stderr + result.stdout, key
    finally:
        params_file.write_text(original)


def test_report_and_cards_match_the_metrics(pipeline: dict) -> None:
    repo = pipeline["repo"]
    report = (repo / "reports/report.md").read_text()
    for section in ("## Data", "## Results: internal test vs held-out vs external",
                    "## Cross-source validation", "## Leakage audit", "## Shortcut probe",
                    "## Plots", "## Grad-CAM gallery",
                    "## Limitations", "not a diagnostic device"):
        assert section in report, section
    evaluate = read_json(repo / "metrics/evaluate.json")
    validate = read_json(repo / "reports/validate/details.json")
    selection = read_json(repo / "metrics/selection.json")
    for model in ("covid_normal", "covid_pneumonia"):
        assert f"{evaluate[model]['roc_auc']:.3f}" in report
        external = validate[model]["external"]["demo_external"]
        if external["accuracy"] is not None:
            assert f"{external['accuracy']:.3f}" in report
        card = (repo / f"models/{model}.card.md").read_text()
        assert "Intended use" in card and "not a diagnostic device" in card
        assert f"{evaluate[model]['sensitivity']:.3f}" in card
    assert f"{selection['rows_in']} rows in" in report
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (repo / "reports" / image).resolve().is_file(), image


def test_data_stages_run_on_the_real_sample_via_a_local_source(
        tmp_path: Path, repo_root: Path, xray_sample: Path) -> None:
    """The real files, in their real layouts (older metadata schema, most images missing)."""
    params = {"data": {"source": str(xray_sample)},
              "copy": {"heldout_normal": 1, "heldout_pneumonia": 1, "max_per_class": 6},
              "split": {"test_size": 0.3, "val_size": 0.0}}
    repo = make_repo_copy(repo_root, tmp_path / "repo", params)
    result = run(["dvc", "repro", "split"], repo)
    assert ran(result.stdout) == {"acquire", "select_metadata", "copy_images", "split"}
    selection = read_json(repo / "metrics/selection.json")
    assert selection["schema"]["patient_column"] == "Patientid"
    assert selection["missing_files"] >= 20  # counted and reported, not fatal
    assert selection["rows_selected"] > 0
    source = read_json(repo / "data/raw/SOURCE.json")
    assert source["source"] == "local" and source["links"]["hardlinks"] + \
        source["links"]["symlinks"] > 0
    split = read_json(repo / "metrics/split.json")
    assert split["covid_normal"]["patient_overlap"] == 0
