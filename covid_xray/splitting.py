"""Train / val / test lists per model, stratified by label and grouped by patient.

The seed split images with ``train_test_split``, so one patient's films sat on both sides and the
test score measured recognition of patients as much as of disease. Here whole patient groups are
assigned, per class, with a seeded greedy fill that lands close to the requested share; the
plain stratified image split is kept behind ``split.group_by_patient: false`` for comparison.
A patient group (the manifest's ``patient_group``, from copy_images) is a patient id plus every
patient id that shares a picture with it, so one picture published under two ids cannot sit on
both sides either.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covid_xray.config import MODEL_NAMES, class_names
from covid_xray.errors import PipelineError
from covid_xray.io import read_stage_csv, write_csv
from covid_xray.params import SplitParams

SPLIT_COLUMNS: tuple[str, ...] = ("path", "label", "patient_id", "sha256", "split",
                                  "patient_group")
SPLITS: tuple[str, ...] = ("train", "val", "test")
GROUP = "patient_group"
"""The unit the split keeps together (docs/contracts.md)."""
_MANIFEST_COLUMNS = ("path", "set", "label", "patient_id", "sha256", GROUP)


def read_manifest(path: Path, required: Sequence[str] = _MANIFEST_COLUMNS) -> pd.DataFrame:
    """The copy_images manifest (all strings), checked for the ``required`` columns.

    The one reader of data/datasets/manifest.csv: split, featurize and validate call it.
    """
    return read_stage_csv(path, required, "copy_images")


def read_excluded(path: Path) -> pd.DataFrame:
    """copy_images' excluded.csv (``source, reason``): training images left out before the split."""
    return read_stage_csv(path, ("source", "reason"), "copy_images")


READ_SPLIT_COLUMNS: tuple[str, ...] = ("path", "label", "sha256", "split", "patient_group")


def read_split(path: Path, model_name: str) -> pd.DataFrame:
    """``data/splits/<model>.csv``, checked: contract columns, known labels and split names."""
    frame = read_stage_csv(path, READ_SPLIT_COLUMNS, "split")
    labels = set(class_names(model_name))
    bad_label = frame[~frame["label"].isin(labels)]
    if not bad_label.empty:
        raise PipelineError(f"{path}: column label has {bad_label['label'].iloc[0]!r} (row of "
                            f"{bad_label['path'].iloc[0]}); {model_name} expects only "
                            f"{' / '.join(sorted(labels))}")
    bad_split = frame[~frame["split"].isin(SPLITS)]
    if not bad_split.empty:
        raise PipelineError(f"{path}: column split has {bad_split['split'].iloc[0]!r}; "
                            f"expected one of {', '.join(SPLITS)}")
    if frame[frame["split"] == "train"]["label"].nunique() < 2:
        raise PipelineError(f"{path}: the train split needs images of both classes "
                            f"({' and '.join(sorted(labels))}); check copy_images/split")
    return frame


def _rng(seed: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


def pick_groups(sizes: dict[str, int], share: float, rng: np.random.Generator,
                min_left: int = 1) -> set[str]:
    """Choose whole groups (patients) holding as close to ``share`` of all images as possible.

    Groups are visited in a seeded random order and taken while they do not overshoot the target;
    at the end one more group is taken if that brings the total closer. At least one group is
    always taken and at least ``min_left`` are left, so callers pass ``min_left + 1`` or more.
    """
    names = sorted(sizes)
    if len(names) <= min_left:
        raise ValueError(f"need more than {min_left} groups, got {len(names)}")
    total = sum(sizes.values())
    target = max(1.0, share * total)
    order = [names[i] for i in rng.permutation(len(names))]
    chosen: list[str] = []
    filled = 0
    for name in order:
        if len(chosen) == len(names) - min_left:
            break
        if filled + sizes[name] <= target:
            chosen.append(name)
            filled += sizes[name]
    rest = [n for n in order if n not in chosen]
    if len(rest) > min_left:
        best = min(rest, key=lambda n: abs(filled + sizes[n] - target))
        if not chosen or abs(filled + sizes[best] - target) < abs(filled - target):
            chosen.append(best)
    return set(chosen)


def _too_few(model: str, label: str, images: int, patients: int, needed: int,
             grouped: bool, val_size: float) -> PipelineError:
    unit = "patients" if grouped else "images"
    sides = "train, val and test" if val_size > 0 else "train and test"
    options = (["set split.val_size: 0"] if val_size > 0 else []) + (
        ["set split.group_by_patient: false"] if grouped else []) + [
        "add images of this class"]
    advice = options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]
    return PipelineError(
        f"{model}: class `{label}` has {images} images of {patients} patients, too few for a "
        f"split into {sides} (needs at least {needed} {unit}); {advice}")


def split_grouped(frame: pd.DataFrame, model: str, params: SplitParams,
                  seed: int) -> pd.Series:
    """Per class: test patient groups (``test_size`` of the images), then val groups from the
    rest."""
    split = pd.Series("train", index=frame.index, dtype=object)
    needed = 3 if params.val_size > 0 else 2
    for label, part in frame.groupby("label", sort=True):
        sizes = part.groupby(GROUP).size().to_dict()
        if len(sizes) < needed:
            raise _too_few(model, str(label), len(part), len(sizes), needed, True,
                           params.val_size)
        test = pick_groups(sizes, params.test_size, _rng(seed, f"{model}/{label}/test"),
                           min_left=needed - 1)
        split[part.index[part[GROUP].isin(test)]] = "test"
        if params.val_size > 0:
            rest = {p: n for p, n in sizes.items() if p not in test}
            val = pick_groups(rest, params.val_size, _rng(seed, f"{model}/{label}/val"))
            split[part.index[part[GROUP].isin(val)]] = "val"
    return split


def split_images(frame: pd.DataFrame, model: str, params: SplitParams, seed: int) -> pd.Series:
    """The seed's split: stratified by label over images (``random_state=seed``), no grouping."""
    from sklearn.model_selection import train_test_split  # ~2 s import; only this path needs it

    needed = 3 if params.val_size > 0 else 2
    for label, part in frame.groupby("label", sort=True):
        if len(part) < needed:
            raise _too_few(model, str(label), len(part), part["patient_id"].nunique(), needed,
                           False, params.val_size)
    labels = frame["label"]
    split = pd.Series("train", index=frame.index, dtype=object)
    try:
        train_idx, test_idx = train_test_split(frame.index, test_size=params.test_size,
                                               stratify=labels, random_state=seed)
        split[test_idx] = "test"
        if params.val_size > 0:
            rest = labels[train_idx]
            _, val_idx = train_test_split(rest.index, test_size=params.val_size, stratify=rest,
                                          random_state=seed)
            split[val_idx] = "val"
    except ValueError as exc:  # sklearn: a side would get fewer images than classes
        raise PipelineError(
            f"{model}: {len(frame)} images ({labels.value_counts().to_dict()}) are too few for "
            f"split.test_size={params.test_size} / split.val_size={params.val_size} ({exc}); "
            "raise the sizes or add data") from exc
    return split


def split_model(manifest: pd.DataFrame, model: str, params: SplitParams,
                seed: int) -> pd.DataFrame:
    """The rows of ``model``'s training set with a ``split`` column (contract columns, by path)."""
    frame = manifest[manifest["set"] == model].sort_values("path", ignore_index=True)
    if frame.empty:
        raise PipelineError(f"manifest has no rows for set {model}; re-run copy_images")
    if frame["label"].nunique() < 2:
        raise PipelineError(f"{model}: only class(es) {sorted(set(frame['label']))} in the "
                            "manifest; a classifier needs two. Re-run copy_images.")
    splitter = split_grouped if params.group_by_patient else split_images
    frame = frame.assign(split=splitter(frame, model, params, seed))
    return frame[list(SPLIT_COLUMNS)]


def split_report(splits: dict[str, pd.DataFrame], params: SplitParams, seed: int,
                 excluded: pd.DataFrame | None = None) -> dict[str, Any]:
    """``metrics/split.json``: images and patients per split and label, overlap checks, patient
    groups merged by shared pictures, and the training images copy_images left out before the
    split (``excluded``: its excluded.csv) per reason."""
    report: dict[str, Any] = {"seed": seed, "group_by_patient": params.group_by_patient,
                              "test_size": params.test_size, "val_size": params.val_size}
    if excluded is not None:
        reasons = excluded["reason"].str.split(":", n=1).str[0].value_counts()
        report["excluded_before_split"] = {"total": len(excluded),
                                           **{str(k): int(v) for k, v in
                                              sorted(reasons.items())}}
    for model, frame in splits.items():
        images: dict[str, dict[str, int]] = {}
        patients: dict[str, dict[str, int]] = {}
        for name in SPLITS:
            part = frame[frame["split"] == name]
            if part.empty and name == "val":
                continue
            images[name] = {str(k): int(v) for k, v in part.groupby("label").size().items()}
            patients[name] = {str(k): int(v) for k, v in
                              part.groupby("label")["patient_id"].nunique().items()}
        sides_per_patient = frame.groupby("patient_id")["split"].nunique()
        sides_per_group = frame.groupby(GROUP)["split"].nunique()
        sides_per_image = frame.groupby("sha256")["split"].nunique()
        ids_per_group = frame.groupby(GROUP)["patient_id"].nunique()
        report[model] = {
            "images": images,
            "patients": patients,
            "test_share": round(float((frame["split"] == "test").mean()), 4),
            "patient_overlap": int((sides_per_patient > 1).sum()),
            "group_overlap": int((sides_per_group > 1).sum()),
            "image_overlap": int((sides_per_image > 1).sum()),
            "groups_merged": int((ids_per_group > 1).sum()),
            "images_regrouped": int((frame[GROUP] != frame["patient_id"]).sum()),
        }
    return report


def split_all(manifest: pd.DataFrame, params: SplitParams, seed: int,
              models: Sequence[str] = MODEL_NAMES) -> dict[str, pd.DataFrame]:
    """Split every model's set; raises :class:`PipelineError` on the first class too small."""
    return {model: split_model(manifest, model, params, seed) for model in models}


def write_splits(splits: dict[str, pd.DataFrame], folder: Path) -> None:
    """One ``<model>.csv`` per model in ``folder`` (columns of the contract)."""
    for model, frame in splits.items():
        write_csv(folder / f"{model}.csv", SPLIT_COLUMNS,
                  list(frame[list(SPLIT_COLUMNS)].itertuples(index=False, name=None)))


def split_summary(report: dict[str, Any], models: Sequence[str] = MODEL_NAMES) -> str:
    """One log line: per model the images on each side and the patient-overlap check."""
    parts = []
    for model in models:
        entry = report[model]
        sides = " / ".join(f"{name} {sum(entry['images'][name].values())}"
                           for name in SPLITS if name in entry["images"])
        parts.append(f"{model}: {sides} (patient overlap {entry['patient_overlap']})")
    grouping = "grouped by patient" if report["group_by_patient"] else "NOT grouped by patient"
    return f"split {grouping}: " + "; ".join(parts)
