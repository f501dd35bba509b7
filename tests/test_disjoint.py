"""Disjoint by construction: each leak the real collections hold, planted in a small data set.

The planted source (``data.source=<folder>``) holds what the real collections hold:

- a Kermany pneumonia patient (``person3``) and a normal patient (``IM-0007``) with files in both
  ``chest_xray/train`` and ``chest_xray/test``, and a train NORMAL file that is a re-encoded copy
  of a test NORMAL file of another patient id;
- the same COVID picture under two patient ids, re-encoded (JPEG quality 70, resized to 92%):
  once with both copies in training, once with one copy held out (dated from March 2020);
- a training image identical to an external-set image, and one re-encoded from another.

``dvc repro audit`` runs once on it with the default ``audit.fail_on_leak: true``: the data stages
must leave every copy out or group it, so the audit passes; the tests read what it wrote.
"""

from __future__ import annotations

import copy
import csv
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from pipeline_helpers import FAST_PARAMS, make_repo_copy, read_json, run
from test_metadata import NEW_HEADER

from covid_xray.datasets import ImageRecord, patient_groups
from covid_xray.duplicates import fingerprint, near_duplicates, same_pictures
from covid_xray.report import RunMetrics, data_lines

pytestmark = pytest.mark.slow
MODELS = ("covid_normal", "covid_pneumonia")


# ------------------------------------------------------------------------------------ builders
def film(seed: int, size: int = 64) -> np.ndarray:
    """A smooth grey film-like image (the image checks refuse pure noise), unique to ``seed``."""
    noise = np.random.default_rng(seed).normal(size=(size, size + seed % 5)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 4)
    return cv2.normalize(smooth, None, 20, 235, cv2.NORM_MINMAX).astype(np.uint8)


def save(path: Path, pixels: np.ndarray, quality: int = 95) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix in (".jpg", ".jpeg") else []
    assert cv2.imwrite(str(path), pixels, params)
    return path


def reencode(source: Path, target: Path) -> Path:
    """The same picture as published twice: resized to 92% and saved at JPEG quality 70."""
    pixels = cv2.imread(str(source), cv2.IMREAD_GRAYSCALE)
    height, width = pixels.shape
    smaller = cv2.resize(pixels, (round(width * 0.92), round(height * 0.92)),
                         interpolation=cv2.INTER_AREA)
    return save(target, smaller, quality=70)


def _print(path: Path):
    return fingerprint(path.read_bytes(), cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))


def assert_same_picture(a: Path, b: Path) -> None:
    """The planted copy really is a near-duplicate by the audit's criterion (not identical)."""
    pa, pb = _print(a), _print(b)
    assert pa.sha256 != pb.sha256
    assert list(near_duplicates([pa], [pb], max_distance=4)), f"{b} is no near-copy of {a}"


def planted_source(folder: Path) -> Path:
    """The data.source folder: covid-chestxray-dataset/, chest_xray/, external/."""
    covid = folder / "covid-chestxray-dataset"
    images = covid / "images"
    rows: list[tuple[str, str, str]] = []
    seed = 0

    def add(patient: str, name: str, date: str, pixels: np.ndarray | None = None) -> Path:
        nonlocal seed
        seed += 1
        rows.append((patient, name, date))
        return save(images / name, film(1000 + seed) if pixels is None else pixels)

    for p in range(10, 20):  # ordinary training patients, two films each
        for k in range(2):
            add(str(p), f"p{p}-{k}.jpg", "February 2, 2020")
    for p in (20, 21):  # ordinary held-out patients
        add(str(p), f"p{p}.jpg", "April 2, 2020")
    # same picture under patients 30 and 31, both in training (ieee8023's patient 97 / 178)
    ards = add("30", "ards-day-1.jpg", "February 3, 2020")
    add("30", "ards-day-2.jpg", "February 4, 2020")
    rows.append(("31", "16660_3_1.jpg", "February 3, 2020"))
    assert_same_picture(ards, reencode(ards, images / "16660_3_1.jpg"))
    add("31", "16660_4_1.jpg", "February 5, 2020")
    # same picture under patients 40 (held out, April) and 41 (training, February)
    late = add("40", "late.jpg", "April 3, 2020")
    rows.append(("41", "early-copy.jpg", "February 6, 2020"))
    assert_same_picture(late, reencode(late, images / "early-copy.jpg"))
    add("41", "early-other.jpg", "February 7, 2020")
    # training images that an external set also publishes: identical, and re-encoded
    external = folder / "external"
    shared = add("50", "shared-with-external.jpg", "February 8, 2020")
    (external / "covid").mkdir(parents=True)
    shutil.copyfile(shared, external / "covid" / "EXT-0001.jpg")
    add("50", "p50-other.jpg", "February 8, 2020")
    published = add("51", "published-elsewhere.jpg", "February 9, 2020")
    assert_same_picture(published, reencode(published, external / "covid" / "EXT-0002.jpg"))
    add("51", "p51-other.jpg", "February 9, 2020")
    for k in range(3):
        save(external / "normal" / f"EXT-N{k}.jpg", film(5000 + k))
    with (covid / "metadata.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(NEW_HEADER)
        for patient, name, date in rows:
            values = dict.fromkeys(NEW_HEADER, "")
            values.update({"patientid": patient, "finding": "Pneumonia/Viral/COVID-19",
                           "view": "PA", "modality": "X-ray", "date": date, "folder": "images",
                           "filename": name})
            writer.writerow([values[h] for h in NEW_HEADER])

    kermany = folder / "chest_xray"
    for i in range(1, 41):
        save(kermany / "train" / "NORMAL" / f"IM-{i:04d}-0001.jpeg", film(2000 + i))
    for person in range(1, 21):
        for k in range(2):
            name = f"person{person}_bacteria_{10 * person + k}.jpeg"
            save(kermany / "train" / "PNEUMONIA" / name, film(3000 + 10 * person + k))
    for i in range(5000, 5004):
        save(kermany / "test" / "NORMAL" / f"IM-{i:04d}-0001.jpeg", film(4000 + i))
    for person in range(5000, 5003):
        save(kermany / "test" / "PNEUMONIA" / f"person{person}_virus_{person}.jpeg",
             film(6000 + person))
    # a public re-split: the same patients in train/ and test/
    save(kermany / "test" / "PNEUMONIA" / "person3_bacteria_99.jpeg", film(3999))
    save(kermany / "test" / "NORMAL" / "IM-0007-0002.jpeg", film(2999))
    # and a test picture re-encoded into train/ under another patient id
    (kermany / "train" / "NORMAL" / "IM-0009-0001.jpeg").unlink()
    assert_same_picture(kermany / "test" / "NORMAL" / "IM-5001-0001.jpeg",
                        reencode(kermany / "test" / "NORMAL" / "IM-5001-0001.jpeg",
                                 kermany / "train" / "NORMAL" / "IM-0009-0001.jpeg"))
    return folder


# --------------------------------------------------------------------------------- the one run
@pytest.fixture(scope="module")
def planted(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``dvc repro audit`` on the planted source, default audit params (fail on any leak)."""
    base = tmp_path_factory.mktemp("disjoint")
    source = planted_source(base / "source")
    params = copy.deepcopy(FAST_PARAMS)
    params["data"] = {"source": str(source)}
    params["copy"] = {"heldout_normal": 4, "heldout_pneumonia": 4}
    repo = make_repo_copy(repo_root, base / "repo", params)
    assert yaml.safe_load((repo / "params.yaml").read_text())["audit"]["fail_on_leak"] is True
    result = run(["dvc", "repro", "audit"], repo, check=False)
    assert result.returncode == 0, f"dvc repro audit failed:\n{result.stderr[-6000:]}"
    datasets = repo / "data" / "datasets"

    def table(path: Path) -> pd.DataFrame:
        return pd.read_csv(path, dtype=str, keep_default_na=False)

    return {
        "repo": repo,
        "manifest": table(datasets / "manifest.csv"),
        "excluded": table(datasets / "excluded.csv"),
        "splits": {m: table(repo / "data" / "splits" / f"{m}.csv") for m in MODELS},
        "metrics": {name: read_json(repo / "metrics" / f"{name}.json")
                    for name in ("selection", "copy_images", "split", "audit")},
    }


def reason_of(planted: dict[str, Any], source: str) -> str:
    rows = planted["excluded"]
    match = rows[rows["source"] == source]
    assert len(match) == 1, f"{source} is not listed in excluded.csv:\n{rows.to_string()}"
    return match["reason"].iloc[0]


def training(planted: dict[str, Any]) -> pd.DataFrame:
    manifest = planted["manifest"]
    return manifest[manifest["set"].isin(MODELS)]


def test_the_audit_passes_with_fail_on_leak(planted: dict[str, Any]) -> None:
    audit = planted["metrics"]["audit"]
    assert audit["passed"] is True and audit["fail_on_leak"] is True
    assert audit["leaks"] == {"patient": 0, "identical": 0, "near_duplicate": 0, "total": 0}
    rows = list(csv.DictReader((planted["repo"] / "data/audit/pairs.csv").open()))
    checked = {(r["group_a"], r["group_b"]) for r in rows}
    for model in MODELS:  # each planted case sits in a pair the audit checked
        assert {(f"{model}/train", f"{model}/test"), (f"{model}/train", "heldout/covid"),
                (f"{model}/train", "kermany_test/normal"),
                (f"{model}/train", "kermany_test/pneumonia"),
                (f"{model}/train", "external/demo_external")} <= checked


def test_kermany_patient_in_train_and_test_goes_to_the_test_side(planted: dict[str, Any]) -> None:
    manifest = planted["manifest"]
    for patient in ("kermany-person3", "kermany-IM-0007"):
        sets = set(manifest.loc[manifest["patient_id"] == patient, "set"])
        assert sets == {"kermany_test"}, f"{patient} is in {sets}"
    for name in ("person3_bacteria_30.jpeg", "person3_bacteria_31.jpeg"):
        reason = reason_of(planted, f"chest_xray/train/PNEUMONIA/{name}")
        assert reason == ("patient_in_kermany_test: patient group kermany-person3 has "
                          "kermany_test image chest_xray/test/PNEUMONIA/person3_bacteria_99.jpeg")
    assert reason_of(planted, "chest_xray/train/NORMAL/IM-0007-0001.jpeg").startswith(
        "patient_in_kermany_test: patient group kermany-IM-0007 has kermany_test image ")
    # the re-encoded test picture under another id is left out, and not held out either
    assert reason_of(planted, "chest_xray/train/NORMAL/IM-0009-0001.jpeg").startswith(
        "same_picture_as_kermany_test: same picture as kermany_test image "
        "chest_xray/test/NORMAL/IM-5001-0001.jpeg (pHash distance ")
    assert "kermany-IM-0009" not in set(manifest["patient_id"])


def test_same_covid_picture_under_two_ids_is_one_patient_group(planted: dict[str, Any]) -> None:
    rows = training(planted)
    pair = rows[rows["patient_id"].isin(["covid-30", "covid-31"])]
    assert len(pair) == 2 * 4  # both patients' 4 images, in both models
    assert set(pair["patient_group"]) == {"covid-30"}
    for model, split in planted["splits"].items():
        part = split[split["patient_id"].isin(["covid-30", "covid-31"])]
        assert len(part) == 4 and part["split"].nunique() == 1, f"{model}: {part.to_string()}"
        assert set(part["patient_group"]) == {"covid-30"}
        assert (split.groupby("patient_group")["split"].nunique() == 1).all()
        report = planted["metrics"]["split"][model]
        assert report["groups_merged"] == 1 and report["images_regrouped"] == 2
        assert report["group_overlap"] == 0 and report["patient_overlap"] == 0
    others = rows[~rows["patient_id"].isin(["covid-30", "covid-31"])]
    assert (others["patient_group"] == others["patient_id"]).all()


def test_same_covid_picture_as_a_heldout_one_is_left_out_with_its_patient(
        planted: dict[str, Any]) -> None:
    manifest = planted["manifest"]
    assert set(manifest.loc[manifest["patient_id"] == "covid-40", "set"]) == {"heldout"}
    assert "covid-41" not in set(training(planted)["patient_id"])
    assert reason_of(planted, "covid-chestxray-dataset/images/early-copy.jpg").startswith(
        "same_picture_as_heldout: same picture as heldout image "
        "covid-chestxray-dataset/images/late.jpg (pHash distance ")
    assert reason_of(planted, "covid-chestxray-dataset/images/early-other.jpg") == (
        "patient_in_heldout: patient group covid-40 has heldout image "
        "covid-chestxray-dataset/images/late.jpg of patient covid-40, linked to covid-41 by a "
        "shared picture")


def test_training_images_published_in_an_external_set_are_left_out(
        planted: dict[str, Any]) -> None:
    identical = reason_of(planted, "covid-chestxray-dataset/images/shared-with-external.jpg")
    assert identical == ("same_picture_as_external: same picture as external/demo_external "
                         "file external/covid/EXT-0001.jpg (pHash distance 0)")
    assert reason_of(planted, "covid-chestxray-dataset/images/published-elsewhere.jpg").startswith(
        "same_picture_as_external: same picture as external/demo_external file "
        "external/covid/EXT-0002.jpg (pHash distance ")
    # only the shared pictures: the patients' other films still train
    sources = set(training(planted)["source"])
    assert {"covid-chestxray-dataset/images/p50-other.jpg",
            "covid-chestxray-dataset/images/p51-other.jpg"} <= sources


def test_counts_in_copy_images_split_and_the_report(planted: dict[str, Any]) -> None:
    metrics = planted["metrics"]
    counts = {"same_picture_as_heldout": 1, "same_picture_as_kermany_test": 1,
              "patient_in_heldout": 1, "patient_in_kermany_test": 3,
              "same_picture_as_external": 2, "conflicting_labels": 0}
    assert metrics["copy_images"]["skipped"] == {"total": 0}  # every planted file is usable
    assert metrics["copy_images"]["excluded"] == {"total": 8, **counts}
    assert len(planted["excluded"]) == 8
    assert metrics["split"]["excluded_before_split"] == {
        "total": 8, **{k: v for k, v in sorted(counts.items()) if v}}
    groups = metrics["copy_images"]["patient_groups"]
    # covid-31's 2 images in both models, and kermany_test's IM-5001 (grouped with IM-0009)
    assert groups == {"merged": 3, "patients_in_merged": 6, "images_regrouped": 2 * 2 + 1}
    assert metrics["copy_images"]["images"]["covid_normal"] == {"covid": 26, "normal": 26}
    run_metrics = RunMetrics(selection=metrics["selection"], copy_images=metrics["copy_images"],
                             split=metrics["split"], audit=metrics["audit"], probe={},
                             evaluate={}, validate={}, models={}, source={})
    text = "\n".join(data_lines(run_metrics))
    assert ("Left out of training to keep sets disjoint (listed in data/datasets/excluded.csv): "
            "8 (3 patient_in_kermany_test, 2 same_picture_as_external, 1 patient_in_heldout, "
            "1 same_picture_as_heldout, 1 same_picture_as_kermany_test)") in text
    assert ("Patient groups: 3 merged 6 patient ids that share a picture (5 manifest rows "
            "regrouped); the split keeps each group on one side.") in text


# --------------------------------------------------------------------------------- unit checks
def _record(path: Path, patient: str, pixels: np.ndarray, label: str = "covid") -> ImageRecord:
    save(path, pixels)
    return ImageRecord(path, label, patient, _print(path), pixels.shape[1], pixels.shape[0],
                       "jpeg")


def test_patient_groups_follow_chains_and_ignore_input_order(tmp_path: Path) -> None:
    """a ~ b by picture, b and c share a patient id: a, b, c are one group; d stays alone."""
    pixels = film(1)
    a = _record(tmp_path / "a.jpg", "covid-9", pixels)
    b_path = reencode(a.source, tmp_path / "b.jpg")
    b = ImageRecord(b_path, "covid", "covid-12", _print(b_path), 59, 59, "jpeg")
    c = _record(tmp_path / "c.jpg", "covid-12", film(2))
    d = _record(tmp_path / "d.jpg", "covid-2", film(3))
    groups = patient_groups([a, b, c, d], max_distance=4)
    assert groups == {a.source: "covid-12", b.source: "covid-12", c.source: "covid-12",
                      d.source: "covid-2"}
    assert patient_groups([d, c, b, a], max_distance=4) == groups


def test_same_pictures_prefers_identical_bytes_then_the_closest(tmp_path: Path) -> None:
    pixels = film(7)
    original = save(tmp_path / "o.jpg", pixels)
    copy_path = reencode(original, tmp_path / "copy.jpg")
    other = save(tmp_path / "other.jpg", film(8))
    prints = [_print(original), _print(other)]
    against = [_print(other), _print(copy_path), _print(original)]
    assert same_pictures(prints, against, max_distance=4) == {0: (2, 0), 1: (0, 0)}
    assert same_pictures([_print(copy_path)], prints, max_distance=4)[0][0] == 0
    assert same_pictures([_print(other)], [_print(original)], max_distance=4) == {}
