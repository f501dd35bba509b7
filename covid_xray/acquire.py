"""The ``acquire`` stage's logic: fill ``data/raw`` from the demo generator, the public
downloads, or a local folder, always in the two real layouts (see docs/contracts.md).

``data/raw`` is rebuilt whole in a temporary sibling and swapped in (``covid_xray.io.atomic_dir``):
a failed download, a refused archive or a bad folder leaves the previous ``data/raw`` untouched.
Downloads are cached in ``data/downloads/`` (git-ignored, never removed), resume from a ``.part``
file via HTTP ``Range``, are checked for size and (where published) SHA-256, and are extracted by
code that refuses any archive member that would land outside the target folder.

The archives are read as published (GitHub's ``<repo>-<commit>/`` top folder, Mendeley's and
Kaggle's ``__MACOSX/`` and ``.DS_Store``, Kaggle's ``val/`` and nested duplicate
``chest_xray/chest_xray/``), extracted or as a local folder: OS junk is skipped and counted
(:mod:`covid_xray.junk`), ``val/`` goes back into ``train/`` (:data:`KERMANY_VAL`), a nested copy is
reported and not read.

DVC runs the stage on every ``dvc repro`` (a local folder can change where DVC does not look):
:func:`refresh` keeps ``data/raw`` when its stamp says it still matches the source (same demo
params, same archive files, same local files: a stat per file) and rebuilds it otherwise. A local
folder is rebuilt as hard links, never copied, so a rebuild is cheap and unchanged files keep
their inodes (DVC does not even re-hash them).
"""

from __future__ import annotations

import csv
import filecmp
import json
import logging
import os
import re
import shutil
import socket
import stat
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import requests
from tqdm import tqdm

from covid_xray.config import NO_EXTERNAL_FILE, Paths, resolve_path
from covid_xray.errors import PipelineError
from covid_xray.io import atomic_dir, read_json, sha256_file, write_json, write_text
from covid_xray.junk import JUNK_KINDS, MACOSX_DIR, junk_kind
from covid_xray.params import Params

log = logging.getLogger("acquire")

COVID_DIR = "covid-chestxray-dataset"
KERMANY_DIR = "chest_xray"
EXTERNAL_DIR = "external"
SOURCE_FILE = "SOURCE.json"
"""Written into ``data/raw/external/`` when the source has no external set: DVC warns "'data/raw/
external' is empty" for an empty folder dependency (audit, featurize and validate depend on it).
Hidden, so the stages that list external images never see it."""
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
KERMANY_SPLITS = ("train", "test")
KERMANY_LABELS = ("NORMAL", "PNEUMONIA")
KERMANY_VAL = "val"
"""Kaggle's copy of Kermany's data adds ``val/`` (8 NORMAL + 8 PNEUMONIA): images Kaggle took out
of Mendeley's train/ (Kaggle's train + val = Mendeley's train, 1,349 NORMAL and 3,883 PNEUMONIA),
so acquire puts them back into ``train/``, where the patient-grouped draws see them."""


@dataclass(frozen=True)
class RemoteArchive:
    """One published archive: where it lives, what it should be, how to arrange it."""

    name: str
    url: str
    filename: str
    layout: str  # covid | kermany | actualmed
    size: int | None = None
    sha256: str | None = None
    citation: str = ""
    alternatives: tuple[str, ...] = ()
    """Other file names a user may place in data/downloads instead (another copy of the same data
    that cannot be fetched by URL, e.g. behind a login); used with a warning, checksum recorded."""


DATASETS: tuple[RemoteArchive, ...] = (
    RemoteArchive(
        name="covid-chestxray-dataset",
        # A pinned commit of ieee8023/covid-chestxray-dataset (current metadata.csv schema):
        # the archive of a commit never changes content, unlike master.zip.
        url=("https://github.com/ieee8023/covid-chestxray-dataset/archive/"
             "6a4242344473ccb5ed0d2148d8c7bfb1691e4ed8.zip"),
        filename="covid-chestxray-dataset-6a42423.zip",
        layout="covid",
        citation="Cohen et al., COVID-19 image data collection, arXiv:2003.11597",
    ),
    RemoteArchive(
        name="chest_xray",
        url=("https://data.mendeley.com/public-files/datasets/rscbjbr9sj/files/"
             "f12eaf6d-6023-432f-acc9-80c9d7393433/file_downloaded"),
        filename="ChestXRay2017.zip",
        layout="kermany",
        citation="Kermany, Zhang, Goldbaum (2018), Mendeley Data V2, doi:10.17632/rscbjbr9sj.2",
        # Kaggle's "chest-xray-pneumonia" (paultimothymooney), as `kaggle datasets download`
        # names it: the same images with val/ split off train/ and a nested duplicate copy.
        alternatives=("chest-xray-pneumonia.zip",),
    ),
    RemoteArchive(
        name="actualmed-covid-chestxray-dataset",
        url=("https://github.com/agchung/Actualmed-COVID-chestxray-dataset/archive/"
             "refs/heads/master.zip"),
        filename="Actualmed-COVID-chestxray-dataset-master.zip",
        layout="actualmed",
        citation="Actualmed COVID-19 chest X-ray data (adult COVID-19 and No finding), "
                 "an external test set",
    ),
)
"""What ``data.source: download`` fetches. Sizes and SHA-256 are not published for these
archives: the size is checked against the server's ``Content-Length``/``Content-Range`` and the
computed SHA-256 is recorded in ``data/raw/SOURCE.json`` (set ``sha256`` here to pin it)."""


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def refresh(params: Params, paths: Paths, archives: Sequence[RemoteArchive] = DATASETS,
            progress: bool = True) -> tuple[dict[str, Any], bool]:
    """What the stage does on every ``dvc repro`` (it is ``always_changed``): keep ``data/raw``
    when it still matches its source, else rebuild it (:func:`acquire`).

    Returns what SOURCE.json holds and whether ``data/raw`` was rebuilt. Kept untouched, its
    hash is unchanged and DVC skips every stage after it; rebuilt from unchanged files, it hashes
    the same too (the demo is deterministic, local files are the same hard links), so downstream
    stages re-run only when the data really changed. The check costs a stat per file (see
    :func:`raw_is_current`).
    """
    kind = params.data.source_kind
    folder = resolve_local_source(params.data.source, paths) if kind == "local" else None
    inputs = source_inputs(params, paths, archives, folder)
    if inputs is not None and raw_is_current(paths.raw, inputs, folder):
        return read_json(paths.raw / SOURCE_FILE), False
    return acquire(params, paths, archives, progress), True


def acquire(params: Params, paths: Paths, archives: Sequence[RemoteArchive] = DATASETS,
            progress: bool = True) -> dict[str, Any]:
    """Rebuild ``paths.raw`` from ``params.data.source``; returns what SOURCE.json holds."""
    kind = params.data.source_kind
    folder = resolve_local_source(params.data.source, paths) if kind == "local" else None
    if kind == "download":
        # Fail fast (before touching anything) when an archive must be fetched and we are offline.
        missing = [a for a in archives if placed_archive(a, paths.downloads) is None]
        check_connectivity(missing, paths.downloads)

    with atomic_dir(paths.raw) as tmp:
        _chmod_like_mkdir(tmp)
        if kind == "demo":
            # Imported here: OpenCV and NumPy take ~0.15 s to import, and the stage runs on every
            # `dvc repro` but generates the demo only when its params changed.
            from covid_xray.demo import generate_demo

            summary: dict[str, Any] = {
                **_demo_identity(params),
                "generated": generate_demo(tmp, params.data.demo, params.seed, progress=progress)}
        elif kind == "download":
            summary = {"source": "download",
                       **fetch_and_arrange(tmp, paths.downloads, archives, progress)}
        else:
            assert folder is not None
            summary = {"source": "local", "folder": str(folder),
                       **link_local_source(folder, tmp, paths.raw)}
        validate_layout(tmp, what="data/raw")
        ensure_external_dir(tmp / EXTERNAL_DIR)
        summary["counts"] = count_raw(tmp)
        write_json(tmp / SOURCE_FILE, summary)
        stamp = {"inputs": source_inputs(params, paths, archives, folder),
                 "files": file_states(tmp)}
        write_text(tmp / STAMP_FILE, json.dumps(stamp, separators=(",", ":")))
    return summary


def ensure_external_dir(folder: Path) -> None:
    """``data/raw/external/`` always exists (stages depend on it) and is never empty (an empty
    folder dependency makes DVC warn on every run): without external images it holds a note."""
    folder.mkdir(exist_ok=True)
    if not any(path.is_file() for path in folder.rglob("*")):
        write_text(folder / NO_EXTERNAL_FILE,
                   "This data source has no external test set (no external/ folder). List "
                   "external sets in params.yaml validate.external.\n")


# --------------------------------------------------------------------------------------------
# Is data/raw current? (the stamp)
# --------------------------------------------------------------------------------------------

STAMP_FILE = ".acquire-stamp.json"
"""In ``data/raw``: what it was built from and the size and mtime of each file as written.
Listed in .dvcignore, so not part of data/raw's hash (mtimes differ from one build to the next)."""


def _demo_identity(params: Params) -> dict[str, Any]:
    return {"source": "demo", "seed": params.seed, "demo": asdict(params.data.demo)}


def source_inputs(params: Params, paths: Paths, archives: Sequence[RemoteArchive],
                  folder: Path | None) -> dict[str, Any] | None:
    """Everything ``data/raw``'s content follows from, besides the files of a local folder: the
    source, the demo's params and seed or each archive's size and mtime, and this code (the
    demo generator and the layout rules). ``None`` when an archive is still to be downloaded."""
    here = Path(__file__)
    code = {module.name: sha256_file(module)
            for module in (here, here.with_name("demo.py"), here.with_name("junk.py"))}
    kind = params.data.source_kind
    if kind == "demo":
        what = _demo_identity(params)
    elif kind == "local":
        what = {"source": "local", "folder": str(folder)}
    else:
        placed = [placed_archive(a, paths.downloads) for a in archives]
        if any(f is None for f in placed):
            return None
        files = [f for f in placed if f is not None]
        what = {"source": "download", "archives": [
            {**asdict(a), "file": f.name, "bytes": f.stat().st_size,
             "mtime_ns": f.stat().st_mtime_ns}
            for a, f in zip(archives, files, strict=True)]}
    return json.loads(json.dumps({**what, "code": code}))  # as it reads back from the stamp


def file_states(root: Path) -> dict[str, list[int]]:
    """Every folder (``name/``: ``[]``) and file (``[size, mtime_ns]``, through symlinks) under
    ``root``, but the stamp itself."""
    states: dict[str, list[int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        states.update({f"{(rel / d).as_posix()}/": [] for d in dirnames})
        for name in filenames:
            if rel == Path() and name == STAMP_FILE:
                continue
            info = (Path(dirpath) / name).stat()
            states[(rel / name).as_posix()] = [info.st_size, info.st_mtime_ns]
    return states


def raw_is_current(raw: Path, inputs: dict[str, Any], folder: Path | None) -> bool:
    """``raw`` was built from ``inputs`` and no file in it changed since (stamp); for a local
    ``folder``, its files are still the folder's very files, none added or removed."""
    try:
        stamp = read_json(raw / STAMP_FILE)
        if stamp.get("inputs") != inputs or stamp.get("files") != file_states(raw):
            return False
    except (OSError, ValueError):  # no data/raw, no stamp, a broken symlink
        return False
    return folder is None or _links_current(plan_local(folder, raw)[0], raw)


def _links_current(plan: Plan, raw: Path) -> bool:
    """Does every file of the dataset folders in ``raw`` link to the file ``plan`` (what
    :func:`link_local_source` would link now) puts there, with the same file list?"""
    linked = {(Path(dirpath).relative_to(raw) / f).as_posix()
              for name in (COVID_DIR, KERMANY_DIR, EXTERNAL_DIR)
              for dirpath, _, filenames in os.walk(raw / name) for f in filenames}
    linked.discard(f"{EXTERNAL_DIR}/{NO_EXTERNAL_FILE}")  # written by acquire, not linked
    return linked == set(plan.files) and all(os.path.samefile(raw / rel, source)
                                             for rel, source in plan.files.items())


def _chmod_like_mkdir(folder: Path) -> None:
    """``mkdtemp`` makes 0700 folders; give data/raw the permissions ``mkdir`` would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)


def describe(summary: dict[str, Any], raw_dir: str, seconds: float, rebuilt: bool = True) -> str:
    """The stage's one log line (``rebuilt=False``: data/raw was current and left untouched)."""
    counts = summary["counts"]
    what = {"demo": "demo data set", "download": "downloaded data sets",
            "local": f"local folder {summary.get('folder', '')}"}[summary["source"]]
    external = counts["external_images"]
    extra = f", {external} external" if external else ""
    missing = counts["covid_missing_files"]
    missing_text = f", {missing} listed files missing" if missing else ""
    notes = "".join(f"; {note}" for note in _notes(summary))
    return (f"{what}, {counts['images']} images ({counts['covid_rows']} COVID rows, "
            f"{counts['kermany_images']} Kermany{extra}{missing_text}) in {raw_dir}"
            f"{'' if rebuilt else ', unchanged'} ({seconds:.1f} s){notes}")


def _notes(summary: dict[str, Any]) -> list[str]:
    """What the log line adds about the source's shape: val/ merged, copies and junk skipped."""
    notes = []
    kermany = summary.get("kermany") or {}
    val = sum((kermany.get("val_into_train") or {}).values())
    if val or kermany.get("val_duplicates"):
        dups = kermany.get("val_duplicates", 0)
        notes.append(f"Kermany val/: {val} images added to train/"
                     + (f" ({dups} already there, same content)" if dups else ""))
    for copy in kermany.get("copies_ignored", []):
        same = "same file names and sizes" if copy["same_names_and_sizes"] else "DIFFERENT files"
        notes.append(f"{copy['folder']}/ ignored: a second copy of the Kermany data "
                     f"({copy['files']:,} files, {same} as {kermany['root']}/)")
    if kermany.get("ignored"):
        notes.append(f"not read: {', '.join(kermany['ignored'])}")
    junk = summary.get("junk_skipped") or {}
    if junk:
        kinds = ", ".join(f"{n:,} {JUNK_KINDS[kind]}" for kind, n in junk.items())
        notes.append(f"{sum(junk.values()):,} OS junk files skipped ({kinds})")
    return notes


# --------------------------------------------------------------------------------------------
# Layout checks and counts
# --------------------------------------------------------------------------------------------

def validate_layout(root: Path, what: str) -> None:
    """Both datasets must be present: ``covid-chestxray-dataset/metadata.csv`` and
    ``chest_xray/{train,test}/``. The error names everything that is missing."""
    problems = []
    if not (root / COVID_DIR / "metadata.csv").is_file():
        problems.append(f"{COVID_DIR}/metadata.csv")
    problems.extend(_kermany_problems(root / KERMANY_DIR, need_labels=False))
    if problems:
        raise _layout_error(root, what, problems)


def _kermany_problems(kermany: Path, need_labels: bool) -> list[str]:
    if not kermany.is_dir():
        return [f"{KERMANY_DIR}/ (with train/ and test/, each holding NORMAL/ and PNEUMONIA/)"]
    missing = [f"{KERMANY_DIR}/{split}/" for split in KERMANY_SPLITS
               if not (kermany / split).is_dir()]
    if not missing and need_labels:
        missing = [f"{KERMANY_DIR}/train|test/NORMAL|PNEUMONIA/ (no class folder in train/ or "
                   "test/)"]
    return missing


def _layout_error(root: Path, what: str, problems: list[str]) -> PipelineError:
    return PipelineError(
        f"{what} ({root}) is missing {', '.join(problems)}. A data folder must hold the "
        f"ieee8023 layout ({COVID_DIR}/metadata.csv + images/) and Kermany's layout "
        f"({KERMANY_DIR}/train|test/NORMAL|PNEUMONIA/).")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def count_raw(root: Path) -> dict[str, Any]:
    """Rows, image files and missing files per dataset, for SOURCE.json and the log line."""
    covid = root / COVID_DIR
    rows = 0
    missing = 0
    with (covid / "metadata.csv").open(newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            rows += 1
            name = (row.get("filename") or row.get("imagename") or "").strip()
            folder = (row.get("folder") or "images").strip() or "images"
            if name and not (covid / folder / name).exists():
                missing += 1
    covid_images = sum(1 for p in (covid / "images").rglob("*") if p.is_file() and _is_image(p)) \
        if (covid / "images").is_dir() else 0
    volumes = sum(1 for p in (covid / "volumes").rglob("*") if p.is_file()) \
        if (covid / "volumes").is_dir() else 0
    kermany: dict[str, dict[str, int]] = {}
    for split_dir in sorted(p for p in (root / KERMANY_DIR).iterdir() if p.is_dir()):
        kermany[split_dir.name] = {
            label_dir.name: sum(1 for f in label_dir.iterdir() if f.is_file() and _is_image(f))
            for label_dir in sorted(p for p in split_dir.iterdir() if p.is_dir())}
    external: dict[str, int] = {}
    if (root / EXTERNAL_DIR).is_dir():
        external = {d.name: sum(1 for f in d.iterdir() if f.is_file() and _is_image(f))
                    for d in sorted(p for p in (root / EXTERNAL_DIR).iterdir() if p.is_dir())}
    kermany_images = sum(sum(labels.values()) for labels in kermany.values())
    return {
        "covid_rows": rows,
        "covid_images": covid_images,
        "covid_volumes": volumes,
        "covid_missing_files": missing,
        "kermany": kermany,
        "kermany_images": kermany_images,
        "external": external,
        "external_images": sum(external.values()),
        "images": covid_images + kermany_images + sum(external.values()),
    }


# --------------------------------------------------------------------------------------------
# Local folder: validate and link
# --------------------------------------------------------------------------------------------

def resolve_local_source(source: str, paths: Paths) -> Path:
    """``data.source`` as an absolute folder; refuses ``data/raw`` itself (it is rebuilt) and a
    folder where the two datasets cannot be found (:func:`find_local_roots`)."""
    folder = resolve_path(source, paths.root).resolve()
    if not folder.is_dir():
        raise PipelineError(f"data.source: folder {folder} not found")
    raw = paths.raw.resolve()
    if folder == raw or raw in folder.parents:
        raise PipelineError(f"data.source: {folder} is inside {paths.raw}, which acquire "
                            "rebuilds; point it at a folder outside data/raw")
    find_local_roots(folder, paths.raw, what=f"data.source folder {source!r}")
    return folder


LOCAL_SEARCH_DEPTH = 3
"""How deep under ``data.source`` the dataset folders are looked for (archives extracted as
they come put them one or two levels down: ``covid-chestxray-dataset-<commit>/``,
``ChestXRay2017/chest_xray/``)."""


def find_local_roots(folder: Path, raw: Path, what: str = "data.source") -> tuple[Path, Path]:
    """The ieee8023 folder and Kermany's ``chest_xray`` folder in a local ``folder``.

    ieee8023: ``covid-chestxray-dataset/``, else the shallowest folder named
    ``covid-chestxray-dataset*`` (GitHub's archive extracts to ``<repo>-<commit>/``) holding
    ``metadata.csv``. Kermany: ``chest_xray/``, else the shallowest folder with
    ``train/`` and ``test/`` holding ``NORMAL/`` or ``PNEUMONIA/`` (so Kaggle's nested duplicate
    ``chest_xray/chest_xray/`` is never chosen over its parent). ``__MACOSX``, hidden folders and
    ``raw`` (data/raw, if ``folder`` holds it) are not searched.
    """
    covid = folder / COVID_DIR
    if not (covid / "metadata.csv").is_file():
        covid = next((d for d in _walk_dirs(folder, LOCAL_SEARCH_DEPTH, skip=raw)
                      if d.name.lower().startswith(COVID_DIR)
                      and (d / "metadata.csv").is_file()), None)
    kermany = folder / KERMANY_DIR
    if not _is_kermany_root(kermany):
        kermany = next((d for d in _walk_dirs(folder, LOCAL_SEARCH_DEPTH, skip=raw)
                        if _is_kermany_root(d)), None)
    problems = [] if covid is not None else [
        f"{COVID_DIR}/metadata.csv (or {COVID_DIR}-<commit>/metadata.csv, as GitHub's archive "
        f"extracts, up to {LOCAL_SEARCH_DEPTH} levels down)"]
    if kermany is None:
        problems.extend(_kermany_problems(folder / KERMANY_DIR, need_labels=True))
    if problems or covid is None or kermany is None:
        raise _layout_error(folder, what, problems)
    return covid, kermany


@dataclass
class Plan:
    """Which source file each file of data/raw is (relative posix path -> file), the folders to
    create, and what was left out on the way (for SOURCE.json and the log line)."""

    files: dict[str, Path] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    junk: Counter[str] = field(default_factory=Counter)


def _count_files(folder: Path) -> int:
    return sum(len(filenames) for _, _, filenames in os.walk(folder))


def _skip_junk(entry: Path, plan: Plan) -> bool:
    """Count ``entry`` if it is OS junk (a ``__MACOSX`` folder: every file in it)."""
    if entry.is_dir():
        if entry.name != MACOSX_DIR:
            return False
        plan.junk["macosx"] += _count_files(entry)
        return True
    kind = junk_kind(entry.name)
    if kind is not None:
        plan.junk[kind] += 1
    return kind is not None


def plan_tree(source: Path, dest: str, plan: Plan) -> None:
    """Every file under ``source`` (recursively) to ``dest/<same path>``, junk skipped."""
    for dirpath, dirnames, filenames in os.walk(source):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not _skip_junk(here / d, plan))
        rel = PurePosixPath(dest, here.relative_to(source).as_posix())
        plan.dirs.add(rel.as_posix())
        for name in sorted(filenames):
            if not _skip_junk(here / name, plan):
                plan.files[(rel / name).as_posix()] = here / name


def plan_kermany(root: Path, base: Path, plan: Plan) -> dict[str, Any]:
    """Kermany's ``root/{train,test,val}/{NORMAL,PNEUMONIA}/*`` to ``chest_xray/{train,test}/``.

    ``val/`` goes into ``train/`` (see :data:`KERMANY_VAL`); a val file whose name is already in
    train is dropped when its bytes are the same and refused when they differ. Anything else in
    the root is not read: OS junk is counted, a nested copy of the whole data (Kaggle's
    ``chest_xray/chest_xray/``) is compared by file names and sizes and reported, other entries
    are listed. Returns the report for SOURCE.json (paths relative to ``base``).
    """
    report: dict[str, Any] = {"root": _rel(root, base), "val_into_train": {},
                              "val_duplicates": 0, "copies_ignored": [], "ignored": []}
    reading = {"": (*KERMANY_SPLITS, KERMANY_VAL),
               **{split: KERMANY_LABELS for split in (*KERMANY_SPLITS, KERMANY_VAL)}}
    for parent, names in reading.items():
        folder = root / parent
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if (entry.is_dir() and entry.name in names) or _skip_junk(entry, plan):
                continue
            if parent == "" and _is_kermany_root(entry):
                listing = _kermany_listing(entry)
                report["copies_ignored"].append({
                    "folder": _rel(entry, base), "files": len(listing),
                    "same_names_and_sizes": listing == _kermany_listing(root)})
                continue
            report["ignored"].append(_rel(entry, base) + ("/" if entry.is_dir() else ""))
    val: Counter[str] = Counter()
    for split in (*KERMANY_SPLITS, KERMANY_VAL):  # train before val: val joins it
        into = "train" if split == KERMANY_VAL else split
        for label in KERMANY_LABELS:
            folder = root / split / label
            if not folder.is_dir():
                continue
            plan.dirs.add(f"{KERMANY_DIR}/{into}/{label}")
            for entry in sorted(folder.iterdir()):
                if _skip_junk(entry, plan):
                    continue
                if entry.is_dir():
                    report["ignored"].append(_rel(entry, base) + "/")
                    continue
                rel = f"{KERMANY_DIR}/{into}/{label}/{entry.name}"
                if split == KERMANY_VAL:
                    if rel in plan.files:
                        if not filecmp.cmp(plan.files[rel], entry, shallow=False):
                            raise PipelineError(
                                f"{entry}: Kermany's val/ is added to train/, but "
                                f"{plan.files[rel]} is a different file of the same name; "
                                "rename or remove one of them")
                        report["val_duplicates"] += 1
                        continue
                    val[label] += 1
                plan.files[rel] = entry
    if (root / KERMANY_VAL).is_dir():
        report["val_into_train"] = {label: val[label] for label in KERMANY_LABELS}
    for split in KERMANY_SPLITS:
        plan.dirs.add(f"{KERMANY_DIR}/{split}")
    return report


def _kermany_listing(root: Path) -> dict[str, int]:
    """``split/label/name`` -> size of every image file of a Kermany root (junk left out)."""
    return {f"{split}/{label}/{f.name}": f.stat().st_size
            for split in (*KERMANY_SPLITS, KERMANY_VAL) for label in KERMANY_LABELS
            if (root / split / label).is_dir()
            for f in (root / split / label).iterdir() if f.is_file() and not junk_kind(f.name)}


def plan_local(folder: Path, raw: Path) -> tuple[Plan, dict[str, Any]]:
    """What :func:`link_local_source` links from ``folder``, and its SOURCE.json report."""
    covid, kermany = find_local_roots(folder, raw)
    plan = Plan()
    plan_tree(covid, COVID_DIR, plan)
    report = plan_kermany(kermany, folder, plan)
    if (folder / EXTERNAL_DIR).is_dir():
        plan_tree(folder / EXTERNAL_DIR, EXTERNAL_DIR, plan)
    return plan, {"covid_root": _rel(covid, folder), "kermany": report}


def link_local_source(folder: Path, target: Path, raw: Path) -> dict[str, Any]:
    """Link both datasets (and ``external/`` if present) from ``folder`` into ``target``."""
    plan, report = plan_local(folder, raw)
    links = materialize(plan, target, move=False)
    return {**report, "links": links, "junk_skipped": _sorted_counts(plan.junk)}


def materialize(plan: Plan, target: Path, move: bool) -> dict[str, int]:
    """Put each planned file in place under ``target``: moved (``move``: an extracted archive)
    or linked, with hard links (no copy), or symlinks where hard links are impossible (another
    filesystem, or a filesystem without them)."""
    counts = {"hardlinks": 0, "symlinks": 0} if not move else {"moved": 0}
    for rel in sorted(plan.dirs):
        (target / rel).mkdir(parents=True, exist_ok=True)
    for rel, source in sorted(plan.files.items()):
        out = target / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if move:
            os.replace(source, out)
            counts["moved"] += 1
            continue
        try:
            os.link(source, out)
            counts["hardlinks"] += 1
        except OSError:
            os.symlink(source.resolve(), out)
            counts["symlinks"] += 1
    return counts


def _rel(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


def _sorted_counts(counts: Counter[str]) -> dict[str, int]:
    return {kind: counts[kind] for kind in JUNK_KINDS if counts[kind]}


# --------------------------------------------------------------------------------------------
# Download: connectivity, resumable transfer, verification
# --------------------------------------------------------------------------------------------

def _offline_message(archives: Iterable[RemoteArchive], downloads: Path, reason: str) -> str:
    manual = "; ".join(f"{a.filename} from {a.url}"
                       + (f" (or {' / '.join(a.alternatives)})" if a.alternatives else "")
                       for a in archives)
    return (f"data.source=download: {reason}. Offline? Use `data.source: demo` (synthetic data, "
            "no network), set `data.source` to a local folder holding covid-chestxray-dataset/ and "
            f"chest_xray/, or place the archives in {downloads}/ by hand ({manual}) and re-run.")


def check_connectivity(archives: Sequence[RemoteArchive], downloads: Path,
                       timeout: float = 3.0) -> None:
    """Open a TCP connection to every host still to download from; fail at once if one is down."""
    seen: set[tuple[str, int]] = set()
    for archive in archives:
        parts = urlsplit(archive.url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if (host, port) in seen:
            continue
        seen.add((host, port))
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as exc:
            raise PipelineError(_offline_message(
                archives, downloads, f"cannot reach {host}:{port} ({exc.__class__.__name__}: "
                f"{exc})")) from exc


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def placed_archive(archive: RemoteArchive, downloads: Path) -> Path | None:
    """The file in ``downloads`` that stands for ``archive``: its own name, else the first of
    its :attr:`~RemoteArchive.alternatives` present; ``None`` when it is still to be fetched."""
    return next((downloads / name for name in (archive.filename, *archive.alternatives)
                 if (downloads / name).is_file()), None)


def download(archive: RemoteArchive, downloads: Path, progress: bool = True,
             timeout: float = 30.0, chunk_size: int = 1 << 16) -> dict[str, Any]:
    """Fetch ``archive`` into ``downloads/<filename>`` (resuming ``<filename>.part``) and verify it.

    Returns ``{"file", "bytes", "sha256", "sha256_verified", "resumed_from"}``. A size or checksum
    mismatch deletes the partial file and raises :class:`PipelineError`; an interrupted transfer
    keeps it, so the next run resumes. A file of the archive's own name already there is verified
    like a download; one of its ``alternatives`` is used as it is (the pinned size and checksum
    are those of ``url``), with a warning, its SHA-256 recorded.
    """
    downloads.mkdir(parents=True, exist_ok=True)
    final = downloads / archive.filename
    if final.is_file():
        return _verify(archive, final, final, resumed_from=0, already=True)
    placed = placed_archive(archive, downloads)
    if placed is not None:
        log.warning("%s: using %s, placed in %s by hand, in place of %s from %s (its SHA-256 is "
                    "recorded, not checked)", archive.name, placed.name, downloads,
                    archive.filename, archive.url)
        return {"name": archive.name, "url": archive.url, "file": placed.name,
                "bytes": placed.stat().st_size, "sha256": sha256_file(placed),
                "sha256_verified": False, "resumed_from": 0, "cached": True,
                "citation": archive.citation}
    part = downloads / f"{archive.filename}.part"
    offset = part.stat().st_size if part.is_file() else 0
    resumed_from = offset
    for _attempt in range(2):
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = requests.get(archive.url, headers=headers, stream=True,
                                    timeout=(min(timeout, 10.0), timeout))
        except requests.RequestException as exc:
            raise PipelineError(_offline_message([archive], downloads,
                                                 f"cannot download {archive.url} ({exc})")) from exc
        with response:
            if response.status_code == 416 and offset:
                match = re.search(r"/(\d+)", response.headers.get("Content-Range", ""))
                if match and int(match.group(1)) == offset:
                    break  # the .part is already complete
                part.unlink()
                offset = resumed_from = 0
                continue
            if response.status_code not in (200, 206):
                raise PipelineError(f"{archive.url}: HTTP {response.status_code} "
                                    f"{response.reason}; try again later or place "
                                    f"{archive.filename} in {downloads}/ by hand")
            total = _expected_total(response, offset)
            if response.status_code == 200:
                offset = resumed_from = 0  # the server ignored Range: start over
            _stream(response, part, offset, total, archive.filename, progress, chunk_size)
            size = part.stat().st_size
            if total is not None and size != total:
                raise PipelineError(
                    f"{archive.url}: download stopped at {size:,} of {total:,} bytes; run the "
                    f"stage again to resume from {part}")
            break
    else:
        raise PipelineError(f"{archive.url}: the server refused every byte range; delete {part} "
                            "and run the stage again")
    return _verify(archive, part, final, resumed_from=resumed_from, already=False)


def _expected_total(response: requests.Response, offset: int) -> int | None:
    if response.status_code == 206:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != offset:
            raise PipelineError(f"{response.url}: the server answered a resume request with a "
                                f"range it was not asked for "
                                f"({response.headers.get('Content-Range')!r}); delete the .part "
                                "file and retry")
        return int(match.group(3)) if match.group(3) != "*" else None
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _stream(response: requests.Response, part: Path, offset: int, total: int | None,
            label: str, progress: bool, chunk_size: int) -> None:
    mode = "ab" if offset and response.status_code == 206 else "wb"
    with part.open(mode) as handle, tqdm(total=total, initial=offset if mode == "ab" else 0,
                                         unit="B", unit_scale=True, unit_divisor=1024,
                                         desc=label, disable=not progress,
                                         leave=False) as bar:
        try:
            for block in response.iter_content(chunk_size=chunk_size):
                handle.write(block)
                bar.update(len(block))
        except requests.RequestException as exc:
            handle.flush()
            raise PipelineError(f"{response.url}: connection lost after {part.stat().st_size:,} "
                                f"bytes ({exc.__class__.__name__}); run the stage again to resume "
                                f"from {part}") from exc


def _verify(archive: RemoteArchive, path: Path, final: Path, resumed_from: int,
            already: bool) -> dict[str, Any]:
    size = path.stat().st_size
    if archive.size is not None and size != archive.size:
        path.unlink()
        raise PipelineError(f"{final}: {size:,} bytes, expected {archive.size:,} for "
                            f"{archive.url}; the file was deleted, run the stage again")
    digest = sha256_file(path)
    if archive.sha256 is not None and digest != archive.sha256.lower():
        path.unlink()
        raise PipelineError(f"{final}: SHA-256 {digest} does not match the expected "
                            f"{archive.sha256} for {archive.url} (corrupt or changed upstream); "
                            "the file was deleted, run the stage again")
    if path != final:
        os.replace(path, final)
    return {"name": archive.name, "url": archive.url, "file": final.name, "bytes": size,
            "sha256": digest, "sha256_verified": archive.sha256 is not None,
            "resumed_from": resumed_from, "cached": already, "citation": archive.citation}


# --------------------------------------------------------------------------------------------
# Safe extraction
# --------------------------------------------------------------------------------------------

def _checked_member(name: str, archive: Path) -> PurePosixPath | None:
    """The member's relative path, ``None`` for entries to skip, or an error if it escapes."""
    if "\x00" in name:
        raise PipelineError(f"{archive}: refusing member {name!r} (NUL byte in its name)")
    posix = name.replace("\\", "/")
    path = PurePosixPath(posix)
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix) or ".." in path.parts:
        raise PipelineError(f"{archive}: refusing member {name!r}: its path escapes the "
                            "extraction folder (absolute or with '..'); the archive is unsafe")
    parts = [p for p in path.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else None


class Extraction(NamedTuple):
    """What :func:`safe_extract` did: files written, and OS junk skipped by kind."""

    files: int
    junk: dict[str, int]


def safe_extract(archive: Path, target: Path, progress: bool = True) -> Extraction:
    """Extract a zip or tar archive into ``target``; returns the files written and junk skipped.

    Every member is checked BEFORE anything is written: absolute paths, ``..`` components,
    symbolic and hard links, and device files are refused (:class:`PipelineError`), so a hostile
    archive leaves nothing behind. OS junk (``__MACOSX/``, AppleDouble ``._*``, ``.DS_Store``:
    :mod:`covid_xray.junk`) is skipped and counted.
    """
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    junk: Counter[str] = Counter()

    def wanted(rel: PurePosixPath | None, is_dir: bool) -> PurePosixPath | None:
        """``rel`` if it is a file to write; junk is counted."""
        if rel is None or is_dir:
            return None
        kind = junk_kind(rel)
        if kind is not None:
            junk[kind] += 1
        return rel if kind is None else None

    def destination(rel: PurePosixPath) -> Path:
        out = (root / rel).resolve()
        if root not in out.parents:
            raise PipelineError(f"{archive}: refusing member {rel}: resolves outside {target}")
        return out

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            plan: list[tuple[zipfile.ZipInfo, Path]] = []
            for info in zf.infolist():
                rel = _checked_member(info.filename, archive)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise PipelineError(f"{archive}: refusing member {info.filename!r}: "
                                        "symbolic links are not extracted")
                if (keep := wanted(rel, info.is_dir())) is not None:
                    plan.append((info, destination(keep)))
            for info, out in tqdm(plan, desc=f"extract {archive.name}", unit="file",
                                  disable=not progress, leave=False):
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            return Extraction(len(plan), _sorted_counts(junk))
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members: list[tuple[tarfile.TarInfo, Path]] = []
            for member in tf.getmembers():
                rel = _checked_member(member.name, archive)
                if member.issym() or member.islnk():
                    raise PipelineError(f"{archive}: refusing member {member.name!r}: links "
                                        f"(-> {member.linkname!r}) are not extracted")
                if not (member.isfile() or member.isdir()):
                    raise PipelineError(f"{archive}: refusing member {member.name!r}: not a "
                                        "regular file or folder")
                if (keep := wanted(rel, member.isdir())) is not None:
                    members.append((member, destination(keep)))
            for member, out in tqdm(members, desc=f"extract {archive.name}", unit="file",
                                    disable=not progress, leave=False):
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(member)
                if src is None:  # pragma: no cover - regular files always have data
                    continue
                with src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            return Extraction(len(members), _sorted_counts(junk))
    raise PipelineError(f"{archive}: neither a zip nor a tar archive (a broken download? delete "
                        "it and run the stage again)")


# --------------------------------------------------------------------------------------------
# Arranging extracted archives into the contract layout
# --------------------------------------------------------------------------------------------

def _walk_dirs(root: Path, max_depth: int | None = None, skip: Path | None = None) -> list[Path]:
    """``root`` and the folders under it (``max_depth`` levels at most), shallowest first; not
    ``__MACOSX``, hidden folders or ``skip``."""
    found = [root]
    skip = skip.resolve() if skip is not None else None
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        dirnames[:] = [] if max_depth is not None and depth >= max_depth else sorted(
            d for d in dirnames if d != MACOSX_DIR and not d.startswith(".")
            and (skip is None or (here / d).resolve() != skip))
        found.extend(here / d for d in dirnames)
    return sorted(found, key=lambda p: (len(p.relative_to(root).parts), str(p)))


def find_folder(root: Path, accept: Callable[[Path], bool], what: str, archive: str) -> Path:
    """The shallowest folder under ``root`` that ``accept``s (strips archive top folders)."""
    for folder in _walk_dirs(root):
        if accept(folder):
            return folder
    raise PipelineError(f"{archive}: no {what} found inside the archive (not the expected "
                        "dataset? delete it from data/downloads and run again)")


def _is_kermany_root(folder: Path) -> bool:
    return all((folder / split).is_dir() and any(
        (folder / split / label).is_dir() for label in ("NORMAL", "PNEUMONIA"))
        for split in ("train", "test"))


def arrange(layout: str, extracted: Path, target: Path, archive: str) -> dict[str, Any]:
    """Move an extracted archive's dataset folder into place under ``target``; returns what was
    arranged from where (``root`` relative to the archive's top)."""
    if layout == "covid":
        source = find_folder(extracted, lambda p: (p / "metadata.csv").is_file()
                             and (p / "images").is_dir(), "metadata.csv + images/", archive)
        os.replace(source, target / COVID_DIR)
        return {"root": _rel(source, extracted)}
    if layout == "kermany":
        source = find_folder(extracted, _is_kermany_root, "train/ and test/ with NORMAL/ and "
                             "PNEUMONIA/", archive)
        plan = Plan()
        report = plan_kermany(source, extracted, plan)
        materialize(plan, target, move=True)
        return report
    if layout == "actualmed":
        source = find_folder(extracted, lambda p: (p / "metadata.csv").is_file(),
                             "metadata.csv", archive)
        return {"root": _rel(source, extracted),
                **arrange_external(source, target / EXTERNAL_DIR, archive)}
    raise ValueError(f"unknown layout {layout!r}")


EXTERNAL_LABELS = {"covid-19": "covid", "no finding": "normal"}


def arrange_external(source: Path, target: Path, archive: str) -> dict[str, int]:
    """Sort a metadata.csv-described collection (Actualmed style: ``finding`` = ``COVID-19`` or
    ``No finding``, file in ``imagename``/``filename``) into ``external/{covid,normal}/``."""
    counts = {"covid": 0, "normal": 0, "skipped": 0, "missing": 0}
    with (source / "metadata.csv").open(newline="", encoding="utf-8", errors="replace") as handle:
        for row in csv.DictReader(handle):
            label = EXTERNAL_LABELS.get((row.get("finding") or "").strip().lower())
            name = (row.get("imagename") or row.get("filename") or "").strip()
            if label is None or not name:
                counts["skipped"] += 1
                continue
            candidates = [source / "images" / name, source / name]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                counts["missing"] += 1
                continue
            (target / label).mkdir(parents=True, exist_ok=True)
            os.replace(found, target / label / Path(name).name)
            counts[label] += 1
    if counts["covid"] + counts["normal"] == 0:
        raise PipelineError(f"{archive}: metadata.csv lists no COVID-19 or No finding images "
                            "that exist in the archive")
    return counts


def fetch_and_arrange(target: Path, downloads: Path, archives: Sequence[RemoteArchive],
                      progress: bool = True) -> dict[str, Any]:
    """Download (or reuse), verify, safely extract and arrange every archive into ``target``.

    Returns SOURCE.json's ``archives`` (one entry each), ``junk_skipped`` (all archives) and,
    for the Kermany archive, ``kermany`` (val/ added to train, copies and entries not read).
    """
    results = []
    junk: Counter[str] = Counter()
    kermany: dict[str, Any] = {}
    scratch = target / ".extract"
    for archive in archives:
        info = download(archive, downloads, progress=progress)
        # Run-dependent facts go to the log, not SOURCE.json, so that a rerun compares equal.
        cached, resumed = info.pop("cached"), info.pop("resumed_from")
        how = "cached" if cached else f"downloaded (resumed at byte {resumed:,})" if resumed \
            else "downloaded"
        log.info("%s: %s, %s bytes, sha256 %s", info["file"], how, f"{info['bytes']:,}",
                 info["sha256"])
        extracted = scratch / archive.name
        extraction = safe_extract(downloads / info["file"], extracted, progress)
        info["files_extracted"], info["junk_skipped"] = extraction
        junk.update(extraction.junk)
        arranged = arrange(archive.layout, extracted, target, info["file"])
        if archive.layout == "kermany":
            kermany, arranged = arranged, {"root": arranged["root"]}
        info["arranged"] = arranged
        shutil.rmtree(extracted, ignore_errors=True)
        results.append(info)
    shutil.rmtree(scratch, ignore_errors=True)
    return {"archives": results, "junk_skipped": _sorted_counts(junk),
            **({"kermany": kermany} if kermany else {})}
