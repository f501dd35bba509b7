"""End to end: the real ``covid-xray serve`` process (waitress) on loopback, and the CLI.

The server's JSON for a real JPEG must equal ``covid-xray predict`` on the same file, field for
field (timings aside), since both go through the one prediction service.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
import requests
from conftest import sample_dir

from covid_xray.config import MODEL_NAMES
from covid_xray.testing import demo_images_by_class

pytestmark = pytest.mark.slow
START_TIMEOUT_S = 180


def cli() -> list[str]:
    command = shutil.which("covid-xray")
    return [command] if command else [sys.executable, "-m", "covid_xray.cli"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def jpeg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sample = sample_dir()
    if sample is not None:
        return sorted((sample / "chest_xray" / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    path = tmp_path_factory.mktemp("img") / "demo.jpeg"
    rgb = demo_images_by_class(per_class=1, seed=13)["pneumonia"][0]
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``covid-xray serve`` as a child process; yields its base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*cli(), "serve", "--host", "127.0.0.1", "--port", str(port),
             "--models-dir", str(models_dir), "--max-upload-mb", "1"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up after {START_TIMEOUT_S}s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield base
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def without_timing(answer: dict) -> dict:
    cleaned = {k: v for k, v in answer.items() if k not in ("timing_ms", "file")}
    cleaned["models"] = {name: {k: v for k, v in model.items() if k != "timing_ms"}
                         for name, model in answer["models"].items()}
    return cleaned


def test_server_json_matches_the_cli(server: str, models_dir: Path, jpeg_file: Path) -> None:
    with jpeg_file.open("rb") as handle:
        response = requests.post(f"{server}/api/predict",
                                 files={"file": ("upload.jpeg", handle, "image/jpeg")},
                                 timeout=60)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith(
        "application/json")
    api = response.json()
    assert api["in_distribution"] is True
    done = subprocess.run([*cli(), "predict", str(jpeg_file), "--models-dir", str(models_dir)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    command_line = json.loads(lines[0])
    assert command_line["file"] == str(jpeg_file)
    assert without_timing(api) == without_timing(command_line)
    for name in MODEL_NAMES:
        assert api["models"][name]["label"] in ("POSITIVE", "NEGATIVE")


def test_raw_body_healthz_and_page(server: str, jpeg_file: Path) -> None:
    raw = requests.post(f"{server}/api/predict", data=jpeg_file.read_bytes(),
                        headers={"Content-Type": "application/octet-stream"}, timeout=60)
    assert raw.status_code == 200 and raw.json()["in_distribution"] is True
    health = requests.get(f"{server}/healthz", timeout=10).json()
    assert health["status"] == "ok" and set(health["models"]) == set(MODEL_NAMES)
    page = requests.get(server, timeout=10)
    assert page.status_code == 200 and "not a diagnostic device" in page.text.lower()


def test_errors_through_the_real_server_are_json(server: str) -> None:
    too_big = requests.post(f"{server}/api/predict", data=b"\0" * (1024 * 1024 + 10),
                            headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert too_big.status_code == 413 and "too large" in too_big.json()["error"]
    malformed = requests.post(f"{server}/api/predict", data=b"garbage",
                              headers={"Content-Type": "multipart/form-data; boundary=Q"},
                              timeout=60)
    assert malformed.status_code == 400 and "multipart" in malformed.json()["error"]
    text = requests.post(f"{server}/api/predict", files={"file": ("a.jpg", b"plain text")},
                         timeout=60)
    assert text.status_code == 415 and "not an image" in text.json()["error"]


def test_server_refuses_to_start_without_models(tmp_path: Path) -> None:
    done = subprocess.run([*cli(), "serve", "--port", str(free_port()), "--models-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 1
    assert "covid_normal.keras" in done.stderr and "not found" in done.stderr
