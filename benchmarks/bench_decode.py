"""Decode cost per image: OpenCV's decode vs the project's strict decode, and with the checks.

``imaging.decode_image`` decodes JPEGs with libjpeg-turbo through ``simplejpeg`` in strict mode
(truncated or corrupt data is refused); ``imaging.decode_checked`` adds the server's image-level
checks, which copy_images runs on every image. Uses the real sample when present (JPEGs decoded
at full size only, so the comparison is like for like), else synthetic film-like JPEGs.

    python benchmarks/bench_decode.py [--sample /path/to/xray-sample] [--repeat 3]

Prints figures; it is not a test. The build machine may be shared: the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from covid_xray.imaging import decode_checked, decode_image, jpeg_scale, read_image_info, to_rgb8

DEFAULT_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "xray-sample"


def synthetic_jpegs(count: int = 40, side: int = 1800) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        noise = rng.normal(size=(side, side - 200)).astype(np.float32)
        film = cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 20), None, 20, 235, cv2.NORM_MINMAX)
        out.append(cv2.imencode(".jpg", film.astype(np.uint8))[1].tobytes())
    return out


def per_image_ms(decode: Callable[[bytes], object], datas: list[bytes], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for data in datas:
            decode(data)
        best = min(best, (time.perf_counter() - start) / len(datas) * 1000)
    return best


def opencv(data: bytes) -> np.ndarray:
    flags = cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION
    return to_rgb8(cv2.imdecode(np.frombuffer(data, np.uint8), flags))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    files = sorted(args.sample.rglob("*.jp*g")) if args.sample.is_dir() else []
    datas = [p.read_bytes() for p in files]
    datas = [d for d in datas if jpeg_scale(read_image_info(d)) == 1] or synthetic_jpegs()
    source = f"{args.sample} ({len(datas)} full-size JPEGs)" if files else "synthetic JPEGs"
    print(f"{source}; load average {os.getloadavg()[0]:.1f}")
    for name, decode in (("OpenCV imdecode + to_rgb8", opencv),
                         ("imaging.decode_image (strict)", decode_image),
                         ("imaging.decode_checked (+ image checks)", decode_checked)):
        print(f"  {name:42s} {per_image_ms(decode, datas, args.repeat):6.1f} ms/image")


if __name__ == "__main__":
    main()
