"""copy_images: balanced, seeded, decoded, hard-linked class folders with disjoint held-out sets."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from covid_xray.datasets import (
    MANIFEST_COLUMNS,
    POOL_COLUMNS,
    POOL_FILE,
    Candidate,
    ImageRecord,
    Skip,
    build_datasets,
    check_disjoint,
    folder_patient_id,
    inspect_file,
    kermany_patient_id,
    link_or_copy,
    share_equally,
)
from covid_xray.errors import PipelineError
from covid_xray.metadata import NEGATIVE_COLUMNS, OUTPUT_COLUMNS
from covid_xray.params import AuditParams, CopyParams, NegativesParams


# ------------------------------------------------------------------------------------ builders
def image_bytes(key: str, ext: str = ".jpeg", size: int = 32) -> bytes:
    """Small, smooth grey image bytes (film-like: the server's checks accept it), unique to
    ``key``."""
    seed = zlib.crc32(key.encode())
    noise = np.random.default_rng(seed).normal(size=(size, size + seed % 9)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 3)
    pixels = cv2.normalize(smooth, None, 20, 235, cv2.NORM_MINMAX).astype(np.uint8)
    ok, buffer = cv2.imencode(ext, pixels)
    assert ok
    return buffer.tobytes()


def put_image(path: Path, key: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(key or path.as_posix(), path.suffix))
    return path


def corrupt_jpeg() -> bytes:
    """A JPEG with a valid header whose scan refers to a Huffman table that does not exist."""
    data = bytearray(image_bytes("corrupt", ".jpg"))
    sos = data.index(b"\xff\xda")
    data[sos + 6] = 0x33
    return bytes(data)


def _cut(data: bytes) -> bytes:
    """The first two thirds of a file: headers intact, pixel data cut off (a partial download)."""
    return data[: len(data) * 2 // 3]


def make_kermany(raw: Path, split: str, normals: int, pneumonia_patients: int,
                 per_patient: int = 2, first_id: int = 1) -> None:
    """Kermany-style files: ``IM-<id>-0001.jpeg`` / ``NORMAL2-IM-...`` and multi-image persons."""
    base = raw / "chest_xray" / split
    for i in range(normals):
        number = first_id + i
        name = (f"NORMAL2-IM-{number:04d}-0001.jpeg" if i % 3 == 2
                else f"IM-{number:04d}-0001.jpeg")
        put_image(base / "NORMAL" / name)
    for person in range(first_id, first_id + pneumonia_patients):
        kind = "virus" if person % 2 else "bacteria"
        for k in range(per_patient):
            put_image(base / "PNEUMONIA" / f"person{person}_{kind}_{person * 10 + k}.jpeg")


def make_covid(root: Path, train_patients: int, heldout_patients: int,
               per_patient: int = 2) -> None:
    """COVID images plus the two select_metadata tables that copy_images reads."""
    dataset = root / "data" / "raw" / "covid-chestxray-dataset"
    for name, first, count in (("covid_selected.csv", 1, train_patients),
                               ("covid_heldout.csv", 1000, heldout_patients)):
        rows = []
        for patient in range(first, first + count):
            for k in range(per_patient):
                filename = f"covid-{patient}-{k}.{'png' if k % 2 else 'jpg'}"
                put_image(dataset / "images" / filename)
                rows.append({"patient_id": f"covid-{patient}", "filename": filename,
                             "image_path": f"images/{filename}", "finding": "COVID-19",
                             "view": "PA", "modality": "X-ray", "date": "", "date_raw": "2020"})
        interim = root / "data" / "interim"
        interim.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS)).to_csv(interim / name, index=False)


def make_tree(root: Path, covid_train: int = 5, covid_heldout: int = 2, normals: int = 20,
              pneumonia_patients: int = 10, test: int = 3) -> Path:
    """A complete raw + interim tree: 10 COVID training images, 20 Kermany per class."""
    make_covid(root, covid_train, covid_heldout)
    raw = root / "data" / "raw"
    make_kermany(raw, "train", normals, pneumonia_patients)
    make_kermany(raw, "test", test, test, first_id=5000)
    return root


def make_collection_negatives(root: Path, selected: dict[str, int], heldout: dict[str, int],
                              first: int = 300) -> None:
    """The collection's own negatives (``negatives_*.csv``): per label, that many patients with
    one image each, origins ``site0.org`` / ``site1.org`` alternating."""
    dataset = root / "data" / "raw" / "covid-chestxray-dataset"
    patient = first
    for name, counts in (("negatives_selected.csv", selected), ("negatives_heldout.csv", heldout)):
        rows = []
        for label, count in counts.items():
            for _ in range(count):
                filename = f"neg-{patient}.jpg"
                put_image(dataset / "images" / filename)
                rows.append({"patient_id": f"covid-{patient}", "filename": filename,
                             "image_path": f"images/{filename}", "finding": label,
                             "view": "PA", "modality": "X-ray", "date": "", "date_raw": "2019",
                             "origin": f"site{patient % 2}.org", "label": label})
                patient += 1
        pd.DataFrame(rows, columns=list(NEGATIVE_COLUMNS)).to_csv(
            root / "data" / "interim" / name, index=False)


def make_folder(folder: Path, counts: dict[str, int]) -> Path:
    """A labelled folder of adult negatives: ``<label>/img-<k>.png`` files."""
    for label, count in counts.items():
        for k in range(count):
            put_image(folder / label / f"img-{k}.png", f"{folder.name}/{label}/{k}")
    return folder


def build(root: Path, seed: int = 42, normal: int = 4, pneumonia: int = 4,
          out: str = "datasets", external: dict[str, Path] | None = None,
          negatives: dict[str, tuple[str, ...]] | None = None,
          folders: dict[str, Path] | None = None):
    out_dir = root / "data" / out
    out_dir.mkdir(parents=True)
    params = CopyParams(heldout_normal=normal, heldout_pneumonia=pneumonia,
                        folders={name: str(path) for name, path in (folders or {}).items()},
                        negatives=NegativesParams(**(negatives or {})))
    return build_datasets(root / "data" / "raw", root / "data" / "interim", out_dir, seed,
                          params, max_distance=AuditParams().phash_max_distance,
                          external=external, folders=folders)


# --------------------------------------------------------------------------------- patient ids
@pytest.mark.parametrize(("name", "patient"), [
    ("person1000_bacteria_2931.jpeg", "kermany-person1000"),
    ("person10_virus_35.jpeg", "kermany-person10"),
    ("IM-0115-0001.jpeg", "kermany-IM-0115"),
    ("IM-0501-0001-0002.jpeg", "kermany-IM-0501"),
    ("NORMAL2-IM-0500-0001.jpeg", "kermany-NORMAL2-IM-0500"),
    ("NORMAL2-IM-1345-0001-0002.jpeg", "kermany-NORMAL2-IM-1345"),
    ("chest_xray/train/PNEUMONIA/person1_virus_6.jpeg", "kermany-person1"),
    ("scan 7.png", "kermany-scan 7"),
])
def test_kermany_patient_ids_from_file_names(name: str, patient: str) -> None:
    assert kermany_patient_id(name) == patient


# ---------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize(("payload", "reason"), [
    (lambda: image_bytes("ok", ".jpg"), None),
    (lambda: image_bytes("ok", ".png"), None),
    (lambda: _cut(image_bytes("cut", ".jpg", size=64)), "truncated"),
    (lambda: _cut(image_bytes("cut", ".png", size=64)), "truncated"),
    (corrupt_jpeg, "corrupt"),
    (lambda: b"<html>not an x-ray</html>", "not_image"),
    (lambda: b"", "empty"),
])
def test_every_file_is_decoded_and_bad_ones_classified(tmp_path: Path, payload,
                                                       reason: str | None) -> None:
    path = tmp_path / "x.jpeg"
    path.write_bytes(payload())
    result = inspect_file(Candidate(path, "normal", "kermany-x"))
    if reason is None:
        assert isinstance(result, ImageRecord) and result.width >= 32
    else:
        assert isinstance(result, Skip) and result.reason.startswith(f"{reason}:")


def test_unreadable_file_is_skipped(tmp_path: Path) -> None:
    result = inspect_file(Candidate(tmp_path / "gone.jpeg", "normal", "kermany-gone"))
    assert isinstance(result, Skip) and result.reason.startswith("unreadable:")


# ------------------------------------------------------------------------------------- build
def test_balanced_folders_heldout_sets_and_manifest(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    result = build(root)
    out = root / "data" / "datasets"
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    counts = manifest.groupby(["set", "label"]).size().to_dict()
    assert counts == {("covid_normal", "covid"): 10, ("covid_normal", "normal"): 10,
                      ("covid_pneumonia", "covid"): 10, ("covid_pneumonia", "pneumonia"): 10,
                      ("heldout", "covid"): 4, ("heldout", "normal"): 4,
                      ("heldout", "pneumonia"): 4, ("kermany_test", "normal"): 3,
                      ("kermany_test", "pneumonia"): 6}
    for path in manifest["path"]:
        assert (out / path).is_file()
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                     if p.is_file() and p.suffix != ".csv")
    assert on_disk == sorted(manifest["path"])
    # held-out Kermany images come from patients no training folder uses
    training = manifest[manifest["set"].isin(["covid_normal", "covid_pneumonia"])]
    heldout = manifest[(manifest["set"] == "heldout") & (manifest["label"] != "covid")]
    assert not set(heldout["patient_id"]) & set(training["patient_id"])
    assert not set(heldout["sha256"]) & set(training["sha256"])
    assert set(manifest.loc[manifest["label"] == "pneumonia", "patient_id"]) <= {
        f"kermany-person{i}" for i in range(1, 11)} | {f"kermany-person{i}"
                                                      for i in range(5000, 5003)}
    row = manifest[manifest["path"].str.endswith("covid-1-0.jpg")].iloc[0]
    assert (row["source"], row["patient_id"], row["format"]) == (
        "covid-chestxray-dataset/images/covid-1-0.jpg", "covid-1", "jpeg")
    report = result.report
    assert report["images"]["covid_normal"] == {"covid": 10, "normal": 10}
    assert report["images_total"] == len(manifest) == 61
    assert report["skipped"] == {"total": 0}
    assert report["patient_overlap_with_training"]["heldout"]["normal"] == 0
    json.dumps(report)


def test_kermany_pool_holds_only_images_clear_of_every_evaluation_set(tmp_path: Path) -> None:
    """kermany_pool.csv (what the pretrain may learn from): Kermany train images whose patient
    group has no held-out or test image. 3 held-out PNEUMONIA images of 2-image patients: one
    patient is only half drawn, and its other image must not be in the pool either."""
    root = make_tree(tmp_path)
    make_kermany(root / "data" / "raw", "test", 0, 1, first_id=3)  # person3 in train AND test
    result = build(root, normal=4, pneumonia=3)
    out = root / "data" / "datasets"
    pool = pd.read_csv(out / POOL_FILE, dtype=str, keep_default_na=False)
    assert list(pool.columns) == list(POOL_COLUMNS)
    assert pool["source"].str.startswith("chest_xray/train/").all()
    manifest = result.manifest
    evaluation = manifest[manifest["set"].isin(["heldout", "kermany_test"])]
    assert not set(pool["patient_group"]) & set(evaluation["patient_group"])
    assert not set(pool["patient_id"]) & set(evaluation["patient_id"])
    held = manifest[(manifest["set"] == "heldout") & (manifest["label"] == "pneumonia")]
    half_drawn = held.groupby("patient_group").size()
    assert (half_drawn == 1).any()  # the case this test is about
    excluded = pd.read_csv(out / "excluded.csv", dtype=str, keep_default_na=False)
    assert "kermany-person3" in " ".join(excluded["reason"])  # left out, not in the pool
    assert not set(pool["source"]) & set(excluded["source"])
    training = manifest[manifest["set"].isin(["covid_normal", "covid_pneumonia"])
                        & (manifest["label"] != "covid")]
    assert set(training["sha256"]) <= set(pool["sha256"])  # the models' negatives are in it
    every = {p.relative_to(root / "data" / "raw").as_posix()
             for p in (root / "data" / "raw" / "chest_xray" / "train").rglob("*.jpeg")}
    listed = set(pool["source"]) | set(excluded["source"]) | set(
        manifest.loc[manifest["set"] == "heldout", "source"])
    unlisted = every - listed  # only the rest of the half-drawn patient's images
    assert unlisted and {kermany_patient_id(s) for s in unlisted} <= set(
        half_drawn[half_drawn == 1].index)


def test_hard_links_are_used(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    result = build(root)
    out = root / "data" / "datasets"
    assert result.links["hardlink"] == len(result.manifest) and result.links["copy"] == 0
    row = result.manifest.iloc[0]
    linked, source = out / row["path"], root / "data" / "raw" / row["source"]
    assert os.path.samefile(linked, source)


def test_link_falls_back_to_copy_across_filesystems(tmp_path: Path) -> None:
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem to link across")
    folder = other / f"covid-xray-test-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    try:
        source = put_image(folder / "a.jpeg")
        assert link_or_copy(source, tmp_path / "out" / "a.jpeg") == "copy"
        assert (tmp_path / "out" / "a.jpeg").read_bytes() == source.read_bytes()
        assert not os.path.samefile(source, tmp_path / "out" / "a.jpeg")
    finally:
        shutil.rmtree(folder)


def test_sampling_is_seeded(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    first = build(root, out="a").manifest
    again = build(root, out="b").manifest
    other = build(root, seed=7, out="c").manifest
    assert first.equals(again)
    assert set(first["path"]) != set(other["path"])


def test_bad_files_are_skipped_listed_and_never_copied(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    raw = root / "data" / "raw"
    bad = {
        "chest_xray/train/NORMAL/IM-0900-0001.jpeg": corrupt_jpeg(),
        "chest_xray/train/NORMAL/IM-0901-0001.jpeg": _cut(image_bytes("trunc", ".jpg", 64)),
        "chest_xray/train/PNEUMONIA/person900_virus_1.jpeg": b"GIF89a not really",
        "chest_xray/test/NORMAL/notes.txt": b"readme",
        "covid-chestxray-dataset/images/covid-2-1.png": _cut(image_bytes("x", ".png", 64)),
    }
    for relative, payload in bad.items():
        (raw / relative).write_bytes(payload)
    result = build(root)
    out = root / "data" / "datasets"
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped.columns) == ["source", "reason"]
    assert sorted(skipped["source"]) == sorted(bad)
    reasons = dict(zip(skipped["source"], skipped["reason"].str.split(":").str[0], strict=True))
    assert reasons["chest_xray/train/NORMAL/IM-0900-0001.jpeg"] == "corrupt"
    assert reasons["chest_xray/train/NORMAL/IM-0901-0001.jpeg"] == "truncated"
    assert reasons["chest_xray/test/NORMAL/notes.txt"] == "not_image"
    assert not set(bad) & set(result.manifest["source"])
    assert result.report["skipped"]["total"] == 5
    assert result.report["skipped"]["corrupt"] == 1
    assert result.report["skipped"]["truncated"] == 2
    # one COVID training image less -> one fewer NORMAL/PNEUMONIA image drawn to balance
    assert result.report["images"]["covid_normal"] == {"covid": 9, "normal": 9}


def test_duplicates_are_removed_before_sampling(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    raw = root / "data" / "raw"
    test_image = raw / "chest_xray" / "test" / "NORMAL" / "IM-5000-0001.jpeg"
    for i in range(3):  # three training NORMAL files that are copies of a test image
        shutil.copy(test_image, raw / "chest_xray/train/NORMAL" / f"IM-{8000 + i}-0001.jpeg")
    covid = raw / "covid-chestxray-dataset" / "images"
    shutil.copy(covid / "covid-1000-0.jpg", covid / "covid-1-0.jpg")  # train == held out
    result = build(root)
    skipped = pd.read_csv(root / "data" / "datasets" / "skipped.csv")
    duplicates = skipped[skipped["reason"].str.startswith("duplicate")]
    assert len(duplicates) == 4
    assert "covid-chestxray-dataset/images/covid-1000-0.jpg" in " ".join(duplicates["reason"])
    assert result.report["skipped"]["duplicate"] == 4
    manifest = result.manifest
    assert manifest["sha256"][manifest["set"] == "covid_normal"].is_unique
    assert not (manifest["source"] == "covid-chestxray-dataset/images/covid-1-0.jpg").any()
    # covid-1's other film is the held-out patient covid-1000's too now: left out, with why
    assert result.report["excluded"]["patient_in_heldout"] == 1
    assert not (manifest["patient_id"] == "covid-1").any()
    excluded = pd.read_csv(root / "data" / "datasets" / "excluded.csv")
    assert excluded.to_dict("records") == [{
        "source": "covid-chestxray-dataset/images/covid-1-1.png",
        "reason": "patient_in_heldout: patient group covid-1 has heldout image "
                  "covid-chestxray-dataset/images/covid-1000-0.jpg of patient covid-1000, linked "
                  "to covid-1 by a shared picture"}]


def test_a_picture_published_under_two_labels_trains_neither(tmp_path: Path) -> None:
    """A COVID training film re-encoded into Kermany's train/NORMAL (and identical in PNEUMONIA):
    one picture, two labels. Its group is left out of every training pool and held-out draw."""
    root = make_tree(tmp_path)
    raw = root / "data" / "raw"
    covid = raw / "covid-chestxray-dataset" / "images" / "covid-2-0.jpg"
    pixels = cv2.imread(str(covid), cv2.IMREAD_GRAYSCALE)
    ok, data = cv2.imencode(".jpeg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 60])
    assert ok
    (raw / "chest_xray/train/NORMAL/IM-0901-0001.jpeg").write_bytes(data.tobytes())
    shutil.copy(covid, raw / "chest_xray/train/PNEUMONIA/person901_virus_1.jpeg")
    result = build(root)
    excluded = pd.read_csv(root / "data" / "datasets" / "excluded.csv")
    reasons = dict(zip(excluded["source"], excluded["reason"], strict=True))
    assert reasons["covid-chestxray-dataset/images/covid-2-0.jpg"].startswith(
        "conflicting_labels: patient group covid-2 also holds a normal image, "
        "chest_xray/train/NORMAL/IM-0901-0001.jpeg")
    assert reasons["chest_xray/train/NORMAL/IM-0901-0001.jpeg"].startswith(
        "conflicting_labels: patient group covid-2 also holds a covid image")
    assert result.report["excluded"]["conflicting_labels"] == 3  # covid-2's two films + the copy
    assert result.report["skipped"]["duplicate"] == 1  # the identical PNEUMONIA copy
    groups = set(result.manifest["patient_group"])
    assert "covid-2" not in groups and "kermany-IM-0901" not in set(result.manifest["patient_id"])


def test_disjointness_check_fires_on_a_planted_duplicate(tmp_path: Path) -> None:
    manifest = build(make_tree(tmp_path)).manifest
    check_disjoint(manifest)  # the real build is clean
    planted = manifest.copy()
    training = planted.index[planted["set"] == "covid_normal"][0]
    heldout = planted.index[(planted["set"] == "heldout") & (planted["label"] == "normal")][0]
    planted.loc[heldout, "sha256"] = planted.loc[training, "sha256"]
    with pytest.raises(PipelineError) as info:
        check_disjoint(planted)
    message = str(info.value)
    assert "disjoint" in message
    assert planted.loc[heldout, "path"] in message and planted.loc[training, "path"] in message


def test_not_enough_kermany_images_names_param_and_numbers(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    with pytest.raises(PipelineError, match=r"train/NORMAL: copy.heldout_normal=25 but only 20 "
                                            r"files are there; lower copy.heldout_normal"):
        build(root, normal=25)
    normal = root / "data" / "raw" / "chest_xray" / "train" / "NORMAL"
    for path in sorted(normal.iterdir())[:2]:
        path.write_bytes(b"broken")
    with pytest.raises(PipelineError, match=r"copy.heldout_normal=19 but only 18 readable, "
                                            r"unique images \(18 patients\)"):
        build(root, normal=19, out="after-decoding")
    with pytest.raises(PipelineError) as info:
        build(root, normal=12, out="other")
    message = str(info.value)
    assert "covid_normal needs 10 normal images to balance its 10 COVID training images" in message
    assert "only 6 readable, unique images remain" in message
    assert "copy.heldout_normal=12" in message


def test_missing_inputs_are_clear_errors(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "a")
    shutil.rmtree(root / "data" / "raw" / "chest_xray" / "test" / "PNEUMONIA")
    with pytest.raises(PipelineError, match=r"test/PNEUMONIA: folder not found"):
        build(root)
    root = make_tree(tmp_path / "b")
    (root / "data" / "interim" / "covid_selected.csv").write_text("a,b\n1,2\n")
    with pytest.raises(PipelineError, match=r"covid_selected.csv: missing column\(s\) "
                                            r"patient_id, image_path"):
        build(root)
    (root / "data" / "interim" / "covid_selected.csv").unlink()
    with pytest.raises(PipelineError, match=r"covid_selected.csv: not found; run the "
                                            r"select_metadata stage"):
        build(root, out="other")


def test_real_sample_is_too_small_to_balance_and_says_why(tmp_path: Path,
                                                          xray_sample: Path) -> None:
    from covid_xray.metadata import select_covid, write_selection
    from covid_xray.params import SelectParams

    selection = select_covid(xray_sample / "covid-chestxray-dataset" / "metadata.csv",
                             SelectParams())
    write_selection(selection, tmp_path / "interim")
    (tmp_path / "out").mkdir()
    with pytest.raises(PipelineError, match=r"covid_normal needs \d+ normal images to balance"):
        build_datasets(xray_sample, tmp_path / "interim", tmp_path / "out", 42,
                       CopyParams(heldout_normal=2, heldout_pneumonia=2), max_distance=4)


# ------------------------------------------------------------------------------- stage main
def test_stage_builds_folder_atomically(tmp_path: Path, repo_root: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import copy_images

    root = make_tree(tmp_path)
    params = (repo_root / "params.yaml").read_text()
    (root / "params.yaml").write_text(params.replace("heldout_normal: 20", "heldout_normal: 4")
                                      .replace("heldout_pneumonia: 20", "heldout_pneumonia: 4"))
    stale = root / "data" / "datasets" / "stale.jpeg"
    put_image(stale)
    monkeypatch.setenv("COVID_XRAY_ROOT", str(root))
    copy_images.main()
    assert not stale.exists()
    assert (root / "data" / "datasets" / "manifest.csv").is_file()
    metric = json.loads((root / "metrics" / "copy_images.json").read_text())
    assert metric["images"]["heldout"] == {"covid": 4, "normal": 4, "pneumonia": 4}
    leftovers = [p.name for p in (root / "data").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    # a failing run leaves the previous folder in place, and no temp folder behind
    (root / "params.yaml").write_text(params.replace("heldout_normal: 20", "heldout_normal: 99"))
    with pytest.raises(PipelineError):
        copy_images.main()
    assert (root / "data" / "datasets" / "manifest.csv").is_file()
    assert [p.name for p in (root / "data").iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------- issue 10: what the server refuses, stages skip
def _png_bytes(rgb: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", rgb)
    assert ok
    return buffer.tobytes()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def bomb_png(side: int = 60_000) -> bytes:
    """A PNG declaring ``side`` x ``side`` grey pixels: a decompression bomb by its header."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + _png_chunk(b"IEND", b""))


def test_images_the_server_refuses_are_skipped_with_its_reasons(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    test_normal = root / "data" / "raw" / "chest_xray" / "test" / "NORMAL"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)
    jpeg = image_bytes("cut-with-marker", ".jpg", 64)
    bad = {
        "IM-7001-0001.png": _png_bytes(np.full((1, 1), 128, np.uint8)),  # one pixel
        "IM-7002-0001.png": _png_bytes(noise),  # pure noise
        "IM-7003-0001.png": bomb_png(),
        "IM-7004-0001.jpeg": jpeg[: len(jpeg) // 2] + b"\xff\xd9",  # cut, end marker appended
        "IM-7005-0001.png": _png_bytes(cv2.merge([noise // 4, noise // 4, noise])),  # colour
    }
    for name, payload in bad.items():
        (test_normal / name).write_bytes(payload)
    result = build(root)
    skipped = pd.read_csv(root / "data" / "datasets" / "skipped.csv")
    reasons = dict(zip(skipped["source"].str.rsplit("/", n=1).str[-1],
                       skipped["reason"].str.split(":").str[0], strict=True))
    assert reasons == {"IM-7001-0001.png": "too_small", "IM-7002-0001.png": "noise",
                       "IM-7003-0001.png": "too_large", "IM-7004-0001.jpeg": "truncated",
                       "IM-7005-0001.png": "colour"}
    assert result.report["images"]["kermany_test"] == {"normal": 3, "pneumonia": 6}
    assert result.report["skipped"] == {"total": 5, "colour": 1, "noise": 1, "too_large": 1,
                                        "too_small": 1, "truncated": 1}


def test_all_covid_duplicates_still_write_skipped_csv(tmp_path: Path, repo_root: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import copy_images

    root = make_tree(tmp_path)
    images = root / "data" / "raw" / "covid-chestxray-dataset" / "images"
    heldout = (images / "covid-1000-0.jpg").read_bytes()
    training = sorted(p for p in images.iterdir() if not p.name.startswith("covid-100"))
    for path in training:  # every COVID training image is a copy of a held-out one
        path.write_bytes(heldout)
    params = (repo_root / "params.yaml").read_text()
    (root / "params.yaml").write_text(params.replace("heldout_normal: 20", "heldout_normal: 4")
                                      .replace("heldout_pneumonia: 20", "heldout_pneumonia: 4"))
    monkeypatch.setenv("COVID_XRAY_ROOT", str(root))
    with pytest.raises(PipelineError) as caught:
        copy_images.main()
    message = str(caught.value)
    listing = root / "data" / "datasets" / "skipped.csv"
    assert f"10 duplicate; each is listed with its reason in skipped.csv: {listing}" in message
    skipped = pd.read_csv(listing)
    assert sorted(skipped["source"]) == sorted(
        f"covid-chestxray-dataset/images/{p.name}" for p in training)
    assert skipped["reason"].str.startswith("duplicate: same content as ").all()
    assert sorted(p.name for p in listing.parent.iterdir()) == ["excluded.csv", "skipped.csv"]
    assert [p.name for p in (root / "data").iterdir() if p.name.startswith(".")] == []


def test_a_source_without_external_set_is_skipped_not_an_error(tmp_path: Path) -> None:
    """`data.source=<folder>` without an external set: acquire leaves only its note in
    data/raw/external, and the committed `demo_external` entry is skipped with a log line (before,
    featurize and validate stopped with "has no images"); a real folder still must hold images."""
    from covid_xray.config import NO_EXTERNAL_FILE
    from covid_xray.datasets import external_sets

    noted = tmp_path / "data" / "raw" / "external"
    noted.mkdir(parents=True)
    (noted / NO_EXTERNAL_FILE).write_text("no external set\n")
    real = tmp_path / "adults"
    (real / "normal").mkdir(parents=True)
    assert cv2.imwrite(str(real / "normal" / "a.png"), np.full((40, 40), 90, np.uint8))
    sets = external_sets({"demo_external": "data/raw/external", "adults": str(real)}, tmp_path)
    assert list(sets) == ["adults"] and sets["adults"]["label"].tolist() == ["normal"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipelineError, match="has no images"):
        external_sets({"mine": str(empty)}, tmp_path)


# ------------------------------------------------------------------ negatives from several sources
@pytest.mark.parametrize(("wanted", "available", "quotas"), [
    (10, {"kermany": 160}, {"kermany": 10}),
    (170, {"kermany": 200, "covid_collection": 13}, {"kermany": 157, "covid_collection": 13}),
    (208, {"covid_collection": 56, "kermany": 400}, {"covid_collection": 56, "kermany": 152}),
    (10, {"a": 3, "b": 3, "c": 100}, {"a": 3, "b": 3, "c": 4}),
    (7, {"a": 10, "b": 10}, {"a": 4, "b": 3}),
    (30, {"a": 10, "b": 12}, {"a": 10, "b": 12}),  # not enough: all there is
    (6, {"a": 0, "b": 9}, {"a": 0, "b": 6}),
])
def test_negatives_are_shared_equally_among_sources(wanted: int, available: dict[str, int],
                                                    quotas: dict[str, int]) -> None:
    assert share_equally(wanted, available) == quotas


@pytest.mark.parametrize(("name", "relative", "patient"), [
    ("adult", "00000013_005.png", "adult-00000013"),          # NIH ChestX-ray14
    ("adult", "sub/00000013_006.png", "adult-00000013"),
    ("adult", "person12_virus_3.jpeg", "adult-person12"),     # Kermany's patterns
    ("adult", "a/scan 7.png", "adult-a/scan 7"),              # unknown: the file itself
])
def test_folder_files_get_a_patient_from_known_name_patterns(name: str, relative: str,
                                                             patient: str) -> None:
    assert folder_patient_id(name, Path(relative)) == patient


def test_negatives_from_kermany_the_collection_and_a_folder(tmp_path: Path) -> None:
    """10 COVID training images; normal from three sources (collection 2, folder 3, Kermany the
    rest), pneumonia from the collection (6) and Kermany (4): equal shares, scarce sources first.
    The collection's late negatives join the held-out set; every image keeps its origin."""
    root = make_tree(tmp_path)
    make_collection_negatives(root, {"normal": 2, "pneumonia": 6}, {"normal": 1, "pneumonia": 1})
    adult = make_folder(tmp_path / "adult", {"normal": 3})
    result = build(root, negatives={"normal": ("covid_collection", "adult", "kermany"),
                                    "pneumonia": ("kermany", "covid_collection")},
                   folders={"adult": adult})
    manifest = result.manifest
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert result.report["negative_sources"] == {
        "covid_normal": {"adult": 3, "covid_collection": 2, "kermany": 5},
        "covid_pneumonia": {"covid_collection": 5, "kermany": 5},
        "heldout_normal": {"covid_collection": 1, "kermany": 4},
        "heldout_pneumonia": {"covid_collection": 1, "kermany": 4}}
    assert result.report["images"]["covid_normal"] == {"covid": 10, "normal": 10}
    assert result.report["images"]["covid_pneumonia"] == {"covid": 10, "pneumonia": 10}
    origins = manifest.groupby(["set", "label"])["origin"].agg(lambda o: sorted(set(o)))
    assert origins[("covid_normal", "normal")] == ["adult", "kermany", "site0.org", "site1.org"]
    assert origins[("covid_normal", "covid")] == ["unknown"]  # make_covid writes no origin
    assert origins[("kermany_test", "normal")] == ["kermany"]
    adult_rows = manifest[manifest["origin"] == "adult"]
    assert set(adult_rows["patient_id"]) == {"adult-normal/img-0", "adult-normal/img-1",
                                             "adult-normal/img-2"}
    assert set(adult_rows["source"]) == {str(adult / "normal" / f"img-{k}.png")
                                         for k in range(3)}
    check_disjoint(manifest)
    # the default run draws Kermany exactly as before: same images for a kermany-only source
    default = build(root, out="default")
    for model, label in (("covid_normal", "normal"), ("covid_pneumonia", "pneumonia")):
        seed_draw = default.manifest[(default.manifest["set"] == model)
                                     & (default.manifest["label"] == label)]
        assert default.report["negative_sources"][model] == {"kermany": 10}
        assert len(seed_draw) == 10


def test_every_source_is_grouped_and_kept_clear_of_evaluation_and_external(
        tmp_path: Path) -> None:
    """A collection negative of a held-out COVID patient, a folder image that is a COVID
    training picture re-encoded, and a folder image that is an external-set file: all left
    out, with their reasons; the audit's criterion covers every source."""
    root = make_tree(tmp_path)
    make_collection_negatives(root, {"normal": 3, "pneumonia": 0}, {})
    interim = root / "data" / "interim" / "negatives_selected.csv"
    table = pd.read_csv(interim, dtype=str, keep_default_na=False)
    table.loc[0, "patient_id"] = "covid-1000"  # a held-out COVID patient's normal film
    table.to_csv(interim, index=False)
    adult = make_folder(tmp_path / "adult", {"normal": 8})
    covid = root / "data" / "raw" / "covid-chestxray-dataset" / "images" / "covid-2-0.jpg"
    pixels = cv2.imread(str(covid), cv2.IMREAD_GRAYSCALE)
    ok, data = cv2.imencode(".jpeg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 70])
    assert ok
    (adult / "normal" / "img-0.png").unlink()
    (adult / "normal" / "img-0.jpeg").write_bytes(data.tobytes())
    external = tmp_path / "external"
    (external / "normal").mkdir(parents=True)
    shutil.copy(adult / "normal" / "img-1.png", external / "normal" / "x.png")
    result = build(root, negatives={"normal": ("covid_collection", "adult")},
                   folders={"adult": adult}, external={"ext": external})
    excluded = pd.read_csv(root / "data" / "datasets" / "excluded.csv")
    reasons = {row.source: row.reason.split(":", 1)[0] for row in excluded.itertuples()}
    assert reasons["covid-chestxray-dataset/images/neg-300.jpg"] == "patient_in_heldout"
    assert reasons[str(adult / "normal" / "img-0.jpeg")] == "conflicting_labels"
    assert reasons[str(adult / "normal" / "img-1.png")] == "same_picture_as_external"
    manifest = result.manifest
    assert result.report["negative_sources"]["covid_normal"] == {"adult": 6,
                                                                 "covid_collection": 2}
    covid_2 = manifest[manifest["patient_id"] == "covid-2"]
    assert covid_2.empty  # the picture is labelled COVID and normal: neither trains
    # 8 COVID training images (covid-2's two left out): balanced by 2 + 6
    assert result.report["images"]["covid_normal"] == {"covid": 8, "normal": 8}


def test_a_folder_copy_of_a_held_out_kermany_picture_never_trains(tmp_path: Path) -> None:
    """Every Kermany train NORMAL is held out (copy.heldout_normal=20); the adult folder holds a
    re-encoded copy of one of them: same patient group, so it stays out of training."""
    root = make_tree(tmp_path)
    adult = make_folder(tmp_path / "adult", {"normal": 12})
    kermany = root / "data" / "raw" / "chest_xray" / "train" / "NORMAL" / "IM-0001-0001.jpeg"
    pixels = cv2.imread(str(kermany), cv2.IMREAD_GRAYSCALE)
    ok, data = cv2.imencode(".jpeg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 70])
    assert ok
    copy = adult / "normal" / "copy-of-kermany.jpeg"
    copy.write_bytes(data.tobytes())
    result = build(root, normal=20, negatives={"normal": ("adult",)}, folders={"adult": adult})
    manifest = result.manifest
    held = manifest[(manifest["set"] == "heldout") & (manifest["label"] == "normal")]
    assert "chest_xray/train/NORMAL/IM-0001-0001.jpeg" in set(held["source"])
    training = manifest[manifest["set"] == "covid_normal"]
    assert str(copy) not in set(training["source"])
    assert result.report["negative_sources"]["covid_normal"] == {"adult": 10}
    check_disjoint(manifest)


def test_sources_that_cannot_balance_or_do_not_exist_say_what_to_change(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    make_collection_negatives(root, {"normal": 2, "pneumonia": 0}, {})
    adult = make_folder(tmp_path / "adult", {"normal": 3})
    with pytest.raises(PipelineError) as info:
        build(root, negatives={"normal": ("covid_collection", "adult")},
              folders={"adult": adult})
    message = str(info.value)
    assert ("covid_normal needs 10 normal images to balance its 10 COVID training images, but "
            "the sources in copy.negatives.normal have only covid_collection 2, adult 3 usable "
            "images") in message
    assert "copy.max_per_class" in message
    with pytest.raises(PipelineError, match=r"negatives_selected.csv: no pneumonia rows .* "
                                            r"`copy.negatives.pneumonia` lists covid_collection"):
        build(root, negatives={"pneumonia": ("covid_collection", "kermany")}, out="b")
    with pytest.raises(PipelineError, match=r"`copy.folders.gone`: folder .*gone not found"):
        build(root, negatives={"normal": ("gone", "kermany")}, out="c",
              folders={"gone": tmp_path / "gone"})
    with pytest.raises(PipelineError, match=r"adult/pneumonia: no image files there; "
                                            r"`copy.negatives.pneumonia` lists adult"):
        build(root, negatives={"pneumonia": ("adult",)}, out="d", folders={"adult": adult})
