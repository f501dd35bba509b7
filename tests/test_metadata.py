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
    NEGATIVE_COLUMNS,
    OUTPUT_COLUMNS,
    finding_labels,
    finding_matches,
    negative_label,
    normalise_column,
    on_or_after,
    origin_of,
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


# ---------------------------------------------------------------------- same-source negatives
@pytest.mark.parametrize(("value", "label"), [
    ("No Finding", "normal"), ("No finding ", "normal"),
    ("Streptococcus", "pneumonia"), ("Pneumocystis", "pneumonia"), ("SARS", "pneumonia"),
    ("Pneumonia", "pneumonia"), ("Klebsiella", "pneumonia"), ("Legionella", "pneumonia"),
    ("Varicella", "pneumonia"), ("E.Coli", "pneumonia"), ("Chlamydophila", "pneumonia"),
    ("Influenza", "pneumonia"), ("Mycoplasma Bacterial Pneumonia", "pneumonia"),
    ("Bacterial", "pneumonia"), ("Pneumonia/Bacterial/Streptococcus", "pneumonia"),
    ("Pneumonia/Fungal/Pneumocystis", "pneumonia"), ("Pneumonia/Viral/SARS", "pneumonia"),
    ("Pneumonia/Viral/Influenza/H1N1", "pneumonia"),
    ("Pneumonia/Bacterial/Staphylococcus/MRSA", "pneumonia"),
    # not infectious, not a pneumonia, unknown, or COVID-19 itself: never a negative
    ("Lipoid", None), ("Pneumonia/Lipoid", None), ("Pneumonia/Aspiration", None),
    ("ARDS", None), ("Tuberculosis", None), ("todo", None), ("Unknown", None), ("", None),
    ("COVID-19", None), ("Pneumonia/Viral/COVID-19", None), ("COVID-19, ARDS", None),
    ("Streptococcus, ARDS", None), ("No Finding, Pneumonia", None),
])
def test_negative_findings_map_to_a_class_or_to_none(value: str, label: str | None) -> None:
    assert negative_label(value) == label


@pytest.mark.parametrize(("url", "doi", "origin"), [
    ("https://radiopaedia.org/cases/covid-19-pneumonia-7", "", "radiopaedia.org"),
    ("https://www.eurorad.org/case/16664", "10.1/x", "eurorad.org"),
    ("HTTPS://WWW.NEJM.org/doi/full/10.1056/NEJMc2001272", "", "nejm.org"),
    ("radiopaedia.org/cases/x", "", "radiopaedia.org"),
    ("https://a.org/1 https://b.org/2", "", "a.org"),
    ("", "10.1148/radiol.2020200230", "doi:10.1148"),
    ("", "https://doi.org/10.1016/j.jmii.2020.03.008", "doi:10.1016"),
    ("not a url", "", "unknown"), ("", "", "unknown"),
])
def test_origin_is_the_url_domain_else_the_doi_registrant(url: str, doi: str,
                                                          origin: str) -> None:
    assert origin_of(url, doi) == origin


def test_collection_negatives_get_the_same_checks_dates_and_origins(tmp_path: Path) -> None:
    rows = [*ROWS,
            ("10", "No Finding", "No Finding", "PA", "X-ray", "April 2, 2020", "images",
             "p10.jpg", True),                                      # held out like COVID
            ("11", "Lipoid", "Pneumonia/Lipoid", "PA", "X-ray", "2019", "images", "p11.jpg",
             True),                                                 # not infectious: finding
            ("12", "Klebsiella", "Pneumonia/Bacterial/Klebsiella", "PA", "X-ray", "2019",
             "images", "p12.jpg", False),                           # missing file
            ("13", "Streptococcus", "Pneumonia/Bacterial/Streptococcus", "PA", "X-ray", "2019",
             "images", "p1a.jpg", True),                            # a COVID row's file
            ("14", "Streptococcus", "Pneumonia/Bacterial/Streptococcus", "AP", "X-ray", "2019",
             "images", "p14.jpg", True)]                            # view
    csv_path = write_metadata(tmp_path / "ds", "new", rows)
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    frame["url"] = [f"https://www.site{int(p) % 3}.org/case/{p}" for p in frame["patientid"]]
    frame.to_csv(csv_path, index=False)
    selection = select_covid(csv_path, SelectParams())
    assert list(selection.negatives["filename"]) == ["p6.jpg", "p7.jpg", "p9.jpg"]
    assert list(selection.negatives_heldout["filename"]) == ["p10.jpg"]
    assert list(selection.negatives_heldout["label"]) == ["normal"]
    reasons = dict(zip(selection.dropped["filename"], selection.dropped["reason"], strict=True))
    assert {name: reasons[name] for name in ("p11.jpg", "p12.jpg", "p14.jpg")} == {
        "p11.jpg": "finding", "p12.jpg": "missing_file", "p14.jpg": "view"}
    assert reasons["p1a.jpg"] == "duplicate"  # the COVID row keeps its file
    assert list(selection.selected["filename"]) == ["p1a.jpg", "p2a.png", "p3a.jpg"]
    assert list(selection.selected["origin"]) == ["site1.org", "site2.org", "site0.org"]
    assert list(selection.negatives["origin"]) == ["site0.org", "site1.org", "site0.org"]
    assert selection.report["origins"] == 3  # COVID rows' origins, training and held out
    assert selection.report["negatives"]["heldout"] == {"normal": 1, "pneumonia": 0}


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
    assert reasons == {"p3b.jpg": "missing_file", "p4a.jpg": "view", "p5.nii.gz": "modality"}
    assert list(selection.dropped["row"]) == [4, 5, 6]
    # SARS, Streptococcus and No Finding PA X-rays: the collection's own negatives
    assert list(selection.negatives.columns) == list(NEGATIVE_COLUMNS)
    assert dict(zip(selection.negatives["filename"], selection.negatives["label"],
                    strict=True)) == {"p6.jpg": "pneumonia", "p7.jpg": "pneumonia",
                                      "p9.jpg": "normal"}
    assert list(selection.negatives["patient_id"]) == ["covid-6", "covid-7", "covid-9"]
    assert selection.negatives_heldout.empty
    report = selection.report
    assert report["rows_in"] == len(ROWS)
    assert (report["rows_selected"], report["rows_heldout"]) == (3, 2)
    assert report["dropped"]["finding"] == 0 and report["dropped"]["missing_file"] == 1
    assert report["dropped_total"] == 3 == report["rows_in"] - 5 - 3
    assert report["negatives"] == {"selected": {"normal": 1, "pneumonia": 2},
                                   "heldout": {"normal": 0, "pneumonia": 0}}
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
    negatives = sum(n for part in report["negatives"].values() for n in part.values())
    assert negatives == len(selection.negatives) + len(selection.negatives_heldout) > 0
    assert (report["rows_selected"] + report["rows_heldout"] + negatives
            + report["dropped_total"]) == 146
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
    assert sorted(p.name for p in interim.iterdir()) == [
        "covid_heldout.csv", "covid_selected.csv", "dropped.csv", "negatives_heldout.csv",
        "negatives_selected.csv"]
    negatives = pd.read_csv(interim / "negatives_selected.csv", dtype=str, keep_default_na=False)
    assert list(negatives.columns) == list(NEGATIVE_COLUMNS) and len(negatives) == 3
    selected = pd.read_csv(interim / "covid_selected.csv", dtype=str, keep_default_na=False)
    assert list(selected.columns) == list(OUTPUT_COLUMNS) and len(selected) == 3
    dropped = pd.read_csv(interim / "dropped.csv")
    assert list(dropped.columns) == ["row", "filename", "reason"]
    metric = json.loads((tmp_path / "metrics" / "selection.json").read_text())
    assert metric["rows_selected"] == 3 and metric["dropped"]["missing_file"] == 1
