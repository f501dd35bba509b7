"""The pretrain stage's images and its cost when off: planted patients never reach it, the audit
covers it, and with model.weights != xray it writes a constant marker without TensorFlow."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import yaml
from test_audit import Tree, clean_tree, xray_like

from covid_xray.audit import collect_groups as audit_groups
from covid_xray.audit import run_audit
from covid_xray.datasets import POOL_COLUMNS
from covid_xray.errors import PipelineError
from covid_xray.params import PretrainParams
from covid_xray.pretrain_data import NOT_USED, select_images

KERMANY_CLASS = {"normal": "NORMAL", "pneumonia": "PNEUMONIA"}


class PoolTree(Tree):
    """The audit's miniature layout plus copy_images' kermany_pool.csv and its raw files."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.pool: list[list[str]] = []

    def add_pool(self, name: str, label: str, patient: str, group: str | None = None,
                 image_file: Path | None = None) -> str:
        source = f"chest_xray/train/{KERMANY_CLASS[label]}/{name}"
        file = self.paths.raw / source
        file.parent.mkdir(parents=True, exist_ok=True)
        if image_file is not None:
            file.write_bytes(image_file.read_bytes())
        else:
            self.seed += 1
            assert cv2.imwrite(str(file), xray_like(5000 + self.seed))
        sha = hashlib.sha256(file.read_bytes()).hexdigest()
        self.pool.append([source, label, patient, group or patient, sha])
        return source

    def save(self) -> None:
        super().save()
        with self.paths.kermany_pool.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(POOL_COLUMNS)
            writer.writerows(self.pool)


def pool_tree(root: Path) -> tuple[PoolTree, dict[str, str]]:
    """clean_tree's sets, and a pool with planted images of patients the pretrain must not see.

    Returns the tree and the expected ``use`` per pool source (before any cap)."""
    tree = clean_tree(root, PoolTree(root))
    assert isinstance(tree, PoolTree)
    expected: dict[str, str] = {}
    for i in range(4):
        for label in ("normal", "pneumonia"):
            expected[tree.add_pool(f"free-{label}-{i}.png", label, f"free-{label}-{i}")] = "ok"
    # covid_normal's TRAIN patient: training data for the pretrain too
    expected[tree.add_pool("n0-more.png", "normal", "normal-0")] = "ok"
    planted = [  # (name, label, patient id, patient group, reason)
        ("heldout-group.png", "normal", "kermany-other", "normal-h0", "patient_in_heldout"),
        ("kt-patient.png", "pneumonia", "pneu-t1", "pneu-t1", "patient_in_kermany_test"),
        ("test-patient.png", "normal", "normal-7", "merged-7", "patient_in_covid_normal_test"),
        ("val-group.png", "pneumonia", "kermany-x", "pneu-5", "patient_in_covid_pneumonia_val"),
    ]
    for name, label, patient, group, reason in planted:
        expected[tree.add_pool(name, label, patient, group)] = f"left_out: {reason}"
    tree.save()
    return tree, expected


def test_only_allowed_patients_are_used(tmp_path: Path) -> None:
    tree, expected = pool_tree(tmp_path)
    chosen = select_images(tree.paths, PretrainParams(max_per_class=0, val_size=0.25, seed=3))
    uses = dict(zip(chosen.pool["source"], chosen.pool["use"], strict=True))
    assert {s: u for s, u in uses.items() if u.startswith("left_out")} == {
        s: u for s, u in expected.items() if u != "ok"}
    assert {s for s, u in uses.items() if u in ("train", "val")} == {
        s for s, u in expected.items() if u == "ok"}
    val = chosen.part("val")
    assert set(val["label"]) == {"normal", "pneumonia"}  # val patients per class
    assert not set(val["patient_group"]) & set(chosen.part("train")["patient_group"])
    counts = chosen.counts()
    assert counts["left_out"]["total"] == 4 and counts["left_out"]["patient_in_heldout"] == 1
    assert counts["kermany_test"] == {"normal": 0, "pneumonia": 3}
    assert sorted(chosen.test["label"]) == ["pneumonia"] * 3
    # seeded: the same params choose the same images, another seed other val patients
    again = select_images(tree.paths, PretrainParams(max_per_class=0, val_size=0.25, seed=3))
    assert again.pool.equals(chosen.pool)


def test_cap_per_class_draws_a_seeded_subset(tmp_path: Path) -> None:
    tree, _ = pool_tree(tmp_path)
    chosen = select_images(tree.paths, PretrainParams(max_per_class=2, val_size=0, seed=1))
    picked = chosen.chosen
    assert picked.groupby("label").size().to_dict() == {"normal": 2, "pneumonia": 2}
    assert (chosen.pool["use"] == "not_drawn").sum() == (5 - 2) + (4 - 2)
    other = select_images(tree.paths, PretrainParams(max_per_class=2, val_size=0, seed=2))
    assert set(other.chosen["source"]) != set(picked["source"])


def test_too_few_allowed_images_is_a_clear_error(tmp_path: Path) -> None:
    tree = clean_tree(tmp_path, PoolTree(tmp_path))
    assert isinstance(tree, PoolTree)
    tree.add_pool("a.png", "normal", "normal-7")  # a test patient: left out
    tree.add_pool("b.png", "pneumonia", "p1")
    tree.save()
    with pytest.raises(PipelineError, match=r"kermany_pool\.csv: only 0 normal image"):
        select_images(tree.paths, PretrainParams())


def test_audit_covers_the_pretrain_images(tmp_path: Path) -> None:
    tree, _ = pool_tree(tmp_path)
    images = select_images(tree.paths, PretrainParams(max_per_class=0, val_size=0)).audited()
    assert len(images) == 9  # 4 + 4 free images and covid_normal's training patient
    clean = run_audit(audit_groups(tree.paths, {}, pretrain=images), 4, progress=False)
    assert not clean.leaks
    checked = {(a, b) for a, b in clean.pairs if a.startswith("pretrain/")}
    assert ("pretrain/normal", "covid_normal/test") in checked
    assert ("pretrain/pneumonia", "kermany_test/pneumonia") in checked
    assert ("pretrain/normal", "heldout/covid") in checked
    assert not any(b.endswith("/train") for _, b in checked)  # training data is allowed

    # planted: a copy_images bug lets in a Kermany-test picture and a val patient
    test_image = tree.paths.datasets / "kermany_test/pneumonia/kt0.jpeg"
    leaky = [*images,
             ("pneumonia", tree.paths.raw / tree.add_pool("copy.jpeg", "pneumonia", "z",
                                                          image_file=test_image), "z"),
             ("normal", tree.paths.raw / tree.add_pool("v.png", "normal", "normal-5"),
              "normal-5")]
    found = run_audit(audit_groups(tree.paths, {}, pretrain=leaky), 4, progress=False)
    kinds = {(leak.kind, leak.group_a, leak.group_b) for leak in found.leaks}
    assert kinds == {("identical", "pretrain/pneumonia", "kermany_test/pneumonia"),
                     ("patient", "pretrain/normal", "covid_normal/val")}


def test_off_writes_a_constant_marker_without_tensorflow(tmp_path: Path,
                                                         repo_root: Path) -> None:
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    assert params["model"]["weights"] != "xray"  # off by default
    params["pretrain"]["epochs"] = 99  # a pretrain param changes nothing while it is off
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    probe = ("import runpy, sys\n"
             "runpy.run_module('stages.pretrain', run_name='__main__')\n"
             "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, "
             "'TensorFlow was imported'\n")
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    digests = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "no pretraining" in result.stderr
        info = tmp_path / "models/pretrain/info.json"
        digests.append(hashlib.sha256(info.read_bytes()).hexdigest())
        assert json.loads(info.read_text()) == NOT_USED
        assert sorted(p.name for p in (tmp_path / "models/pretrain").iterdir()) == ["info.json"]
        assert json.loads((tmp_path / "metrics/pretrain/metrics.json").read_text()) == {}
    assert digests[0] == digests[1]
