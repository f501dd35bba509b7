"""featurize throughput: the local engine vs the Ray engine with 1 and 2 workers, same machine.

On the same cores, Ray can only add overhead (object store, an actor process, a decoding task
process, scheduling); what it buys is more machines. This prints, for each engine, images/s end
to end (start-up included: Ray start, actors building the backbone, XLA compile) and once started
(after the first batch), and Ray's overhead against the local engine on equal cores (target
under 15% once started). Every engine computes on the same JPEG files (1024 x 1024, decoded and
resized like real scans) with the same backbone; the features are checked to be identical.

    python benchmarks/bench_ray.py                          # 224 px VGG16, 32 images x 3 rows
    python benchmarks/bench_ray.py --images 8 --batch 4 --repeats 1    # a quick check

"Once started" is the rate between a small and the full run of the same engine (the fastest of
``--repeats`` each): start-up costs cancel, on a quiet machine. On a loaded one start-up varies by
tens of seconds and swamps the difference: read the end-to-end figures there.

Prints figures; it is not a test. The build machine may be shared: the load average is printed.
Needs the ray extra (``pip install -e ".[ray]"``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2
import numpy as np
import pandas as pd

from covid_xray.feature_io import FeaturizeResult
from covid_xray.features import compute_features, plan_rows, use_xla
from covid_xray.modeling import build_backbone
from covid_xray.params import parse_params
from covid_xray.ray_featurize import compute_features_ray


def write_jpegs(folder: Path, n_images: int) -> pd.DataFrame:
    """``n_images`` film-sized JPEGs under ``folder``, as a manifest (training set: rotated)."""
    rng = np.random.default_rng(0)
    rows = []
    (folder / "covid_normal" / "covid").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        image = cv2.GaussianBlur(rng.integers(0, 255, (1024, 1024), dtype=np.uint8), (0, 0), 3)
        name = f"covid_normal/covid/{i:04d}.jpeg"
        cv2.imwrite(str(folder / name), image)
        rows.append((name, "covid_normal", "covid", f"{i + 1:064x}"))
    return pd.DataFrame(rows, columns=["path", "set", "label", "sha256"])


def run_engine(name: str, folder: Path, plan: pd.DataFrame, img_size: int, batch: int,
               workers: int, cpus_per_worker: float) -> tuple[FeaturizeResult, float, bytes]:
    """One featurize of the plan; returns the result, the wall seconds and the features' bytes."""
    backbone = build_backbone("vgg16", img_size, "none", seed=0)
    out = folder / f"features-{name}.npy"
    started = time.perf_counter()
    if workers == 0:
        result = compute_features(plan, folder, backbone, out, batch,
                                  jit_compile=use_xla(img_size), progress=False)
    else:
        params = parse_params({"featurize": {"engine": "ray", "batch_size": batch,
                                             "workers": workers,
                                             "cpus_per_worker": cpus_per_worker},
                               "model": {"img_size": img_size, "pool_size": 1}})
        result = compute_features_ray(plan, folder, backbone, out, params,
                                      jit_compile=use_xla(img_size), progress=False)
    return result, time.perf_counter() - started, out.read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=32, help="JPEG files (1024 x 1024)")
    parser.add_argument("--copies", type=int, default=2, help="rotated copies per image")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each size per engine; the fastest counts (load spikes)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"{cores} cores, load average {os.getloadavg()[0]:.1f} (other jobs on a shared "
          "machine lower every figure)")
    folder = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        plan = plan_rows(write_jpegs(folder, args.images), args.copies, 15.0, seed=0)
        small = plan.iloc[:max(args.batch, len(plan) // 4 // args.batch * args.batch)]
        print(f"{len(plan)} rows ({args.images} images + {args.copies} rotated copies each), "
              f"{args.img_size} px VGG16, batch {args.batch}; each engine runs {len(small)} rows "
              f"then {len(plan)}: the rate once started is the difference of the two (start-up "
              "costs cancel)")
        engines = [("local", 0, 0.0), ("ray, 1 worker x all cores", 1, float(cores)),
                   ("ray, 2 workers", 2, max(cores / 2, 1.0))]
        rates: dict[str, tuple[float, float]] = {}
        reference: bytes | None = None
        for name, workers, cpus in engines:
            tag = f"{name.split(',')[0]}{workers}"
            small_s = min(run_engine(tag, folder, small, args.img_size, args.batch, workers,
                                     cpus)[1] for _ in range(args.repeats))
            runs = [run_engine(tag, folder, plan, args.img_size, args.batch, workers, cpus)
                    for _ in range(args.repeats)]
            result, wall, data = min(runs, key=lambda run: run[1])
            end_to_end = len(result.index) / wall
            started = (len(plan) - len(small)) / max(wall - small_s, 1e-9)
            rates[name] = (end_to_end, started)
            same = "identical" if reference in (None, data) else "DIFFERENT"
            reference = reference or data
            print(f"{name:27s} {end_to_end:5.2f} images/s end to end ({wall:5.1f} s; "
                  f"{len(small)} rows: {small_s:5.1f} s), {started:5.2f} images/s once started; "
                  f"features {same}")
        local, one = rates["local"], rates["ray, 1 worker x all cores"]
        print(f"Ray overhead on equal cores (1 worker): {100 * (1 - one[1] / local[1]):.1f}% once "
              f"started (target < 15%), {100 * (1 - one[0] / local[0]):.1f}% end to end")
        two = rates["ray, 2 workers"]
        print(f"2 workers vs 1 on the same {cores} cores: {two[1] / one[1]:.2f}x once started "
              "(no gain expected: they share the cores; workers pay off with nodes)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
