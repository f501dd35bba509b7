"""Leakage audit: sets that must be disjoint share no patient, no file and no near-copy.

The seed's NORMAL "validation" images were training images, and its split put one patient's X-rays
on both sides. Both inflate every reported number. This module checks, after the split, every pair
of image groups that must be disjoint:

- within each model: ``train`` vs ``val``, ``train`` vs ``test`` and ``val`` vs ``test``;
- each model's ``train`` vs every held-out group (``heldout/<label>``, ``kermany_test/<label>``)
  and every external folder (``external/<name>``);
- with ``model.weights: xray``, the images the pretrain stage learns from (``pretrain/<label>``,
  :mod:`covid_xray.pretrain_data`) vs every held-out group, external folder and both models'
  ``val`` and ``test`` splits (the models' training images are training data for it too).

Two models' training sets legitimately share the COVID images, so groups of different models are
never compared with each other.

Three kinds of leak are counted: a ``patient`` present in both groups (one row per patient), an
``identical`` file (same SHA-256 of the bytes, one row per pair of files) and a ``near_duplicate``
(a different file that is the same picture re-encoded, resized or recompressed, by the criterion of
:mod:`covid_xray.duplicates`: pHash within ``max_distance`` bits AND 32 x 32 correlation >=
:data:`~covid_xray.duplicates.MIN_CORRELATION`; one row per pair of files). copy_images keeps the
sets disjoint by construction with the same criterion; this audit is the independent check of the
written files (it reads the patient ids of the split files, not copy_images' merged groups).
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covid_xray.config import MODEL_NAMES, Paths, resolve_path
from covid_xray.duplicates import (
    MIN_CORRELATION,
    Fingerprint,
    external_image_files,
    fingerprint_files,
    near_duplicates,
)
from covid_xray.errors import PipelineError

log = logging.getLogger(__name__)

LEAK_KINDS: tuple[str, ...] = ("patient", "identical", "near_duplicate")
LEAKS_HEADER: tuple[str, ...] = ("kind", "group_a", "path_a", "group_b", "path_b", "distance",
                                 "patient_id")
PAIRS_HEADER: tuple[str, ...] = ("group_a", "group_b", "images_a", "images_b", *LEAK_KINDS)
SPLIT_COLUMNS: tuple[str, ...] = ("path", "label", "patient_id", "sha256", "split")
MANIFEST_COLUMNS: tuple[str, ...] = ("path", "set", "label", "patient_id", "sha256")
HELDOUT_SETS: tuple[str, ...] = ("heldout", "kermany_test")
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
PRETRAIN = "pretrain"
"""Group prefix of the pretrain stage's images (``pretrain/normal``, ``pretrain/pneumonia``)."""


@dataclass(frozen=True)
class AuditImage:
    """One image of one group: where it is, how to report it, and who it belongs to."""

    group: str
    path: str
    """As reported: relative to the project root (posix) when inside it, else absolute."""
    file: Path
    patient_id: str = ""


@dataclass(frozen=True, order=True)
class Leak:
    """One offending pair; ``distance`` is the pHash distance (near-duplicates only)."""

    kind: str
    group_a: str
    path_a: str
    group_b: str
    path_b: str
    distance: int | None = None
    patient_id: str = ""

    def row(self) -> tuple[Any, ...]:
        distance = "" if self.distance is None else self.distance
        return (self.kind, self.group_a, self.path_a, self.group_b, self.path_b, distance,
                self.patient_id)

    def describe(self) -> str:
        if self.kind == "patient":
            return (f"patient {self.patient_id!r} in {self.group_a} ({self.path_a}) and "
                    f"{self.group_b} ({self.path_b})")
        if self.kind == "identical":
            return f"identical file: {self.group_a} {self.path_a} == {self.group_b} {self.path_b}"
        return (f"near-duplicate (pHash distance {self.distance}): {self.group_a} {self.path_a} ~ "
                f"{self.group_b} {self.path_b}")


@dataclass
class AuditResult:
    """Everything the stage writes: the leaks, the pairs checked, group sizes, unreadable files."""

    leaks: list[Leak]
    pairs: list[tuple[str, str]]
    group_sizes: dict[str, int]
    max_distance: int
    files: int = 0
    """Files hashed (by path: a COVID image linked into both models' folders counts twice)."""
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(LEAK_KINDS, 0)
        for leak in self.leaks:
            counts[leak.kind] += 1
        counts["total"] = len(self.leaks)
        return counts

    def pair_counts(self) -> dict[tuple[str, str], dict[str, int]]:
        """Leaks per checked pair and kind (zeros included), in check order."""
        per_pair = {pair: dict.fromkeys(LEAK_KINDS, 0) for pair in self.pairs}
        for leak in self.leaks:
            per_pair[(leak.group_a, leak.group_b)][leak.kind] += 1
        return per_pair

    def pair_rows(self) -> list[tuple[Any, ...]]:
        """data/audit/pairs.csv: every pair checked, its sizes and counts (for the report)."""
        return [(a, b, self.group_sizes[a], self.group_sizes[b], *counts.values())
                for (a, b), counts in self.pair_counts().items()]

    def summary(self, fail_on_leak: bool) -> dict[str, Any]:
        """metrics/audit.json: totals, and per-pair counts for the pairs that leaked only (a
        column per clean pair would bury `dvc exp show`; data/audit/pairs.csv has them all)."""
        return {
            "leaks": self.counts(),
            "passed": not self.leaks,
            "fail_on_leak": fail_on_leak,
            "phash_max_distance": self.max_distance,
            "min_correlation": MIN_CORRELATION,
            "files": self.files,
            "groups": len(self.group_sizes),
            "pairs_checked": len(self.pairs),
            "pairs": {pair_key(a, b): counts for (a, b), counts in self.pair_counts().items()
                      if any(counts.values())},
            "unreadable": len(self.unreadable),
            "unreadable_files": [f"{path}: {reason}" for path, reason in self.unreadable],
        }


def pair_key(group_a: str, group_b: str) -> str:
    return f"{group_a} vs {group_b}"


# ---------------------------------------------------------------------------------------------
# Groups


def display_path(file: Path, root: Path) -> str:
    """Root-relative posix path when the file is under ``root`` (portable), else absolute."""
    try:
        return file.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return file.resolve().as_posix()


def read_table(path: Path, required: Sequence[str], what: str) -> list[dict[str, str]]:
    """Read a CSV produced by an earlier stage; a missing file or column is a clear error."""
    if not path.is_file():
        raise PipelineError(f"{path}: not found; it is the {what}. Run the earlier stages first "
                            "(`dvc repro`).")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in required if column not in (reader.fieldnames or [])]
        if missing:
            raise PipelineError(f"{path}: missing column(s) {', '.join(missing)} "
                                f"(expected {', '.join(required)}; see docs/contracts.md)")
        return [{key: (value or "").strip() for key, value in row.items() if key} for row in reader]


def _image(group: str, datasets: Path, root: Path, table: Path, line: int,
           row: Mapping[str, str]) -> AuditImage:
    file = datasets / row["path"]
    if not file.is_file():
        raise PipelineError(f"{table}: line {line} lists {row['path']!r}, which is not in "
                            f"{datasets}; the data stages are out of date: re-run `dvc repro`.")
    return AuditImage(group=group, path=display_path(file, root), file=file,
                      patient_id=row.get("patient_id", ""))


def split_groups(split_csv: Path, model: str, datasets: Path, root: Path
                 ) -> dict[str, list[AuditImage]]:
    """Groups ``<model>/train``, ``<model>/val``, ``<model>/test`` (empty ones omitted)."""
    groups: dict[str, list[AuditImage]] = defaultdict(list)
    for line, row in enumerate(read_table(split_csv, SPLIT_COLUMNS, f"split of {model}"), start=2):
        if row["split"] not in SPLIT_NAMES:
            raise PipelineError(f"{split_csv}: line {line}: split {row['split']!r} is not one of "
                                f"{', '.join(SPLIT_NAMES)}")
        group = f"{model}/{row['split']}"
        groups[group].append(_image(group, datasets, root, split_csv, line, row))
    return dict(groups)


def heldout_groups(manifest: Path, datasets: Path, root: Path) -> dict[str, list[AuditImage]]:
    """``heldout/<label>`` and ``kermany_test/<label>`` from the manifest."""
    groups: dict[str, list[AuditImage]] = defaultdict(list)
    for line, row in enumerate(read_table(manifest, MANIFEST_COLUMNS, "image manifest"), start=2):
        if row["set"] in HELDOUT_SETS:
            group = f"{row['set']}/{row['label']}"
            groups[group].append(_image(group, datasets, root, manifest, line, row))
    return dict(groups)


def external_group(name: str, folder: Path, root: Path) -> list[AuditImage]:
    """Every (non-hidden) file under an external folder; externals carry no patient ids."""
    group = f"external/{name}"
    return [AuditImage(group=group, path=display_path(f, root), file=f)
            for f in external_image_files(folder)]


def pretrain_groups(images: Iterable[tuple[str, Path, str]], root: Path
                    ) -> dict[str, list[AuditImage]]:
    """``pretrain/<label>`` from ``(label, file, patient_id)`` of the pretrain's images
    (:func:`covid_xray.pretrain_data.select_images`)."""
    groups: dict[str, list[AuditImage]] = defaultdict(list)
    for label, file, patient_id in images:
        group = f"{PRETRAIN}/{label}"
        groups[group].append(AuditImage(group=group, path=display_path(file, root), file=file,
                                        patient_id=patient_id))
    return dict(groups)


def collect_groups(paths: Paths, external: Mapping[str, str],
                   models: Sequence[str] = MODEL_NAMES,
                   pretrain: Iterable[tuple[str, Path, str]] = ()) -> dict[str, list[AuditImage]]:
    """All groups of a pipeline run: each model's splits, the held-out sets, existing externals,
    and the pretrain's images (``(label, file, patient_id)``, when it runs)."""
    groups: dict[str, list[AuditImage]] = {}
    for model in models:
        groups.update(split_groups(paths.split_file(model), model, paths.datasets, paths.root))
    groups.update(heldout_groups(paths.manifest, paths.datasets, paths.root))
    groups.update(pretrain_groups(pretrain, paths.root))
    for name, folder in sorted(external.items()):
        location = resolve_path(folder, paths.root)
        if location.is_dir():
            groups[f"external/{name}"] = external_group(name, location, paths.root)
        else:
            log.info("external set %s: %s does not exist, not audited", name, location)
    return groups


def disjoint_pairs(groups: Iterable[str], models: Sequence[str] = MODEL_NAMES
                   ) -> list[tuple[str, str]]:
    """The pairs of groups that must not share anything (see the module docstring)."""
    names = set(groups)
    pairs: list[tuple[str, str]] = []
    outside = sorted(n for n in names if n.split("/", 1)[0] in (*HELDOUT_SETS, "external"))
    for model in models:
        train, val, test = (f"{model}/{s}" for s in SPLIT_NAMES)
        within = [(train, val), (train, test), (val, test)]
        pairs += [(a, b) for a, b in within if a in names and b in names]
        if train in names:
            pairs += [(train, other) for other in outside]
    held = [f"{model}/{s}" for model in models for s in ("val", "test")]
    for group in sorted(n for n in names if n.split("/", 1)[0] == PRETRAIN):
        pairs += [(group, other) for other in [*outside, *held] if other in names]
    return pairs


# ---------------------------------------------------------------------------------------------
# The audit


def find_leaks(groups: Mapping[str, Sequence[AuditImage]], prints: Mapping[Path, Fingerprint],
               pairs: Sequence[tuple[str, str]], max_distance: int,
               min_correlation: float = MIN_CORRELATION) -> list[Leak]:
    """Every shared patient, identical file and near-duplicate between the given pairs.

    Near-duplicate: :func:`covid_xray.duplicates.near_duplicates` between different files (pHash
    within ``max_distance`` bits AND 32 x 32 correlation >= ``min_correlation``).
    """
    leaks: list[Leak] = []
    for name_a, name_b in pairs:
        a, b = groups[name_a], groups[name_b]
        leaks += _patient_leaks(name_a, a, name_b, b)
        by_sha: dict[str, list[AuditImage]] = defaultdict(list)
        for image in b:
            by_sha[prints[image.file].sha256].append(image)
        for image in a:
            for other in by_sha.get(prints[image.file].sha256, []):
                leaks.append(Leak("identical", name_a, image.path, name_b, other.path))
        prints_a = [prints[i.file] for i in a]
        prints_b = [prints[i.file] for i in b]
        for i, j, distance in near_duplicates(prints_a, prints_b, max_distance, min_correlation):
            if prints_a[i].sha256 != prints_b[j].sha256:  # identical files: counted above
                leaks.append(Leak("near_duplicate", name_a, a[i].path, name_b, b[j].path,
                                  distance=distance))
    order = {kind: k for k, kind in enumerate(LEAK_KINDS)}
    return sorted(leaks, key=lambda leak: (order[leak.kind], leak))


def _patient_leaks(name_a: str, a: Sequence[AuditImage], name_b: str,
                   b: Sequence[AuditImage]) -> list[Leak]:
    """One leak per patient id present in both groups (shown with its first image on each side)."""
    first_a: dict[str, str] = {}
    for image in sorted(a, key=lambda i: i.path):
        if image.patient_id:
            first_a.setdefault(image.patient_id, image.path)
    first_b: dict[str, str] = {}
    for image in sorted(b, key=lambda i: i.path):
        if image.patient_id:
            first_b.setdefault(image.patient_id, image.path)
    return [Leak("patient", name_a, first_a[p], name_b, first_b[p], patient_id=p)
            for p in sorted(first_a.keys() & first_b.keys())]


def run_audit(groups: Mapping[str, Sequence[AuditImage]], max_distance: int,
              models: Sequence[str] = MODEL_NAMES, progress: bool = True) -> AuditResult:
    """Hash every image once and check every must-be-disjoint pair of groups."""
    pairs = disjoint_pairs(groups, models)
    files = (image.file for images in groups.values() for image in images)
    prints, unreadable = fingerprint_files(files, progress=progress, desc="audit: hashing")
    leaks = find_leaks(groups, prints, pairs, max_distance)
    root_paths = {image.file: image.path for images in groups.values() for image in images}
    return AuditResult(leaks=leaks, pairs=pairs,
                       group_sizes={name: len(images) for name, images in groups.items()},
                       max_distance=max_distance, files=len(prints),
                       unreadable=[(root_paths[f], reason) for f, reason in unreadable])


def leak_error(result: AuditResult, leaks_csv: str, limit: int = 20) -> str:
    """The message that stops the pipeline: counts, the first ``limit`` pairs, where the rest is."""
    counts = result.counts()
    kinds = ", ".join(f"{counts[k]} {k.replace('_', '-')}" for k in LEAK_KINDS if counts[k])
    lines = [f"leakage audit: {counts['total']} leak(s) between sets that must be disjoint "
             f"({kinds}):"]
    lines += [f"  {leak.describe()}" for leak in result.leaks[:limit]]
    if len(result.leaks) > limit:
        lines.append(f"  ... and {len(result.leaks) - limit} more; see {leaks_csv}")
    else:
        lines.append(f"  (full list in {leaks_csv})")
    lines.append("Fix the data stages (selection, copy, split) so these sets are disjoint, or set "
                 "`audit.fail_on_leak: false` to continue and only report them.")
    return "\n".join(lines)


def audit_dir(paths: Paths) -> Path:
    """data/audit/: leaks.csv (every offending pair) and pairs.csv (every pair checked)."""
    return paths.data / "audit"
