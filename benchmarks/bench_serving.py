"""Serving benchmark: latency and throughput of the real server, and the API's overhead.

    python benchmarks/bench_serving.py [--models-dir models] [--requests 40] [--clients 4]

Uses ``models/`` when both models are there, else builds 224 px VGG16 models (random frozen
backbone, pool 4, 64 dense nodes: the pipeline's default architecture) in a temporary folder.
Starts ``covid-xray serve`` (waitress) on a free loopback port and measures:

- p50/p95 latency of one prediction (both models) through ``POST /api/predict``;
- throughput with ``--clients`` concurrent clients;
- the same computation in-process (``PredictionService.predict_bytes`` on the same bytes,
  measured interleaved with the API calls so both see the same machine load), and the API's
  overhead over it at p50 (target: under 15%);
- for reference, the models alone (shared backbone + heads) and the naive path (each complete
  Keras model called on its own), and one page request with Grad-CAM;
- ``/healthz`` and one prediction on fresh connections, without and then with ``--stalled``
  connections open that sent headers and a few bytes of a 1 MB body and then nothing (slow
  clients; waitress's old default connection limit of 100 locked everyone else out).

Prints the figures and writes them to ``benchmarks/results/serving.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("COVID_XRAY_SAMPLE", ROOT.parent / "shared" / "data" / "xray-sample"))
RESULTS = ROOT / "benchmarks" / "results" / "serving.json"
PAUSE_S = 0.1
"""Pause between timed calls: TensorFlow's worker threads spin for a while after each call and
would otherwise slow the next call of the *other* process (server vs. in-process)."""


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def models_ready(models_dir: Path) -> bool:
    from covid_xray.config import MODEL_NAMES

    return all((models_dir / f"{n}{ext}").is_file() for n in MODEL_NAMES
               for ext in (".keras", ".json"))


def build_models(target: Path) -> Path:
    from covid_xray.testing import build_smoke_models, demo_images_by_class, sample_images_by_class

    images = demo_images_by_class(per_class=16, max_side=320)
    if (SAMPLE / "chest_xray").is_dir():
        for label, extra in sample_images_by_class(SAMPLE).items():
            images[label] = [*images[label], *extra]
    print(f"building 224 px VGG16 models in {target} ...", flush=True)
    return build_smoke_models(target, images, img_size=224, pool_size=4, dense_nodes=64,
                              epochs=5)


def test_image() -> tuple[bytes, str]:
    """A real chest X-ray JPEG from the sample when present, else a demo image."""
    if (SAMPLE / "chest_xray").is_dir():
        path = sorted((SAMPLE / "chest_xray" / "test" / "NORMAL").glob("*.jpeg"))[0]
        return path.read_bytes(), str(path)
    from covid_xray.testing import demo_images_by_class

    rgb = demo_images_by_class(per_class=1, max_side=1024)["normal"][0]
    return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes(), "demo"


def start_server(models_dir: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "covid_xray.cli", "serve", "--port", str(port), "--models-dir",
         str(models_dir), "--threads", "4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read()}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok:
                return process
        except requests.ConnectionError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("server did not start within 600 s")


@contextlib.contextmanager
def stalled_connections(port: int, count: int):
    """Connections that announce a 1 MB body, send two bytes of it and then nothing."""
    conns = []
    try:
        for _ in range(count):
            conn = socket.create_connection(("127.0.0.1", port), timeout=30)
            conn.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000"
                         b"\r\n\r\n\xff\xd8")
            conns.append(conn)
        yield conns
    finally:
        for conn in conns:
            conn.close()


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--requests", type=int, default=40, help="sequential latency samples")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--throughput-requests", type=int, default=40)
    parser.add_argument("--stalled", type=int, default=200,
                        help="stalled (slow-client) connections held open for the last check")
    parser.add_argument("--build-dir", type=Path, default=None,
                        help="where to build (and keep) the models when --models-dir has none; "
                             "default: a temporary folder, deleted afterwards")
    args = parser.parse_args()

    from covid_xray.predict import PredictionService

    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        if models_ready(args.models_dir):
            models_dir = args.models_dir
        elif args.build_dir is not None and models_ready(args.build_dir):
            models_dir = args.build_dir
        else:
            models_dir = build_models(args.build_dir or Path(tmp))
        data, source = test_image()
        service = PredictionService.load(models_dir)
        port = free_port()
        server = start_server(models_dir, port)
        url = f"http://127.0.0.1:{port}/api/predict"
        session = requests.Session()

        def api() -> dict:
            response = session.post(url, data=data,
                                    headers={"Content-Type": "application/octet-stream"},
                                    timeout=120)
            response.raise_for_status()
            return response.json()

        try:
            for _ in range(3):  # warm both sides (connection, caches)
                api()
                service.predict_bytes(data)
            local = service.predict_bytes(data)["models"]
            remote = api()["models"]
            assert all(local[n]["probabilities"] == remote[n]["probabilities"] for n in local), \
                "the server and the in-process service disagree"
            direct_ms, api_ms = [], []
            for _ in range(args.requests):  # interleaved: both see the same background load
                direct_ms.append(timed(lambda: service.predict_bytes(data)))
                time.sleep(PAUSE_S)
                api_ms.append(timed(api))
                time.sleep(PAUSE_S)

            group = service.groups[0]
            from covid_xray import imaging

            batch = group.prepare(imaging.decode_image(data))
            models_only = []
            for _ in range(args.requests // 2):
                models_only.append(timed(lambda: group.run(batch)))
                time.sleep(PAUSE_S)
            naive = [timed(lambda: service.scores_direct(batch)) for _ in range(5)]

            def client(count: int) -> int:
                with requests.Session() as own:
                    for _ in range(count):
                        own.post(url, data=data, timeout=300,
                                 headers={"Content-Type": "image/jpeg"}).raise_for_status()
                return count

            per_client = max(1, args.throughput_requests // args.clients)
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                done = sum(pool.map(client, [per_client] * args.clients))
            elapsed = time.perf_counter() - start
            gradcam = [timed(lambda: session.post(url + "?gradcam=1", data=data, timeout=300))
                       for _ in range(3)]

            health_url = f"http://127.0.0.1:{port}/healthz"

            def fresh_health() -> None:  # a new connection each time: the accept path
                requests.get(health_url, timeout=300).raise_for_status()

            def fresh_predict() -> None:
                requests.post(url, data=data, headers={"Content-Type": "image/jpeg"},
                              timeout=300).raise_for_status()

            quiet = {"healthz": [timed(fresh_health) for _ in range(5)],
                     "predict": [timed(fresh_predict) for _ in range(3)]}
            with stalled_connections(port, args.stalled):
                busy = {"healthz": [timed(fresh_health) for _ in range(5)],
                        "predict": [timed(fresh_predict) for _ in range(3)]}
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)

    p50_api, p50_direct = percentile(api_ms, 50), percentile(direct_ms, 50)
    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "load_average_1m": os.getloadavg()[0],
        "image": source, "image_bytes": len(data),
        "models": {m.name: {"img_size": m.info.img_size, "backbone": m.info.backbone,
                            "sha256": m.sha256[:12]} for m in service.models},
        "shared_backbone": service.shared_backbone,
        "api_latency_ms": {"p50": p50_api, "p95": percentile(api_ms, 95), "n": len(api_ms)},
        "in_process_latency_ms": {"p50": p50_direct, "p95": percentile(direct_ms, 95)},
        "api_overhead_p50": (p50_api - p50_direct) / p50_direct,
        "api_overhead_paired_median_ms": statistics.median(a - d for a, d in
                                                           zip(api_ms, direct_ms, strict=True)),
        "models_only_ms_p50": percentile(models_only, 50),
        "naive_two_full_models_ms_p50": percentile(naive, 50),
        "throughput_rps": done / elapsed, "clients": args.clients, "throughput_requests": done,
        "gradcam_page_request_ms_p50": percentile(gradcam, 50),
        "stalled_connections": args.stalled,
        "fresh_connection_ms": {  # max: the first request is the one a lock-out hits
            kind: {"none_stalled": {"p50": percentile(quiet[kind], 50), "max": max(quiet[kind])},
                   "with_stalled": {"p50": percentile(busy[kind], 50), "max": max(busy[kind])}}
            for kind in quiet},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"models: {figures['models']} (shared backbone: {service.shared_backbone})")
    print(f"image: {source} ({len(data):,} bytes)")
    print(f"API latency (loopback, both models): p50 {p50_api:.1f} ms, "
          f"p95 {figures['api_latency_ms']['p95']:.1f} ms (n={len(api_ms)})")
    print(f"same computation in-process: p50 {p50_direct:.1f} ms, "
          f"p95 {figures['in_process_latency_ms']['p95']:.1f} ms")
    print(f"API overhead at p50: {100 * figures['api_overhead_p50']:.1f}% "
          f"(paired median {figures['api_overhead_paired_median_ms']:.1f} ms; target < 15%)")
    print(f"models alone (backbone once + 2 heads): p50 {figures['models_only_ms_p50']:.1f} ms; "
          f"naive (2 complete models): p50 {figures['naive_two_full_models_ms_p50']:.1f} ms")
    print(f"throughput, {args.clients} concurrent clients: {figures['throughput_rps']:.2f} "
          f"requests/s ({done} requests in {elapsed:.1f} s)")
    print(f"page request with Grad-CAM: p50 {figures['gradcam_page_request_ms_p50']:.0f} ms")
    for kind, values in figures["fresh_connection_ms"].items():
        quiet_ms, busy_ms = values["none_stalled"], values["with_stalled"]
        print(f"{kind} on a fresh connection: p50 {quiet_ms['p50']:.1f} ms (max "
              f"{quiet_ms['max']:.1f}); with {args.stalled} stalled connections open p50 "
              f"{busy_ms['p50']:.1f} ms (max {busy_ms['max']:.1f})")
    print(f"machine: {figures['machine']}, load average {figures['load_average_1m']:.2f}")
    print(f"written: {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
