"""The demo data set: deterministic, in both real layouts with their quirks, learnable from the
lungs but not from trivial image statistics (unless the source artefact is planted)."""

from __future__ import annotations

import csv
import gzip
import hashlib
import re
from collections import defaultdict
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from covid_xray.demo import (
    COVID_FINDING,
    DEMO_SITES,
    METADATA_COLUMNS,
    external_count,
    generate_demo,
    generate_folder,
)
from covid_xray.imaging import load_image, read_image_info, resize_square
from covid_xray.params import DemoParams

TINY = DemoParams(covid_patients=8, kermany_train=6, kermany_test=3, max_side=64)
SMALL = DemoParams(covid_patients=40, kermany_train=60, kermany_test=8, max_side=96)
PROXY = DemoParams(covid_patients=50, kermany_train=100, kermany_test=4, max_side=96)


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo_small")
    return root, generate_demo(root, SMALL, seed=7, progress=False)


@pytest.fixture(scope="module")
def proxy_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    sets = {}
    for artifact in (False, True):
        root = tmp_path_factory.mktemp(f"demo_proxy_{artifact}")
        generate_demo(root, DemoParams(**{**PROXY.__dict__, "plant_artifact": artifact}),
                      seed=42, progress=False)
        sets["artifact" if artifact else "clean"] = root
    return sets


def _metadata(root: Path) -> list[dict[str, str]]:
    with (root / "covid-chestxray-dataset" / "metadata.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _selectable(row: dict[str, str]) -> bool:
    return (row["finding"].strip().split("/")[-1].lower() == "covid-19" and row["view"] == "PA"
            and row["modality"] == "X-ray")


def _parse_date(text: str) -> date | None:
    """Only full dates; year-only, month-less and empty dates are undatable."""
    for fmt in ("%B %d, %Y", "%b %d, %Y", "%m/%d/%Y"):
        try:
            return datetime.strptime(text.strip(), fmt).date()
        except ValueError:
            continue
    return None


def _covid_paths(root: Path) -> list[Path]:
    base = root / "covid-chestxray-dataset"
    paths = [base / r["folder"] / r["filename"] for r in _metadata(root) if _selectable(r)]
    return [p for p in paths if p.is_file()]


def _kermany(root: Path, label: str) -> list[Path]:
    return sorted((root / "chest_xray" / "train" / label).iterdir())


# ---------------------------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    counts_a = generate_demo(first, TINY, seed=3, progress=False)
    counts_b = generate_demo(second, TINY, seed=3, progress=False)
    generate_demo(other, TINY, seed=4, progress=False)
    digest = _tree_digest(first)
    assert len(digest) > 40
    assert digest == _tree_digest(second)
    assert counts_a == counts_b
    assert digest != _tree_digest(other)


def test_collection_negatives_and_sites_leave_every_other_file_as_it_was(
        tmp_path: Path) -> None:
    """Version 2 added the collection's own negatives and site urls: the metadata changes, every
    image of a demo without them stays byte-identical (committed demo metrics do not move)."""
    without = _tree_digest(generate_demo_dir(tmp_path / "a", TINY, collection_negatives=0))
    with_them = _tree_digest(generate_demo_dir(tmp_path / "b", TINY, collection_negatives=6))
    changed = {k for k in without if without[k] != with_them.get(k)}
    assert changed == {"covid-chestxray-dataset/metadata.csv"}
    added = set(with_them) - set(without)
    assert len(added) >= 6 and all("/images/demo-negative-" in f"/{k}" for k in added)


def generate_demo_dir(root: Path, params: DemoParams, **changes: int) -> Path:
    generate_demo(root, DemoParams(**{**params.__dict__, **changes}), seed=3, progress=False)
    return root


def test_collection_negatives_come_from_the_covid_images_sites(small: tuple[Path, dict]) -> None:
    from covid_xray.metadata import negative_label, origin_of

    root, counts = small
    rows = _metadata(root)
    assert {origin_of(r["url"], r["doi"]) for r in rows} == set(DEMO_SITES)
    negatives = [r for r in rows if r["filename"].startswith("demo-negative-")]
    assert len(negatives) == counts["collection_negative_rows"] > 0
    assert {r["view"] for r in negatives} == {"PA"}
    assert {negative_label(r["finding"]) for r in negatives} == {"normal", "pneumonia"}
    covid_sites = {origin_of(r["url"]) for r in rows if _selectable(r)}
    negative_sites = {origin_of(r["url"]) for r in negatives}
    assert len(covid_sites & negative_sites) >= 3  # same-source negatives for several sites
    base = root / "covid-chestxray-dataset"
    assert all((base / r["folder"] / r["filename"]).is_file() for r in negatives)
    ids = {r["patientid"] for r in negatives}
    assert not ids & {r["patientid"] for r in rows if r not in negatives}


def test_generated_folder_holds_decodable_chest_films_per_label(tmp_path: Path) -> None:
    from covid_xray.imaging import decode_checked

    generate_folder(tmp_path / "adult", {"normal": 3, "pneumonia": 2}, seed=1, max_side=96)
    files = sorted(p.relative_to(tmp_path / "adult").as_posix()
                   for p in (tmp_path / "adult").rglob("*.png"))
    assert files == ["normal/site3-0000.png", "normal/site3-0001.png", "normal/site3-0002.png",
                     "pneumonia/site3-0000.png", "pneumonia/site3-0001.png"]
    for name in files:  # the server's own checks accept them
        assert decode_checked((tmp_path / "adult" / name).read_bytes()).shape[2] == 3


def test_metadata_has_current_schema_and_its_quirks(small: tuple[Path, dict]) -> None:
    root, _ = small
    header = (root / "covid-chestxray-dataset" / "metadata.csv").read_text().splitlines()[0]
    assert header == ",".join(METADATA_COLUMNS) + ","  # trailing comma, as in the real file
    frame = pd.read_csv(root / "covid-chestxray-dataset" / "metadata.csv")
    assert frame.columns[-1].startswith("Unnamed")  # the unnamed empty column it adds
    assert frame[frame.columns[-1]].isna().all()

    rows = _metadata(root)
    findings = {r["finding"] for r in rows}
    assert COVID_FINDING in findings and COVID_FINDING + " " in findings  # trailing spaces
    assert {"Pneumonia/Bacterial/Streptococcus", "Pneumonia/Viral/SARS", "No Finding",
            "todo"} <= findings
    assert {"PA", "L", "AP", "AP Supine"} <= {r["view"] for r in rows}
    ct = [r for r in rows if r["modality"] == "CT"]
    assert ct and {r["view"] for r in ct} <= {"Axial", "Coronal"}
    volumes = [r for r in ct if r["folder"] == "volumes"]
    assert volumes, "CT volumes live in volumes/"
    for row in volumes:
        data = gzip.decompress((root / "covid-chestxray-dataset" / "volumes" /
                                row["filename"]).read_bytes())
        assert data[344:348] == b"n+1\x00"  # a real NIfTI-1 header

    per_patient = defaultdict(list)
    for row in rows:
        if _selectable(row):
            per_patient[row["patientid"]].append(row)
    assert max(len(v) for v in per_patient.values()) >= 3
    assert min(len(v) for v in per_patient.values()) == 1


def test_dates_formats_heldout_share_and_no_patient_straddles_march(
        small: tuple[Path, dict]) -> None:
    root, counts = small
    selectable = [r for r in _metadata(root) if _selectable(r)]
    texts = [r["date"] for r in selectable]
    assert any(re.fullmatch(r"[A-Z][a-z]+ \d{1,2}, \d{4}", t) and len(t.split()[0]) > 3
               for t in texts)  # March 10, 2020
    assert any(re.fullmatch(r"[A-Z][a-z]{2} \d{1,2}, \d{4}", t) for t in texts)  # Mar 4, 2020
    assert any(re.fullmatch(r"\d{1,2}/\d{1,2}/\d{4}", t) for t in texts)  # 2/29/2020
    assert any(re.fullmatch(r"\d{4}", t) for t in texts)  # year only
    assert "" in texts
    march = date(2020, 3, 1)
    late = [r for r in selectable if (d := _parse_date(r["date"])) is not None and d >= march]
    share = len(late) / len(selectable)
    assert 0.05 <= share <= 0.25, share
    assert counts["covid_pa_xray_from_2020_03"] == len(late)
    late_patients = {r["patientid"] for r in late}
    for row in selectable:  # a held-out patient never has an image left in training
        if row["patientid"] in late_patients:
            parsed = _parse_date(row["date"])
            assert parsed is not None and parsed >= march, row


def test_missing_files_and_formats_of_covid_images(small: tuple[Path, dict]) -> None:
    root, counts = small
    base = root / "covid-chestxray-dataset"
    rows = _metadata(root)
    missing = [r for r in rows if not (base / r["folder"] / r["filename"]).is_file()]
    assert len(missing) == counts["covid_missing_files"] >= 1
    assert all(r["filename"] for r in missing)
    infos = [read_image_info(p.read_bytes()) for p in sorted((base / "images").iterdir())]
    assert {i.format for i in infos} == {"jpeg", "png"}
    assert {i.mode for i in infos} == {"L", "RGB"}
    for path in (base / "images").iterdir():  # the extension matches the content
        fmt = read_image_info(path.read_bytes()).format
        assert path.suffix in ((".png",) if fmt == "png" else (".jpg", ".jpeg"))
    assert len({r["filename"] for r in rows}) == len(rows)


def test_kermany_names_patients_and_formats(small: tuple[Path, dict]) -> None:
    root, counts = small
    kermany = root / "chest_xray"
    pattern_normal = re.compile(r"(NORMAL2-)?IM-(\d{4})-\d{4}(-\d{4})?\.jpeg")
    pattern_pneumonia = re.compile(r"person(\d+)_(bacteria|virus)_\d+\.jpeg")
    patients: dict[str, set[str]] = {"train": set(), "test": set()}
    multi = 0
    for split, size in (("train", SMALL.kermany_train), ("test", SMALL.kermany_test)):
        normal = sorted((kermany / split / "NORMAL").iterdir())
        pneumonia = sorted((kermany / split / "PNEUMONIA").iterdir())
        assert len(normal) == len(pneumonia) == size
        assert counts["kermany"][split] == {"NORMAL": size, "PNEUMONIA": size}
        for path in normal:
            match = pattern_normal.fullmatch(path.name)
            assert match, path.name
            patients[split].add(path.name.split("-0001")[0])
        per_person: dict[str, int] = defaultdict(int)
        for path in pneumonia:
            match = pattern_pneumonia.fullmatch(path.name)
            assert match, path.name
            per_person[match.group(1)] += 1
            patients[split].add("person" + match.group(1))
        multi += sum(1 for n in per_person.values() if n > 1)
        for path in normal + pneumonia:
            assert read_image_info(path.read_bytes()).format == "jpeg"
    assert multi >= 1, "some pneumonia patients have several images"
    assert not patients["train"] & patients["test"], "train and test share patients"
    assert {"virus", "bacteria"} <= {p.name.split("_")[1]
                                     for p in (kermany / "train" / "PNEUMONIA").iterdir()}


def test_image_sizes_vary_within_bounds_for_every_class(small: tuple[Path, dict]) -> None:
    root, _ = small
    groups = {"covid": _covid_paths(root), "normal": _kermany(root, "NORMAL"),
              "pneumonia": _kermany(root, "PNEUMONIA")}
    for name, paths in groups.items():
        sides = np.array([(i.width, i.height) for i in
                          (read_image_info(p.read_bytes()) for p in paths)])
        assert sides.max() <= SMALL.max_side, name
        assert sides.max(axis=1).min() >= SMALL.max_side // 2 - 1, name
        assert len({tuple(s) for s in sides}) > len(paths) // 2, name


def test_external_set_exists_scaled_and_styled_differently(small: tuple[Path, dict]) -> None:
    root, counts = small
    n = external_count(SMALL)
    assert counts["external"] == {"covid": n, "normal": n}
    for label in ("covid", "normal"):
        assert len(list((root / "external" / label).iterdir())) == n
    assert external_count(DemoParams()) == 20

    def corner_darkness(paths: list[Path]) -> float:  # collimated framing: black margins
        return float(np.mean([load_image(p)[:3, :3].mean() for p in paths]))

    external = sorted((root / "external" / "normal").iterdir())
    assert corner_darkness(external) < 20
    assert corner_darkness(_kermany(root, "NORMAL")) > corner_darkness(external) + 5


# --------------------------------------------------------------------------------------------
# Learnability and shortcut hygiene (cheap proxies for the frozen-backbone model and the probe)
# --------------------------------------------------------------------------------------------

def _logistic(c: float) -> LogisticRegression:
    # liblinear: fast when features (64x64 pixels) outnumber images.
    return LogisticRegression(C=c, max_iter=5000, solver="liblinear")


def _cv_auc(features: np.ndarray, labels: np.ndarray, c: float = 0.1) -> float:
    model = make_pipeline(StandardScaler(), _logistic(c))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(model, features, labels, cv=folds, scoring="roc_auc").mean())


def _pixels(paths: list[Path], size: int) -> np.ndarray:
    return np.stack([resize_square(load_image(p), size)[..., 0].ravel() / 255.0 for p in paths])


def _trivial_stats(paths: list[Path]) -> np.ndarray:
    """What the shortcut probe looks at: size, aspect, format, bit depth, intensity, border."""
    rows = []
    for path in paths:
        info = read_image_info(path.read_bytes())
        gray = load_image(path)[..., 0].astype(np.float64)
        b = max(1, min(gray.shape) // 20)
        border = np.concatenate([gray[:b].ravel(), gray[-b:].ravel(), gray[:, :b].ravel(),
                                 gray[:, -b:].ravel()])
        rows.append([info.width, info.height, info.width / info.height, info.format == "png",
                     info.mode == "L", info.bit_depth, gray.mean(), gray.std(), border.mean()])
    return np.array(rows, dtype=np.float64)


def _two_class(positive: list[Path], negative: list[Path]) -> tuple[list[Path], np.ndarray]:
    negative = negative[: len(positive)]
    return positive + negative, np.r_[np.ones(len(positive)), np.zeros(len(negative))]


@pytest.mark.parametrize("negative", ["NORMAL", "PNEUMONIA"])
def test_lung_patterns_are_learnable_but_not_trivially(proxy_sets: dict[str, Path],
                                                       negative: str) -> None:
    root = proxy_sets["clean"]
    paths, labels = _two_class(_covid_paths(root), _kermany(root, negative))
    for size in (32, 64):
        auc = _cv_auc(_pixels(paths, size), labels)
        assert 0.75 <= auc <= 0.995, (negative, size, auc)


@pytest.mark.parametrize("negative", ["NORMAL", "PNEUMONIA"])
def test_trivial_statistics_do_not_separate_the_classes(proxy_sets: dict[str, Path],
                                                        negative: str) -> None:
    root = proxy_sets["clean"]
    paths, labels = _two_class(_covid_paths(root), _kermany(root, negative))
    auc = _cv_auc(_trivial_stats(paths), labels, c=1.0)
    assert auc < 0.8, auc


@pytest.mark.parametrize("negative", ["NORMAL", "PNEUMONIA"])
def test_planted_artifact_makes_trivial_statistics_separate(proxy_sets: dict[str, Path],
                                                            negative: str) -> None:
    root = proxy_sets["artifact"]
    paths, labels = _two_class(_covid_paths(root), _kermany(root, negative))
    auc = _cv_auc(_trivial_stats(paths), labels, c=1.0)
    assert auc > 0.9, auc
    # Only COVID images carry it: the Kermany files are the same as without the artefact.
    clean = proxy_sets["clean"]
    for path in _kermany(root, negative)[:5]:
        twin = clean / path.relative_to(root)
        assert path.read_bytes() == twin.read_bytes()


def test_a_model_of_the_internal_data_scores_lower_on_the_external_set(
        proxy_sets: dict[str, Path]) -> None:
    root = proxy_sets["clean"]
    paths, labels = _two_class(_covid_paths(root), _kermany(root, "NORMAL"))
    features = _pixels(paths, 32)
    internal = _cv_auc(features, labels)
    model = make_pipeline(StandardScaler(), _logistic(0.1)).fit(features, labels)
    external_covid = sorted((root / "external" / "covid").iterdir())
    external_normal = sorted((root / "external" / "normal").iterdir())
    scores = model.predict_proba(_pixels(external_covid + external_normal, 32))[:, 1]
    external = roc_auc_score(np.r_[np.ones(len(external_covid)), np.zeros(len(external_normal))],
                             scores)
    assert external > 0.55, "same disease patterns: still better than chance"
    assert external < internal - 0.05, (internal, external)
