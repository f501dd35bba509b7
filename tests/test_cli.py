"""``covid-xray predict`` prints one JSON line per image; start-up errors exit 1 naming the file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from conftest import sample_dir
from sklearn.datasets import load_sample_image

from covid_xray.cli import main
from covid_xray.config import MODEL_NAMES
from covid_xray.testing import demo_images_by_class


@pytest.fixture(scope="module")
def xray_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sample = sample_dir()
    if sample is not None:
        return sorted((sample / "chest_xray" / "test" / "NORMAL").glob("*.jpeg"))[0]
    path = tmp_path_factory.mktemp("img") / "demo.jpeg"
    rgb = demo_images_by_class(per_class=1, seed=12)["normal"][0]
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err


def test_predict_prints_one_json_line_per_image(models_dir: Path, xray_file: Path,
                                                tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    photo = tmp_path / "holiday.jpg"
    cv2.imwrite(str(photo), cv2.cvtColor(load_sample_image("flower.jpg"), cv2.COLOR_RGB2BGR))
    not_image = tmp_path / "scan.jpeg"
    not_image.write_text("this is a text file with an image extension")
    missing = tmp_path / "missing.png"
    status, lines, _ = run_main(["predict", str(xray_file), str(photo), str(not_image),
                                 str(missing), "--models-dir", str(models_dir)], capsys)
    assert status == 2  # some images could not be read; the others were answered
    answers = [json.loads(line) for line in lines]
    assert [a["file"] for a in answers] == [str(p) for p in (xray_file, photo, not_image,
                                                             missing)]
    xray, holiday, text, gone = answers
    assert xray["in_distribution"] is True
    assert {xray["models"][n]["label"] for n in MODEL_NAMES} <= {"POSITIVE", "NEGATIVE"}
    assert holiday["in_distribution"] is False
    assert holiday["models"]["covid_normal"]["label"] is None
    assert text["status"] == 415 and "not an image" in text["error"]
    assert "missing.png" in gone["error"]


def test_predict_all_good_exits_zero(models_dir: Path, xray_file: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    status, lines, err = run_main(["predict", str(xray_file), "--models-dir", str(models_dir)],
                                  capsys)
    assert status == 0 and len(lines) == 1, err


def test_missing_models_exit_1_naming_the_file(tmp_path: Path, xray_file: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    status, lines, err = run_main(["predict", str(xray_file), "--models-dir",
                                   str(tmp_path / "none")], capsys)
    assert status == 1 and lines == [] and "none" in err and "not found" in err


def test_serve_refuses_to_start_with_an_incompatible_model(models_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    for name in MODEL_NAMES:
        shutil.copy(models_dir / f"{name}.json", tmp_path / f"{name}.json")
        (tmp_path / f"{name}.keras").symlink_to(models_dir / f"{name}.keras")
    (tmp_path / "covid_pneumonia.json").write_text('{"model_name": "covid_pneumonia"}')
    status, _, err = run_main(["serve", "--models-dir", str(tmp_path), "--port", "1"], capsys)
    assert status == 1
    assert "covid_pneumonia.json" in err and "not a covid-xray model info file" in err


def test_console_script_is_installed() -> None:
    command = shutil.which("covid-xray")
    args = [command] if command else [sys.executable, "-m", "covid_xray.cli"]
    done = subprocess.run([*args, "--help"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0 and "predict" in done.stdout and "serve" in done.stdout
