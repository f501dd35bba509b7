"""End to end: the real ``covid-xray serve`` process (waitress) on loopback, and the CLI.

The server's JSON for a real JPEG must equal ``covid-xray predict`` on the same file, field for
field (timings aside), since both go through the one prediction service.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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


@contextlib.contextmanager
def running_server(models_dir: Path, log_dir: Path, *options: str) -> Iterator[str]:
    """``covid-xray serve`` as a child process on a free loopback port; yields its base URL."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*cli(), "serve", "--host", "127.0.0.1", "--port", str(port),
             "--models-dir", str(models_dir), *options],
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


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server with its default limits (except a 1 MB upload limit, to keep bodies small)."""
    with running_server(models_dir, tmp_path_factory.mktemp("server"),
                        "--max-upload-mb", "1") as base:
        yield base


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


# -- slow clients and limits (waitress settings from covid_xray.serving.settings) ----------------


def stalled_connections(base: str, count: int) -> list[socket.socket]:
    """Connections that send headers announcing a 1 MB body, a few bytes of it, then nothing."""
    port = int(base.rsplit(":", 1)[1])
    stalled = []
    for _ in range(count):
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: image/jpeg\r\nContent-Length: 1000000\r\n\r\n\xff\xd8")
        stalled.append(conn)
    return stalled


def closed_by_server(conn: socket.socket, wait_s: float) -> bool:
    conn.settimeout(wait_s)
    try:
        return conn.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


ANSWER_WITHIN_S = 30
"""A functional bound (a locked-out request waits for the idle timeout, by default 30 s, or
forever), not a performance figure: an answer normally takes well under a second."""


def test_slow_clients_do_not_lock_others_out(server: str, jpeg_file: Path) -> None:
    """100 connections that never finish their body (waitress's old default limit was 100)."""
    stalled = stalled_connections(server, 100)
    try:
        health = requests.get(f"{server}/healthz", timeout=ANSWER_WITHIN_S)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        with jpeg_file.open("rb") as handle:
            answer = requests.post(f"{server}/api/predict", files={"file": ("x.jpeg", handle)},
                                   timeout=ANSWER_WITHIN_S)
        assert answer.status_code == 200 and answer.json()["in_distribution"] is True
    finally:
        for conn in stalled:
            conn.close()


def test_idle_connections_are_closed_and_free_the_limit(models_dir: Path,
                                                        tmp_path: Path) -> None:
    """With the limit reached by stalled clients, a new request waits only for the idle timeout."""
    with running_server(models_dir, tmp_path, "--connection-limit", "10",
                        "--channel-timeout", "2") as base:
        stalled = stalled_connections(base, 12)  # more than the limit: some wait in the backlog
        try:
            health = requests.get(f"{base}/healthz", timeout=ANSWER_WITHIN_S)
            assert health.status_code == 200
            assert all(closed_by_server(conn, ANSWER_WITHIN_S) for conn in stalled)
        finally:
            for conn in stalled:
                conn.close()
        log = "".join(p.read_text() for p in tmp_path.glob("server-*.log"))
        assert "connection limit 10, idle timeout 2 s" in log


# -- errors: JSON with the true cause wherever the app sees the request ---------------------------


def multipart_body(boundary: str, name: str, filename: str | None, data: bytes) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data
            + f"\r\n--{boundary}--\r\n".encode())


def test_multipart_faults_are_named_not_called_too_large(server: str) -> None:
    data = bytes(range(256)) * 3000  # 768,000 bytes: below the 1 MB upload limit
    wrong = requests.post(f"{server}/api/predict", data=multipart_body("A", "file", "x.jpg", data),
                          headers={"Content-Type": "multipart/form-data; boundary=B"},
                          timeout=60)
    assert wrong.status_code == 400
    assert "malformed multipart body" in wrong.json()["error"]
    field = requests.post(f"{server}/api/predict", files={"file": (None, data)}, timeout=60)
    assert field.status_code == 413
    assert "'file' is a plain form field larger than the 500,000 bytes" in field.json()["error"]
    parts = requests.post(f"{server}/api/predict", timeout=60,
                          files=[(f"n{i}", (None, b"x")) for i in range(20)])
    assert parts.status_code == 413 and "too many multipart parts" in parts.json()["error"]


def test_bodies_up_to_four_times_the_limit_get_the_json_413(server: str) -> None:
    """Waitress used to answer bodies over twice the limit itself, in plain text."""
    body = b"\0" * (3 * 1024 * 1024)
    response = requests.post(f"{server}/api/predict", data=body,
                             headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert response.status_code == 413
    assert response.json()["error"] == "upload too large: 3.00 MB sent, the limit is 1 MB"


def raw_exchange(base: str, request: bytes) -> bytes:
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_requests_waitress_refuses_before_the_app_are_the_documented_ones(server: str) -> None:
    """docs/serving.md: over the body cap (announced, never read) and over 64 KiB of headers,
    waitress answers in plain text; the app never sees those requests."""
    over_cap = raw_exchange(server, b"POST /api/predict HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Length: 6000000\r\nConnection: close\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] 413 ", over_cap) and b"max_body of 5242880" in over_cap
    start = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: "
    # exactly the limit, all of it read by waitress (unread bytes would reset the connection)
    long_headers = raw_exchange(server, start + b"a" * (65536 - len(start)))
    assert re.match(rb"HTTP/1\.[01] 431 ", long_headers) and b"65536" in long_headers
