"""Atomic writes and the stage entry-point wrapper.

Nothing half-written may survive a failure: every output is written to a temporary sibling and
renamed into place (``os.replace`` is atomic on one filesystem). Folders are built under a temporary
name and swapped in whole. A run killed mid-write (``kill -9``) leaves its temporary behind; the
next write of the same target removes it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covid_xray.errors import ParamsError, PipelineError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("covid_xray")


def require_stage_file(path: Path, produced_by: str) -> None:
    """The error for a missing stage input: the file, and the stage that writes it."""
    if not path.is_file():
        raise PipelineError(f"{path}: not found; run the {produced_by} stage first "
                            f"(`dvc repro {produced_by}`)")


def read_stage_csv(path: Path, required: Sequence[str], produced_by: str) -> pd.DataFrame:
    """A CSV an earlier stage wrote, as strings, checked for the ``required`` columns.

    The one place for the two errors every stage CSV can raise: the file is missing (run the
    stage that writes it) or lacks columns (named, with the expected set and the contract doc).
    """
    import pandas as pd  # here, not at module level: the web app imports this module too

    require_stage_file(path, produced_by)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise PipelineError(f"{path}: missing column(s) {', '.join(missing)} (expected "
                            f"{', '.join(required)}, the {produced_by} output: see "
                            f"docs/contracts.md); re-run {produced_by}")
    return frame


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (content identity of images and archives)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()


TEMP_MARK = ".tmp-"
"""Temporaries are named ``.<target name>.tmp-<pid>-<random>`` beside their target: the pid says
which process writes them (.gitignore and .dvcignore match the pattern)."""

_temps_lock = threading.Lock()
_open_temps: set[Path] = set()  # this process's temporaries still in use


def _new_temp(target: Path, make: Callable[[str, Path], str]) -> Path:
    """A fresh temporary beside ``target`` (``make`` is mkstemp or mkdtemp), after removing the
    stale ones an interrupted run left there."""
    with _temps_lock:
        remove_stale_temps(target)
        tmp = Path(make(f".{target.name}{TEMP_MARK}{os.getpid()}-", target.parent))
        _open_temps.add(Path(os.path.abspath(tmp)))
    return tmp


def _done_with_temp(tmp: Path) -> None:
    with _temps_lock:
        _open_temps.discard(Path(os.path.abspath(tmp)))


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete the temporaries beside ``target`` whose writer no longer runs (a killed stage's).

    Called whenever a stage writes ``target``, so the next run of a killed stage cleans up after
    it. A temporary is kept while its writer may still run: another live process with that pid
    which started before the temporary was last written (two DVC runs can share a workspace).
    """
    prefix = f".{target.name}{TEMP_MARK}"
    try:
        candidates = sorted(e for e in target.parent.iterdir() if e.name.startswith(prefix))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in candidates:
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or Path(os.path.abspath(entry)) in _open_temps \
                or _writer_may_run(int(pid), entry):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run: %s", len(removed),
                 ", ".join(str(p) for p in removed))
    return removed


def _writer_may_run(pid: int, entry: Path) -> bool:
    """Could process ``pid`` still be writing ``entry``? (psutil: portable process facts)."""
    import psutil

    if pid == os.getpid():
        return False  # not among this process's open temporaries: an earlier process's
    try:
        started = psutil.Process(pid).create_time()
        written = entry.lstat().st_mtime
    except (psutil.NoSuchProcess, FileNotFoundError):
        return False
    except psutil.Error:  # access denied: assume it is the writer
        return True
    # A process started after the temporary was last written is a reuse of the pid, not its
    # writer (2 s: process start times are rounded on some systems).
    return started <= written + 2.0


@contextlib.contextmanager
def atomic_path(target: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success rename it over ``target``, else delete it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)

    def make(prefix: str, folder: Path) -> str:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix or ".tmp", dir=folder)
        os.close(fd)
        return name

    tmp = _new_temp(target, make)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes 0600 files; outputs get the usual umask-based mode
            os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
        _done_with_temp(tmp)


@contextlib.contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield an empty temp folder beside ``target``; on success it replaces ``target`` whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)

    def make(prefix: str, folder: Path) -> str:
        return tempfile.mkdtemp(prefix=prefix, dir=folder)

    tmp = _new_temp(target, make)
    try:
        yield tmp
        os.chmod(tmp, _DIR_MODE)  # mkdtemp makes 0700 folders
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            old = _new_temp(target, make)  # the previous version, deleted once swapped out
            try:
                os.replace(target, old / "x")
                try:
                    os.replace(tmp, target)
                except OSError:
                    os.replace(old / "x", target)  # put the previous version back
                    raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
                _done_with_temp(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        _done_with_temp(tmp)


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path | str, payload: Any) -> None:
    """Pretty, key-sorted JSON so ``git diff`` and ``dvc metrics diff`` read well."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return value.as_posix()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def write_csv(path: Path | str, header: Sequence[str], rows: Sequence[Sequence[Any]],
              delimiter: str = ",") -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("tensorflow", "absl", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main()``: user errors become one clear line and exit status 1.

    A successful ``main()`` returns here and the interpreter shuts down the normal way (atexit
    handlers, buffered streams and library teardown all run).
    """
    setup_logging()
    try:
        main()
    except (ParamsError, PipelineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
