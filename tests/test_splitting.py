"""split: stratified train/val/test lists grouped by patient; the data stages end to end."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.model_selection import train_test_split
from test_datasets import make_kermany, put_image
from test_metadata import ROWS, write_metadata

from covid_xray.errors import PipelineError
from covid_xray.params import SplitParams
from covid_xray.splitting import (
    SPLIT_COLUMNS,
    pick_groups,
    read_manifest,
    split_all,
    split_model,
    split_report,
)

GROUPED = SplitParams(test_size=0.2, val_size=0.2, group_by_patient=True)


def manifest(covid_patients: int = 40, normal_patients: int = 60, seed: int = 0) -> pd.DataFrame:
    """A copy_images-like manifest: COVID patients with 1-4 images, NORMAL with 1-2."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, patients, most in (("covid", covid_patients, 4), ("normal", normal_patients, 2)):
        for p in range(patients):
            for k in range(int(rng.integers(1, most + 1))):
                rows.append({"path": f"covid_normal/{label}/{label}-{p}-{k}.jpeg",
                             "set": "covid_normal", "label": label,
                             "patient_id": f"{label}-{p}", "sha256": f"{label}{p:04d}{k}",
                             "patient_group": f"{label}-{p}"})
    frame = pd.DataFrame(rows)
    other = frame.assign(set="heldout")  # rows of other sets are ignored
    return pd.concat([frame, other], ignore_index=True)


# ------------------------------------------------------------------------------- group picking
def test_pick_groups_hits_the_share_and_is_seeded() -> None:
    sizes = {f"p{i}": 1 + i % 4 for i in range(50)}
    total = sum(sizes.values())
    chosen = pick_groups(sizes, 0.2, np.random.default_rng(1))
    assert abs(sum(sizes[p] for p in chosen) - 0.2 * total) <= 1
    assert chosen == pick_groups(sizes, 0.2, np.random.default_rng(1))
    assert chosen != pick_groups(sizes, 0.2, np.random.default_rng(2))


def test_pick_groups_always_takes_one_and_leaves_enough() -> None:
    assert len(pick_groups({"a": 10, "b": 10}, 0.01, np.random.default_rng(0))) == 1
    picked = pick_groups({"a": 1, "b": 1, "c": 1}, 0.99, np.random.default_rng(0), min_left=2)
    assert len(picked) == 1
    with pytest.raises(ValueError, match="need more than 2 groups"):
        pick_groups({"a": 1, "b": 1}, 0.5, np.random.default_rng(0), min_left=2)


# -------------------------------------------------------------------------------------- split
def test_grouped_split_has_no_patient_overlap_and_keeps_class_ratios() -> None:
    rows = manifest()
    result = split_model(rows, "covid_normal", GROUPED, seed=42)
    assert list(result.columns) == list(SPLIT_COLUMNS)
    assert len(result) == (rows["set"] == "covid_normal").sum()
    assert (result.groupby("patient_id")["split"].nunique() == 1).all()
    for _label, part in result.groupby("label"):
        shares = part["split"].value_counts(normalize=True)
        assert abs(shares["test"] - 0.2) < 0.03
        assert abs(shares["val"] - 0.8 * 0.2) < 0.03
    covid_share = {name: (part["label"] == "covid").mean()
                   for name, part in result.groupby("split")}
    assert max(covid_share.values()) - min(covid_share.values()) < 0.06
    assert result.equals(split_model(rows, "covid_normal", GROUPED, seed=42))
    assert not result["split"].equals(split_model(rows, "covid_normal", GROUPED, 7)["split"])


def test_a_merged_patient_group_stays_on_one_side_and_is_counted() -> None:
    """copy_images merged covid-0..covid-5 (they share pictures): one unit for the split."""
    rows = manifest()
    merged = rows["patient_id"].isin([f"covid-{p}" for p in range(6)])
    rows.loc[merged, "patient_group"] = "covid-0"
    for seed in range(5):
        result = split_model(rows, "covid_normal", GROUPED, seed=seed)
        assert result.loc[result["patient_group"] == "covid-0", "split"].nunique() == 1
        assert set(result.loc[result["patient_group"] == "covid-0", "patient_id"]) == {
            f"covid-{p}" for p in range(6)}
    report = split_report({"covid_normal": result}, GROUPED, 0)["covid_normal"]
    regrouped = int((merged & (rows["set"] == "covid_normal")
                     & (rows["patient_id"] != "covid-0")).sum())
    assert report["groups_merged"] == 1 and report["images_regrouped"] == regrouped > 0
    assert report["group_overlap"] == 0 and report["patient_overlap"] == 0


def test_val_size_zero_gives_train_and_test_only() -> None:
    params = SplitParams(test_size=0.25, val_size=0.0, group_by_patient=True)
    result = split_model(manifest(), "covid_normal", params, seed=42)
    assert set(result["split"]) == {"train", "test"}
    assert abs((result["split"] == "test").mean() - 0.25) < 0.03


def test_ungrouped_split_is_the_seeds_train_test_split() -> None:
    params = SplitParams(test_size=0.2, val_size=0.0, group_by_patient=False)
    rows = manifest()
    result = split_model(rows, "covid_normal", params, seed=42)
    frame = rows[rows["set"] == "covid_normal"].sort_values("path", ignore_index=True)
    _, expected_test = train_test_split(frame["path"], test_size=0.2, stratify=frame["label"],
                                        random_state=42)
    assert set(result.loc[result["split"] == "test", "path"]) == set(expected_test)


def test_report_counts_and_a_real_patient_overlap_check() -> None:
    rows = manifest()
    grouped = split_all(rows, GROUPED, 42, models=("covid_normal",))
    report = split_report(grouped, GROUPED, 42)["covid_normal"]
    assert report["patient_overlap"] == 0 and report["image_overlap"] == 0
    assert sum(sum(v.values()) for v in report["images"].values()) == len(grouped["covid_normal"])
    assert set(report["patients"]) == {"train", "val", "test"}
    plain = SplitParams(test_size=0.2, val_size=0.2, group_by_patient=False)
    ungrouped = split_report(split_all(rows, plain, 42, models=("covid_normal",)), plain, 42)
    assert ungrouped["covid_normal"]["patient_overlap"] > 0  # the seed's leak, measured


def test_too_few_patients_names_model_class_count_and_param() -> None:
    rows = manifest(covid_patients=2)
    rows = rows[(rows["label"] == "normal") | rows["patient_id"].isin(["covid-0", "covid-1"])]
    count = int(((rows["label"] == "covid") & (rows["set"] == "covid_normal")).sum())
    with pytest.raises(PipelineError) as info:
        split_model(rows, "covid_normal", GROUPED, seed=42)
    message = str(info.value)
    assert message.startswith(f"covid_normal: class `covid` has {count} images of 2 patients")
    assert "needs at least 3 patients" in message and "split.val_size: 0" in message
    no_val = SplitParams(test_size=0.2, val_size=0.0, group_by_patient=True)
    assert set(split_model(rows, "covid_normal", no_val, 42)["split"]) == {"train", "test"}


def test_too_few_images_without_grouping() -> None:
    rows = manifest(covid_patients=1)
    rows = rows[(rows["label"] == "normal") | (rows["path"].str.endswith("covid-0-0.jpeg"))]
    params = SplitParams(test_size=0.2, val_size=0.0, group_by_patient=False)
    with pytest.raises(PipelineError, match=r"class `covid` has 1 images .*needs at least 2 "
                                            r"images\); add images of this class$"):
        split_model(rows, "covid_normal", params, 42)
    small = manifest(covid_patients=3, normal_patients=3)
    with pytest.raises(PipelineError, match=r"split.test_size=0.05"):
        split_model(small, "covid_normal", SplitParams(0.05, 0.0, False), 42)


def test_manifest_problems_are_clear(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="run the copy_images stage first"):
        read_manifest(tmp_path / "manifest.csv")
    (tmp_path / "manifest.csv").write_text("path,label\nx,covid\n")
    with pytest.raises(PipelineError, match=r"missing column\(s\) set, patient_id, sha256"):
        read_manifest(tmp_path / "manifest.csv")
    rows = manifest()
    with pytest.raises(PipelineError, match="no rows for set covid_pneumonia"):
        split_model(rows, "covid_pneumonia", GROUPED, 42)
    with pytest.raises(PipelineError, match="only class"):
        split_model(rows[rows["label"] == "covid"], "covid_normal", GROUPED, 42)


# --------------------------------------------------------------------------------- end to end
def _params(repo_root: Path, root: Path, heldout: int) -> None:
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["copy"] = {"heldout_normal": heldout, "heldout_pneumonia": heldout}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _run_stages(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, dict]:
    from stages import copy_images, select_metadata, split

    monkeypatch.setenv("COVID_XRAY_ROOT", str(root))
    for stage in (select_metadata, copy_images, split):
        stage.main()
    return {name: json.loads((root / "metrics" / f"{name}.json").read_text())
            for name in ("selection", "copy_images", "split")}


def _check_outputs(root: Path, metrics: dict[str, dict]) -> None:
    datasets = root / "data" / "datasets"
    full = pd.read_csv(datasets / "manifest.csv", dtype=str, keep_default_na=False)
    for model in ("covid_normal", "covid_pneumonia"):
        table = pd.read_csv(root / "data" / "splits" / f"{model}.csv", dtype=str)
        assert list(table.columns) == list(SPLIT_COLUMNS)
        assert sorted(table["path"]) == sorted(full.loc[full["set"] == model, "path"])
        assert (table.groupby("patient_id")["split"].nunique() == 1).all()
        assert set(table["split"]) == {"train", "val", "test"}
        assert metrics["split"][model]["patient_overlap"] == 0
        for path in table["path"]:
            assert (datasets / path).is_file()
    selected = pd.read_csv(root / "data" / "interim" / "covid_selected.csv", dtype=str)
    skipped = set(pd.read_csv(datasets / "skipped.csv", dtype=str)["source"])
    excluded = set(pd.read_csv(datasets / "excluded.csv", dtype=str)["source"])
    expected = ({f"covid-chestxray-dataset/{p}" for p in selected["image_path"]} - skipped
                - excluded)
    covid_train = full[(full["set"] == "covid_normal") & (full["label"] == "covid")]
    assert set(covid_train["source"]) == expected
    assert len(selected) == metrics["selection"]["rows_selected"]
    assert metrics["copy_images"]["images"]["heldout"]["covid"] == metrics["selection"][
        "rows_heldout"]


def test_three_stages_end_to_end_on_a_fixture_tree(tmp_path: Path, repo_root: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "data" / "raw"
    rows = list(ROWS) + [
        (str(p), "COVID-19", "Pneumonia/Viral/COVID-19", "PA", "X-ray",
         ["2020", "Feb 2, 2020", "January 30, 2020", "3/12/2020"][p % 4], "images",
         f"e2e-{p}-{k}.jpg", True)
        for p in range(10, 22) for k in range(1 + p % 3)]
    write_metadata(raw / "covid-chestxray-dataset", "new", rows)
    make_kermany(raw, "train", normals=40, pneumonia_patients=20)
    make_kermany(raw, "test", normals=4, pneumonia_patients=2, first_id=5000)
    _params(repo_root, tmp_path, heldout=3)
    metrics = _run_stages(tmp_path, monkeypatch)
    assert (metrics["selection"]["rows_selected"], metrics["selection"]["rows_heldout"]) == (21, 8)
    # one patient is dated on both sides of select.heldout_from: its training image is left out
    assert metrics["copy_images"]["images"]["covid_pneumonia"] == {"covid": 20, "pneumonia": 20}
    assert metrics["copy_images"]["excluded"]["patient_in_heldout"] == 1
    assert metrics["split"]["excluded_before_split"] == {"total": 1, "patient_in_heldout": 1}
    assert metrics["copy_images"]["links"]["copy"] == 0
    _check_outputs(tmp_path, metrics)


def test_three_stages_end_to_end_on_the_real_sample(tmp_path: Path, repo_root: Path,
                                                    xray_sample: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The real metadata (old schema, most images missing) and real Kermany files, topped up
    with synthetic Kermany images: the sample's 8 per class cannot balance its COVID images."""
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    os.symlink(xray_sample / "covid-chestxray-dataset", raw / "covid-chestxray-dataset")
    for source in sorted((xray_sample / "chest_xray").glob("*/*/*.jpeg")):
        target = raw / "chest_xray" / source.relative_to(xray_sample / "chest_xray")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source, target)
    make_kermany(raw, "train", normals=30, pneumonia_patients=15, first_id=9000)
    put_image(raw / "chest_xray" / "train" / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(
        b"\xff\xd8\xff\xe0 not really a jpeg")
    _params(repo_root, tmp_path, heldout=3)
    metrics = _run_stages(tmp_path, monkeypatch)
    selection = metrics["selection"]
    assert selection["rows_in"] == 146 and selection["missing_files"] > 0
    assert selection["schema"]["patient_column"] == "Patientid"
    copied = metrics["copy_images"]
    assert copied["skipped"]["total"] == 1 and copied["skipped"]["not_image"] == 1
    real = pd.read_csv(tmp_path / "data" / "datasets" / "manifest.csv")
    sample_test = {p.relative_to(xray_sample).as_posix()
                   for p in (xray_sample / "chest_xray" / "test").glob("*/*.jpeg")}
    assert set(real.loc[real["set"] == "kermany_test", "source"]) == sample_test
    assert set(real.loc[real["label"] == "covid", "format"]) == {"jpeg", "png"}
    _check_outputs(tmp_path, metrics)
    shutil.rmtree(tmp_path / "data" / "datasets")  # hard links into the shared sample
