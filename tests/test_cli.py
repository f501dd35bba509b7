"""``covid-xray predict`` prints one JSON line per image; start-up errors exit 1 naming the file;
every bad ``serve``/``predict`` option exits 2 with one line naming it."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import sample_dir
from sklearn.datasets import load_sample_image

from covid_xray.cli import _load_service, _parser, main
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cli() -> list[str]:
    command = shutil.which("covid-xray")
    return [command] if command else [sys.executable, "-m", "covid_xray.cli"]


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
    status, _, err = run_main(["serve", "--models-dir", str(tmp_path), "--port",
                               str(free_port())], capsys)
    assert status == 1
    assert "covid_pneumonia.json" in err and "not a covid-xray model info file" in err


def test_console_script_is_installed() -> None:
    done = subprocess.run([*cli(), "--help"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0 and "predict" in done.stdout and "serve" in done.stdout


# -- options are validated: one line naming the option, exit status 2 ---------------------------


@pytest.mark.parametrize(("args", "pattern"), [
    (["serve", "--port", "99999"], r"--port: must be from 1 to 65,535, got '99999'"),
    (["serve", "--port", "0"], r"--port: must be from 1"),
    (["serve", "--port", "http"], r"--port: must be a number"),
    (["serve", "--host", "999.1.1.1"], r"--host: '999\.1\.1\.1' is not a valid IP address"),
    (["serve", "--host", "no-such-host.invalid"], r"--host: .* cannot be resolved"),
    (["serve", "--max-upload-mb", "nan"], r"--max-upload-mb: must be a finite number"),
    (["serve", "--max-upload-mb", "-1"], r"--max-upload-mb: must be above 0"),
    (["serve", "--max-upload-mb", "0"], r"--max-upload-mb: must be above 0"),
    (["serve", "--max-upload-mb", "inf"], r"--max-upload-mb: must be a finite number"),
    (["serve", "--threads", "0"], r"--threads: must be from 1 to 256"),
    (["serve", "--threads", "2.5"], r"--threads: must be a whole number"),
    (["serve", "--max-pixels", "0"], r"--max-pixels: must be from 65,536"),
    (["serve", "--ood-tolerance", "nan"], r"--ood-tolerance: must be a finite number"),
    (["serve", "--ood-tolerance", "0"], r"--ood-tolerance: must be above 0"),
    (["serve", "--connection-limit", "2"], r"--connection-limit: must be from 10"),
    (["serve", "--channel-timeout", "0"], r"--channel-timeout: must be from 1"),
    (["predict", "x.png", "--max-pixels", "-5"], r"--max-pixels: must be from 65,536"),
    (["predict", "x.png", "--ood-tolerance=-inf"], r"--ood-tolerance: must be a finite"),
    (["serve", "--max-decoded-mb", "0.5"], r"--max-decoded-mb: must be from 1 to 16384"),
    (["serve", "--max-decoded-mb", "nan"], r"--max-decoded-mb: must be a finite number"),
    (["predict", "x.png", "--max-decoded-mb", "1e9"], r"--max-decoded-mb: must be from 1 to "
                                                       r"16384, got '1e9'"),
    (["serve", "--decode-slots", "0"], r"--decode-slots: must be from 1 to 64, got '0'"),
    (["predict", "x.png", "--decode-slots", "two"], r"--decode-slots: must be a number"),
    (["predict", "x.png", "--decode-slots", "1.5"], r"--decode-slots: must be a whole number"),
])
def test_bad_options_exit_2_with_one_line(args: list[str], pattern: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    # a missing models folder: before validation existed, these exited 1 there (or served)
    with pytest.raises(SystemExit) as stop:
        main([*args, "--models-dir", str(tmp_path / "no-models")])
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err


def test_valid_edge_values_are_accepted() -> None:
    args = _parser().parse_args([
        "serve", "--port", "65535", "--host", "localhost", "--max-upload-mb", "0.5",
        "--threads", "1", "--max-pixels", "65536", "--ood-tolerance", "2.5",
        "--connection-limit", "10", "--channel-timeout", "1", "--max-decoded-mb", "1",
        "--decode-slots", "64"])
    assert (args.port, args.threads, args.max_pixels, args.connection_limit,
            args.channel_timeout, args.decode_slots) == (65535, 1, 65536, 10, 1, 64)
    assert (args.max_upload_mb, args.ood_tolerance, args.max_decoded_mb) == (0.5, 2.5, 1.0)
    defaults = _parser().parse_args(["predict", "x.png"])
    assert (defaults.max_decoded_mb, defaults.decode_slots) == (128.0, 2)  # the service's


def test_decode_limits_reach_the_service(models_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """``--max-decoded-mb`` and ``--decode-slots`` are the service's, on ``predict`` and
    ``serve`` alike (both build it with ``_load_service``)."""
    grey = np.random.default_rng(0).integers(0, 255, (1600, 1600), dtype=np.uint8)
    large = tmp_path / "large.png"  # 2.4 MiB once decoded
    cv2.imwrite(str(large), grey)
    status, lines, err = run_main(["predict", str(large), "--models-dir", str(models_dir),
                                   "--max-decoded-mb", "2"], capsys)
    answer = json.loads(lines[0])
    assert status == 2 and answer["status"] == 400, err
    assert "MiB once decoded, above the limit of 2 MiB" in answer["error"]
    status, lines, err = run_main(["predict", str(large), "--models-dir", str(models_dir)],
                                  capsys)
    assert status == 0 and "error" not in json.loads(lines[0]), err  # decoded (then checked)
    for command in (["predict", "x.png"], ["serve"]):
        args = _parser().parse_args([*command, "--models-dir", str(models_dir),
                                     "--max-decoded-mb", "3", "--decode-slots", "5"])
        limits = _load_service(args).health()["limits"]
        assert limits["max_decoded_bytes"] == 3 * 1024 * 1024 and limits["decode_slots"] == 5


@pytest.mark.parametrize("host", ["127.0.0.1", "192.0.2.1"])
def test_serve_on_a_busy_port_or_foreign_address_exits_2_naming_it(host: str,
                                                                   models_dir: Path) -> None:
    """Checked before the models load: one line naming host:port, in seconds, exit 2."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = subprocess.run([*cli(), "serve", "--host", host, "--port", str(port),
                               "--models-dir", str(models_dir)], capture_output=True, text=True,
                              timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on {host}:{port}" in lines[0], done.stderr
    reason = "already in use" if host == "127.0.0.1" else "not an address of this machine"
    assert reason in lines[0], done.stderr


def test_connection_limit_beyond_the_open_file_limit_exits_2(tmp_path: Path) -> None:
    """Waitress would fail on accept() at run time; say so at start, naming the limit."""
    import resource

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))

    done = subprocess.run([*cli(), "serve", "--port", str(free_port()), "--connection-limit",
                           "1000", "--models-dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, check=False, preexec_fn=low_limit)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--connection-limit 1000 needs about 3,256 open files" in lines[0]
    assert "at most 512" in lines[0], done.stderr
