"""Atomic writes and the stage entry-point wrapper.

Nothing half-written may survive a failure: every output is written to a temporary sibling and
renamed into place (``os.replace`` is atomic on one filesystem). Folders are built under a temporary
name and swapped in whole.
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


class PipelineError(RuntimeError):
    """A user-fixable problem (bad input file, missing column...). Printed without a traceback."""


@contextlib.contextmanager
def atomic_path(target: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success rename it over ``target``, else delete it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp",
                                    dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes 0600 files; outputs get the usual umask-based mode
            os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield an empty temp folder beside ``target``; on success it replaces ``target`` whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, _DIR_MODE)  # mkdtemp makes 0700 folders
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
    from covid_xray.params import ParamsError

    setup_logging()
    try:
        main()
    except (ParamsError, PipelineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
