"""Building the per-model class folders and the held-out folders from the raw datasets.

The seed's sampler copied the first N files a glob returned, so its "validation" NORMAL images were
training images. Here every draw is seeded, held-out images come from patients no training folder
uses, identical files are removed by content hash before any draw, and the result is checked
again by hash before the folder is swapped in. Every image is decoded and checked first, with the
server's own decode and image-level checks (``imaging.decode_checked``): a file the server would
refuse (not an image, too large, truncated, corrupt, too small, colour, blank, page, noise) is
listed in ``skipped.csv`` with the same reason name, never copied.

Disjoint by construction: public collections publish one picture twice (ieee8023 under two patient
ids, re-encoded) and re-splits of Kermany put one patient in both ``train/`` and ``test/``. So,
before any draw, every decoded image is put in a *patient group*: the connected component of
images linked by patient id, identical bytes or a near-duplicate (:mod:`covid_xray.duplicates`,
the audit's own criterion). A training image is left out (``excluded.csv``, with its reason) when
its group holds a held-out or Kermany-test image, when its group holds another label, or when it is
the same picture as an external-set image. Kermany held-out images are drawn by whole groups, and
the split groups by ``patient_group``, so no patient and no picture can sit on both sides.

Negatives from several sources (``copy.negatives``): each model's negative class is drawn from the
listed sources, ``kermany`` (the seed's), ``covid_collection`` (the COVID collection's own
non-COVID rows, from the same papers and websites: same-source negatives) and labelled folders of
adult X-rays (``copy.folders``). The count still balances the COVID training images; it is shared
equally among the sources, a source with fewer images giving all it has and the others making up
the rest (:func:`share_equally`). Every source goes through the same decode, patient grouping,
near-duplicate grouping and leave-out rules, and each image keeps its ``origin`` (the url domain of
a collection row, ``kermany``, or the folder's name) for cross-source validation.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from covid_xray.config import (
    MODEL_NAMES,
    NEGATIVE_CLASS,
    NO_EXTERNAL_FILE,
    POSITIVE_CLASS,
    resolve_path,
)
from covid_xray.duplicates import (
    Fingerprint,
    external_image_files,
    fingerprint,
    fingerprint_files,
    near_duplicates,
    same_pictures,
)
from covid_xray.errors import PipelineError
from covid_xray.imaging import ImageRejected, decode_checked, read_image_info
from covid_xray.io import read_stage_csv, sha256_file, write_csv
from covid_xray.junk import is_junk
from covid_xray.params import CopyParams

log = logging.getLogger("covid_xray.datasets")

TRAINING_SETS: tuple[str, ...] = MODEL_NAMES
EVALUATION_SETS: tuple[str, ...] = ("heldout", "kermany_test")
EXTERNAL_LABELS: tuple[str, ...] = ("covid", "normal", "pneumonia")
"""Class subfolders read from an external set (``validate.external.<name>``)."""
MANIFEST_COLUMNS: tuple[str, ...] = ("path", "set", "label", "patient_id", "sha256", "source",
                                     "width", "height", "format", "patient_group", "origin")
SKIPPED_COLUMNS: tuple[str, ...] = ("source", "reason")
EXCLUDED_REASONS: tuple[str, ...] = (
    "same_picture_as_heldout", "same_picture_as_kermany_test", "patient_in_heldout",
    "patient_in_kermany_test", "same_picture_as_external", "conflicting_labels")
"""Why a usable training image is left out (``excluded.csv``), in the order they are tested."""
EVALUATION_POOLS: dict[str, str] = {"covid_heldout": "heldout",
                                    "kermany_test_normal": "kermany_test",
                                    "kermany_test_pneumonia": "kermany_test"}
"""Pools of evaluation images (copied as they are) and the set each becomes."""
TRAINING_POOLS: tuple[str, ...] = ("covid_train", "kermany_train_normal",
                                   "kermany_train_pneumonia")
KERMANY_CLASSES: dict[str, str] = {"normal": "NORMAL", "pneumonia": "PNEUMONIA"}
KERMANY, COLLECTION = "kermany", "covid_collection"
"""The built-in negative sources (``copy.negatives``); other names are ``copy.folders`` entries."""
FOLDER_LABELS: tuple[str, ...] = ("normal", "pneumonia")
"""Class subfolders read from a ``copy.folders`` folder."""
_INTERIM_COLUMNS = ("patient_id", "image_path", "origin")


# ------------------------------------------------------------------------------------ patient ids
def kermany_patient_id(filename: str) -> str:
    """The patient encoded in a Kermany file name (the dataset has no other patient column).

    ``person1000_bacteria_2931.jpeg`` -> ``kermany-person1000``; ``IM-0115-0001.jpeg`` ->
    ``kermany-IM-0115``; ``NORMAL2-IM-0500-0001.jpeg`` -> ``kermany-NORMAL2-IM-0500``. A name
    that follows none of these counts as its own patient (``kermany-<stem>``), which can only
    make a grouped split stricter, never leak.
    """
    name = Path(filename).name
    for pattern in (r"(person\d+)_", r"(NORMAL2-IM-\d+)-", r"(IM-\d+)-"):
        if match := re.match(pattern, name, flags=re.IGNORECASE):
            return f"kermany-{match[1]}"
    return f"kermany-{Path(name).stem}"


# ------------------------------------------------------------------------------------ inspection
@dataclass(frozen=True)
class Candidate:
    """A raw file that should become an image of a set (before it is decoded)."""

    source: Path
    label: str
    patient_id: str
    origin: str = ""
    """Where it was published (url domain, ``kermany``, a folder's name): cross-source folds."""
    dataset: str = ""
    """Which negative source it belongs to: ``kermany``, ``covid_collection`` or a folder name."""


@dataclass(frozen=True)
class ImageRecord:
    """A raw file that decoded cleanly: what the manifest needs to know about it."""

    source: Path
    label: str
    patient_id: str
    fingerprint: Fingerprint = field(compare=False, repr=False)
    width: int
    height: int
    format: str
    patient_group: str = ""
    """The merged group (:func:`patient_groups`); empty until grouped."""
    origin: str = ""
    dataset: str = ""

    @property
    def sha256(self) -> str:
        return self.fingerprint.sha256


@dataclass(frozen=True)
class Skip:
    source: Path
    reason: str


def classify_decode_error(exc: Exception) -> str:
    """The category for ``skipped.csv`` and the metric: the server's reason for refusing it."""
    if isinstance(exc, ImageRejected):
        return exc.reason
    if isinstance(exc, OSError):
        return "unreadable"
    return "corrupt"


def inspect_file(candidate: Candidate) -> ImageRecord | Skip:
    """Hash, fully decode and check one file, exactly as the server would before its models;
    the near-duplicate signature comes from the same decode (no second pass)."""
    try:
        data = candidate.source.read_bytes()
        info = read_image_info(data)
        rgb = decode_checked(data)
    except (ImageRejected, OSError) as exc:
        return Skip(candidate.source, f"{classify_decode_error(exc)}: {exc}")
    return ImageRecord(candidate.source, candidate.label, candidate.patient_id,
                       fingerprint(data, rgb), info.width, info.height, info.format,
                       origin=candidate.origin, dataset=candidate.dataset)


def inspect_files(candidates: Sequence[Candidate], desc: str,
                  workers: int | None = None) -> tuple[list[ImageRecord], list[Skip]]:
    """Decode many files in threads (OpenCV releases the GIL); keeps the input order."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(inspect_file, candidates), total=len(candidates),
                            desc=desc, unit="img", leave=False))
    images = [r for r in results if isinstance(r, ImageRecord)]
    skips = [r for r in results if isinstance(r, Skip)]
    return images, skips


def drop_duplicates(images: Iterable[ImageRecord], seen: dict[str, Path],
                    raw_dir: Path) -> tuple[list[ImageRecord], list[Skip]]:
    """Keep the first image per content hash; ``seen`` carries hashes claimed by earlier groups.

    Groups are passed evaluation-first, so a file that also exists in a held-out or test set is
    removed from the training pool and the disjointness check cannot fail by accident.
    """
    kept: list[ImageRecord] = []
    skips: list[Skip] = []
    for image in images:
        if image.sha256 in seen:
            skips.append(Skip(image.source,
                              f"duplicate: same content as {_rel(seen[image.sha256], raw_dir)}"))
            continue
        seen[image.sha256] = image.source
        kept.append(image)
    return kept, skips


# ------------------------------------------------------------------------- disjoint by construction
def patient_groups(images: Sequence[ImageRecord], max_distance: int) -> dict[Path, str]:
    """The patient group of each image: connected components of images linked by patient id,
    identical bytes or a near-duplicate (:func:`covid_xray.duplicates.near_duplicates`).

    A group is named by its smallest patient id, so an image whose patient shares no picture with
    another keeps its own id as its group. Deterministic: independent of the input order.
    """
    patients = {p: k for k, p in enumerate(sorted({i.patient_id for i in images}))}
    shas = {h: k for k, h in enumerate(sorted({i.sha256 for i in images}))}
    n, n_patients = len(images), len(patients)
    edges = [(k, n + patients[image.patient_id]) for k, image in enumerate(images)]
    edges += [(k, n + n_patients + shas[image.sha256]) for k, image in enumerate(images)]
    prints = [image.fingerprint for image in images]
    edges += [(i, j) for i, j, _ in near_duplicates(prints, prints, max_distance) if i < j]
    rows, cols = zip(*edges, strict=True) if edges else ((), ())
    size = n + n_patients + len(shas)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(size, size))
    _, component = connected_components(graph, directed=False)
    names: dict[int, str] = {}
    for k, image in enumerate(images):
        label = int(component[k])
        names[label] = min(names.get(label, image.patient_id), image.patient_id)
    return {image.source: names[int(component[k])] for k, image in enumerate(images)}


def leave_out(pools: dict[str, list[ImageRecord]], decoded: Iterable[ImageRecord],
              max_distance: int, external: dict[str, dict[Path, Fingerprint]], raw_dir: Path,
              evaluation_pools: dict[str, str] | None = None,
              training_pools: Sequence[str] = TRAINING_POOLS
              ) -> tuple[dict[str, list[ImageRecord]], list[Skip]]:
    """Training pools without the images that would make sets share a patient or a picture.

    Tested in the order of :data:`EXCLUDED_REASONS`: the image is the same picture as an
    evaluation image (held-out or Kermany test); its patient group holds one (Kermany patients
    in both ``train/`` and ``test/`` go to the test side); it is the same picture as a file of
    an external set; its group holds another label among all ``decoded`` images (a picture
    published as COVID-19 and as normal). Evaluation pools (``evaluation_pools``: pool -> set,
    default :data:`EVALUATION_POOLS`) are never changed; ``training_pools`` are filtered.
    """
    evaluation_pools = EVALUATION_POOLS if evaluation_pools is None else evaluation_pools
    evaluation = [(evaluation_pools[name], image) for name in evaluation_pools
                  for image in sorted(pools[name], key=lambda i: i.source.as_posix())]
    eval_prints = [image.fingerprint for _, image in evaluation]
    first_in_group: dict[str, tuple[str, ImageRecord]] = {}
    for set_name, image in evaluation:
        first_in_group.setdefault(image.patient_group, (set_name, image))
    labels: dict[str, dict[str, ImageRecord]] = defaultdict(dict)
    for image in sorted(decoded, key=lambda i: i.source.as_posix()):
        labels[image.patient_group].setdefault(image.label, image)
    external_files = [(name, file) for name, prints in sorted(external.items())
                      for file in sorted(prints)]
    external_prints = [external[name][file] for name, file in external_files]

    kept_pools: dict[str, list[ImageRecord]] = {}
    excluded: list[Skip] = []
    for name in training_pools:
        pool = pools[name]
        prints = [image.fingerprint for image in pool]
        same_eval = same_pictures(prints, eval_prints, max_distance)
        same_external = same_pictures(prints, external_prints, max_distance)
        kept: list[ImageRecord] = []
        for k, image in enumerate(pool):
            group = image.patient_group
            if k in same_eval:
                j, distance = same_eval[k]
                set_name, other = evaluation[j]
                reason = (f"same_picture_as_{set_name}: same picture as {set_name} image "
                          f"{_rel(other.source, raw_dir)} (pHash distance {distance})")
            elif group in first_in_group:
                set_name, other = first_in_group[group]
                via = ("" if other.patient_id == image.patient_id
                       else f" of patient {other.patient_id}, linked to {image.patient_id} by "
                            "a shared picture")
                reason = (f"patient_in_{set_name}: patient group {group} has {set_name} image "
                          f"{_rel(other.source, raw_dir)}{via}")
            elif k in same_external:
                j, distance = same_external[k]
                set_name, file = external_files[j]
                reason = (f"same_picture_as_external: same picture as external/{set_name} file "
                          f"{_rel(file, raw_dir)} (pHash distance {distance})")
            elif len(labels[group]) > 1:
                others = sorted(set(labels[group]) - {image.label})
                reason = (f"conflicting_labels: patient group {group} also holds a "
                          f"{others[0]} image, {_rel(labels[group][others[0]].source, raw_dir)}")
            else:
                kept.append(image)
                continue
            excluded.append(Skip(image.source, reason))
        kept_pools[name] = kept
    return kept_pools, excluded


def external_fingerprints(external: dict[str, Path]) -> dict[str, dict[Path, Fingerprint]]:
    """Fingerprints of every file of each external set (an undecodable file: its SHA-256 only,
    which still catches an identical training file)."""
    prints: dict[str, dict[Path, Fingerprint]] = {}
    for name, folder in sorted(external.items()):
        prints[name], _ = fingerprint_files(external_image_files(folder),
                                            desc=f"external {name}")
    return prints


# ------------------------------------------------------------------------------------ candidates
def covid_candidates(table_path: Path, covid_dir: Path,
                     label: str = POSITIVE_CLASS) -> list[Candidate]:
    """Rows of ``covid_selected.csv`` / ``covid_heldout.csv`` as files under the COVID dataset;
    with a negative ``label``, the rows of that label of ``negatives_*.csv`` (the collection's
    own non-COVID X-rays, same patient ids: a patient with both kinds of picture is one group)."""
    required = _INTERIM_COLUMNS if label == POSITIVE_CLASS else (*_INTERIM_COLUMNS, "label")
    table = read_stage_csv(table_path, required, "select_metadata")
    if label != POSITIVE_CLASS:
        table = table[table["label"] == label]
    return [Candidate(covid_dir / path, label, patient, origin or "unknown", COLLECTION)
            for patient, path, origin in zip(table["patient_id"], table["image_path"],
                                             table["origin"], strict=True)]


def kermany_candidates(kermany_dir: Path, split: str, label: str) -> list[Candidate]:
    """Every file of ``chest_xray/<split>/<CLASS>/`` (sorted: listing order must not matter)
    but OS junk (``._*``, ``.DS_Store``: not images, so never reported as corrupt ones)."""
    folder = kermany_dir / split / KERMANY_CLASSES[label]
    if not folder.is_dir():
        raise PipelineError(f"{folder}: folder not found; expected Kermany's chest_xray layout "
                            "{train,test}/{NORMAL,PNEUMONIA}/. Re-run the acquire stage.")
    return [Candidate(path, label, kermany_patient_id(path.name), KERMANY, KERMANY)
            for path in sorted(folder.iterdir()) if path.is_file() and not is_junk(path.name)]


_FOLDER_PATIENT = (re.compile(r"(\d{8})_\d{3}\.[A-Za-z]+"),)
"""File names that encode a patient in public adult sets (NIH ChestX-ray14: ``00000013_005.png``
is patient 00000013)."""


def folder_patient_id(name: str, relative: Path) -> str:
    """The patient of a file of folder ``name``: from its file name where one of the known
    patterns (Kermany's, NIH's) gives it, else the file itself (``<name>-<path in the folder
    without suffix>``, so ``normal/1.png`` and ``pneumonia/1.png`` are two patients), which can
    only make grouping stricter, never leak."""
    derived = kermany_patient_id(relative.name)
    if derived != f"kermany-{Path(relative.name).stem}":
        return f"{name}-{derived.removeprefix('kermany-')}"
    for pattern in _FOLDER_PATIENT:
        if match := pattern.fullmatch(relative.name):
            return f"{name}-{match[1]}"
    return f"{name}-{relative.with_suffix('').as_posix()}"


def folder_candidates(name: str, folder: Path, label: str) -> list[Candidate]:
    """Every file under ``<folder>/<label>/`` (recursively, sorted, OS junk ignored) of a
    ``copy.folders`` entry; origin and source are the folder's name."""
    base = folder / label
    if not base.is_dir():
        return []
    return [Candidate(path, label, folder_patient_id(name, path.relative_to(folder)), name, name)
            for path in sorted(base.rglob("*"))
            if path.is_file() and not is_junk(path.relative_to(folder))
            and not path.name.startswith(".")]


def share_equally(wanted: int, available: dict[str, int]) -> dict[str, int]:
    """How many images each source gives so that they add up to ``wanted`` (or all there is).

    Equal shares, a source with fewer images giving all it has and the others splitting the
    rest equally (water-filling); a remainder that does not divide goes one image each to the
    sources in list order. Order-independent otherwise, so no source is favoured by its place.
    """
    quota = dict.fromkeys(available, 0)
    open_sources = [s for s in available if available[s] > 0]
    left = min(wanted, sum(available.values()))
    while left > 0 and open_sources:
        share, extra = divmod(left, len(open_sources))
        small = [s for s in open_sources if available[s] - quota[s] <= share]
        if small:  # they give everything they have; the rest is shared again
            for source in small:
                left -= available[source] - quota[source]
                quota[source] = available[source]
            open_sources = [s for s in open_sources if s not in small]
            continue
        for k, source in enumerate(open_sources):
            quota[source] += share + (1 if k < extra else 0)
        left = 0
    return quota


# -------------------------------------------------------------------------------------- sampling
def _rng(seed: int, purpose: str) -> np.random.Generator:
    """An independent stream per purpose, so e.g. changing a held-out size leaves others alone."""
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


def draw_heldout(images: Sequence[ImageRecord], count: int, seed: int,
                 purpose: str) -> tuple[list[ImageRecord], set[str]]:
    """``count`` images from randomly chosen whole patient groups; returns them and the groups
    used.

    Every image of a used group is reserved (not drawn for training), so held-out patients (and
    pictures shared across patient ids) never appear in a training folder.
    """
    by_patient: dict[str, list[ImageRecord]] = defaultdict(list)
    for image in sorted(images, key=lambda i: i.source.as_posix()):
        by_patient[image.patient_group].append(image)
    patients = sorted(by_patient)
    order = _rng(seed, purpose).permutation(len(patients))
    chosen: list[ImageRecord] = []
    used: set[str] = set()
    for index in order:
        if len(chosen) >= count:
            break
        patient = patients[index]
        used.add(patient)
        chosen.extend(by_patient[patient][: count - len(chosen)])
    return chosen, used


def draw_images(images: Sequence[ImageRecord], count: int, seed: int,
                purpose: str) -> list[ImageRecord]:
    """``count`` images drawn without replacement with the seeded stream for ``purpose``."""
    ordered = sorted(images, key=lambda i: i.source.as_posix())
    picks = _rng(seed, purpose).permutation(len(ordered))[:count]
    return [ordered[i] for i in sorted(picks)]


# --------------------------------------------------------------------------------------- copying
def link_or_copy(source: Path, target: Path) -> str:
    """Hard-link ``source`` to ``target`` (no extra disk space), else copy; says which."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
        return "hardlink"
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise
    shutil.copyfile(source, target)
    return "copy"


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(source: Path, sha256: str, taken: set[str]) -> str:
    """The source's file name with odd characters replaced; made unique in its folder."""
    name = _SAFE_NAME.sub("_", source.name).lstrip(".") or f"{sha256[:12]}.img"
    if name in taken:
        stem, dot, suffix = name.rpartition(".")
        name = f"{stem}-{sha256[:8]}.{suffix}" if dot else f"{name}-{sha256[:8]}"
    taken.add(name)
    return name


def check_disjoint(manifest: pd.DataFrame) -> None:
    """Raise :class:`PipelineError` if any evaluation image has the content of a training image."""
    training = manifest[manifest["set"].isin(TRAINING_SETS)]
    evaluation = manifest[manifest["set"].isin(EVALUATION_SETS)]
    shared = set(training["sha256"]) & set(evaluation["sha256"])
    if shared:
        clash = manifest[manifest["sha256"].isin(shared)].sort_values(["sha256", "set", "path"])
        lines = [f"  {row.sha256[:12]} {row.path} (from {row.source})"
                 for row in clash.head(20).itertuples()]
        more = f"\n  ... {len(clash) - 20} more" if len(clash) > 20 else ""
        raise PipelineError(
            f"{len(shared)} held-out/test image(s) have the same content (sha256) as training "
            "images; held-out sets must be disjoint from every training folder:\n"
            + "\n".join(lines) + more)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


class DatasetBuildError(PipelineError):
    """Too few usable images; ``skipped`` says why each file was left out.

    The stage still writes ``skipped.csv`` (alone in ``data/datasets/``) before failing, so the
    list the message points to exists.
    """

    def __init__(self, message: str, skipped: Sequence[Skip], raw_dir: Path,
                 excluded: Sequence[Skip] = ()) -> None:
        detail = _reason_counts(skipped)
        left_out = (f"; left out to keep sets disjoint: {_reason_counts(excluded)}, listed in "
                    f"{EXCLUDED_FILE}" if excluded else "")
        super().__init__(f"{message}. Skipped files: {detail}; each is listed with its reason "
                         f"in skipped.csv{left_out}")
        self.skipped = list(skipped)
        self.excluded = list(excluded)
        self.raw_dir = raw_dir


def _reason_counts(skips: Sequence[Skip]) -> str:
    counts = Counter(s.reason.split(":", 1)[0] for s in skips)
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) or "none"


EXCLUDED_FILE = "excluded.csv"
"""Usable training images left out so that sets stay disjoint (same columns as skipped.csv)."""
POOL_FILE = "kermany_pool.csv"
"""Every usable, unique Kermany ``chest_xray/train`` image whose patient group holds no held-out
or Kermany-test image and that is no external picture: what a network may learn NORMAL vs
PNEUMONIA from (the ``pretrain`` stage, which also leaves out the models' val/test patients)."""
POOL_COLUMNS: tuple[str, ...] = ("source", "label", "patient_id", "patient_group", "sha256")


def write_skipped(folder: Path, skipped: Sequence[Skip], raw_dir: Path,
                  name: str = "skipped.csv") -> Path:
    """``<folder>/<name>``: every file left out, relative to ``raw_dir``, with its reason."""
    path = folder / name
    write_csv(path, SKIPPED_COLUMNS, [(_rel(s.source, raw_dir), s.reason) for s in skipped])
    return path


@dataclass
class DatasetBuild:
    """What :func:`build_datasets` wrote, for the metric and the log line."""

    manifest: pd.DataFrame
    skipped: list[Skip]
    links: Counter[str] = field(default_factory=Counter)
    report: dict[str, Any] = field(default_factory=dict)
    excluded: list[Skip] = field(default_factory=list)

    def summary(self) -> str:
        counts = self.report["images"]
        parts = [f"{name} " + "/".join(f"{n} {label}" for label, n in counts[name].items())
                 for name in counts]
        groups = self.report["patient_groups"]
        return (f"{len(self.manifest)} images ({'; '.join(parts)}); skipped "
                f"{self.report['skipped']['total']} unusable or duplicate files; left out "
                f"{self.report['excluded']['total']} training images to keep sets disjoint "
                f"({_reason_counts(self.excluded)}); {groups['merged']} patient groups merged "
                f"by shared pictures; {self.links['hardlink']} hard links, "
                f"{self.links['copy']} copies")


def build_datasets(raw_dir: Path, interim_dir: Path, out_dir: Path, seed: int,
                   params: CopyParams, *, max_distance: int,
                   external: dict[str, Path] | None = None,
                   folders: dict[str, Path] | None = None) -> DatasetBuild:
    """Populate ``out_dir`` (an empty temp folder) with every class folder, manifest and report.

    Training sets: all COVID training images in both models; as many NORMAL (PNEUMONIA) images,
    drawn with ``seed`` from the sources ``params.negatives`` lists for that class (Kermany
    train, the collection's own negatives, ``folders``: name -> resolved ``copy.folders``
    folder), shared by :func:`share_equally`. Held-out: the held-out COVID rows, plus
    ``params.heldout_*`` Kermany-train images from patient groups no training folder uses, plus
    the collection's negatives dated in or after ``select.heldout_from`` where the collection is
    a listed source; and all of Kermany test. Training images that would share a patient group
    or a picture with an evaluation set, or a picture with an ``external`` folder
    (``name: folder``), are left out (:func:`leave_out`; near-duplicate: pHash within
    ``max_distance`` bits, the audit's ``audit.phash_max_distance``). Raises
    :class:`PipelineError` if the pools are too small or a disjointness check fails.
    """
    covid_dir, kermany_dir = raw_dir / "covid-chestxray-dataset", raw_dir / "chest_xray"
    groups: dict[str, list[Candidate]] = {
        "covid_heldout": covid_candidates(interim_dir / "covid_heldout.csv", covid_dir),
        "kermany_test_normal": kermany_candidates(kermany_dir, "test", "normal"),
        "kermany_test_pneumonia": kermany_candidates(kermany_dir, "test", "pneumonia"),
    }
    evaluation_pools = dict(EVALUATION_POOLS)
    for label in FOLDER_LABELS:  # the collection's late negatives are held out, as COVID's are
        if COLLECTION in params.sources(label):
            name = f"{COLLECTION}_heldout_{label}"
            groups[name] = covid_candidates(interim_dir / "negatives_heldout.csv", covid_dir,
                                            label)
            evaluation_pools[name] = "heldout"
    groups.update({
        "covid_train": covid_candidates(interim_dir / "covid_selected.csv", covid_dir),
        "kermany_train_normal": kermany_candidates(kermany_dir, "train", "normal"),
        "kermany_train_pneumonia": kermany_candidates(kermany_dir, "train", "pneumonia"),
    })
    training_pools = list(TRAINING_POOLS)
    for label in FOLDER_LABELS:
        for source in params.sources(label):
            if source == KERMANY:
                continue
            name = negative_pool(source, label)
            groups[name] = negative_candidates(source, label, interim_dir, covid_dir,
                                               folders or {})
            training_pools.append(name)
    heldout_sizes = {"normal": params.heldout_normal, "pneumonia": params.heldout_pneumonia}
    for label, size in heldout_sizes.items():  # cheap check before decoding thousands of files
        files = len(groups[f"kermany_train_{label}"])
        if size > files:
            raise PipelineError(
                f"{kermany_dir / 'train' / KERMANY_CLASSES[label]}: copy.heldout_{label}={size} "
                f"but only {files} files are there; lower copy.heldout_{label} or use a larger "
                "data set (demo: raise data.demo.kermany_train)")
    every = [c for group in groups.values() for c in group]
    records, skipped = inspect_files(every, desc="decode")
    grouped = patient_groups(records, max_distance)  # before dedup: identical files link too
    decoded = {r.source: replace(r, patient_group=grouped[r.source]) for r in records}
    seen: dict[str, Path] = {}
    pools: dict[str, list[ImageRecord]] = {}
    for name, group in groups.items():  # evaluation groups first: they keep shared content
        kept, dups = drop_duplicates([decoded[c.source] for c in group if c.source in decoded],
                                     seen, raw_dir)
        pools[name] = kept
        skipped.extend(dups)
    skipped.sort(key=lambda s: s.source.as_posix())
    usable = {name: len(pool) for name, pool in pools.items()}
    training, excluded = leave_out(pools, decoded.values(), max_distance,
                                   external_fingerprints(external or {}), raw_dir,
                                   evaluation_pools, training_pools)
    pools.update(training)
    excluded.sort(key=lambda s: s.source.as_posix())

    covid_train = pools["covid_train"]
    if not covid_train:
        raise DatasetBuildError(
            f"{interim_dir / 'covid_selected.csv'}: none of the {len(groups['covid_train'])} "
            f"COVID training images is usable (unreadable, refused or duplicate) and clear of "
            f"the held-out, test and external sets; nothing to train on", skipped, raw_dir,
            excluded)
    if params.max_per_class and len(covid_train) > params.max_per_class:
        log.info("copy.max_per_class=%d: training on %d of %d COVID images",
                 params.max_per_class, params.max_per_class, len(covid_train))
        covid_train = draw_images(covid_train, params.max_per_class, seed, "train/covid")
    wanted = len(covid_train)
    clear: list[ImageRecord] = []  # Kermany train images clear of every evaluation set
    plan: dict[tuple[str, str], list[ImageRecord]] = {
        ("heldout", POSITIVE_CLASS): pools["covid_heldout"],
        ("kermany_test", "normal"): pools["kermany_test_normal"],
        ("kermany_test", "pneumonia"): pools["kermany_test_pneumonia"],
    }
    for model in MODEL_NAMES:
        plan[(model, POSITIVE_CLASS)] = covid_train
    for model, label in ((m, NEGATIVE_CLASS[m]) for m in MODEL_NAMES):
        pool = pools[f"kermany_train_{label}"]
        key, size = f"copy.heldout_{label}", heldout_sizes[label]
        patients = len({i.patient_group for i in pool})
        if size > len(pool):
            raise DatasetBuildError(
                f"{kermany_dir / 'train' / KERMANY_CLASSES[label]}: {key}={size} but only "
                f"{len(pool)} readable, unique images ({patients} patients) not shared with the "
                f"test folder are there; lower {key} or use a larger data set (demo: raise "
                "data.demo.kermany_train)", skipped, raw_dir, excluded)
        held, used = draw_heldout(pool, size, seed, f"heldout/{label}")
        plan[("heldout", label)] = held + pools.get(f"{COLLECTION}_heldout_{label}", [])
        # no training image from a held-out group, whatever its source (a folder's copy of a
        # held-out Kermany picture is in that picture's group)
        available = {source: [i for i in (pool if source == KERMANY
                                          else pools[negative_pool(source, label)])
                              if i.patient_group not in used]
                     for source in params.sources(label)}
        quotas = share_equally(wanted, {s: len(images) for s, images in available.items()})
        if sum(quotas.values()) < wanted:
            raise DatasetBuildError(
                _too_few_negatives(model, label, wanted, available, kermany_dir, key, size,
                                   len(used), len(pool)), skipped, raw_dir, excluded)
        plan[(model, label)] = [
            image for source, images in available.items()
            for image in draw_images(images, quotas[source], seed,
                                     f"train/{model}/{label}" if source == KERMANY
                                     else f"train/{model}/{label}/{source}")]
        clear.extend(i for i in pool if i.patient_group not in used)  # the pretrain's pool

    links: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    jobs = [(s, label, image) for (s, label), images in sorted(plan.items()) for image in images]
    taken: dict[tuple[str, str], set[str]] = defaultdict(set)
    for set_name, label, image in tqdm(jobs, desc="link", unit="img", leave=False):
        name = safe_name(image.source, image.sha256, taken[(set_name, label)])
        relative = f"{set_name}/{label}/{name}"
        links[link_or_copy(image.source, out_dir / relative)] += 1
        rows.append({"path": relative, "set": set_name, "label": label,
                     "patient_id": image.patient_id, "sha256": image.sha256,
                     "source": _rel(image.source, raw_dir), "width": image.width,
                     "height": image.height, "format": image.format,
                     "patient_group": image.patient_group, "origin": image.origin})
    manifest = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)).sort_values("path",
                                                                                ignore_index=True)
    check_disjoint(manifest)
    write_csv(out_dir / "manifest.csv", MANIFEST_COLUMNS,
              list(manifest.itertuples(index=False, name=None)))
    write_skipped(out_dir, skipped, raw_dir)
    write_skipped(out_dir, excluded, raw_dir, EXCLUDED_FILE)
    write_csv(out_dir / POOL_FILE, POOL_COLUMNS, sorted(
        (_rel(i.source, raw_dir), i.label, i.patient_id, i.patient_group, i.sha256)
        for i in clear))
    report = _report(manifest, skipped, excluded, links, usable, decoded.values(), seed)
    report["negative_sources"] = negative_source_counts(plan)
    return DatasetBuild(manifest, skipped, links, report, excluded)


def negative_pool(source: str, label: str) -> str:
    """The pool name of a non-Kermany negative source's training images of ``label``."""
    return f"{source}_train_{label}"


def negative_candidates(source: str, label: str, interim_dir: Path, covid_dir: Path,
                        folders: dict[str, Path]) -> list[Candidate]:
    """Training candidates of negative class ``label`` from ``covid_collection`` (select_metadata's
    ``negatives_selected.csv``) or a ``copy.folders`` entry; an empty source is an error."""
    if source == COLLECTION:
        table = interim_dir / "negatives_selected.csv"
        found = covid_candidates(table, covid_dir, label)
        where = (f"{table}: no {label} rows (the collection's non-COVID X-rays passing "
                 "select.modalities/views and the finding mapping)")
    else:
        if source not in folders:
            raise PipelineError(f"params.yaml `copy.negatives.{label}` lists {source}, which "
                                "is not under `copy.folders`")
        folder = folders[source]
        if not folder.is_dir():
            raise PipelineError(f"params.yaml `copy.folders.{source}`: folder {folder} not "
                                f"found; create it with normal/ or pneumonia/ subfolders of "
                                "images, or remove the entry")
        found = folder_candidates(source, folder, label)
        where = f"{folder / label}: no image files there"
    if not found:
        raise PipelineError(f"{where}; `copy.negatives.{label}` lists {source}: remove it from "
                            "that list or add images")
    return found


def _too_few_negatives(model: str, label: str, wanted: int,
                       available: dict[str, list[ImageRecord]], kermany_dir: Path, key: str,
                       size: int, used: int, pool: int) -> str:
    """Why the negatives cannot balance the COVID images, naming what to change."""
    if list(available) == [KERMANY]:
        return (f"{kermany_dir / 'train' / KERMANY_CLASSES[label]}: {model} needs {wanted} "
                f"{label} images to balance its {wanted} COVID training images, but only "
                f"{len(available[KERMANY])} readable, unique images remain after holding out "
                f"{key}={size} images ({used} patients) of {pool} not shared with the test "
                f"folder; lower {key} or use a larger Kermany data set (demo: raise "
                "data.demo.kermany_train)")
    counts = ", ".join(f"{source} {len(images)}" for source, images in available.items())
    return (f"{model} needs {wanted} {label} images to balance its {wanted} COVID training "
            f"images, but the sources in copy.negatives.{label} have only {counts} usable images "
            f"(after holding out {key}={size} Kermany images); add a source, or cap the COVID "
            "images with copy.max_per_class")


def negative_source_counts(plan: dict[tuple[str, str], list[ImageRecord]]
                           ) -> dict[str, dict[str, int]]:
    """Negative images per source in each training set and held-out class (the metric)."""
    counts: dict[str, dict[str, int]] = {}
    for (set_name, label), images in sorted(plan.items()):
        if label == POSITIVE_CLASS or set_name not in (*MODEL_NAMES, "heldout"):
            continue
        key = set_name if set_name in MODEL_NAMES else f"heldout_{label}"
        counts[key] = dict(sorted(Counter(i.dataset for i in images).items()))
    return counts


def _report(manifest: pd.DataFrame, skipped: list[Skip], excluded: list[Skip],
            links: Counter[str], pools: dict[str, int], decoded: Iterable[ImageRecord],
            seed: int) -> dict[str, Any]:
    """The ``metrics/copy_images.json`` payload: counts a reader can check at a glance.

    ``pools``: usable, unique images per pool before any was left out; ``decoded``: every decoded
    candidate, with its patient group."""
    images: dict[str, dict[str, int]] = {}
    patients: dict[str, dict[str, int]] = {}
    for (set_name, label), part in manifest.groupby(["set", "label"], sort=True):
        images.setdefault(str(set_name), {})[str(label)] = len(part)
        patients.setdefault(str(set_name), {})[str(label)] = part["patient_id"].nunique()
    training = manifest[manifest["set"].isin(TRAINING_SETS)]
    overlap: dict[str, dict[str, int]] = {}
    for set_name in EVALUATION_SETS:
        part = manifest[manifest["set"] == set_name]
        overlap[set_name] = {
            str(label): len(set(group["patient_id"]) & set(training["patient_id"]))
            for label, group in part.groupby("label", sort=True)}
    reasons = Counter(s.reason.split(":", 1)[0] for s in skipped)
    left_out = Counter(s.reason.split(":", 1)[0] for s in excluded)
    return {
        "seed": seed,
        "images": images,
        "images_total": len(manifest),
        "patients": patients,
        "skipped": {"total": len(skipped), **dict(sorted(reasons.items()))},
        "excluded": {"total": len(excluded),
                     **{reason: left_out[reason] for reason in EXCLUDED_REASONS}},
        "patient_groups": group_counts(decoded, manifest),
        "links": {"hardlink": links["hardlink"], "copy": links["copy"]},
        "pools": pools,
        "hash_overlap": 0,  # check_disjoint raised otherwise
        "patient_overlap_with_training": overlap,
    }


def group_counts(decoded: Iterable[ImageRecord], manifest: pd.DataFrame) -> dict[str, int]:
    """Patient groups that joined several patient ids (over every decoded candidate) and the
    manifest images whose group is not their own patient id."""
    patients_of: dict[str, set[str]] = defaultdict(set)
    for image in decoded:
        patients_of[image.patient_group].add(image.patient_id)
    merged = {g: ids for g, ids in patients_of.items() if len(ids) > 1}
    return {"merged": len(merged),
            "patients_in_merged": sum(len(ids) for ids in merged.values()),
            "images_regrouped": int((manifest["patient_group"] != manifest["patient_id"]).sum())}


def external_files(name: str, folder: str, root: Path) -> pd.DataFrame:
    """Files of one external set (``path``, ``label``, ``sha256``) from its class subfolders.

    ``path`` is absolute; ``folder`` is relative to ``root`` unless absolute. Featurize caches the
    images' features and validate scores them: both list the set with this function.
    """
    location = resolve_path(folder, root)
    if not location.is_dir():
        raise PipelineError(f"params.yaml `validate.external.{name}`: folder {folder!r} not found "
                            f"({location}); create it with covid/, normal/ or pneumonia/ "
                            f"subfolders of images, or remove the entry")
    ignored = sorted(p.name for p in location.iterdir()
                     if p.is_dir() and p.name not in EXTERNAL_LABELS)
    if ignored:
        log.warning("validate.external.%s: ignoring subfolder(s) %s of %s (only %s are read)",
                    name, ", ".join(ignored), location, "/".join(EXTERNAL_LABELS))
    rows = [(str(path), label, sha256_file(path))
            for label in EXTERNAL_LABELS if (location / label).is_dir()
            for path in sorted((location / label).rglob("*"))
            if path.is_file() and not path.name.startswith(".")
            and not is_junk(path.relative_to(location))]
    if not rows:
        raise PipelineError(f"params.yaml `validate.external.{name}`: {location} has no images "
                            f"in covid/, normal/ or pneumonia/ subfolders")
    return pd.DataFrame(rows, columns=["path", "label", "sha256"])


def external_sets(external: dict[str, str], root: Path) -> dict[str, pd.DataFrame]:
    """Every ``validate.external`` set listed (fails on the first missing or empty folder).

    A folder that holds only acquire's ``.no-external-set`` note (the committed
    ``demo_external: data/raw/external`` when ``data.source`` is a folder without an external
    set) is left out with a log line: the source has none, which is not an error.
    """
    sets = {}
    for name, folder in external.items():
        location = resolve_path(folder, root)
        if (location / NO_EXTERNAL_FILE).is_file() and not any(
                (location / label).is_dir() for label in EXTERNAL_LABELS):
            log.info("validate.external.%s: %s holds no external set (the data source has none; "
                     "list your own sets in params.yaml validate.external)", name, location)
            continue
        sets[name] = external_files(name, folder, root)
    return sets
