"""The ``acquire`` stage's logic: fill ``data/raw`` from the demo generator, the public
downloads, or a local folder, always in the two real layouts (see docs/contracts.md).

``data/raw`` is rebuilt whole in a temporary sibling and swapped in (``covid_xray.io.atomic_dir``):
a failed download, a refused archive or a bad folder leaves the previous ``data/raw`` untouched.
Downloads are cached in ``data/downloads/`` (git-ignored, never removed), resume from a ``.part``
file via HTTP ``Range``, are checked for size and (where published) SHA-256, and are extracted by
code that refuses any archive member that would land outside the target folder.

DVC runs the stage on every ``dvc repro`` (a local folder can change where DVC does not look):
:func:`refresh` keeps ``data/raw`` when its stamp says it still matches the source (same demo
params, same archive files, same local files: a stat per file) and rebuilds it otherwise. A local
folder is rebuilt as hard links, never copied, so a rebuild is cheap and unchanged files keep
their inodes (DVC does not even re-hash them).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import socket
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import requests
from tqdm import tqdm

from covid_xray.config import Paths, resolve_path
from covid_xray.errors import PipelineError
from covid_xray.io import atomic_dir, read_json, sha256_file, write_json, write_text
from covid_xray.params import Params

log = logging.getLogger("acquire")

COVID_DIR = "covid-chestxray-dataset"
KERMANY_DIR = "chest_xray"
EXTERNAL_DIR = "external"
SOURCE_FILE = "SOURCE.json"
NO_EXTERNAL_FILE = ".no-external-set"
"""Written into ``data/raw/external/`` when the source has no external set: DVC warns "'data/raw/
external' is empty" for an empty folder dependency (audit, featurize and validate depend on it).
Hidden, so the stages that list external images never see it."""
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


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
        missing = [a for a in archives if not (paths.downloads / a.filename).is_file()]
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
                       "archives": fetch_and_arrange(tmp, paths.downloads, archives, progress)}
        else:
            assert folder is not None
            summary = {"source": "local", "folder": str(folder),
                       "links": link_local_source(folder, tmp)}
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
    code = {module.name: sha256_file(module) for module in (here, here.with_name("demo.py"))}
    kind = params.data.source_kind
    if kind == "demo":
        what = _demo_identity(params)
    elif kind == "local":
        what = {"source": "local", "folder": str(folder)}
    else:
        files = [paths.downloads / a.filename for a in archives]
        if not all(f.is_file() for f in files):
            return None
        what = {"source": "download", "archives": [
            {**asdict(a), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
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
    return folder is None or _links_current(folder, raw)


def _links_current(folder: Path, raw: Path) -> bool:
    """Does every file of the dataset folders in ``raw`` link to the same file in ``folder``,
    with the same file list (what :func:`link_tree` would link now)?"""
    expected: set[str] = set()
    for name in (COVID_DIR, KERMANY_DIR, EXTERNAL_DIR):
        for dirpath, dirnames, filenames in os.walk(folder / name):
            dirnames[:] = [d for d in dirnames if d != "__MACOSX"]
            rel = Path(dirpath).relative_to(folder)
            expected.update((rel / f).as_posix() for f in filenames)
    linked = {(Path(dirpath).relative_to(raw) / f).as_posix()
              for name in (COVID_DIR, KERMANY_DIR, EXTERNAL_DIR)
              for dirpath, _, filenames in os.walk(raw / name) for f in filenames}
    linked.discard(f"{EXTERNAL_DIR}/{NO_EXTERNAL_FILE}")  # written by acquire, not linked
    return linked == expected and all(os.path.samefile(raw / rel, folder / rel) for rel in linked)


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
    return (f"{what}, {counts['images']} images ({counts['covid_rows']} COVID rows, "
            f"{counts['kermany_images']} Kermany{extra}{missing_text}) in {raw_dir}"
            f"{'' if rebuilt else ', unchanged'} ({seconds:.1f} s)")


# --------------------------------------------------------------------------------------------
# Layout checks and counts
# --------------------------------------------------------------------------------------------

def validate_layout(root: Path, what: str) -> None:
    """Both datasets must be present: ``covid-chestxray-dataset/metadata.csv`` and
    ``chest_xray/{train,test}/``. The error names everything that is missing."""
    problems = []
    if not (root / COVID_DIR / "metadata.csv").is_file():
        problems.append(f"{COVID_DIR}/metadata.csv")
    kermany = root / KERMANY_DIR
    if not kermany.is_dir():
        problems.append(f"{KERMANY_DIR}/ (with train/ and test/, each holding NORMAL/ and "
                        "PNEUMONIA/)")
    else:
        problems.extend(f"{KERMANY_DIR}/{split}/" for split in ("train", "test")
                        if not (kermany / split).is_dir())
    if problems:
        raise PipelineError(
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
    """``data.source`` as an absolute folder; refuses ``data/raw`` itself (it is rebuilt)."""
    folder = resolve_path(source, paths.root).resolve()
    if not folder.is_dir():
        raise PipelineError(f"data.source: folder {folder} not found")
    raw = paths.raw.resolve()
    if folder == raw or raw in folder.parents:
        raise PipelineError(f"data.source: {folder} is inside {paths.raw}, which acquire "
                            "rebuilds; point it at a folder outside data/raw")
    validate_layout(folder, what=f"data.source folder {source!r}")
    return folder


def link_local_source(folder: Path, target: Path) -> dict[str, int]:
    """Link both datasets (and ``external/`` if present) from ``folder`` into ``target``."""
    totals = {"hardlinks": 0, "symlinks": 0}
    for name in (COVID_DIR, KERMANY_DIR, EXTERNAL_DIR):
        if (folder / name).is_dir():
            counts = link_tree(folder / name, target / name)
            for key in totals:
                totals[key] += counts[key]
    return totals


def link_tree(source: Path, target: Path) -> dict[str, int]:
    """Mirror ``source`` into ``target`` with hard links per file (no copy), or symlinks where
    hard links are impossible (another filesystem, or a filesystem without them)."""
    counts = {"hardlinks": 0, "symlinks": 0}
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if d != "__MACOSX")
        rel = Path(dirpath).relative_to(source)
        (target / rel).mkdir(parents=True, exist_ok=True)
        for name in sorted(filenames):
            src = Path(dirpath) / name
            dst = target / rel / name
            try:
                os.link(src, dst)
                counts["hardlinks"] += 1
            except OSError:
                os.symlink(src.resolve(), dst)
                counts["symlinks"] += 1
    return counts


# --------------------------------------------------------------------------------------------
# Download: connectivity, resumable transfer, verification
# --------------------------------------------------------------------------------------------

def _offline_message(archives: Iterable[RemoteArchive], downloads: Path, reason: str) -> str:
    manual = "; ".join(f"{a.filename} from {a.url}" for a in archives)
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


def download(archive: RemoteArchive, downloads: Path, progress: bool = True,
             timeout: float = 30.0, chunk_size: int = 1 << 16) -> dict[str, Any]:
    """Fetch ``archive`` into ``downloads/<filename>`` (resuming ``<filename>.part``) and verify it.

    Returns ``{"file", "bytes", "sha256", "sha256_verified", "resumed_from"}``. A size or checksum
    mismatch deletes the partial file and raises :class:`PipelineError`; an interrupted transfer
    keeps it, so the next run resumes.
    """
    downloads.mkdir(parents=True, exist_ok=True)
    final = downloads / archive.filename
    if final.is_file():
        return _verify(archive, final, final, resumed_from=0, already=True)
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
    if not parts or parts[0] == "__MACOSX" or parts[-1] == ".DS_Store":
        return None
    return PurePosixPath(*parts)


def safe_extract(archive: Path, target: Path, progress: bool = True) -> int:
    """Extract a zip or tar archive into ``target``; returns the number of files written.

    Every member is checked BEFORE anything is written: absolute paths, ``..`` components,
    symbolic and hard links, and device files are refused (:class:`PipelineError`), so a hostile
    archive leaves nothing behind. ``__MACOSX/`` and ``.DS_Store`` entries are skipped.
    """
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()

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
                if rel is None or info.is_dir():
                    continue
                plan.append((info, destination(rel)))
            for info, out in tqdm(plan, desc=f"extract {archive.name}", unit="file",
                                  disable=not progress, leave=False):
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            return len(plan)
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
                if rel is None or member.isdir():
                    continue
                members.append((member, destination(rel)))
            for member, out in tqdm(members, desc=f"extract {archive.name}", unit="file",
                                    disable=not progress, leave=False):
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(member)
                if src is None:  # pragma: no cover - regular files always have data
                    continue
                with src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            return len(members)
    raise PipelineError(f"{archive}: neither a zip nor a tar archive (a broken download? delete "
                        "it and run the stage again)")


# --------------------------------------------------------------------------------------------
# Arranging extracted archives into the contract layout
# --------------------------------------------------------------------------------------------

def _walk_dirs(root: Path) -> list[Path]:
    """All folders under ``root``, shallowest first (skipping ``__MACOSX``)."""
    found = [root]
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__MACOSX")
        found.extend(Path(dirpath) / d for d in dirnames)
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


def arrange(layout: str, extracted: Path, target: Path, archive: str) -> dict[str, int]:
    """Move an extracted archive's dataset folder into place under ``target``."""
    if layout == "covid":
        source = find_folder(extracted, lambda p: (p / "metadata.csv").is_file()
                             and (p / "images").is_dir(), "metadata.csv + images/", archive)
        os.replace(source, target / COVID_DIR)
        return {"folders": 1}
    if layout == "kermany":
        source = find_folder(extracted, _is_kermany_root, "train/ and test/ with NORMAL/ and "
                             "PNEUMONIA/", archive)
        os.replace(source, target / KERMANY_DIR)
        return {"folders": 1}
    if layout == "actualmed":
        source = find_folder(extracted, lambda p: (p / "metadata.csv").is_file(),
                             "metadata.csv", archive)
        return arrange_external(source, target / EXTERNAL_DIR, archive)
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
                      progress: bool = True) -> list[dict[str, Any]]:
    """Download (or reuse), verify, safely extract and arrange every archive into ``target``."""
    results = []
    scratch = target / ".extract"
    for archive in archives:
        info = download(archive, downloads, progress=progress)
        # Run-dependent facts go to the log, not SOURCE.json, so that a rerun compares equal.
        cached, resumed = info.pop("cached"), info.pop("resumed_from")
        how = "cached" if cached else f"downloaded (resumed at byte {resumed:,})" if resumed \
            else "downloaded"
        log.info("%s: %s, %s bytes, sha256 %s", archive.filename, how, f"{info['bytes']:,}",
                 info["sha256"])
        extracted = scratch / archive.name
        info["files_extracted"] = safe_extract(downloads / archive.filename, extracted, progress)
        info["arranged"] = arrange(archive.layout, extracted, target, archive.filename)
        shutil.rmtree(extracted, ignore_errors=True)
        results.append(info)
    shutil.rmtree(scratch, ignore_errors=True)
    return results
