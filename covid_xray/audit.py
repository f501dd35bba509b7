"""Leakage audit: sets that must be disjoint share no patient, no file and no near-copy.

The seed's NORMAL "validation" images were training images, and its split put one patient's X-rays
on both sides. Both inflate every reported number. This module checks, after the split, every pair
of image groups that must be disjoint:

- within each model: ``train`` vs ``val``, ``train`` vs ``test`` and ``val`` vs ``test``;
- each model's ``train`` vs every held-out group (``heldout/<label>``, ``kermany_test/<label>``)
  and every external folder (``external/<name>``).

Two models' training sets legitimately share the COVID images, so groups of different models are
never compared with each other.

Three kinds of leak are counted: a ``patient`` present in both groups (one row per patient), an
``identical`` file (same SHA-256 of the bytes, one row per pair of files) and a ``near_duplicate``
(a different file whose perceptual hash is within ``max_distance`` bits: the same X-ray re-encoded,
resized or recompressed; one row per pair of files).

Why near-duplicates need a second look: a 64-bit pHash keeps only the 8 x 8 lowest DCT frequencies,
and on chest X-rays those are dominated by the anatomy every film shares. Measured on the demo data
(487 images), 0.3% of pairs of DIFFERENT images lie within 4 bits (hundreds of false alarms a run);
on the real sample none do (closest pair: 8 bits). So a pHash match is only a candidate, confirmed
when the two 32 x 32 grey reductions the hash was computed from correlate at
>= :data:`MIN_CORRELATION` (re-encoded or resized copies: >= 0.996 even at 96 px; different demo
images: <= 0.988; different real X-rays: <= 0.92).
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from covid_xray.config import MODEL_NAMES, Paths, resolve_path
from covid_xray.errors import PipelineError
from covid_xray.imaging import ImageDecodeError, load_image

log = logging.getLogger(__name__)

LEAK_KINDS: tuple[str, ...] = ("patient", "identical", "near_duplicate")
LEAKS_HEADER: tuple[str, ...] = ("kind", "group_a", "path_a", "group_b", "path_b", "distance",
                                 "patient_id")
PAIRS_HEADER: tuple[str, ...] = ("group_a", "group_b", "images_a", "images_b", *LEAK_KINDS)
SPLIT_COLUMNS: tuple[str, ...] = ("path", "label", "patient_id", "sha256", "split")
MANIFEST_COLUMNS: tuple[str, ...] = ("path", "set", "label", "patient_id", "sha256")
HELDOUT_SETS: tuple[str, ...] = ("heldout", "kermany_test")
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
PHASH_SIZE = 32
"""Images are reduced to 32 x 32 grey before the DCT; the 8 x 8 lowest frequencies give 64 bits."""
MIN_CORRELATION = 0.993
"""Pearson correlation of the 32 x 32 reductions that confirms a pHash candidate (see above)."""


@dataclass(frozen=True)
class AuditImage:
    """One image of one group: where it is, how to report it, and who it belongs to."""

    group: str
    path: str
    """As reported: relative to the project root (posix) when inside it, else absolute."""
    file: Path
    patient_id: str = ""


@dataclass(frozen=True)
class Fingerprint:
    """Content identity of a file: SHA-256 of its bytes, 64-bit pHash and the unit-norm,
    zero-mean 32 x 32 grey reduction it came from (both None: undecodable)."""

    sha256: str
    phash: int | None
    thumb: np.ndarray | None = field(default=None, compare=False, repr=False)


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
# Perceptual hash


def reduce_image(image: np.ndarray) -> np.ndarray:
    """Grey, 32 x 32 (area interpolation), float32: the common input of pHash and correlation."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (PHASH_SIZE, PHASH_SIZE), interpolation=cv2.INTER_AREA)
    return small.astype(np.float32)


def phash_reduced(small: np.ndarray) -> int:
    coefficients = cv2.dct(small)[:8, :8]
    bits = (coefficients > np.median(coefficients)).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def phash(image: np.ndarray) -> int:
    """64-bit DCT perceptual hash (the classic pHash, as in the ``imagehash`` package).

    Grey, 32 x 32, 2-D DCT, keep the 8 x 8 lowest frequencies, one bit per coefficient: above
    their median or not. Re-encoding, recompression and small resizes move few bits.
    """
    return phash_reduced(reduce_image(image))


def unit_thumb(small: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm flattening: the dot product of two is their Pearson correlation
    (all zeros for a flat image, which then correlates with nothing)."""
    flat = small.ravel().astype(np.float32)
    flat = flat - flat.mean()
    norm = float(np.linalg.norm(flat))
    return flat / norm if norm > 1e-6 else np.zeros_like(flat)


def signature(image: np.ndarray) -> tuple[int, np.ndarray]:
    """pHash and unit thumbnail of one decoded image (one reduction for both)."""
    small = reduce_image(image)
    return phash_reduced(small), unit_thumb(small)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def near_pairs(hashes_a: np.ndarray, hashes_b: np.ndarray, max_distance: int,
               chunk: int = 1024) -> Iterator[tuple[int, int, int]]:
    """All ``(i, j, distance)`` with Hamming distance <= ``max_distance`` (exact, chunked).

    XOR + popcount on uint64 over the full cross product: for 5,000 x 5,000 images that is 25 M
    operations in NumPy, about a second, and never more than ``chunk`` x ``len(b)`` in memory.
    """
    a = np.asarray(hashes_a, dtype=np.uint64)
    b = np.asarray(hashes_b, dtype=np.uint64)
    if a.size == 0 or b.size == 0:
        return
    for start in range(0, a.size, chunk):
        distances = np.bitwise_count(a[start:start + chunk, None] ^ b[None, :])
        rows, cols = np.nonzero(distances <= max_distance)
        for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
            yield start + i, j, int(distances[i, j])


def fingerprint_files(files: Iterable[Path], progress: bool = True
                      ) -> tuple[dict[Path, Fingerprint], list[tuple[Path, str]]]:
    """SHA-256 and pHash of every file (each decoded once; identical bytes hashed once).

    Undecodable files keep their SHA-256 (identical-file checks still apply) with ``phash`` None,
    and are returned with the reason so the stage can list them.
    """
    unique = sorted(set(files))
    prints: dict[Path, Fingerprint] = {}
    by_sha: dict[str, tuple[int | None, np.ndarray | None]] = {}
    unreadable: list[tuple[Path, str]] = []
    for file in tqdm(unique, desc="audit: hashing", unit="img", disable=not progress):
        data = file.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if sha not in by_sha:
            try:
                by_sha[sha] = signature(load_image(file))
            except ImageDecodeError as exc:
                by_sha[sha] = (None, None)
                unreadable.append((file, str(exc).removeprefix(f"{file}: ")))
        hash64, thumb = by_sha[sha]
        prints[file] = Fingerprint(sha256=sha, phash=hash64, thumb=thumb)
    return prints, unreadable


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
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".")
                                              for part in p.relative_to(folder).parts))
    return [AuditImage(group=group, path=display_path(f, root), file=f) for f in files]


def collect_groups(paths: Paths, external: Mapping[str, str],
                   models: Sequence[str] = MODEL_NAMES) -> dict[str, list[AuditImage]]:
    """All groups of a pipeline run: each model's splits, the held-out sets, existing externals."""
    groups: dict[str, list[AuditImage]] = {}
    for model in models:
        groups.update(split_groups(paths.split_file(model), model, paths.datasets, paths.root))
    groups.update(heldout_groups(paths.manifest, paths.datasets, paths.root))
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
    return pairs


# ---------------------------------------------------------------------------------------------
# The audit


def find_leaks(groups: Mapping[str, Sequence[AuditImage]], prints: Mapping[Path, Fingerprint],
               pairs: Sequence[tuple[str, str]], max_distance: int,
               min_correlation: float = MIN_CORRELATION) -> list[Leak]:
    """Every shared patient, identical file and near-duplicate between the given pairs.

    Near-duplicate: pHash within ``max_distance`` bits AND 32 x 32 correlation >=
    ``min_correlation`` (see the module docstring for why both).
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
        hashed_a = [i for i in a if prints[i.file].phash is not None]
        hashed_b = [i for i in b if prints[i.file].phash is not None]
        hashes_a = np.array([prints[i.file].phash for i in hashed_a], dtype=np.uint64)
        hashes_b = np.array([prints[i.file].phash for i in hashed_b], dtype=np.uint64)
        for i, j, distance in near_pairs(hashes_a, hashes_b, max_distance):
            image, other = hashed_a[i], hashed_b[j]
            fa, fb = prints[image.file], prints[other.file]
            if fa.sha256 != fb.sha256 and float(fa.thumb @ fb.thumb) >= min_correlation:
                leaks.append(Leak("near_duplicate", name_a, image.path, name_b, other.path,
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
    prints, unreadable = fingerprint_files(files, progress=progress)
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
