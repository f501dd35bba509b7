"""Leakage audit: planted duplicates, near-duplicates and shared patients are caught; clean data
passes; the stage writes its metrics before it fails."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from pipeline_helpers import MANIFEST_HEADER, SPLIT_HEADER

from covid_xray.audit import (
    AuditImage,
    Leak,
    collect_groups,
    disjoint_pairs,
    find_leaks,
    run_audit,
)
from covid_xray.config import Paths
from covid_xray.duplicates import (
    MIN_CORRELATION,
    Fingerprint,
    hamming,
    near_pairs,
    phash,
    signature,
)
from covid_xray.errors import PipelineError
from covid_xray.imaging import load_image


def xray_like(seed: int, size: int = 48) -> np.ndarray:
    """A grey image with its own large-scale structure (distinct pHash per seed)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(6, 6)).astype(np.float32)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 4, size=(size, size)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


class Tree:
    """A miniature data/datasets + data/splits layout, written like the data stages write it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths = Paths(root)
        self.manifest: list[list[str]] = []
        self.splits: dict[str, list[list[str]]] = {"covid_normal": [], "covid_pneumonia": []}
        self.seed = 0

    def write_image(self, rel: str, image: np.ndarray, quality: int = 95) -> Path:
        file = self.paths.datasets / rel
        file.parent.mkdir(parents=True, exist_ok=True)
        params = [cv2.IMWRITE_JPEG_QUALITY, quality] if file.suffix == ".jpeg" else []
        assert cv2.imwrite(str(file), image, params)
        return file

    def add(self, rel: str, set_name: str, label: str, patient: str,
            image: np.ndarray | None = None, split: dict[str, str] | None = None,
            quality: int = 95) -> Path:
        if image is None:
            self.seed += 1
            image = xray_like(self.seed)
        file = self.write_image(rel, image, quality)
        sha = hashlib.sha256(file.read_bytes()).hexdigest()
        self.manifest.append([rel, set_name, label, patient, sha, f"raw/{rel}",
                              str(image.shape[1]), str(image.shape[0]), "jpeg", patient,
                              "unknown"])
        for model, part in (split or {}).items():
            self.splits[model].append([rel, label, patient, sha, part, patient])
        return file

    def save(self) -> None:
        for path, header, rows in [(self.paths.manifest, MANIFEST_HEADER, self.manifest)] + [
                (self.paths.split_file(m), SPLIT_HEADER, rows) for m, rows in self.splits.items()]:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(header)
                writer.writerows(rows)


def clean_tree(root: Path, tree: Tree | None = None) -> Tree:
    """Two models sharing COVID training images (legitimately); splits, held-out sets disjoint."""
    tree = tree or Tree(root)
    for p in range(8):
        part = "train" if p < 5 else ("val" if p == 5 else "test")
        for k in range(2):
            image = xray_like(1000 + 10 * p + k)
            for model in ("covid_normal", "covid_pneumonia"):
                tree.add(f"{model}/covid/c{p}_{k}.jpeg", model, "covid", f"covid-{p}",
                         image=image, split={model: part})
    for p in range(8):
        part = "train" if p < 5 else ("val" if p == 5 else "test")
        tree.add(f"covid_normal/normal/n{p}.jpeg", "covid_normal", "normal", f"normal-{p}",
                 split={"covid_normal": part})
        tree.add(f"covid_pneumonia/pneumonia/q{p}.jpeg", "covid_pneumonia", "pneumonia",
                 f"pneu-{p}", split={"covid_pneumonia": part})
    for k in range(3):
        tree.add(f"heldout/covid/h{k}.jpeg", "heldout", "covid", f"covid-h{k}")
        tree.add(f"heldout/normal/hn{k}.jpeg", "heldout", "normal", f"normal-h{k}")
        tree.add(f"kermany_test/pneumonia/kt{k}.jpeg", "kermany_test", "pneumonia", f"pneu-t{k}")
    return tree


def audit_tree(tree: Tree, external: dict[str, str] | None = None, max_distance: int = 4):
    tree.save()
    return run_audit(collect_groups(tree.paths, external or {}), max_distance, progress=False)


def test_phash_survives_reencoding_and_resizing_but_separates_images(tmp_path: Path) -> None:
    image = xray_like(7, size=200)
    original, variant = tmp_path / "a.png", tmp_path / "b.jpeg"
    cv2.imwrite(str(original), image)
    cv2.imwrite(str(variant), cv2.resize(image, (188, 191)), [cv2.IMWRITE_JPEG_QUALITY, 40])
    same = hamming(phash(load_image(original)), phash(load_image(variant)))
    assert same <= 4
    others = [hamming(phash(xray_like(7, 200)), phash(xray_like(s, 200))) for s in range(20, 40)]
    assert min(others) > 12, others


def test_near_pairs_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, size=70, dtype=np.uint64)
    b = np.concatenate([a[:5] ^ np.uint64(0b1011), rng.integers(0, 2**63, 40, dtype=np.uint64)])
    fast = sorted(near_pairs(a, b, max_distance=3, chunk=16))
    slow = sorted((i, j, hamming(int(x), int(y))) for i, x in enumerate(a)
                  for j, y in enumerate(b) if hamming(int(x), int(y)) <= 3)
    assert fast == slow
    assert len(fast) >= 5


def test_phash_candidate_needs_pixel_correlation_to_count() -> None:
    """Chest X-rays share their low frequencies: equal pHashes alone are not a duplicate."""
    rng = np.random.default_rng(3)
    thumb = rng.normal(size=1024).astype(np.float32)
    thumb /= np.linalg.norm(thumb)
    other = rng.normal(size=1024).astype(np.float32)
    other -= (other @ thumb) * thumb
    other /= np.linalg.norm(other)
    close = thumb + 0.02 * other
    close /= np.linalg.norm(close)
    files = {name: Path(f"/x/{name}.png") for name in ("a", "same_hash_unrelated", "copy")}
    prints = {files["a"]: Fingerprint("1", 0b1011, thumb),
              files["same_hash_unrelated"]: Fingerprint("2", 0b1011, other),
              files["copy"]: Fingerprint("3", 0b1111, close)}
    groups = {"m/train": [AuditImage("m/train", "a", files["a"])],
              "m/test": [AuditImage("m/test", n, files[n])
                         for n in ("same_hash_unrelated", "copy")]}
    leaks = find_leaks(groups, prints, [("m/train", "m/test")], max_distance=4)
    assert leaks == [Leak("near_duplicate", "m/train", "a", "m/test", "copy", distance=1)]
    assert float(close @ thumb) >= MIN_CORRELATION


def test_pairs_compare_within_a_model_and_against_heldout_only() -> None:
    names = ["covid_normal/train", "covid_normal/val", "covid_normal/test",
             "covid_pneumonia/train", "covid_pneumonia/test", "heldout/normal",
             "external/other"]
    pairs = disjoint_pairs(names)
    assert ("covid_normal/train", "covid_normal/test") in pairs
    assert ("covid_normal/val", "covid_normal/test") in pairs
    assert ("covid_pneumonia/train", "heldout/normal") in pairs
    assert ("covid_normal/train", "external/other") in pairs
    assert not any(a.startswith("covid_normal") and b.startswith("covid_pneumonia")
                   for a, b in pairs)
    assert ("covid_pneumonia/train", "covid_pneumonia/val") not in pairs  # empty group


def test_clean_data_has_no_leaks(tmp_path: Path) -> None:
    result = audit_tree(clean_tree(tmp_path))
    assert result.leaks == []
    assert result.counts() == {"patient": 0, "identical": 0, "near_duplicate": 0, "total": 0}
    assert result.group_sizes["covid_normal/train"] == 15
    summary = result.summary(fail_on_leak=True)
    assert summary["passed"] is True and summary["pairs"] == {}
    # 32 COVID files (16 images x 2 model folders) + 16 negatives + 9 held-out
    assert summary["files"] == 57 and summary["pairs_checked"] == 12
    rows = {(a, b): rest for a, b, *rest in result.pair_rows()}
    assert rows[("covid_normal/train", "heldout/normal")] == [15, 3, 0, 0, 0]


def test_planted_identical_file_is_caught(tmp_path: Path) -> None:
    tree = clean_tree(tmp_path)
    source = tree.paths.datasets / "covid_normal/normal/n0.jpeg"  # a training image
    target = tree.paths.datasets / "heldout/normal/copy.jpeg"
    tree.add("heldout/normal/copy.jpeg", "heldout", "normal", "normal-new",
             image=cv2.imread(str(source), cv2.IMREAD_GRAYSCALE))
    shutil.copyfile(source, target)  # bytes identical to the training file, not re-encoded
    result = audit_tree(tree)
    assert result.counts()["identical"] == 1
    assert result.counts()["near_duplicate"] == 0  # an identical file is not counted twice
    assert result.leaks == [Leak("identical", "covid_normal/train",
                                 "data/datasets/covid_normal/normal/n0.jpeg", "heldout/normal",
                                 "data/datasets/heldout/normal/copy.jpeg")]


def test_planted_near_duplicate_is_caught(tmp_path: Path) -> None:
    tree = clean_tree(tmp_path)
    original = cv2.imread(str(tree.paths.datasets / "covid_pneumonia/pneumonia/q1.jpeg"),
                          cv2.IMREAD_GRAYSCALE)
    resized = cv2.resize(original, (45, 46), interpolation=cv2.INTER_AREA)
    tree.add("kermany_test/pneumonia/recompressed.jpeg", "kermany_test", "pneumonia",
             "pneu-other", image=resized, quality=50)
    result = audit_tree(tree)
    near = [leak for leak in result.leaks if leak.kind == "near_duplicate"]
    assert len(near) == 1 and result.counts()["total"] == 1
    assert near[0].group_a == "covid_pneumonia/train"
    assert near[0].path_a.endswith("q1.jpeg") and near[0].distance <= 4


def test_planted_shared_patient_is_caught(tmp_path: Path) -> None:
    tree = clean_tree(tmp_path)
    # covid-1 is a training patient of both models; a new image of theirs lands in one test set.
    tree.add("covid_normal/covid/c1_extra.jpeg", "covid_normal", "covid", "covid-1",
             split={"covid_normal": "test"})
    result = audit_tree(tree)
    assert result.counts() == {"patient": 1, "identical": 0, "near_duplicate": 0, "total": 1}
    leak = result.leaks[0]
    assert (leak.group_a, leak.group_b, leak.patient_id) == (
        "covid_normal/train", "covid_normal/test", "covid-1")


def test_external_folder_is_audited_and_missing_one_skipped(tmp_path: Path) -> None:
    tree = clean_tree(tmp_path)
    external = tmp_path / "ext"
    (external / "normal").mkdir(parents=True)
    shutil.copyfile(tree.paths.datasets / "covid_normal/covid/c0_0.jpeg",
                    external / "normal" / "x.jpeg")
    (external / "normal" / "notes.txt").write_text("not an image")
    result = audit_tree(tree, external={"adults": "ext", "absent": "nowhere"})
    identical = [leak for leak in result.leaks if leak.kind == "identical"]
    assert {(leak.group_a, leak.group_b) for leak in identical} == {
        ("covid_normal/train", "external/adults"), ("covid_pneumonia/train", "external/adults")}
    assert "external/absent" not in result.group_sizes
    assert [path for path, _ in result.unreadable] == ["ext/normal/notes.txt"]


def test_missing_listed_file_is_a_clear_error(tmp_path: Path) -> None:
    tree = clean_tree(tmp_path)
    tree.save()
    (tree.paths.datasets / "covid_normal/normal/n3.jpeg").unlink()
    with pytest.raises(PipelineError, match=r"covid_normal\.csv: line \d+ lists "
                                            r"'covid_normal/normal/n3\.jpeg'"):
        collect_groups(tree.paths, {})


def run_stage_main(root: Path, monkeypatch: pytest.MonkeyPatch, fail_on_leak: bool) -> None:
    from stages.audit import main

    (root / "params.yaml").write_text(yaml.safe_dump(
        {"audit": {"fail_on_leak": fail_on_leak, "phash_max_distance": 4},
         "validate": {"external": {"demo_external": "data/raw/external"}}}))
    monkeypatch.delenv("COVID_XRAY_ROOT", raising=False)
    monkeypatch.chdir(root)
    main()


def test_stage_fails_on_leak_after_writing_its_report(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    tree = clean_tree(tmp_path)
    for k in range(25):  # 25 shared patients: the message lists 20 and points to the file
        tree.add(f"heldout/normal/leak{k}.jpeg", "heldout", "normal", f"normal-{k % 5}")
    tree.save()
    with pytest.raises(PipelineError) as info:
        run_stage_main(tmp_path, monkeypatch, fail_on_leak=True)
    message = str(info.value)
    assert "5 patient" in message and "normal-0" in message
    # 25 images of 5 training patients: leaks are counted per patient.
    metrics = json.loads((tmp_path / "metrics/audit.json").read_text())
    assert metrics["leaks"]["patient"] == 5 and metrics["passed"] is False
    rows = list(csv.DictReader((tmp_path / "data/audit/leaks.csv").open()))
    assert len(rows) == 5 and {r["kind"] for r in rows} == {"patient"}


def test_stage_lists_twenty_then_points_to_the_file(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    tree = clean_tree(tmp_path)
    for k in range(25):
        source = tree.paths.datasets / "covid_normal/normal/n0.jpeg"
        tree.add(f"heldout/normal/dup{k}.jpeg", "heldout", "normal", f"x-{k}",
                 image=cv2.imread(str(source), cv2.IMREAD_GRAYSCALE))
        shutil.copyfile(source, tree.paths.datasets / f"heldout/normal/dup{k}.jpeg")
    tree.save()
    with pytest.raises(PipelineError) as info:
        run_stage_main(tmp_path, monkeypatch, fail_on_leak=True)
    message = str(info.value)
    assert message.count("identical file:") == 20
    assert "... and 5 more; see data/audit/leaks.csv" in message
    assert len(list(csv.DictReader((tmp_path / "data/audit/leaks.csv").open()))) == 25


def test_stage_passes_on_clean_data_and_reports_without_failing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = clean_tree(tmp_path / "clean")
    tree.save()
    run_stage_main(tree.root, monkeypatch, fail_on_leak=True)
    metrics = json.loads((tree.root / "metrics/audit.json").read_text())
    assert metrics["leaks"]["total"] == 0 and metrics["passed"] is True

    leaky = clean_tree(tmp_path / "leaky")
    leaky.add("covid_normal/normal/again.jpeg", "covid_normal", "normal", "normal-0",
              split={"covid_normal": "test"})
    leaky.save()
    run_stage_main(leaky.root, monkeypatch, fail_on_leak=False)  # reports, does not fail
    metrics = json.loads((leaky.root / "metrics/audit.json").read_text())
    assert metrics["leaks"]["patient"] == 1 and metrics["fail_on_leak"] is False
    assert metrics["pairs"] == {"covid_normal/train vs covid_normal/test": {
        "patient": 1, "identical": 0, "near_duplicate": 0}}
    pairs = list(csv.DictReader((leaky.root / "data/audit/pairs.csv").open()))
    assert len(pairs) == 12
    assert [p["patient"] for p in pairs if p["group_b"] == "covid_normal/test"] == ["1", "0"]


def test_real_xrays_copies_found_distinct_films_not(xray_sample: Path) -> None:
    """On real films: resized + recompressed copies match, different X-rays never do."""
    files = sorted((xray_sample / "chest_xray").glob("*/*/*.jpeg"))[:16]
    originals = [signature(load_image(f)) for f in files]
    for index, file in enumerate(files[:6]):
        image = load_image(file)
        height, width = image.shape[:2]
        small = cv2.resize(image, (int(width * 0.9), int(height * 0.93)),
                           interpolation=cv2.INTER_AREA)
        ok, data = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 50])
        assert ok
        copy = signature(cv2.imdecode(data, cv2.IMREAD_COLOR))
        assert hamming(copy[0], originals[index][0]) <= 4
        assert float(copy[1] @ originals[index][1]) >= MIN_CORRELATION
    for i in range(len(files)):
        for j in range(i + 1, len(files)):
            assert (hamming(originals[i][0], originals[j][0]) > 4
                    or float(originals[i][1] @ originals[j][1]) < MIN_CORRELATION)
