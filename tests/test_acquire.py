"""The acquire stage: demo, download (against a real local HTTP server), and local folders."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
from pipeline_helpers import FAST_PARAMS, deep_update, make_repo_copy, run

from covid_xray.acquire import (
    DATASETS,
    NO_EXTERNAL_FILE,
    STAMP_FILE,
    Plan,
    RemoteArchive,
    acquire,
    count_raw,
    describe,
    download,
    materialize,
    plan_tree,
    refresh,
    safe_extract,
)
from covid_xray.config import Paths
from covid_xray.datasets import Candidate, external_files, inspect_file, kermany_candidates
from covid_xray.errors import PipelineError
from covid_xray.junk import junk_kind
from covid_xray.params import Params, parse_params

# --------------------------------------------------------------------------------------------
# A real HTTP server on 127.0.0.1 with Range support
# --------------------------------------------------------------------------------------------


class ArchiveServer:
    """Serves in-memory files; honours ``Range: bytes=N-`` unless ``ignore_range`` is set."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.ignore_range = False
        self.cut_after: int | None = None  # send only this many bytes, then drop the connection
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                header = self.headers.get("Range")
                server.requests.append((self.path, header))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if header and not server.ignore_range:
                    start = int(header.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if server.cut_after is not None:
                    self.wfile.write(body[start:start + server.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={
            "poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ArchiveServer]:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    srv = ArchiveServer()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 20), dtype=np.uint8)
    return cv2.imencode(".jpg", pixels)[1].tobytes()


ZIP_TIME = (1980, 1, 1, 0, 0, 0)
"""Every member's timestamp: ``writestr(name, ...)`` stamps the current time, so the archive's
bytes (and SHA-256) would change from one 2-second window to the next."""


def _zip(entries: dict[str, bytes | None], comment: bytes = b"") -> bytes:
    """A zip of ``entries`` (``None``: a folder entry, as GitHub's archives have), the same bytes
    on every call."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o40755 if data is None else 0o100644) << 16
            zf.writestr(info, b"" if data is None else data)
        zf.comment = comment
    return buffer.getvalue()


def _dataset_zips() -> dict[str, bytes]:
    """Tiny archives shaped like the three published ones (top folders, __MACOSX and all)."""
    covid_top = "covid-chestxray-dataset-6a42423/"
    metadata = ("patientid,offset,sex,age,finding,view,modality,date,folder,filename,\n"
                "2,0,M,65,Pneumonia/Viral/COVID-19,PA,X-ray,\"January 22, 2020\",images,a.jpeg,\n"
                "2,3,M,65,Pneumonia/Viral/COVID-19 ,PA,X-ray,2020,images,b.jpeg,\n"
                "3,0,F,40,Pneumonia/Viral/SARS,PA,X-ray,2004,images,gone.jpeg,\n")
    covid = _zip({covid_top + "metadata.csv": metadata.encode(),
                  covid_top + "images/a.jpeg": _jpeg(1), covid_top + "images/b.jpeg": _jpeg(2),
                  covid_top + "volumes/DOWNLOAD.md": b"CT volumes are hosted elsewhere\n"})
    kermany_entries = {}
    for split in ("train", "test"):
        for k, label in enumerate(("NORMAL", "PNEUMONIA")):
            name = "IM-0115-0001.jpeg" if label == "NORMAL" else "person1_virus_6.jpeg"
            kermany_entries[f"chest_xray/{split}/{label}/{name}"] = _jpeg(10 + k)
            kermany_entries[f"__MACOSX/chest_xray/{split}/{label}/._{name}"] = b"\x00\x05"
    kermany_entries["chest_xray/.DS_Store"] = b"junk"
    actualmed = _zip({
        "Actualmed-COVID-chestxray-dataset-master/metadata.csv":
            b"patientid,finding,view,imagename\nANON1,COVID-19,PA,c1.png\n"
            b"ANON2,No finding,PA,n1.png\nANON3,,PA,i1.png\n",
        "Actualmed-COVID-chestxray-dataset-master/images/c1.png": _jpeg(20),
        "Actualmed-COVID-chestxray-dataset-master/images/n1.png": _jpeg(21),
        "Actualmed-COVID-chestxray-dataset-master/images/i1.png": _jpeg(22)})
    return {"/covid.zip": covid, "/kermany.zip": _zip(kermany_entries),
            "/actualmed.zip": actualmed}


def _archives(server: ArchiveServer, sha256: dict[str, str] | None = None) -> list[RemoteArchive]:
    sha256 = sha256 or {}
    layouts = (("/covid.zip", "covid"), ("/kermany.zip", "kermany"),
               ("/actualmed.zip", "actualmed"))
    return [RemoteArchive(name=layout, url=server.url(path), filename=path.strip("/"),
                          layout=layout, sha256=sha256.get(path)) for path, layout in layouts]


def _params(source: str, root: Path, **demo: Any) -> Params:
    raw: dict[str, Any] = {"data": {"source": source}}
    if demo:
        raw["data"]["demo"] = demo
    return parse_params(raw, root=root)


def _leftovers(data_dir: Path) -> list[str]:
    """Temporary folders of an interrupted atomic swap."""
    return sorted(p.name for p in data_dir.iterdir() if p.name.startswith(".raw."))


# --------------------------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------------------------

def test_full_download_verifies_and_records_sha256(server: ArchiveServer, tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    server.files["/big.zip"] = payload
    expected = hashlib.sha256(payload).hexdigest()
    archive = RemoteArchive("big", server.url("/big.zip"), "big.zip", "covid",
                            size=len(payload), sha256=expected)
    info = download(archive, tmp_path, progress=False)
    assert (tmp_path / "big.zip").read_bytes() == payload
    assert not (tmp_path / "big.zip.part").exists()
    assert info["sha256"] == expected and info["sha256_verified"] and info["bytes"] == len(payload)
    # A second call reuses the verified file without touching the network.
    before = len(server.requests)
    assert download(archive, tmp_path, progress=False)["cached"] is True
    assert len(server.requests) == before


def test_download_resumes_from_a_partial_file(server: ArchiveServer, tmp_path: Path) -> None:
    payload = os.urandom(200_000)
    server.files["/data.zip"] = payload
    (tmp_path / "data.zip.part").write_bytes(payload[:70_000])
    archive = RemoteArchive("data", server.url("/data.zip"), "data.zip", "covid")
    info = download(archive, tmp_path, progress=False)
    assert server.requests == [("/data.zip", "bytes=70000-")]
    assert info["resumed_from"] == 70_000
    assert (tmp_path / "data.zip").read_bytes() == payload
    assert info["sha256"] == hashlib.sha256(payload).hexdigest()


def test_interrupted_download_keeps_the_part_and_the_next_run_resumes(
        server: ArchiveServer, tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    server.files["/data.zip"] = payload
    server.cut_after = 150_000  # the client keeps every complete 64 KiB block it received
    archive = RemoteArchive("data", server.url("/data.zip"), "data.zip", "covid")
    with pytest.raises(PipelineError, match="run the stage again to resume"):
        download(archive, tmp_path, progress=False)
    partial = (tmp_path / "data.zip.part").read_bytes()
    assert 0 < len(partial) < len(payload) and payload.startswith(partial)
    assert not (tmp_path / "data.zip").exists()
    server.cut_after = None
    info = download(archive, tmp_path, progress=False)
    assert server.requests[-1] == ("/data.zip", f"bytes={len(partial)}-")
    assert info["resumed_from"] == len(partial)
    assert (tmp_path / "data.zip").read_bytes() == payload


def test_download_restarts_when_the_server_ignores_range(server: ArchiveServer,
                                                         tmp_path: Path) -> None:
    payload = os.urandom(50_000)
    server.files["/data.zip"] = payload
    server.ignore_range = True
    (tmp_path / "data.zip.part").write_bytes(b"stale bytes from another version")
    info = download(RemoteArchive("d", server.url("/data.zip"), "data.zip", "covid"), tmp_path,
                    progress=False)
    assert (tmp_path / "data.zip").read_bytes() == payload
    assert info["resumed_from"] == 0


def test_complete_partial_file_is_accepted_after_416(server: ArchiveServer,
                                                     tmp_path: Path) -> None:
    payload = os.urandom(10_000)
    server.files["/data.zip"] = payload
    (tmp_path / "data.zip.part").write_bytes(payload)
    download(RemoteArchive("d", server.url("/data.zip"), "data.zip", "covid"), tmp_path,
             progress=False)
    assert (tmp_path / "data.zip").read_bytes() == payload


def test_http_error_is_reported_with_the_url(server: ArchiveServer, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"HTTP 404.*place missing\.zip"):
        download(RemoteArchive("m", server.url("/missing.zip"), "missing.zip", "covid"),
                 tmp_path, progress=False)


def test_download_source_builds_data_raw_in_the_contract_layout(server: ArchiveServer,
                                                                tmp_path: Path) -> None:
    server.files.update(_dataset_zips())
    paths = Paths(tmp_path)
    summary = acquire(_params("download", tmp_path), paths, archives=_archives(server),
                      progress=False)
    raw = paths.raw
    assert (raw / "covid-chestxray-dataset" / "metadata.csv").is_file()
    assert sorted(p.name for p in (raw / "covid-chestxray-dataset" / "images").iterdir()) == [
        "a.jpeg", "b.jpeg"]
    for split in ("train", "test"):
        assert [p.name for p in (raw / "chest_xray" / split / "NORMAL").iterdir()] == [
            "IM-0115-0001.jpeg"]
    assert not list(raw.rglob("__MACOSX")) and not list(raw.rglob(".DS_Store"))
    assert [p.name for p in (raw / "external" / "covid").iterdir()] == ["c1.png"]
    assert [p.name for p in (raw / "external" / "normal").iterdir()] == ["n1.png"]
    assert not (raw / ".extract").exists()

    source = json.loads((raw / "SOURCE.json").read_text())
    assert source == summary and source["source"] == "download"
    digests = {a["file"]: a["sha256"] for a in source["archives"]}
    for path, body in _dataset_zips().items():
        assert digests[path.strip("/")] == hashlib.sha256(body).hexdigest()
    counts = source["counts"]
    assert counts["covid_rows"] == 3 and counts["covid_missing_files"] == 1
    assert counts["kermany"] == {"test": {"NORMAL": 1, "PNEUMONIA": 1},
                                 "train": {"NORMAL": 1, "PNEUMONIA": 1}}
    assert counts["external"] == {"covid": 1, "normal": 1}
    assert (paths.downloads / "covid.zip").is_file()  # cached for the next run

    # Second run: archives are reused (no request at all), the result is identical.
    before = len(server.requests)
    again = acquire(_params("download", tmp_path), paths, archives=_archives(server),
                    progress=False)
    assert len(server.requests) == before
    assert again == summary


def test_checksum_mismatch_fails_clearly_and_leaves_nothing_half_written(
        server: ArchiveServer, tmp_path: Path) -> None:
    server.files.update(_dataset_zips())
    paths = Paths(tmp_path)
    paths.raw.mkdir(parents=True)
    (paths.raw / "previous.txt").write_text("the last good data/raw")
    archives = _archives(server, sha256={"/kermany.zip": "0" * 64})
    with pytest.raises(PipelineError, match=r"kermany\.zip: SHA-256 [0-9a-f]{64} does not match"):
        acquire(_params("download", tmp_path), paths, archives=archives, progress=False)
    assert [p.name for p in paths.raw.iterdir()] == ["previous.txt"]
    assert _leftovers(paths.data) == []
    assert not (paths.downloads / "kermany.zip").exists()
    assert not (paths.downloads / "kermany.zip.part").exists()


def test_offline_fails_at_once_with_what_to_do_instead(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    archives = [RemoteArchive("covid", f"http://127.0.0.1:{port}/covid.zip", "covid.zip",
                              "covid")]
    paths = Paths(tmp_path)
    paths.raw.mkdir(parents=True)
    (paths.raw / "previous.txt").write_text("kept")
    started = time.perf_counter()
    with pytest.raises(PipelineError) as error:
        acquire(_params("download", tmp_path), paths, archives=archives, progress=False)
    assert time.perf_counter() - started < 5
    message = str(error.value)
    assert f"cannot reach 127.0.0.1:{port}" in message
    assert "data.source: demo" in message and "local folder" in message
    assert str(paths.downloads) in message and "covid.zip" in message
    assert [p.name for p in paths.raw.iterdir()] == ["previous.txt"]


def _placed_archives(tmp_path: Path) -> tuple[Paths, list[RemoteArchive]]:
    """The three dataset archives already in data/downloads/, as a user places them by hand;
    their URLs point at a port nothing listens on."""
    paths = Paths(tmp_path)
    paths.downloads.mkdir(parents=True)
    archives = []
    for path, body in _dataset_zips().items():
        (paths.downloads / path.strip("/")).write_bytes(body)
        layout = {"/covid.zip": "covid", "/kermany.zip": "kermany",
                  "/actualmed.zip": "actualmed"}[path]
        archives.append(RemoteArchive(layout, f"http://127.0.0.1:9{path}", path.strip("/"),
                                      layout))
    return paths, archives


def test_archives_placed_by_hand_need_no_network(tmp_path: Path) -> None:
    paths, archives = _placed_archives(tmp_path)
    summary = acquire(_params("download", tmp_path), paths, archives=archives, progress=False)
    assert summary["counts"]["kermany_images"] == 4


# --------------------------------------------------------------------------------------------
# safe extraction
# --------------------------------------------------------------------------------------------

def _tar(members: list[tarfile.TarInfo], payload: bytes = b"x") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for member in members:
            if member.isfile():
                member.size = len(payload)
                tf.addfile(member, io.BytesIO(payload))
            else:
                tf.addfile(member)
    return buffer.getvalue()


def _tar_member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


def _zip_symlink() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(zipfile.ZipInfo("data/ok.txt", date_time=ZIP_TIME), b"fine")
        link = zipfile.ZipInfo("data/link", date_time=ZIP_TIME)
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "/etc/passwd")
    return buffer.getvalue()


HOSTILE = {
    "zip-dotdot.zip": lambda: _zip({"data/ok.txt": b"fine", "data/../../evil.txt": b"owned"}),
    "zip-absolute.zip": lambda: _zip({"data/ok.txt": b"fine", "/tmp/evil.txt": b"owned"}),
    "zip-symlink.zip": _zip_symlink,
    "tar-dotdot.tar.gz": lambda: _tar([_tar_member("data/ok.txt"), _tar_member("../evil.txt")]),
    "tar-absolute.tar.gz": lambda: _tar([_tar_member("data/ok.txt"),
                                         _tar_member("/tmp/evil.txt")]),
    "tar-symlink.tar.gz": lambda: _tar([_tar_member("data/ok.txt"),
                                        _tar_member("data/link", tarfile.SYMTYPE, "/etc")]),
    "tar-hardlink.tar.gz": lambda: _tar([_tar_member("data/ok.txt"),
                                         _tar_member("data/hard", tarfile.LNKTYPE,
                                                     "../../etc/passwd")]),
    "tar-device.tar.gz": lambda: _tar([_tar_member("data/ok.txt"),
                                       _tar_member("data/dev", tarfile.CHRTYPE)]),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_extraction_refuses_members_escaping_the_target(tmp_path: Path, name: str) -> None:
    archive = tmp_path / name
    archive.write_bytes(HOSTILE[name]())
    target = tmp_path / "sandbox" / "out"
    with pytest.raises(PipelineError, match="refusing member"):
        safe_extract(archive, target, progress=False)
    # Checked before writing: not even the harmless member was extracted.
    assert list(target.rglob("*")) == []
    assert sorted(p.name for p in (tmp_path / "sandbox").iterdir()) == ["out"]
    assert not (tmp_path / "evil.txt").exists()


def test_extraction_of_a_clean_tar_and_a_non_archive(tmp_path: Path) -> None:
    archive = tmp_path / "ok.tar.gz"
    archive.write_bytes(_tar([_tar_member("top/"[:-1], tarfile.DIRTYPE),
                              _tar_member("top/a.txt"), _tar_member("top/b/c.txt")]))
    assert safe_extract(archive, tmp_path / "out", progress=False) == (2, {})
    assert (tmp_path / "out" / "top" / "b" / "c.txt").read_bytes() == b"x"
    junk = tmp_path / "page.zip"
    junk.write_text("<html>rate limited</html>")
    with pytest.raises(PipelineError, match="neither a zip nor a tar"):
        safe_extract(junk, tmp_path / "out2", progress=False)


# --------------------------------------------------------------------------------------------
# local folder and demo
# --------------------------------------------------------------------------------------------

def test_local_source_links_the_real_sample(xray_sample: Path, tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    summary = acquire(_params(str(xray_sample), tmp_path), paths, progress=False)
    raw = paths.raw
    assert summary["source"] == "local" and summary["folder"] == str(xray_sample.resolve())
    counts = summary["counts"]
    metadata = pd.read_csv(xray_sample / "covid-chestxray-dataset" / "metadata.csv")
    assert counts["covid_rows"] == len(metadata)
    assert counts["covid_images"] == len(list(
        (xray_sample / "covid-chestxray-dataset" / "images").iterdir()))
    assert counts["covid_missing_files"] > 0  # a partial download: reported, not fatal
    assert counts["kermany"]["train"] == {"NORMAL": 8, "PNEUMONIA": 8}
    links = summary["links"]
    assert links["hardlinks"] + links["symlinks"] == sum(
        1 for p in (raw / "covid-chestxray-dataset").rglob("*") if p.is_file() or p.is_symlink()
    ) + sum(1 for p in (raw / "chest_xray").rglob("*") if p.is_file() or p.is_symlink())
    linked = raw / "chest_xray" / "train" / "NORMAL" / "IM-0416-0001.jpeg"
    original = xray_sample / "chest_xray" / "train" / "NORMAL" / "IM-0416-0001.jpeg"
    assert linked.is_symlink() or os.path.samefile(linked, original)  # linked, not copied
    assert not (raw / "README.md").exists()
    assert json.loads((raw / "SOURCE.json").read_text())["counts"] == counts


def test_local_source_names_what_is_missing(tmp_path: Path) -> None:
    folder = tmp_path / "mydata"
    (folder / "chest_xray" / "train").mkdir(parents=True)
    with pytest.raises(PipelineError) as error:
        acquire(_params(str(folder), tmp_path), Paths(tmp_path), progress=False)
    message = str(error.value)
    assert "covid-chestxray-dataset/metadata.csv" in message and "chest_xray/test/" in message
    assert "chest_xray/train/" not in message


def test_local_source_inside_data_raw_is_refused(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    (paths.raw / "chest_xray").mkdir(parents=True)
    with pytest.raises(PipelineError, match="inside"):
        acquire(_params("data/raw", tmp_path), paths, progress=False)


def test_linking_falls_back_to_symlinks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.jpeg").write_bytes(b"1")

    def no_hard_links(*_: Any) -> None:
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "link", no_hard_links)
    plan = Plan()
    plan_tree(tmp_path / "src", "dst", plan)
    counts = materialize(plan, tmp_path, move=False)
    assert counts == {"hardlinks": 0, "symlinks": 1}
    assert (tmp_path / "dst" / "a" / "x.jpeg").is_symlink()
    assert (tmp_path / "dst" / "a" / "x.jpeg").read_bytes() == b"1"


def test_demo_source_replaces_data_raw_and_writes_source_json(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    (paths.raw / "stale").mkdir(parents=True)
    params = _params("demo", tmp_path, covid_patients=8, kermany_train=6, kermany_test=2,
                     max_side=48)
    summary = acquire(params, paths, progress=False)
    assert not (paths.raw / "stale").exists() and _leftovers(paths.data) == []
    assert oct(paths.raw.stat().st_mode & 0o777) != oct(0o700)
    source = json.loads((paths.raw / "SOURCE.json").read_text())
    assert source["source"] == "demo" and source["seed"] == 42
    assert source["demo"]["covid_patients"] == 8
    counts = count_raw(paths.raw)
    assert source["counts"] == counts == summary["counts"]
    generated = source["generated"]
    for key in ("covid_rows", "covid_images", "covid_missing_files", "kermany_images", "images"):
        assert generated[key] == counts[key], key
    line = describe(summary, "data/raw", 2.14)
    assert line == (f"demo data set, {counts['images']} images ({counts['covid_rows']} COVID "
                    f"rows, {counts['kermany_images']} Kermany, {counts['external_images']} "
                    f"external, {counts['covid_missing_files']} listed files missing) in "
                    "data/raw (2.1 s)")


def test_stage_script_logs_one_line(repo_root: Path, tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(
        "data:\n  source: demo\n  demo:\n    covid_patients: 6\n    kermany_train: 4\n"
        "    kermany_test: 1\n    max_side: 40\n")
    result = subprocess.run([sys.executable, str(repo_root / "stages" / "acquire.py")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "acquire: demo data set, " in result.stderr
    assert "in data/raw (" in result.stderr
    assert (tmp_path / "data" / "raw" / "SOURCE.json").is_file()

    (tmp_path / "params.yaml").write_text("data:\n  source: demo\n  demo:\n    max_side: 8\n")
    result = subprocess.run([sys.executable, str(repo_root / "stages" / "acquire.py")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error:")
    assert "data.demo.max_side" in result.stderr


# --------------------------------------------------------------------------------------------
# The archives in the shapes users get them (built from real sample files, and from demo files
# so that a clone without the sample covers the same shapes)
# --------------------------------------------------------------------------------------------

COMMIT = "6a4242344473ccb5ed0d2148d8c7bfb1691e4ed8"
APPLEDOUBLE = (b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02"
               b"\x00\x00\x00\x09\x00\x00\x00\x32\x00\x00\x0e\xb0"
               b"\x00\x00\x00\x02\x00\x00\x0e\xe2\x00\x00\x01\x1e").ljust(4096, b"\x00")
"""A macOS AppleDouble file (``._<name>``): resource fork and Finder info, not an image."""
DS_STORE = b"\x00\x00\x00\x01Bud1".ljust(6148, b"\x00")
ARCHIVE_NAMES = {archive.layout: archive.filename for archive in DATASETS}
KAGGLE_ZIP = "chest-xray-pneumonia.zip"


@pytest.fixture(scope="module", params=["sample", "demo"])
def collection(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding covid-chestxray-dataset/ and chest_xray/{train,test}/: the real sample,
    or (on a clone without it) a small demo set."""
    if request.param == "sample":
        return request.getfixturevalue("xray_sample")
    paths = Paths(tmp_path_factory.mktemp("demo-collection"))
    acquire(_params("demo", paths.root, **SMALL_DEMO), paths, progress=False)
    return paths.raw


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative posix path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _with_folders(files: dict[str, bytes], top: str) -> dict[str, bytes | None]:
    """``files`` under ``top/`` with a folder entry before each folder's files, as zip tools
    write them."""
    entries: dict[str, bytes | None] = {f"{top}/": None}
    for rel, data in files.items():
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            entries.setdefault(f"{top}/{'/'.join(parts[:depth])}/", None)
        entries[f"{top}/{rel}"] = data
    return entries


def github_zip(folder: Path, repo: str) -> bytes:
    """As GitHub serves ``/archive/<commit>.zip``: one top folder ``<repo>-<commit>/``, folder
    entries, the commit in the zip comment."""
    return _zip(_with_folders(_tree(folder), f"{repo}-{COMMIT}"), comment=COMMIT.encode())


def _mac_litter(files: dict[str, bytes], top: str) -> dict[str, bytes]:
    """What the Mac's "Compress" adds for ``files`` (relative to ``top``): an AppleDouble
    ``._<name>`` under ``__MACOSX/<top>/`` for each file and folder, a ``.DS_Store`` in the top
    folder and in each split folder (with its own AppleDouble)."""
    litter: dict[str, bytes] = {}
    folders = sorted({rel.rsplit("/", 1)[0] for rel in files} | {"train", "test"})
    for rel in [*files, *folders]:
        parent, _, name = rel.rpartition("/")
        litter[f"__MACOSX/{top}/{parent + '/' if parent else ''}._{name}"] = APPLEDOUBLE
    for where in ("", "train/", "test/"):
        litter[f"{top}/{where}.DS_Store"] = DS_STORE
        litter[f"__MACOSX/{top}/{where}._.DS_Store"] = APPLEDOUBLE
    return litter


def mendeley_zip(kermany: Path) -> tuple[bytes, Counter[str]]:
    """Mendeley's ``ChestXRay2017.zip``: ``chest_xray/{train,test}/{NORMAL,PNEUMONIA}/`` plus
    ``.DS_Store`` files and a top-level ``__MACOSX/``. Returns the zip and its junk by kind."""
    files = _tree(kermany)
    litter = _mac_litter(files, "chest_xray")
    entries = {**_with_folders(files, "chest_xray"), **litter}
    return _zip(entries), _kinds(litter)


def kaggle_files(kermany: Path, val_per_class: int) -> dict[str, bytes]:
    """Kaggle's split of the same files: the last ``val_per_class`` train images of each class
    moved to ``val/`` (as Kaggle carved its 8 + 8 val images out of Mendeley's train)."""
    files = _tree(kermany)
    for label in ("NORMAL", "PNEUMONIA"):
        for rel in sorted(r for r in files if r.startswith(f"train/{label}/"))[-val_per_class:]:
            files[f"val/{rel.removeprefix('train/')}"] = files.pop(rel)
    return dict(sorted(files.items()))


def kaggle_zip(kermany: Path, val_per_class: int) -> tuple[bytes, Counter[str]]:
    """Kaggle's ``chest-xray-pneumonia.zip``: ``chest_xray/{train,test,val}/``, the same tree
    again as ``chest_xray/chest_xray/``, ``.DS_Store`` files and ``chest_xray/__MACOSX/``."""
    files = kaggle_files(kermany, val_per_class)
    nested = {f"chest_xray/{rel}": data for rel, data in files.items()}
    litter = {f"chest_xray/{name}": data for name, data in _mac_litter(files, "chest_xray").items()
              if name.startswith("__MACOSX/")}
    litter.update({f"chest_xray/{where}.DS_Store": DS_STORE
                   for where in ("", "train/", "chest_xray/")})
    entries = {**_with_folders({**files, **nested}, "chest_xray"), **litter}
    return _zip(dict(sorted(entries.items()))), _kinds(litter)


def _kinds(litter: dict[str, bytes]) -> Counter[str]:
    return Counter(junk_kind(name) for name in litter)


def actualmed_zip(collection: Path) -> bytes:
    """A GitHub archive in the Actualmed layout, from two of the collection's images."""
    tests = sorted((collection / "chest_xray" / "test").rglob("*.jpeg"))
    folder = {"metadata.csv": b"patientid,finding,view,imagename\n"
                              b"A1,COVID-19,PA,c1.jpeg\nA2,No finding,PA,n1.jpeg\n",
              "images/c1.jpeg": tests[0].read_bytes(), "images/n1.jpeg": tests[-1].read_bytes()}
    top = f"Actualmed-COVID-chestxray-dataset-{COMMIT}"
    return _zip(_with_folders(folder, top), comment=COMMIT.encode())


def _val_per_class(collection: Path) -> int:
    return 2 if len(list((collection / "chest_xray" / "train" / "NORMAL").iterdir())) > 4 else 1


def _place_archives(collection: Path, shape: str, downloads: Path) -> Counter[str]:
    """The three archives in ``downloads`` under the names users give them; returns the junk
    the Kermany one holds."""
    downloads.mkdir(parents=True, exist_ok=True)
    (downloads / ARCHIVE_NAMES["covid"]).write_bytes(
        github_zip(collection / "covid-chestxray-dataset", "covid-chestxray-dataset"))
    (downloads / ARCHIVE_NAMES["actualmed"]).write_bytes(actualmed_zip(collection))
    kermany = collection / "chest_xray"
    if shape == "mendeley":
        data, junk = mendeley_zip(kermany)
        (downloads / ARCHIVE_NAMES["kermany"]).write_bytes(data)
    else:
        data, junk = kaggle_zip(kermany, _val_per_class(collection))
        (downloads / KAGGLE_ZIP).write_bytes(data)
    return junk


def _assert_arranged_like(raw: Path, collection: Path) -> None:
    """data/raw holds exactly the collection's files (Kaggle's val/ back in train/, one copy of
    each image) and no OS junk at all."""
    assert _tree(raw / "chest_xray") == _tree(collection / "chest_xray")
    covid = _tree(raw / "covid-chestxray-dataset")
    assert covid == _tree(collection / "covid-chestxray-dataset")
    leftovers = [p for p in raw.rglob("*") if junk_kind(p.relative_to(raw)) is not None]
    assert leftovers == []


@pytest.mark.parametrize("shape", ["mendeley", "kaggle"])
def test_download_source_arranges_the_archives_as_published(
        collection: Path, shape: str, tmp_path: Path) -> None:
    """data.source=download with the archives placed in data/downloads/ (the real archive
    names, so the real DATASETS definitions and no network)."""
    paths = Paths(tmp_path)
    junk = _place_archives(collection, shape, paths.downloads)
    summary, rebuilt = refresh(_params("download", tmp_path), paths, progress=False)
    assert rebuilt
    _assert_arranged_like(paths.raw, collection)
    counts = count_raw(paths.raw)
    assert summary["counts"] == counts and set(counts["kermany"]) == {"train", "test"}
    assert counts["external"] == {"covid": 1, "normal": 1}

    # Junk: skipped while extracting, counted by kind, never an image.
    assert summary["junk_skipped"] == dict(junk) and sum(junk.values()) > 0
    kermany_info = next(a for a in summary["archives"] if a["name"] == "chest_xray")
    assert kermany_info["junk_skipped"] == dict(junk)
    covid_info = next(a for a in summary["archives"] if a["name"] == "covid-chestxray-dataset")
    assert covid_info["arranged"] == {"root": f"covid-chestxray-dataset-{COMMIT}"}

    report = summary["kermany"]
    assert report["root"] == "chest_xray" and report["ignored"] == []
    line = describe(summary, "data/raw", 1.0)
    assert f"{sum(junk.values()):,} OS junk files skipped" in line
    if shape == "kaggle":
        val = _val_per_class(collection)
        assert kermany_info["file"] == KAGGLE_ZIP and kermany_info["sha256_verified"] is False
        assert report["val_into_train"] == {"NORMAL": val, "PNEUMONIA": val}
        files = len(_tree(collection / "chest_xray"))
        assert report["copies_ignored"] == [{"folder": "chest_xray/chest_xray", "files": files,
                                             "same_names_and_sizes": True}]
        assert f"Kermany val/: {2 * val} images added to train/" in line
        assert "chest_xray/chest_xray/ ignored: a second copy" in line
        assert set(junk) == {"macosx", "ds_store"}
    else:
        assert kermany_info["file"] == "ChestXRay2017.zip"
        assert report["val_into_train"] == {} and report["copies_ignored"] == []
        assert "val/" not in line
        assert set(junk) == {"macosx", "ds_store"}

    again, rebuilt = refresh(_params("download", tmp_path), paths, progress=False)
    assert not rebuilt and again == summary


def _extract_as_is(data: bytes, folder: Path) -> None:
    """What ``unzip`` or a double click does: every member written, ``__MACOSX/`` included."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        zf.extractall(folder)


@pytest.mark.parametrize("shape", ["mendeley", "kaggle"])
def test_local_source_reads_the_archives_extracted_as_they_come(
        collection: Path, shape: str, tmp_path: Path) -> None:
    """data.source=<folder> holding each archive extracted as is: GitHub's
    ``covid-chestxray-dataset-<commit>/`` and Mendeley's or Kaggle's ``chest_xray/`` with their
    ``__MACOSX/``, ``.DS_Store`` files and (Kaggle) nested duplicate and val/."""
    folder = tmp_path / "downloads-extracted"
    _extract_as_is(github_zip(collection / "covid-chestxray-dataset", "covid-chestxray-dataset"),
                   folder)
    kermany = collection / "chest_xray"
    if shape == "mendeley":
        _extract_as_is(mendeley_zip(kermany)[0], folder)
        # Copied through a USB stick by a Mac: AppleDouble files beside the images too.
        normal = folder / "chest_xray" / "train" / "NORMAL"
        for image in sorted(normal.iterdir()):
            (normal / f"._{image.name}").write_bytes(APPLEDOUBLE)
        (normal / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
        beside = len(list(kermany.joinpath("train", "NORMAL").iterdir()))
        # Read: the .DS_Store in chest_xray/ and train/ (test/'s too), the files beside images;
        # the top-level __MACOSX/ is beside the datasets, not in them: never read.
        expected = {"appledouble": beside, "ds_store": 3, "windows": 1}
    else:
        _extract_as_is(kaggle_zip(kermany, _val_per_class(collection))[0], folder)
        macosx = sum(1 for p in (folder / "chest_xray" / "__MACOSX").rglob("*") if p.is_file())
        # Read: chest_xray/__MACOSX/ and the .DS_Store of chest_xray/ and train/; the nested
        # copy is not read at all (its own .DS_Store included).
        expected = {"macosx": macosx, "ds_store": 2}
    assert not (folder / "covid-chestxray-dataset").exists()  # found by its archive's name

    paths = Paths(tmp_path / "project")
    params = _params(str(folder), paths.root)
    summary, rebuilt = refresh(params, paths, progress=False)
    assert rebuilt
    _assert_arranged_like(paths.raw, collection)
    assert summary["covid_root"] == f"covid-chestxray-dataset-{COMMIT}"
    assert summary["junk_skipped"] == expected
    report = summary["kermany"]
    assert report["root"] == "chest_xray" and report["ignored"] == []
    if shape == "kaggle":
        val = _val_per_class(collection)
        assert report["val_into_train"] == {"NORMAL": val, "PNEUMONIA": val}
        assert [c["folder"] for c in report["copies_ignored"]] == ["chest_xray/chest_xray"]
        assert report["copies_ignored"][0]["same_names_and_sizes"] is True
    linked = paths.raw / "chest_xray" / "test" / "NORMAL"
    original = folder / "chest_xray" / "test" / "NORMAL"
    assert all(os.path.samefile(p, original / p.name) for p in linked.iterdir())

    # The stamp still works: unchanged folder, data/raw untouched; a val image removed, relinked.
    before = _states(paths.raw)
    again, rebuilt = refresh(params, paths, progress=False)
    assert not rebuilt and again == summary and _states(paths.raw) == before
    if shape == "kaggle":
        gone = next((folder / "chest_xray" / "val" / "NORMAL").iterdir())
        gone.unlink()
        summary, rebuilt = refresh(params, paths, progress=False)
        assert rebuilt and not (paths.raw / "chest_xray" / "train" / "NORMAL" / gone.name).exists()
        assert summary["kermany"]["val_into_train"]["NORMAL"] == val - 1
        assert summary["kermany"]["copies_ignored"][0]["same_names_and_sizes"] is False


def test_kermany_val_image_already_in_train(collection: Path, tmp_path: Path) -> None:
    """A val/ file also in train/: dropped and counted when it is the same file, refused with
    both names when it differs (never two files of one name, never a silent pick)."""
    folder = tmp_path / "mydata"
    shutil.copytree(collection / "covid-chestxray-dataset", folder / "covid-chestxray-dataset")
    shutil.copytree(collection / "chest_xray", folder / "chest_xray")
    train = folder / "chest_xray" / "train" / "PNEUMONIA"
    (folder / "chest_xray" / "val" / "PNEUMONIA").mkdir(parents=True)
    first, second = sorted(train.iterdir())[:2]
    shutil.copy(first, folder / "chest_xray" / "val" / "PNEUMONIA" / first.name)
    paths = Paths(tmp_path / "project")
    summary = acquire(_params(str(folder), paths.root), paths, progress=False)
    assert summary["kermany"]["val_into_train"] == {"NORMAL": 0, "PNEUMONIA": 0}
    assert summary["kermany"]["val_duplicates"] == 1
    assert _tree(paths.raw / "chest_xray") == _tree(collection / "chest_xray")
    assert "Kermany val/: 0 images added to train/ (1 already there, same content)" in \
        describe(summary, "data/raw", 1.0)

    clash = folder / "chest_xray" / "val" / "PNEUMONIA" / first.name
    clash.unlink()
    shutil.copy(second, clash)  # another image under the same name
    with pytest.raises(PipelineError) as error:
        acquire(_params(str(folder), paths.root), paths, progress=False)
    assert str(clash.resolve()) in str(error.value) and str(first.resolve()) in str(error.value)
    assert "rename or remove one" in str(error.value)


def test_local_source_without_the_datasets_names_what_to_put_where(tmp_path: Path) -> None:
    folder = tmp_path / "mydata"
    (folder / "covid-chestxray-dataset-master" / "images").mkdir(parents=True)  # no metadata.csv
    (folder / "chest_xray" / "train").mkdir(parents=True)
    (folder / "chest_xray" / "test").mkdir(parents=True)
    with pytest.raises(PipelineError) as error:
        acquire(_params(str(folder), tmp_path), Paths(tmp_path / "project"), progress=False)
    message = str(error.value)
    assert "covid-chestxray-dataset-<commit>/metadata.csv" in message
    assert "chest_xray/train|test/NORMAL|PNEUMONIA/" in message


def test_data_stages_ignore_os_junk_left_in_data_raw(tmp_path: Path) -> None:
    """Junk that gets into data/raw after acquire (Finder browsing it, a copy by hand) is not an
    image: the data stages' listings leave it out, so it is never counted as a corrupt one."""
    paths = Paths(tmp_path)
    acquire(_params("demo", tmp_path, **SMALL_DEMO), paths, progress=False)
    normal = paths.raw / "chest_xray" / "train" / "NORMAL"
    images = sorted(p.name for p in normal.iterdir())
    for name in images:
        (normal / f"._{name}").write_bytes(APPLEDOUBLE)
    (normal / ".DS_Store").write_bytes(DS_STORE)
    (normal / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    listed = kermany_candidates(paths.raw / "chest_xray", "train", "normal")
    assert [c.source.name for c in listed] == images
    # What listing them would have cost: each one refused as a broken image.
    assert inspect_file(Candidate(normal / f"._{images[0]}", "normal", "x")).reason.startswith(
        "not_image")

    external = paths.raw / "external"
    (external / "covid" / "__MACOSX").mkdir()
    (external / "covid" / "__MACOSX" / "x.png").write_bytes(APPLEDOUBLE)
    (external / "covid" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    table = external_files("demo", str(external), tmp_path)
    assert not any(junk_kind(Path(p).relative_to(external)) for p in table["path"])
    assert len(table) == sum(count_raw(paths.raw)["external"].values())


@pytest.mark.slow
def test_dvc_repro_on_a_placed_kaggle_archive(repo_root: Path, tmp_path: Path) -> None:
    """The path a user takes: the Kaggle zip (and the two GitHub archives) placed in
    data/downloads, `dvc repro` with data.source=download, no network."""
    maker = Paths(tmp_path / "maker")
    acquire(_params("demo", maker.root, **FAST_PARAMS["data"]["demo"]), maker, progress=False)
    params = deep_update(json.loads(json.dumps(FAST_PARAMS)), {"data": {"source": "download"}})
    repo = make_repo_copy(repo_root, tmp_path / "repo", params)
    junk = _place_archives(maker.raw, "kaggle", repo / "data" / "downloads")
    first = run(["dvc", "repro", "copy_images"], repo)
    assert _ran(first.stdout) == {"acquire", "select_metadata", "copy_images"}
    output = first.stdout + first.stderr
    assert "Kermany val/: 4 images added to train/" in output
    assert f"{sum(junk.values()):,} OS junk files skipped" in output

    source = json.loads((repo / "data" / "raw" / "SOURCE.json").read_text())
    assert source["counts"]["kermany"] == count_raw(maker.raw)["kermany"]
    copied = json.loads((repo / "metrics" / "copy_images.json").read_text())
    demo = FAST_PARAMS["data"]["demo"]
    # One copy of each Kermany image (not two), val/ included; nothing skipped as broken.
    assert copied["pools"]["kermany_train_normal"] == demo["kermany_train"]
    assert copied["pools"]["kermany_test_pneumonia"] == demo["kermany_test"]
    skipped = pd.read_csv(repo / "data" / "datasets" / "skipped.csv")
    assert not skipped["reason"].str.startswith(("not_image", "corrupt", "empty")).any()
    assert not skipped["source"].map(lambda s: junk_kind(s) is not None).any()

    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "first run"], repo)
    again = run(["dvc", "repro", "copy_images"], repo)
    assert _ran(again.stdout) == {"acquire"}
    assert run(["git", "status", "--porcelain"], repo).stdout == ""


# --------------------------------------------------------------------------------------------
# refresh: the stage runs on every dvc repro and keeps data/raw while it is current
# --------------------------------------------------------------------------------------------

SMALL_DEMO = {"covid_patients": 6, "kermany_train": 4, "kermany_test": 2, "max_side": 48}


def _states(root: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file: equal before and after means untouched."""
    return {p.relative_to(root).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def _user_folder(tmp_path: Path, **demo: Any) -> Path:
    """A folder in both dataset layouts (made by the demo generator), as a user's data.source."""
    maker = Paths(tmp_path / "maker")
    acquire(_params("demo", maker.root, **(demo or SMALL_DEMO)), maker, progress=False)
    folder = tmp_path / "mydata"
    shutil.copytree(maker.raw, folder, ignore=shutil.ignore_patterns("*.json", "external"))
    return folder


def _replace(path: Path, text: str) -> None:
    """Replace a file the way editors and downloads do: a new file renamed over the old one."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    os.replace(new, path)


def test_demo_refresh_leaves_current_data_raw_untouched(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    params = _params("demo", tmp_path, **SMALL_DEMO)
    summary, rebuilt = refresh(params, paths, progress=False)
    assert rebuilt and (paths.raw / STAMP_FILE).is_file()
    before = _states(paths.raw)
    again, rebuilt = refresh(params, paths, progress=False)
    assert not rebuilt and again == summary
    assert _states(paths.raw) == before
    assert describe(again, "data/raw", 0.04, rebuilt=False).endswith(
        "in data/raw, unchanged (0.0 s)")


@pytest.mark.parametrize("change", ["param", "deleted file", "edited file", "no stamp"])
def test_demo_refresh_rebuilds_on_any_change(tmp_path: Path, change: str) -> None:
    paths = Paths(tmp_path)
    params = _params("demo", tmp_path, **SMALL_DEMO)
    summary, _ = refresh(params, paths, progress=False)
    metadata = paths.raw / "covid-chestxray-dataset" / "metadata.csv"
    original = metadata.read_bytes()
    if change == "param":
        params = _params("demo", tmp_path, **{**SMALL_DEMO, "covid_patients": 7})
    elif change == "deleted file":
        metadata.unlink()
    elif change == "edited file":
        with metadata.open("ab") as handle:
            handle.write(b"9,0,M,1,COVID-19,PA,X-ray,2020,images,extra.jpeg\n")
    else:
        (paths.raw / STAMP_FILE).unlink()
    again, rebuilt = refresh(params, paths, progress=False)
    assert rebuilt
    if change == "param":
        assert again["demo"]["covid_patients"] == 7 and again != summary
    else:
        assert again == summary and metadata.read_bytes() == original


def test_local_refresh_follows_the_folder_and_relinks_only_when_it_changed(
        tmp_path: Path) -> None:
    folder = _user_folder(tmp_path)
    paths = Paths(tmp_path / "project")
    params = _params(str(folder), paths.root)
    raw = paths.raw
    _, rebuilt = refresh(params, paths, progress=False)
    assert rebuilt
    before = _states(raw)
    _, rebuilt = refresh(params, paths, progress=False)
    assert not rebuilt and _states(raw) == before

    # An image added to the folder: linked on the next run; the other files keep their inodes.
    normal = folder / "chest_xray" / "train" / "NORMAL"
    shutil.copy(next(normal.iterdir()), normal / "IM-9999-0001.jpeg")
    summary, rebuilt = refresh(params, paths, progress=False)
    assert rebuilt and os.path.samefile(raw / "chest_xray/train/NORMAL/IM-9999-0001.jpeg",
                                        normal / "IM-9999-0001.jpeg")
    after = _states(raw)
    written = (".json", NO_EXTERNAL_FILE)  # acquire writes these anew; linked files keep inodes
    assert {k: v for k, v in after.items() if k in before and not k.endswith(written)} == {
        k: v for k, v in before.items() if not k.endswith(written)}
    assert summary["counts"]["kermany"]["train"]["NORMAL"] == SMALL_DEMO["kermany_train"] + 1

    # metadata.csv replaced by a new file: the old hard link in data/raw still holds the old
    # content, so only a relink shows the new one.
    metadata = folder / "covid-chestxray-dataset" / "metadata.csv"
    lines = metadata.read_text().splitlines(keepends=True)
    _replace(metadata, "".join(lines[:-1]))
    summary, rebuilt = refresh(params, paths, progress=False)
    assert rebuilt
    assert (raw / "covid-chestxray-dataset" / "metadata.csv").read_text() == "".join(lines[:-1])
    assert summary["counts"]["covid_rows"] == len(lines) - 2

    # A file removed from the folder is removed from data/raw.
    (normal / "IM-9999-0001.jpeg").unlink()
    _, rebuilt = refresh(params, paths, progress=False)
    assert rebuilt and not (raw / "chest_xray/train/NORMAL/IM-9999-0001.jpeg").exists()


def test_external_folder_is_never_empty_so_dvc_does_not_warn(tmp_path: Path) -> None:
    """Audit, featurize and validate depend on data/raw/external; DVC warns "'data/raw/external'
    is empty" on every run for an empty folder dependency (a local folder or archives without an
    external set). A hidden note fills it, which no stage reads as an image."""
    folder = _user_folder(tmp_path)  # no external/ folder
    paths = Paths(tmp_path / "project")
    params = _params(str(folder), paths.root)
    summary, _ = refresh(params, paths, progress=False)
    external = paths.raw / "external"
    assert [p.name for p in external.iterdir()] == [NO_EXTERNAL_FILE]
    assert "validate.external" in (external / NO_EXTERNAL_FILE).read_text()
    assert summary["counts"]["external_images"] == 0
    assert not refresh(params, paths, progress=False)[1]  # still current: nothing relinked

    demo = Paths(tmp_path / "demo")  # the demo has an external set: no note
    acquire(_params("demo", demo.root, **SMALL_DEMO), demo, progress=False)
    assert not (demo.raw / "external" / NO_EXTERNAL_FILE).exists()
    assert any(p.is_file() for p in (demo.raw / "external").rglob("*"))


def test_download_refresh_keeps_data_raw_while_the_archives_are_the_same(
        tmp_path: Path) -> None:
    paths, archives = _placed_archives(tmp_path)
    params = _params("download", tmp_path)
    summary, rebuilt = refresh(params, paths, archives=archives, progress=False)
    assert rebuilt
    before = _states(paths.raw)
    again, rebuilt = refresh(params, paths, archives=archives, progress=False)
    assert not rebuilt and again == summary and _states(paths.raw) == before
    kermany = paths.downloads / "kermany.zip"
    kermany.write_bytes(kermany.read_bytes())  # placed again by hand: a new mtime
    _, rebuilt = refresh(params, paths, archives=archives, progress=False)
    assert rebuilt


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.mark.slow
def test_dvc_repro_reruns_downstream_only_when_the_source_folder_changed(
        repo_root: Path, tmp_path: Path) -> None:
    folder = _user_folder(tmp_path, **FAST_PARAMS["data"]["demo"])
    params = deep_update(json.loads(json.dumps(FAST_PARAMS)), {"data": {"source": str(folder)}})
    repo = make_repo_copy(repo_root, tmp_path / "repo", params)
    first = run(["dvc", "repro", "copy_images"], repo)
    assert _ran(first.stdout) == {"acquire", "select_metadata", "copy_images"}
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "first run"], repo)
    rows_before = json.loads((repo / "metrics/selection.json").read_text())["rows_in"]

    # No change: acquire runs (always changed) and leaves data/raw as it was; nothing after it.
    assert "always changed" in run(["dvc", "status", "acquire"], repo).stdout
    again = run(["dvc", "repro", "copy_images"], repo)
    assert _ran(again.stdout) == {"acquire"}
    assert "Stage 'copy_images' didn't change, skipping" in again.stdout
    assert run(["git", "status", "--porcelain"], repo).stdout == ""

    # An image added: the Kermany folder changed, the COVID metadata did not.
    normal = folder / "chest_xray" / "train" / "NORMAL"
    image = cv2.imread(str(next(normal.iterdir())))
    cv2.imwrite(str(normal / "IM-9999-0001.jpeg"), cv2.flip(image, 1))
    added = run(["dvc", "repro", "copy_images"], repo)
    assert _ran(added.stdout) == {"acquire", "copy_images"}

    # metadata.csv replaced (a new file, as a fresh download or an editor writes it).
    metadata = folder / "covid-chestxray-dataset" / "metadata.csv"
    lines = metadata.read_text().splitlines(keepends=True)
    _replace(metadata, "".join(lines[:-1]))
    replaced = run(["dvc", "repro", "copy_images"], repo)
    assert _ran(replaced.stdout) == {"acquire", "select_metadata", "copy_images"}
    assert json.loads((repo / "metrics/selection.json").read_text())["rows_in"] == \
        rows_before - 1
