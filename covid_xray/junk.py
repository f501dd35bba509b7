"""Operating-system litter in data folders and archives: never an image, never counted as one.

The published archives carry it: Mendeley's ``ChestXRay2017.zip`` and Kaggle's
``chest-xray-pneumonia.zip`` were zipped on a Mac, so they hold a ``__MACOSX/`` folder of
AppleDouble metadata files (``._<name>.jpeg``: 4 KiB of resource fork, not a JPEG) and Finder's
``.DS_Store``. A copy through a non-Mac filesystem leaves ``._<name>`` beside each file, and
Windows Explorer writes ``Thumbs.db`` and ``desktop.ini``. acquire skips them while extracting or
linking (counted by kind in ``data/raw/SOURCE.json``); the data stages ignore any that appear in
``data/raw`` later, so none is ever reported as a corrupt image. One module, imported by both,
so the two agree on what is junk.
"""

from __future__ import annotations

from pathlib import PurePath, PurePosixPath

MACOSX_DIR = "__MACOSX"

JUNK_KINDS: dict[str, str] = {
    "macosx": "in __MACOSX/",
    "appledouble": "AppleDouble ._*",
    "ds_store": ".DS_Store",
    "windows": "Thumbs.db/desktop.ini",
}
"""Each kind as SOURCE.json counts it, with the words the log line uses for it."""


def junk_kind(path: str | PurePath) -> str | None:
    """The kind of junk ``path`` is (a key of :data:`JUNK_KINDS`), or ``None`` for a real file.

    Pass a path relative to the folder being read: any ``__MACOSX`` component in it counts.
    """
    posix = PurePosixPath(str(path).replace("\\", "/"))
    if MACOSX_DIR in posix.parts:
        return "macosx"
    name = posix.name
    if name.startswith("._"):
        return "appledouble"
    if name == ".DS_Store":
        return "ds_store"
    if name.lower() in ("thumbs.db", "desktop.ini"):
        return "windows"
    return None


def is_junk(path: str | PurePath) -> bool:
    """Is ``path`` (relative to the folder being read) operating-system litter, not data?"""
    return junk_kind(path) is not None
