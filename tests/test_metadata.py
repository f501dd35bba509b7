"""select_metadata: the seed's selection on every published schema of metadata.csv."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from covid_xray.errors import PipelineError
from covid_xray.metadata import (
    OUTPUT_COLUMNS,
    finding_labels,
    finding_matches,
    normalise_column,
    on_or_after,
    parse_date,
    read_metadata,
    select_covid,
)
from covid_xray.params import SelectParams

NEW_HEADER = ["patientid", "offset", "sex", "age", "finding", "RT_PCR_positive", "survival",
              "view", "modality", "date", "location", "folder", "filename", "doi", "url",
              "license", "clinical_notes", "other_notes", ""]  # trailing comma: unnamed column
OLD_HEADER = ["Patientid", "offset", "sex", "age", "finding", "survival", "view", "modality",
              "date", "location", "filename", "doi", " url", "license", "clinical notes",
              "other notes", ""]

# (patient, finding_old, finding_new, view, modality, date, folder, filename, file_exists)
ROWS: list[tuple[str, str, str, str, str, str, str, str, bool]] = [
    ("1", "COVID-19", "Pneumonia/Viral/COVID-19", "PA", "X-ray", "January 22, 2020", "images",
     "p1a.jpg", True),
    ("1", "COVID-19", "Pneumonia/Viral/COVID-19 ", "PA", "X-ray", "Mar 4, 2020", "images",
     "p1b.jpg", True),                                              # held out (March 2020)
    ("2", "COVID-19, ARDS", "Pneumonia/Viral/COVID-19", "PA", "X-ray", "2020", "images",
     "p2a.png", True),                                              # undatable, stays in training
    ("3", "COVID-19", "Pneumonia/Viral/COVID-19", "PA", "X-ray", "2/29/2020", "images",
     "p3a.jpg", True),
    ("3", "COVID-19", "Pneumonia/Viral/COVID-19", "PA", "X-ray", "3/7/2020", "images",
     "p3b.jpg", False),                                             # missing file
    ("4", "COVID-19", "Pneumonia/Viral/COVID-19", "AP Supine", "X-ray", "2020", "images",
     "p4a.jpg", True),                                              # view
    ("5", "COVID-19", "Pneumonia/Viral/COVID-19", "Axial", "CT", "2020", "volumes",
     "p5.nii.gz", False),                                           # modality
    ("6", "SARS", "Pneumonia/Viral/SARS", "PA", "X-ray", "2004", "images", "p6.jpg", True),
    ("7", "Streptococcus", "Pneumonia/Bacterial/Streptococcus", "PA", "x-ray ", "2019",
     "images", "p7.jpg", True),                                     # finding
    ("8", "COVID-19", "Pneumonia/Viral/COVID-19", " pa", "X-Ray", "2020-04-02", "images",
     "p8.jpg", True),                                               # held out, ISO, odd case
    ("9", "No Finding", "No Finding", "PA", "X-ray", "", "images", "p9.jpg", True),
]


def write_image(path: Path, seed: int, size: int = 32) -> None:
    """A tiny, smooth grey image (film-like: copy_images' image checks accept it) whose content
    is unique to ``seed`` (so hashes never collide)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).normal(size=(size, size + seed % 7)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 3)
    assert cv2.imwrite(str(path), cv2.normalize(smooth, None, 20, 235, cv2.NORM_MINMAX)
                       .astype(np.uint8))


def write_metadata(dataset: Path, schema: str, rows: list[tuple] = ROWS,
                   images: bool = True) -> Path:
    """metadata.csv in the ``old`` (Patientid, flat, no folder) or ``new`` schema + images."""
    dataset.mkdir(parents=True, exist_ok=True)
    header = OLD_HEADER if schema == "old" else NEW_HEADER
    lines = []
    for index, (patient, old, new, view, modality, date, folder, name, exists) in enumerate(rows):
        values = dict.fromkeys(header, "")
        values.update({header[0]: patient, "finding": old if schema == "old" else new,
                       "view": view, "modality": modality, "date": date, "filename": name,
                       "folder": folder})
        if schema == "old" and folder != "images":
            values["filename"] = name  # the old schema has no folder column
        lines.append([values[h] for h in header])
        if images and exists:
            write_image(dataset / (folder if schema == "new" else "images") / name, index)
    path = dataset / "metadata.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(lines)
    return path


# ------------------------------------------------------------------------------------- columns
@pytest.mark.parametrize(("raw", "expected"), [
    ("Patientid", "patientid"), (" url", "url"), ("clinical notes", "clinical_notes"),
    ("RT_PCR_positive", "rt_pcr_positive"), ("\ufeffpatientid", "patientid"),
])
def test_column_names_are_normalised(raw: str, expected: str) -> None:
    assert normalise_column(raw) == expected


@pytest.mark.parametrize(("value", "selected"), [
    ("COVID-19", True), ("COVID-19, ARDS", True), ("ARDS, COVID-19", True),
    ("Pneumonia/Viral/COVID-19", True), ("Pneumonia/Viral/COVID-19 ", True),
    (" covid-19", True), ("COVID19", True),
    ("SARS", False), ("ARDS", False), ("Pneumonia/Viral/SARS", False), ("No Finding", False),
    ("todo", False), ("Unknown", False), ("", False), ("COVID-19/Other", False),
])
def test_findings_match_on_last_segment(value: str, selected: bool) -> None:
    assert finding_matches(value, ["COVID-19"]) is selected


def test_finding_with_a_path_matches_that_branch() -> None:
    assert finding_labels("Pneumonia/Viral/COVID-19, ARDS") == (
        {"covid19", "ards"}, {"pneumonia/viral/covid19", "ards"})
    assert finding_matches("Pneumonia/Viral/SARS", ["Pneumonia/Viral"])
    assert not finding_matches("Pneumonia/Bacterial/Streptococcus", ["Pneumonia/Viral"])
    assert finding_matches("Pneumonia/Bacterial/Streptococcus", ["Streptococcus", "SARS"])


# --------------------------------------------------------------------------------------- dates
@pytest.mark.parametrize(("raw", "iso", "precision", "after_march"), [
    ("January 22, 2020", "2020-01-22", "day", False),
    ("Jan 24, 2020", "2020-01-24", "day", False),
    ("Mar 4, 2020", "2020-03-04", "day", True),
    ("Mar. 4, 2020", "2020-03-04", "day", True),
    ("Sept 3, 2020", "2020-09-03", "day", True),
    ("4 March 2020", "2020-03-04", "day", True),
    ("March 2020", "2020-03", "month", True),
    ("Feb 2020", "2020-02", "month", False),
    ("2020-03-04", "2020-03-04", "day", True),
    ("2020-03-04T10:11:12", "2020-03-04", "day", True),
    ("2020/02/28", "2020-02-28", "day", False),
    ("2020-02", "2020-02", "month", False),
    ("2/29/2020", "2020-02-29", "day", False),     # month-first, as the collection writes
    ("3/3/2020", "2020-03-03", "day", True),
    ("29/02/2020", "2020-02-29", "day", False),    # day-first when the first number > 12
    ("04.03.2020", "2020-03-04", "day", True),     # dots: European day-first
    ("3/7/20", "2020-03-07", "day", True),
    ("2020", "", "year", None),                    # same year as the cutoff: undatable
    ("2019", "", "year", False),
    ("2004", "", "year", False),
    ("2021", "", "year", True),
    ("January 12", "", "none", None),              # no year
    ("", "", "none", None),
    ("unknown", "", "none", None),
    ("2020-13-01", "", "none", None),
    ("2/30/2020", "", "none", None),
])
def test_mixed_date_formats(raw: str, iso: str, precision: str, after_march: bool | None) -> None:
    parsed = parse_date(raw)
    assert (parsed.iso, parsed.precision) == (iso, precision)
    assert on_or_after(parsed, "2020-03") is after_march


def test_year_only_dates_against_a_january_cutoff_are_decidable() -> None:
    assert on_or_after(parse_date("2020"), "2020-01") is True
    assert on_or_after(parse_date("2019"), "2020-01") is False


# ----------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("schema", ["old", "new"])
def test_selection_on_both_schemas(tmp_path: Path, schema: str) -> None:
    csv_path = write_metadata(tmp_path / "covid-chestxray-dataset", schema)
    selection = select_covid(csv_path, SelectParams())
    assert list(selection.selected.columns) == list(OUTPUT_COLUMNS)
    assert list(selection.selected["filename"]) == ["p1a.jpg", "p2a.png", "p3a.jpg"]
    assert list(selection.heldout["filename"]) == ["p1b.jpg", "p8.jpg"]
    assert list(selection.selected["patient_id"]) == ["covid-1", "covid-2", "covid-3"]
    assert list(selection.selected["image_path"]) == ["images/p1a.jpg", "images/p2a.png",
                                                      "images/p3a.jpg"]
    assert list(selection.selected["date"]) == ["2020-01-22", "", "2020-02-29"]
    assert list(selection.heldout["date_raw"]) == ["Mar 4, 2020", "2020-04-02"]
    reasons = dict(zip(selection.dropped["filename"], selection.dropped["reason"], strict=True))
    assert reasons == {"p3b.jpg": "missing_file", "p4a.jpg": "view", "p5.nii.gz": "modality",
                       "p6.jpg": "finding", "p7.jpg": "finding", "p9.jpg": "finding"}
    assert list(selection.dropped["row"]) == [4, 5, 6, 7, 8, 10]
    report = selection.report
    assert report["rows_in"] == len(ROWS)
    assert (report["rows_selected"], report["rows_heldout"]) == (3, 2)
    assert report["dropped"]["finding"] == 3 and report["dropped"]["missing_file"] == 1
    assert report["dropped_total"] == 6 == report["rows_in"] - 5
    assert report["undatable"] == 1
    assert report["patients"] == {"selected": 3, "heldout": 2, "both": 1}
    assert report["schema"]["patient_column"] == ("Patientid" if schema == "old" else "patientid")
    assert report["schema"]["folder_column"] is (schema == "new")
    assert report["schema"]["hierarchical_findings"] is (schema == "new")
    json.dumps(report)  # the metric file must serialise


def test_folder_column_is_used_and_empty_folder_defaults_to_images(tmp_path: Path) -> None:
    rows = [("1", "COVID-19", "COVID-19", "PA", "X-ray", "2020", "images", "a.jpg", True),
            ("2", "COVID-19", "COVID-19", "PA", "X-ray", "2020", "", "b.jpg", False),
            ("3", "COVID-19", "COVID-19", "PA", "X-ray", "2020", "scans", "c.jpg", True)]
    dataset = tmp_path / "ds"
    csv_path = write_metadata(dataset, "new", rows)
    write_image(dataset / "images" / "b.jpg", 99)
    selection = select_covid(csv_path, SelectParams())
    assert list(selection.selected["image_path"]) == ["images/a.jpg", "images/b.jpg",
                                                      "scans/c.jpg"]


def test_unsafe_paths_and_duplicate_rows_are_dropped(tmp_path: Path) -> None:
    rows = [("1", "COVID-19", "COVID-19", "PA", "X-ray", "2020", "images", "a.jpg", True),
            ("1", "COVID-19", "COVID-19", "PA", "X-ray", "2020", "images", "a.jpg", True),
            ("2", "COVID-19", "COVID-19", "PA", "X-ray", "2020", "images", "../../etc/passwd",
             False),
            ("3", "COVID-19", "COVID-19", "PA", "X-ray", "2020", "images", " ", False)]
    selection = select_covid(write_metadata(tmp_path / "ds", "new", rows), SelectParams())
    assert len(selection.selected) == 1
    assert list(selection.dropped["reason"]) == ["duplicate", "bad_path", "no_filename"]


def test_params_change_what_is_selected(tmp_path: Path) -> None:
    csv_path = write_metadata(tmp_path / "ds", "new")
    selection = select_covid(csv_path, SelectParams(views=("PA", "AP Supine"),
                                                    findings=("COVID-19", "SARS"),
                                                    heldout_from="2020-04"))
    assert set(selection.selected["filename"]) == {"p1a.jpg", "p1b.jpg", "p2a.png", "p3a.jpg",
                                                   "p4a.jpg", "p6.jpg"}
    assert list(selection.heldout["filename"]) == ["p8.jpg"]


def test_missing_column_names_file_column_and_schema(tmp_path: Path) -> None:
    csv_path = tmp_path / "metadata.csv"
    pd.DataFrame({"Patientid": ["1"], "finding": ["COVID-19"], "modality": ["X-ray"],
                  "filename": ["a.jpg"]}).to_csv(csv_path, index=False)
    with pytest.raises(PipelineError) as info:
        read_metadata(csv_path)
    message = str(info.value)
    assert str(csv_path) in message
    assert "missing required column(s) view, date" in message
    assert "covid-chestxray-dataset" in message and "Patientid" in message


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"metadata\.csv: not found; run the acquire stage"):
        select_covid(tmp_path / "metadata.csv", SelectParams())


def test_empty_selection_names_the_filter_and_what_is_there(tmp_path: Path) -> None:
    csv_path = write_metadata(tmp_path / "ds", "new")
    with pytest.raises(PipelineError) as info:
        select_covid(csv_path, SelectParams(findings=("Influenza",)))
    message = str(info.value)
    assert "0 rows with finding Influenza among 9 rows" in message
    assert "'Pneumonia/Viral/COVID-19' (6)" in message and "select.findings" in message
    with pytest.raises(PipelineError, match=r"0 rows with modality in \['MRI'\].*'X-ray'"):
        select_covid(csv_path, SelectParams(modalities=("MRI",)))
    with pytest.raises(PipelineError, match=r"0 rows with view in \['L'\].*select.views"):
        select_covid(csv_path, SelectParams(views=("L",)))


def test_all_images_missing_says_so(tmp_path: Path) -> None:
    csv_path = write_metadata(tmp_path / "ds", "old", images=False)
    with pytest.raises(PipelineError, match="none of the 6 selected rows has its image file"):
        select_covid(csv_path, SelectParams())


def test_everything_held_out_is_an_error(tmp_path: Path) -> None:
    csv_path = write_metadata(tmp_path / "ds", "new")
    with pytest.raises(PipelineError, match=r"0 training rows.*select\.heldout_from=2019-06"):
        select_covid(csv_path, SelectParams(heldout_from="2019-06"))


# ------------------------------------------------------------------------------- real sample
def test_real_sample_old_schema_with_missing_images(xray_sample: Path) -> None:
    csv_path = xray_sample / "covid-chestxray-dataset" / "metadata.csv"
    selection = select_covid(csv_path, SelectParams())
    report = selection.report
    assert report["rows_in"] == 146
    assert report["schema"]["patient_column"] == "Patientid"
    assert report["schema"]["folder_column"] is False
    assert report["dropped"]["modality"] == 23  # the CT rows
    assert report["missing_files"] > 0  # a partial download: counted, not fatal
    assert report["rows_selected"] + report["rows_heldout"] + report["dropped_total"] == 146
    assert report["rows_heldout"] >= 1 and report["undatable"] > 0
    for path in pd.concat([selection.selected, selection.heldout])["image_path"]:
        assert (csv_path.parent / path).is_file()
    assert (selection.selected["modality"] == "X-ray").all()
    assert (selection.heldout["date"] >= "2020-03").all()


# -------------------------------------------------------------------------------- stage main
def test_stage_writes_tables_and_metric(tmp_path: Path, repo_root: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import select_metadata

    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    write_metadata(tmp_path / "data" / "raw" / "covid-chestxray-dataset", "new")
    stale = tmp_path / "data" / "interim" / "stale.csv"
    stale.parent.mkdir(parents=True)
    stale.write_text("old")
    monkeypatch.setenv("COVID_XRAY_ROOT", str(tmp_path))
    select_metadata.main()
    interim = tmp_path / "data" / "interim"
    assert sorted(p.name for p in interim.iterdir()) == ["covid_heldout.csv",
                                                        "covid_selected.csv", "dropped.csv"]
    selected = pd.read_csv(interim / "covid_selected.csv", dtype=str, keep_default_na=False)
    assert list(selected.columns) == list(OUTPUT_COLUMNS) and len(selected) == 3
    dropped = pd.read_csv(interim / "dropped.csv")
    assert list(dropped.columns) == ["row", "filename", "reason"]
    metric = json.loads((tmp_path / "metrics" / "selection.json").read_text())
    assert metric["rows_selected"] == 3 and metric["dropped"]["missing_file"] == 1
