"""featurize: one backbone pass per unique image (+ rotated copies), streamed into a memmap.

Also home of ``make_project``: a tiny synthetic project (class folders, manifest, splits, an
external folder, params.yaml) in the docs/contracts.md formats, used by the training and
evaluation tests too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from pipeline_helpers import MANIFEST_HEADER, SPLIT_HEADER

from covid_xray.config import Paths
from covid_xray.errors import PipelineError
from covid_xray.features import (
    FeatureStore,
    compute_features,
    featurize,
    plan_rows,
    read_manifest,
    rotation_angle,
)
from covid_xray.imaging import prepare_file
from covid_xray.modeling import build_backbone
from covid_xray.params import load_params

TINY_PARAMS: dict[str, Any] = {
    "base": {"seed": 42},
    "model": {"backbone": "vgg16", "weights": "none", "img_size": 32, "pool_size": 1,
              "dense_nodes": 16},
    "featurize": {"augment_copies": 1, "batch_size": 32},
    "train": {"seed": 42, "init_lr": 0.001, "epochs": 3, "batch_size": 16, "dropout": 0.5,
              "rotation_deg": 15},
    "threshold": {"rule": "youden", "sensitivity": 0.95},
    "validate": {"gradcam_images": 1, "bootstrap": 50,
                 "external": {"ext": "data/raw/external"}},
}


def synthetic_xray(label: str, rng: np.random.Generator, size: int = 48,
                   style: str = "internal") -> np.ndarray:
    """Grey image whose class is learnable: COVID bright with a blob, normal dark, pneumonia
    mid-grey with stripes; ``style='external'`` shifts contrast like another scanner."""
    base = {"covid": 165.0, "normal": 80.0, "pneumonia": 120.0}[label]
    image = np.full((size, size), base + rng.normal(0, 8), dtype=np.float64)
    yy, xx = np.mgrid[:size, :size]
    if label == "covid":
        cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
        image += 60.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 6) ** 2))
    elif label == "pneumonia":
        image += 25.0 * np.sin(yy / 2.0 + rng.uniform(0, 6))
    image += rng.normal(0, 10, size=image.shape)
    if style == "external":
        image = 0.7 * image + 40.0
    return np.clip(image, 0, 255).astype(np.uint8)


def _write(path: Path, image: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_project(root: Path, n_train: int = 24, n_heldout: int = 4, n_external: int = 6,
                 params: dict[str, Any] | None = None, seed: int = 0) -> Paths:
    """Write a complete tiny project under ``root`` (data/datasets, data/splits, params.yaml).

    The COVID images are shared by both models (identical files, so identical sha256), as
    copy_images does with hard links. Split: every 5th image test, every 5th + 1 val.
    """
    rng = np.random.default_rng(seed)
    datasets = root / "data" / "datasets"
    manifest: list[list[Any]] = []

    def add(set_name: str, label: str, name: str, image: np.ndarray) -> str:
        rel = f"{set_name}/{label}/{name}.png"
        sha = _write(datasets / rel, image)
        manifest.append([rel, set_name, label, f"p-{name}", sha, f"raw/{name}.png",
                         image.shape[1], image.shape[0], "png", f"p-{name}", "kermany"])
        return sha

    covid = [synthetic_xray("covid", rng) for _ in range(n_train)]
    splits: dict[str, list[list[Any]]] = {"covid_normal": [], "covid_pneumonia": []}
    for model, negative in (("covid_normal", "normal"), ("covid_pneumonia", "pneumonia")):
        negatives = [synthetic_xray(negative, rng) for _ in range(n_train)]
        for label, images in (("covid", covid), (negative, negatives)):
            for i, image in enumerate(images):
                name = f"{label}{i:03d}"
                sha = add(model, label, name, image)
                side = "test" if i % 5 == 0 else "val" if i % 5 == 1 else "train"
                splits[model].append([f"{model}/{label}/{name}.png", label, f"p-{name}", sha,
                                      side, f"p-{name}"])
    for set_name, labels in (("heldout", ("covid", "normal", "pneumonia")),
                             ("kermany_test", ("normal", "pneumonia"))):
        for label in labels:
            for i in range(n_heldout):
                add(set_name, label, f"{set_name}-{label}{i:02d}", synthetic_xray(label, rng))
    external = root / "data" / "raw" / "external"
    for label in ("covid", "normal"):
        for i in range(n_external):
            _write(external / label / f"ext-{label}{i:02d}.png",
                   synthetic_xray(label, rng, size=56, style="external"))

    pd.DataFrame(manifest, columns=MANIFEST_HEADER).to_csv(datasets / "manifest.csv",
                                                           index=False)
    (root / "data" / "splits").mkdir(parents=True, exist_ok=True)
    for model, rows in splits.items():
        pd.DataFrame(rows, columns=SPLIT_HEADER).to_csv(root / "data" / "splits" / f"{model}.csv",
                                                        index=False)
    merged = yaml.safe_load(yaml.safe_dump(TINY_PARAMS))
    for section, values in (params or {}).items():
        merged.setdefault(section, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    return Paths(root)


@contextlib.contextmanager
def featurized_project(root: Path) -> Iterator[Paths]:
    """:func:`make_project` + featurize under ``root``, with the working directory there (stages
    find their files from it) for as long as the context lasts: for module-scoped fixtures."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("COVID_XRAY_ROOT", raising=False)
        paths = make_project(root)
        featurize(paths, load_params(paths.params), progress=False)
        yield paths


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Paths:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COVID_XRAY_ROOT", raising=False)
    return make_project(tmp_path)


def test_plan_dedupes_shared_images_and_augments_only_training_sets(project: Paths) -> None:
    manifest = read_manifest(project.manifest)
    plan = plan_rows(manifest, augment_copies=2, rotation_deg=15, seed=42)
    unique = manifest["sha256"].nunique()
    assert unique < len(manifest)  # COVID images listed under both models
    training = set(manifest.loc[manifest["set"].isin(["covid_normal", "covid_pneumonia"]),
                                "sha256"])
    assert len(plan) == unique + 2 * len(training)
    assert not plan.duplicated(["sha256", "copy"]).any()
    assert list(plan["row"]) == list(range(len(plan)))
    copies = plan[plan["copy"] > 0]
    assert set(copies["sha256"]) == training
    assert copies["angle"].abs().max() <= 15 and copies["angle"].abs().min() > 0
    assert (plan[plan["copy"] == 0]["angle"] == 0).all()
    # Angles depend only on (seed, image, copy): dropping other images changes none of them.
    again = plan_rows(manifest.iloc[::2], augment_copies=2, rotation_deg=15, seed=42)
    merged = again.merge(plan, on=["sha256", "copy"], suffixes=("", "_full"))
    assert len(merged) == len(again) and (merged["angle"] == merged["angle_full"]).all()
    other_seed = plan_rows(manifest, augment_copies=2, rotation_deg=15, seed=7)
    assert not np.allclose(other_seed["angle"], plan["angle"])
    assert len(plan_rows(manifest, 2, rotation_deg=0, seed=42)) == unique


def test_rotation_angle_is_uniform_in_range() -> None:
    angles = np.array([rotation_angle(f"{i:064x}", 1, 10.0, 3) for i in range(2000)])
    assert angles.min() >= -10 and angles.max() <= 10
    assert abs(angles.mean()) < 0.5 and angles.std() == pytest.approx(20 / np.sqrt(12), rel=0.1)


def test_featurize_writes_exact_backbone_features(project: Paths) -> None:
    params = load_params(project.params)
    info = featurize(project, params, progress=False)
    store = FeatureStore.open(project.features)
    manifest = read_manifest(project.manifest)
    external = store.index[store.index["path"].str.startswith("../raw/external/")]
    assert info["external_images"] == len(external) == 12  # make_project: 6 covid + 6 normal
    assert (external["copy"] == 0).all()  # scored only: no rotated copies
    assert info["images"] == manifest["sha256"].nunique() + len(external)
    assert info["rows"] == len(store.index) == store.features.shape[0]
    assert store.features.dtype == np.float32 and store.feature_shape == (1, 1, 512)
    assert info["images_per_s"] > 0 and info["skipped"] == []  # timing returned, not stored
    assert not list(project.data.glob(".features*"))  # no temp folder left
    # The saved weights are the backbone the features came from; rows match a fresh forward
    # pass of the shared preprocessing (original and rotated copy).
    backbone = build_backbone("vgg16", 32, "none", seed=123)
    backbone.load_weights(store.backbone_weights)
    for copy in (0, 1):
        entry = store.index[store.index["copy"] == copy].iloc[3]
        image = prepare_file(project.datasets / entry["path"], 32, angle_deg=entry["angle"])
        expected = np.asarray(backbone(image[np.newaxis], training=False))[0]
        np.testing.assert_allclose(store.features[entry["row"]], expected, rtol=1e-4,
                                   atol=1e-6 * float(np.abs(expected).max()))
    rows, owner = store.rows(list(manifest["sha256"].iloc[:5]), with_copies=True)
    assert len(rows) == len(set(rows)) and set(owner) <= set(range(5))
    # take() (plain file reads, runs coalesced) returns exactly the memmap's rows, in order.
    wanted = np.array([7, 3, 4, 5, 0, 7, len(store.index) - 1, 6])
    np.testing.assert_array_equal(store.take(wanted), np.asarray(store.features[wanted]))
    assert store.take(np.zeros(0, dtype=np.int64)).shape == (0, 1, 1, 512)
    with pytest.raises(IndexError):
        store.take(np.array([len(store.index)]))


def test_featurize_skips_and_lists_undecodable_images(project: Paths) -> None:
    manifest = read_manifest(project.manifest)
    broken = manifest[manifest["set"] == "heldout"].iloc[0]
    (project.datasets / broken["path"]).write_bytes(b"not an image at all")
    params = load_params(project.params)
    info = featurize(project, params, progress=False)
    assert [s["path"] for s in info["skipped"]] == [broken["path"]]
    store = FeatureStore.open(project.features)
    assert broken["sha256"] not in set(store.index["sha256"])
    assert store.features.shape[0] == len(store.index) == info["rows"]
    assert list(store.index["row"]) == list(range(len(store.index)))
    with pytest.raises(PipelineError, match="no cached features"):
        store.rows([broken["sha256"]])


def test_streaming_writes_incrementally_and_jit_matches_plain(project: Paths,
                                                              tmp_path: Path) -> None:
    manifest = read_manifest(project.manifest)
    plan = plan_rows(manifest.iloc[:10], augment_copies=1, rotation_deg=10, seed=1)
    backbone = build_backbone("vgg16", 32, "none", seed=1)
    out_a, out_b = tmp_path / "a.npy", tmp_path / "b.npy"
    a = compute_features(plan, project.datasets, backbone, out_a, batch_size=4,
                         jit_compile=True, progress=False)
    compute_features(plan, project.datasets, backbone, out_b, batch_size=7,
                     jit_compile=False, progress=False)
    assert len(a.index) == len(plan)  # last partial batch padded and trimmed
    np.testing.assert_allclose(np.load(out_a), np.load(out_b), rtol=1e-4, atol=1e-7)


def test_missing_manifest_and_columns_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="copy_images"):
        read_manifest(tmp_path / "manifest.csv")
    (tmp_path / "manifest.csv").write_text("path,set\nx.png,heldout\n")
    with pytest.raises(PipelineError, match="label, sha256"):
        read_manifest(tmp_path / "manifest.csv")
    with pytest.raises(PipelineError, match="featurize"):
        FeatureStore.open(tmp_path / "features")


def test_stage_main_is_reproducible_byte_for_byte(project: Paths) -> None:
    """Same inputs -> identical data/features files (so DVC sees an unchanged output)."""
    from stages.featurize import main

    assert Path(os.getcwd()) == project.root
    main()
    first = {p.name: p.read_bytes() for p in sorted(project.features.iterdir())}
    metrics = json.loads((project.metrics / "featurize.json").read_text())
    assert metrics["rows"] == len(pd.read_csv(project.features / "index.csv"))
    assert metrics["images_per_s"] > 0 and metrics["skipped"] == 0
    info = json.loads(first["info.json"])
    assert "seconds" not in info and "images_per_s" not in info
    main()
    again = {p.name: p.read_bytes() for p in sorted(project.features.iterdir())}
    assert set(first) == {"backbone.weights.h5", "features.npy", "index.csv", "info.json"}
    assert first == again
