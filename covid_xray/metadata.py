"""Selecting COVID-19 X-rays from the ieee8023 ``metadata.csv``, on every published schema.

The collection's file changed shape several times: ``Patientid`` became ``patientid``, a ``folder``
column appeared, ``finding`` went from flat (``COVID-19``, ``COVID-19, ARDS``) to hierarchical
(``Pneumonia/Viral/COVID-19``, some with trailing spaces), and ``date`` mixes free-text formats
("January 22, 2020", "Mar 4, 2020", "2/29/2020", "2020", ISO). A literal ``finding == "COVID-19"``
silently selects nothing on today's file, so every filter here is normalised, every dropped row is
listed with its reason, and a filter that removes everything stops the stage with a message that
says which one.

The collection's own non-COVID X-rays (same modality and view filters) are selected too, as
*same-source negatives*: ``No Finding`` rows as ``normal``, infectious non-COVID pneumonias as
``pneumonia`` (:func:`negative_label`). They come from the same papers and websites as the COVID
images, so a model trained against them cannot separate the classes by source alone. copy_images
uses them only where ``copy.negatives`` lists ``covid_collection``. Every row also gets an
``origin`` (:func:`origin_of`: the url's domain, else the doi's registrant), the unit that
cross-source validation holds out.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pandas as pd

from covid_xray.errors import PipelineError
from covid_xray.io import write_csv
from covid_xray.params import SelectParams

REQUIRED_COLUMNS: tuple[str, ...] = ("patientid", "finding", "view", "modality", "date",
                                     "filename")
"""Columns every published schema has (after :func:`normalise_column`); ``folder`` is optional."""

OUTPUT_COLUMNS: tuple[str, ...] = ("patient_id", "filename", "image_path", "finding", "view",
                                   "modality", "date", "date_raw", "origin")
"""Columns of ``covid_selected.csv`` / ``covid_heldout.csv`` (docs/contracts.md)."""
NEGATIVE_COLUMNS: tuple[str, ...] = (*OUTPUT_COLUMNS, "label")
"""Columns of ``negatives_selected.csv`` / ``negatives_heldout.csv``: ``label`` normal|pneumonia."""
NEGATIVE_LABELS: tuple[str, ...] = ("normal", "pneumonia")
UNKNOWN_ORIGIN = "unknown"

DROP_REASONS: tuple[str, ...] = ("modality", "view", "finding", "no_filename", "bad_path",
                                 "duplicate", "missing_file")
"""Why a row is not selected, in the order the filters run (the first failing one is recorded)."""

DEFAULT_FOLDER = "images"
EXPECTED_SCHEMA = ("the ieee8023 covid-chestxray-dataset metadata.csv (columns patientid or "
                   "Patientid, finding, view, modality, date, filename, optional folder)")

_MONTHS: dict[str, int] = {name: index for index, name in enumerate(
    ("january", "february", "march", "april", "may", "june", "july", "august", "september",
     "october", "november", "december"), start=1)}


# --------------------------------------------------------------------------------------- columns
def normalise_column(name: str) -> str:
    """``" Clinical notes "`` -> ``clinical_notes``: the schemas differ in case and spacing only."""
    return re.sub(r"\s+", "_", str(name).replace("\ufeff", "").strip().lower())


def _norm_value(value: str) -> str:
    """Compare labels on letters and digits only: ``X-ray`` == ``x-ray `` == ``Xray``."""
    return re.sub(r"[^0-9a-z]", "", str(value).lower())


@dataclass(frozen=True)
class Schema:
    """Which published variant of metadata.csv was read (reported in the selection metric)."""

    patient_column: str
    folder_column: bool
    hierarchical_findings: bool

    @property
    def name(self) -> str:
        style = "hierarchical" if self.hierarchical_findings else "flat"
        folder = "folder" if self.folder_column else "no-folder"
        return f"{self.patient_column}/{folder}/{style}-findings"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "patient_column": self.patient_column,
                "folder_column": self.folder_column,
                "hierarchical_findings": self.hierarchical_findings}


def read_metadata(csv_path: Path) -> tuple[pd.DataFrame, Schema]:
    """Read metadata.csv as strings with normalised column names; detect its schema.

    Raises :class:`PipelineError` when the file is absent, unparsable or lacks a required column.
    """
    if not csv_path.is_file():
        raise PipelineError(f"{csv_path}: not found; run the acquire stage first "
                            "(or point data.source at a folder holding covid-chestxray-dataset/)")
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{csv_path}: cannot be read as CSV ({exc}); expected "
                            f"{EXPECTED_SCHEMA}") from exc
    original = [str(c) for c in frame.columns]
    normalised = [normalise_column(c) for c in original]
    frame.columns = normalised
    # The published files end each line with a comma: pandas adds an empty "Unnamed: N" column.
    unnamed = [c for c in normalised if c.startswith("unnamed:") and not frame[c].str.strip().any()]
    frame = frame.drop(columns=unnamed)
    duplicated = sorted({c for c in frame.columns if list(frame.columns).count(c) > 1})
    if duplicated:
        raise PipelineError(f"{csv_path}: columns {duplicated} appear twice after normalising "
                            f"names (case/spaces); expected {EXPECTED_SCHEMA}")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        found = ", ".join(c for c in original if not c.startswith("Unnamed")) or "(none)"
        raise PipelineError(
            f"{csv_path}: missing required column(s) {', '.join(missing)}; expected "
            f"{EXPECTED_SCHEMA}. Columns found: {found}")
    patient_column = original[normalised.index("patientid")].strip()
    schema = Schema(patient_column=patient_column, folder_column="folder" in frame.columns,
                    hierarchical_findings=bool(frame["finding"].str.contains("/").any()))
    return frame, schema


# -------------------------------------------------------------------------------------- findings
def finding_labels(value: str) -> tuple[set[str], set[str]]:
    """All labels a ``finding`` cell carries: (last-segment labels, full normalised paths).

    ``"COVID-19, ARDS"`` -> {covid19, ards}; ``"Pneumonia/Viral/COVID-19 "`` -> {covid19} (path
    ``pneumonia/viral/covid19``). Comma lists are split first, then each part's last ``/`` segment
    is taken, so old flat and new hierarchical labels compare equal.
    """
    leaves: set[str] = set()
    paths: set[str] = set()
    for part in str(value).split(","):
        segments = [_norm_value(s) for s in part.split("/")]
        segments = [s for s in segments if s]
        if segments:
            leaves.add(segments[-1])
            paths.add("/".join(segments))
    return leaves, paths


def finding_matches(value: str, wanted: Iterable[str]) -> bool:
    """Does a ``finding`` cell match any requested finding?

    A requested name without ``/`` matches the last segment (``COVID-19`` matches
    ``Pneumonia/Viral/COVID-19``); one with ``/`` (``Pneumonia/Viral``) matches that path prefix.
    """
    leaves, paths = finding_labels(value)
    for request in wanted:
        segments = [s for s in (_norm_value(p) for p in request.split("/")) if s]
        if not segments:
            continue
        if len(segments) == 1 and segments[0] in leaves:
            return True
        prefix = "/".join(segments)
        if len(segments) > 1 and any(p == prefix or p.startswith(prefix + "/") for p in paths):
            return True
    return False


PNEUMONIA_BRANCHES: tuple[str, ...] = ("pneumonia/bacterial", "pneumonia/viral",
                                       "pneumonia/fungal")
"""Hierarchical findings under these paths are infectious pneumonias (any leaf but COVID-19)."""
PNEUMONIA_LEAVES: frozenset[str] = frozenset({
    # the flat labels of the June 2020 file and the leaves of the hierarchical one
    "pneumonia", "bacterial", "viral", "fungal", "streptococcus", "staphylococcus", "mrsa",
    "klebsiella", "legionella", "mycoplasma", "mycoplasmabacterialpneumonia", "chlamydophila",
    "ecoli", "nocardia", "pneumocystis", "aspergillosis", "sars", "mers", "merscov", "influenza",
    "h1n1", "varicella", "herpes"})
"""Flat findings that are infectious non-COVID pneumonias. Not here, so never a negative:
``Lipoid`` (lipoid pneumonia is not an infection), ``Aspiration``, ``ARDS`` (a syndrome),
``Tuberculosis``, ``todo``, ``Unknown`` and COVID-19 itself."""


def _is_pneumonia(path: str) -> bool:
    if path.rsplit("/", 1)[-1] == "covid19":
        return False
    if any(path == branch or path.startswith(branch + "/") for branch in PNEUMONIA_BRANCHES):
        return True
    return path == "pneumonia" or ("/" not in path and path in PNEUMONIA_LEAVES)


def negative_label(value: str) -> str | None:
    """The negative class a ``finding`` cell stands for: ``normal``, ``pneumonia`` or None.

    ``No Finding`` (alone) is ``normal``; a cell is ``pneumonia`` when every label in it is an
    infectious non-COVID pneumonia (``Streptococcus``, ``Pneumonia/Fungal/Pneumocystis``,
    ``SARS``, ``Pneumonia``...). Anything else (``Lipoid``, ``ARDS``, ``todo``, a COVID-19 label,
    a mix with a non-pneumonia label) is None: not a negative of either model.
    """
    _, paths = finding_labels(value)
    if not paths:
        return None
    if paths == {"nofinding"}:
        return "normal"
    return "pneumonia" if all(_is_pneumonia(path) for path in paths) else None


def origin_of(url: str, doi: str = "") -> str:
    """Where a row was published: the url's domain without ``www.`` (``radiopaedia.org``), else
    ``doi:<registrant>`` (``doi:10.1148``, the publisher part of the doi), else ``unknown``."""
    first = str(url).strip().split()[0] if str(url).strip() else ""
    if first:
        try:
            host = urlsplit(first if "://" in first else f"//{first}").hostname or ""
        except ValueError:
            host = ""
        host = host.lower().removeprefix("www.")
        if "." in host:
            return host
    if match := re.match(r"\s*(?:https?://(?:dx\.)?doi\.org/)?(10\.\d{4,9})/", str(doi)):
        return f"doi:{match[1]}"
    return UNKNOWN_ORIGIN


# ----------------------------------------------------------------------------------------- dates
@dataclass(frozen=True)
class ParsedDate:
    """A date known to the day, the month, the year, or not at all."""

    raw: str
    year: int | None = None
    month: int | None = None
    day: int | None = None

    @property
    def precision(self) -> str:
        if self.day is not None:
            return "day"
        if self.month is not None:
            return "month"
        return "year" if self.year is not None else "none"

    @property
    def iso(self) -> str:
        """``YYYY-MM-DD``, ``YYYY-MM``, or empty when only the year (or nothing) is known."""
        if self.year is None or self.month is None:
            return ""
        if self.day is None:
            return f"{self.year:04d}-{self.month:02d}"
        return f"{self.year:04d}-{self.month:02d}-{self.day:02d}"


def _month_number(word: str) -> int | None:
    word = word.lower().rstrip(".")
    if len(word) < 3:
        return None
    for name, number in _MONTHS.items():
        if name.startswith(word) or (word == "sept" and name == "september"):
            return number
    return None


def _year(text: str) -> int | None:
    year = int(text)
    if len(text) == 2:
        year += 2000
    return year if 1900 <= year <= 2100 else None


def _valid(raw: str, year: int | None, month: int, day: int | None = None) -> ParsedDate:
    if year is None or not 1 <= month <= 12:
        return ParsedDate(raw)
    if day is not None:
        try:
            dt.date(year, month, day)
        except ValueError:
            return ParsedDate(raw)
    return ParsedDate(raw, year, month, day)


def parse_date(raw: str) -> ParsedDate:
    """Parse the collection's mixed date formats to what is actually known.

    Handles ISO (``2020-03-04``, ``2020-03``, ``2020/03/04``, with or without a time), month
    names (``January 22, 2020``, ``Mar 4, 2020``, ``4 March 2020``, ``March 2020``), a bare year
    (``2020``) and numeric day/month forms: with ``/`` month-first as the collection writes them
    (``2/29/2020``) unless the first number exceeds 12 (``29/2/2020``); with ``.`` or ``-``
    day-first (``29.02.2020``). Anything else, or a date without a year (``January 12``), is
    unknown: such rows are kept and counted as undatable, never guessed.
    """
    text = str(raw).strip()
    if not text:
        return ParsedDate(text)
    if match := re.fullmatch(r"(\d{4})[-/](\d{1,2})[-/](\d{1,2})(?:[ T].*)?", text):
        return _valid(text, _year(match[1]), int(match[2]), int(match[3]))
    if match := re.fullmatch(r"(\d{4})[-/](\d{1,2})", text):
        return _valid(text, _year(match[1]), int(match[2]))
    if match := re.fullmatch(r"(\d{4})", text):
        year = _year(match[1])
        return ParsedDate(text, year) if year is not None else ParsedDate(text)
    if match := re.fullmatch(r"(\d{1,2})([/.\-])(\d{1,2})\2(\d{4}|\d{2})", text):
        first, separator, second, year = int(match[1]), match[2], int(match[3]), _year(match[4])
        month_first = separator == "/"
        if first > 12 >= second:
            month_first = False
        elif second > 12 >= first:
            month_first = True
        month, day = (first, second) if month_first else (second, first)
        return _valid(text, year, month, day)
    words = re.sub(r"[,\s]+", " ", text).strip()
    ordinal = r"(\d{1,2})(?:st|nd|rd|th)?"
    if match := re.fullmatch(rf"([A-Za-z]+\.?) {ordinal} (\d{{4}})", words):
        month = _month_number(match[1])
        return _valid(text, _year(match[3]), month or 0, int(match[2]))
    if match := re.fullmatch(rf"{ordinal} ([A-Za-z]+\.?) (\d{{4}})", words):
        month = _month_number(match[2])
        return _valid(text, _year(match[3]), month or 0, int(match[1]))
    if match := re.fullmatch(r"([A-Za-z]+\.?) (\d{4})", words):
        month = _month_number(match[1])
        return _valid(text, _year(match[2]), month or 0)
    return ParsedDate(text)


def on_or_after(date: ParsedDate, cutoff: str) -> bool | None:
    """Is ``date`` in or after the ``YYYY-MM`` month ``cutoff``? ``None`` when it cannot be told.

    A date known only to the year is decidable when the year lies wholly on one side (``2019`` vs
    ``2020-03``: before; ``2021``: after; any year vs a January cutoff of that year: after);
    ``2020`` vs ``2020-03`` is undatable.
    """
    cut_year, cut_month = (int(part) for part in cutoff.split("-"))
    if date.year is None:
        return None
    if date.month is not None:
        return (date.year, date.month) >= (cut_year, cut_month)
    if date.year != cut_year:
        return date.year > cut_year
    return True if cut_month == 1 else None


# ------------------------------------------------------------------------------------- selection
@dataclass
class Selection:
    """The outcome of :func:`select_covid`: the tables and the report behind the metric."""

    selected: pd.DataFrame
    heldout: pd.DataFrame
    dropped: pd.DataFrame
    report: dict[str, Any] = field(default_factory=dict)
    negatives: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=list(NEGATIVE_COLUMNS)))
    """The collection's non-COVID rows for training (``label`` normal / pneumonia)."""
    negatives_heldout: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=list(NEGATIVE_COLUMNS)))
    """...and those dated in or after ``select.heldout_from`` (held out, like COVID rows)."""

    def summary(self) -> str:
        r = self.report
        dropped = ", ".join(f"{k} {v}" for k, v in r["dropped"].items() if v) or "none"
        negatives = r.get("negatives", {})
        same_source = "; ".join(
            f"{part} " + "/".join(f"{n} {label}" for label, n in counts.items())
            for part, counts in negatives.items())
        return (f"{r['rows_in']} metadata rows ({r['schema']['name']}): {r['rows_selected']} "
                f"training + {r['rows_heldout']} held-out (dated >= {r['heldout_from']}) images "
                f"of {r['patients']['selected']} + {r['patients']['heldout']} patients; "
                f"same-source negatives: {same_source or 'none'}; "
                f"dropped {r['dropped_total']} ({dropped}); undatable kept in training: "
                f"{r['undatable']}")


def _listing(values: pd.Series, limit: int = 8) -> str:
    counts = Counter(v.strip() or "(empty)" for v in values)
    shown = ", ".join(f"{value!r} ({n})" for value, n in counts.most_common(limit))
    more = len(counts) - limit
    return shown + (f", ... {more} more" if more > 0 else "")


def _safe_relative(folder: str, filename: str) -> str | None:
    """``folder/filename`` as a POSIX path inside the dataset, or ``None`` if it would escape."""
    path = PurePosixPath(folder.strip().strip("/") or DEFAULT_FOLDER) / filename.strip()
    if path.is_absolute() or ".." in path.parts or "\\" in str(path):
        return None
    return path.as_posix()


def select_covid(csv_path: Path, params: SelectParams) -> Selection:
    """Apply the seed's selection (modality, view, finding) to any schema of metadata.csv.

    Rows then need a safe, unique, existing image file; survivors dated in or after
    ``params.heldout_from`` are held out, the rest (undatable included, counted) are for
    training. Every other row goes to ``dropped`` with the first filter it failed. Raises
    :class:`PipelineError` naming the filter when one removes every remaining row. Rows of the
    same modality and view whose finding is a negative class (:func:`negative_label`) go through
    the same file checks and date rule into ``negatives`` / ``negatives_heldout`` instead (never
    an error when there are none).
    """
    frame, schema = read_metadata(csv_path)
    dataset_dir = csv_path.parent
    rows_in = len(frame)
    if rows_in == 0:
        raise PipelineError(f"{csv_path}: has a header but no rows")
    folders = frame["folder"] if schema.folder_column else pd.Series(DEFAULT_FOLDER,
                                                                       index=frame.index)
    reason = pd.Series("", index=frame.index, dtype=object)

    def apply(mask: pd.Series, name: str, describe: str, column: str, hint: str) -> None:
        """Record ``name`` for still-undropped rows failing ``mask``; stop if none survive."""
        alive = reason == ""
        failing = alive & ~mask
        reason[failing] = name
        if alive.any() and not (reason == "").any():
            raise PipelineError(
                f"{csv_path}: 0 rows with {describe} among {int(alive.sum())} rows left by the "
                f"earlier filters; their {column} values: {_listing(frame.loc[alive, column])}. "
                f"{hint}")

    modalities = {_norm_value(m) for m in params.modalities}
    apply(frame["modality"].map(lambda v: _norm_value(v) in modalities), "modality",
          f"modality in {list(params.modalities)}", "modality", "Check select.modalities.")
    views = {_norm_value(v) for v in params.views}
    apply(frame["view"].map(lambda v: _norm_value(v) in views), "view",
          f"view in {list(params.views)}", "view", "Check select.views.")
    apply(frame["finding"].map(lambda v: finding_matches(v, params.findings)), "finding",
          f"finding {' or '.join(params.findings)}", "finding",
          "Check select.findings (matched on the last '/' segment, case-insensitively).")
    # same modality and view, a negative finding: the collection's own negatives
    labels = frame["finding"].map(negative_label)
    negative = (reason == "finding") & labels.notna()
    reason[negative] = "negative"  # set aside while the COVID rows are checked
    apply(frame["filename"].str.strip() != "", "no_filename", "a file name", "filename",
          "The filename column is empty for every candidate row.")
    image_paths = pd.Series([_safe_relative(f, n) for f, n in zip(folders, frame["filename"],
                                                                  strict=True)],
                            index=frame.index, dtype=object)
    apply(image_paths.notna(), "bad_path", "a file name inside the dataset folder", "filename",
          "File names must not be absolute or contain '..'.")
    alive = reason == ""
    first_use = ~image_paths.where(alive).duplicated(keep="first") | ~alive
    apply(first_use, "duplicate", "a unique image file", "filename", "")
    exists = image_paths.map(lambda p: p is not None and (dataset_dir / p).is_file())
    alive = reason == ""
    if alive.any() and not (alive & exists).any():
        examples = ", ".join(image_paths[alive].head(3))
        raise PipelineError(
            f"{csv_path}: none of the {int(alive.sum())} selected rows has its image file under "
            f"{dataset_dir} (e.g. {examples}); is the dataset fully downloaded/extracted?")
    reason[alive & ~exists] = "missing_file"
    kept_negatives = _check_negative_files(reason, negative, frame["filename"], image_paths,
                                           exists)

    origins = _origins(frame)
    selected, heldout, undatable, precision = _by_date(
        frame[(reason == "") & ~kept_negatives], image_paths, origins, params.heldout_from)
    if selected.empty:
        raise PipelineError(
            f"{csv_path}: 0 training rows: all {len(heldout)} selected images are dated in or "
            f"after select.heldout_from={params.heldout_from}; choose a later month.")
    negatives, negatives_heldout, _, _ = _by_date(frame[kept_negatives], image_paths, origins,
                                                  params.heldout_from, labels)

    dropped_rows = frame[reason != ""]
    dropped = pd.DataFrame({"row": dropped_rows.index.astype(int),
                            "filename": dropped_rows["filename"].str.strip(),
                            "reason": reason[reason != ""]}, columns=["row", "filename", "reason"])
    per_reason = {name: int((reason == name).sum()) for name in DROP_REASONS}
    train_patients, heldout_patients = set(selected["patient_id"]), set(heldout["patient_id"])
    report: dict[str, Any] = {
        "rows_in": rows_in,
        "rows_selected": len(selected),
        "rows_heldout": len(heldout),
        "dropped": per_reason,
        "dropped_total": int(sum(per_reason.values())),
        "missing_files": per_reason["missing_file"],
        "undatable": undatable,
        "date_precision": precision,
        "patients": {"selected": len(train_patients), "heldout": len(heldout_patients),
                     "both": len(train_patients & heldout_patients)},
        "heldout_from": params.heldout_from,
        "schema": schema.as_dict(),
        "origins": int(pd.concat([selected["origin"], heldout["origin"]]).nunique()),
        "negatives": {part: {label: int((table["label"] == label).sum())
                             for label in NEGATIVE_LABELS}
                      for part, table in (("selected", negatives),
                                          ("heldout", negatives_heldout))},
    }
    return Selection(selected.reset_index(drop=True), heldout.reset_index(drop=True),
                     dropped.reset_index(drop=True), report, negatives.reset_index(drop=True),
                     negatives_heldout.reset_index(drop=True))


def _check_negative_files(reason: pd.Series, negative: pd.Series, filenames: pd.Series,
                          image_paths: pd.Series, exists: pd.Series) -> pd.Series:
    """The same file checks for the negative rows (no error when none survive): a file name,
    inside the dataset, not used by a selected COVID row or an earlier negative row, present.
    Sets ``reason`` of every ``negative`` row ("" when kept: it is not dropped); returns the
    rows kept."""
    taken = set(image_paths[reason == ""])
    kept = pd.Series(False, index=reason.index)
    for row in reason.index[negative]:
        path = image_paths[row]
        if not filenames[row].strip():
            reason[row] = "no_filename"
        elif path is None:
            reason[row] = "bad_path"
        elif path in taken:
            reason[row] = "duplicate"
        elif not exists[row]:
            reason[row] = "missing_file"
        else:
            reason[row] = ""
            kept[row] = True
        taken.add(path)
    return kept


def _origins(frame: pd.DataFrame) -> pd.Series:
    """:func:`origin_of` per row (url and doi columns are optional)."""
    empty = pd.Series("", index=frame.index)
    urls = frame["url"] if "url" in frame.columns else empty
    dois = frame["doi"] if "doi" in frame.columns else empty
    return pd.Series([origin_of(u, d) for u, d in zip(urls, dois, strict=True)],
                     index=frame.index, dtype=object)


def _by_date(kept: pd.DataFrame, image_paths: pd.Series, origins: pd.Series, cutoff: str,
             labels: pd.Series | None = None
             ) -> tuple[pd.DataFrame, pd.DataFrame, int, dict[str, int]]:
    """The output table of ``kept`` rows, split into (before ``cutoff`` or undatable, in or
    after it); plus the undatable count and the date precisions."""
    dates = kept["date"].map(parse_date)
    after = dates.map(lambda d: on_or_after(d, cutoff))
    columns = OUTPUT_COLUMNS if labels is None else NEGATIVE_COLUMNS
    table = pd.DataFrame({
        "patient_id": [_patient_id(p, i) for p, i in zip(kept["patientid"], kept.index,
                                                         strict=True)],
        "filename": kept["filename"].str.strip(),
        "image_path": image_paths[kept.index],
        "finding": kept["finding"].str.strip(),
        "view": kept["view"].str.strip(),
        "modality": kept["modality"].str.strip(),
        "date": dates.map(lambda d: d.iso),
        "date_raw": kept["date"].str.strip(),
        "origin": origins[kept.index],
        **({} if labels is None else {"label": labels[kept.index]}),
    }, index=kept.index, columns=list(columns))
    heldout_mask = after.map(lambda v: v is True).astype(bool)
    return (table[~heldout_mask], table[heldout_mask], int(after[~heldout_mask].isna().sum()),
            dict(Counter(d.precision for d in dates)))


def _patient_id(raw: str, row: int) -> str:
    """``covid-<patientid>``; a row without one counts as its own patient."""
    value = str(raw).strip()
    if re.fullmatch(r"\d+\.0+", value):  # "12.0" from a spreadsheet round trip
        value = value.split(".")[0]
    return f"covid-{value}" if value else f"covid-row{row}"


def write_selection(selection: Selection, interim_dir: Path) -> None:
    """Write the five tables of the contract into ``interim_dir`` (each atomically)."""
    for name, table in (("covid_selected.csv", selection.selected),
                        ("covid_heldout.csv", selection.heldout),
                        ("negatives_selected.csv", selection.negatives),
                        ("negatives_heldout.csv", selection.negatives_heldout),
                        ("dropped.csv", selection.dropped)):
        write_csv(interim_dir / name, list(table.columns),
                  list(table.itertuples(index=False, name=None)))
