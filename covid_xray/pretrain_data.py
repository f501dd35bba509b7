"""Which Kermany images the ``pretrain`` stage may learn from, and its "not used" marker.

The pretrain (``model.weights: xray``) teaches a backbone NORMAL vs PNEUMONIA on Kermany's
``chest_xray/train`` before the COVID classifiers are trained on its features. Whatever it sees
must stay out of every set the pipeline reports on, by the same patient rules as the data stages:

- copy_images' ``kermany_pool.csv`` already holds only images whose patient group (patient id plus
  every patient sharing a picture with it) holds no held-out or Kermany-test image, and no picture
  of an external set;
- here the patient groups of both models' ``val`` and ``test`` splits are left out too (their
  Kermany negatives come from the same folder): the backbone must not have seen the images the
  threshold is chosen on or the test metrics are computed on. The models' ``train`` images are
  training data, and may be used.

Every pool image is listed with what became of it (``images.csv``: ``train``, ``val``,
``not_drawn`` or ``left_out: <reason>``). The audit checks the chosen images independently
(:func:`covid_xray.audit.collect_groups`). No TensorFlow here: the audit imports this module, and
with the pretrain off the stage writes :data:`NOT_USED` without loading TensorFlow.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covid_xray.config import MODEL_NAMES, Paths
from covid_xray.datasets import EVALUATION_SETS, POOL_COLUMNS
from covid_xray.errors import PipelineError
from covid_xray.io import atomic_dir, read_json, read_stage_csv, require_stage_file, write_json
from covid_xray.params import PretrainParams
from covid_xray.splitting import GROUP, pick_groups, read_manifest

LABELS: tuple[str, ...] = ("normal", "pneumonia")
"""Pretraining classes, in output order: the model's score is P(pneumonia)."""
POSITIVE_LABEL = "pneumonia"
HELD_SPLITS: tuple[str, ...] = ("val", "test")
"""Split rows of the COVID models whose patients the pretrain leaves out."""
IMAGES_FILE = "images.csv"
IMAGES_COLUMNS: tuple[str, ...] = ("source", "label", "patient_id", "patient_group", "sha256",
                                   "use")
INFO_FILE = "info.json"
WEIGHTS_FILE = "backbone.weights.h5"
NOT_USED: dict[str, Any] = {
    "used": False,
    "why": "model.weights is not `xray`: no backbone was pretrained. Run "
           "`dvc exp run -S model.weights=xray` to pretrain one on Kermany NORMAL vs PNEUMONIA.",
}
"""``models/pretrain/info.json`` when the pretrain is off. Constant, so the folder's hash never
changes while it is off and featurize (which depends on it) is not re-run by a pretrain param."""


def _rng(seed: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


@dataclass
class PretrainImages:
    """The pretrain's images: every pool image with its ``use``, and the Kermany test images."""

    pool: pd.DataFrame
    """``POOL_COLUMNS`` + ``use`` + ``file`` (absolute path under data/raw)."""
    test: pd.DataFrame
    """Kermany test rows of the manifest (``path`` under data/datasets, ``file``, ``label``)."""

    def part(self, use: str) -> pd.DataFrame:
        return self.pool[self.pool["use"] == use]

    @property
    def chosen(self) -> pd.DataFrame:
        """The images the pretrain learns from (its ``train`` and ``val`` parts)."""
        return self.pool[self.pool["use"].isin(("train", "val"))]

    def counts(self) -> dict[str, Any]:
        """Images per part and label, and the images left out per reason (for info/metrics)."""
        uses = self.pool["use"].str.split(":", n=1).str[0]
        out: dict[str, Any] = {"pool": len(self.pool)}
        for use in ("train", "val"):
            part = self.pool[uses == use]
            out[use] = {label: int((part["label"] == label).sum()) for label in LABELS}
            out[f"{use}_patient_groups"] = int(part[GROUP].nunique())
        out["not_drawn"] = int((uses == "not_drawn").sum())
        reasons = self.pool.loc[uses == "left_out", "use"].str.split(": ", n=1).str[1]
        out["left_out"] = {"total": len(reasons),
                           **{str(k): int(v) for k, v in sorted(reasons.value_counts().items())}}
        out["kermany_test"] = {label: int((self.test["label"] == label).sum())
                               for label in LABELS}
        return out

    def audited(self) -> list[tuple[str, Path, str]]:
        """``(label, file, patient_id)`` of the chosen images, for the audit's ``pretrain``
        groups (:func:`covid_xray.audit.collect_groups`)."""
        chosen = self.chosen
        return list(zip(chosen["label"], map(Path, chosen["file"]), chosen["patient_id"],
                        strict=True))

    def listing(self) -> list[tuple[str, ...]]:
        """Rows of ``images.csv``."""
        return list(self.pool[list(IMAGES_COLUMNS)].itertuples(index=False, name=None))


def held_groups(paths: Paths) -> tuple[dict[str, str], dict[str, str]]:
    """Patient groups and patient ids the pretrain must not see, each with the reason.

    From the manifest (held-out and Kermany-test rows) and both models' split files (val and
    test rows).
    """
    groups: dict[str, str] = {}
    patients: dict[str, str] = {}

    def hold(rows: pd.DataFrame, reason: str) -> None:  # the first reason found is kept
        for group in rows[GROUP]:
            groups.setdefault(group, reason)
        for patient in rows["patient_id"]:
            patients.setdefault(patient, reason)

    manifest = read_manifest(paths.manifest)
    for set_name in EVALUATION_SETS:
        hold(manifest[manifest["set"] == set_name], f"patient_in_{set_name}")
    for model in MODEL_NAMES:
        split = read_stage_csv(paths.split_file(model), ("split", "patient_id", GROUP), "split")
        for name in HELD_SPLITS:
            hold(split[split["split"] == name], f"patient_in_{model}_{name}")
    return groups, patients


def select_images(paths: Paths, params: PretrainParams) -> PretrainImages:
    """The pretrain's images: the pool minus held patients, at most ``max_per_class`` per label
    (a seeded draw), split into ``train`` and ``val`` by patient group (``val_size``)."""
    pool = read_stage_csv(paths.kermany_pool, POOL_COLUMNS, "copy_images")
    unknown = sorted(set(pool["label"]) - set(LABELS))
    if unknown:
        raise PipelineError(f"{paths.kermany_pool}: column label has {unknown[0]!r}; expected "
                            f"{' or '.join(LABELS)}. Re-run copy_images.")
    pool = pool.sort_values("source", ignore_index=True)
    pool["file"] = [str(paths.raw / source) for source in pool["source"]]
    groups, patients = held_groups(paths)
    reason = [groups.get(g) or patients.get(p) or ""
              for g, p in zip(pool[GROUP], pool["patient_id"], strict=True)]
    pool["use"] = [f"left_out: {r}" if r else "" for r in reason]
    for label in LABELS:
        free = pool.index[(pool["use"] == "") & (pool["label"] == label)]
        if params.max_per_class and len(free) > params.max_per_class:
            picks = _rng(params.seed, f"pretrain/{label}").permutation(len(free))
            pool.loc[free[np.sort(picks[params.max_per_class:])], "use"] = "not_drawn"
    chosen = pool[pool["use"] == ""]
    for label in LABELS:
        count = int((chosen["label"] == label).sum())
        if count < 2:
            raise PipelineError(
                f"{paths.kermany_pool}: only {count} {label} image(s) left for the pretrain "
                f"after leaving out held-out, Kermany-test and val/test patients "
                f"({(pool['use'].str.startswith('left_out')).sum()} left out, listed in "
                f"models/pretrain/{IMAGES_FILE} when it runs); add Kermany training images "
                "(demo: raise data.demo.kermany_train) or use model.weights none")
    pool.loc[chosen.index, "use"] = "train"
    if params.val_size > 0:
        for label in LABELS:
            part = chosen[chosen["label"] == label]
            sizes = part.groupby(GROUP).size().to_dict()
            if len(sizes) >= 2:
                val = pick_groups(sizes, params.val_size,
                                  _rng(params.seed, f"pretrain/{label}/val"))
                pool.loc[part.index[part[GROUP].isin(val)], "use"] = "val"
    manifest = read_manifest(paths.manifest)
    test = manifest[(manifest["set"] == "kermany_test") & manifest["label"].isin(LABELS)].copy()
    test["file"] = [str(paths.datasets / path) for path in test["path"]]
    return PretrainImages(pool=pool, test=test.reset_index(drop=True))


def pretrain_info(folder: Path) -> dict[str, Any]:
    """``models/pretrain/info.json`` (how the backbone was trained), or :data:`NOT_USED`."""
    require_stage_file(folder / INFO_FILE, "pretrain")
    return read_json(folder / INFO_FILE)


def write_not_used(paths: Paths) -> None:
    """The stage's outputs when the pretrain is off: :data:`NOT_USED` and empty metrics."""
    with atomic_dir(paths.pretrain) as folder:
        write_json(folder / INFO_FILE, NOT_USED)
    with atomic_dir(paths.pretrain_metrics) as folder:
        write_json(folder / "metrics.json", {})
