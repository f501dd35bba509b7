"""Training cost: the seed's approach vs ours, on the same images, model and epochs.

Seed (Rovai's script, Keras 3 port): every image decoded into one float64 array in memory, the
full model (frozen VGG16 + head) trained with rotation augmentation applied on the fly, so every
image goes through the backbone again in every epoch (and the test images once per epoch for the
validation numbers).
Ours: ``featurize`` (each image + ``augment_copies`` rotated copies through the backbone once,
streamed into a memmap) then ``train`` (the head on cached features; test logged each epoch).

Each configuration runs in its own subprocess; its peak RSS comes from ``os.wait4`` (the child's
own ``ru_maxrss``). Two data sizes 10x apart show how memory scales with the image count. Each
configuration runs ``--repeats`` times and the median of each timing is reported (all fit times
are printed): at 30 images our fit is ~1.5 s, mostly Keras tracing its train and test functions
once, so a single run swings with machine noise.

    python benchmarks/bench_training.py                      # 64 px, 30 and 300 images (~15 min)
    python benchmarks/bench_training.py --img-size 224 --sizes 20 200

Prints figures; it is not a test. The build machine may be shared: the load average is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

MODEL = "covid_normal"


# ---------------------------------------------------------------------------------------------
# Synthetic data in the pipeline's formats (docs/contracts.md)


def make_data(root: Path, n_images: int, img_size: int, epochs: int, batch_size: int,
              augment_copies: int, seed: int = 0) -> None:
    """``n_images`` 320x320 JPEGs (half COVID), manifest, split (80/20) and params.yaml."""
    rng = np.random.default_rng(seed)
    datasets = root / "data" / "datasets"
    manifest, split = [], []
    for i in range(n_images):
        label = "covid" if i % 2 == 0 else "normal"
        image = rng.normal(150 if label == "covid" else 95, 25, size=(320, 320))
        image = cv2.GaussianBlur(np.clip(image, 0, 255).astype(np.uint8), (0, 0), 2)
        rel = f"{MODEL}/{label}/img{i:05d}.jpeg"
        (datasets / MODEL / label).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(datasets / rel), image)
        sha = hashlib.sha256((datasets / rel).read_bytes()).hexdigest()
        manifest.append(f"{rel},{MODEL},{label},p{i},{sha},raw/{i}.jpeg,320,320,jpeg")
        side = "test" if i % 10 in (0, 1) else "train"
        split.append(f"{rel},{label},p{i},{sha},{side}")
    (datasets / "manifest.csv").write_text(
        "path,set,label,patient_id,sha256,source,width,height,format\n"
        + "\n".join(manifest) + "\n")
    (root / "data" / "splits").mkdir(parents=True, exist_ok=True)
    (root / "data" / "splits" / f"{MODEL}.csv").write_text(
        "path,label,patient_id,sha256,split\n" + "\n".join(split) + "\n")
    params = {
        "base": {"seed": 42},
        "model": {"backbone": "vgg16", "weights": "none", "img_size": img_size,
                  "pool_size": max(1, min(4, img_size // 32)), "dense_nodes": 64},
        "featurize": {"augment_copies": augment_copies, "batch_size": 16},
        "train": {"seed": 42, "init_lr": 0.001, "epochs": epochs, "batch_size": batch_size,
                  "dropout": 0.5, "rotation_deg": 15},
        "threshold": {"rule": "argmax"},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))


# ---------------------------------------------------------------------------------------------
# Workers (run in subprocesses)


def worker_seed(root: Path) -> dict[str, Any]:
    """The seed's recipe: float64 arrays in memory, backbone forward per image per epoch."""
    import keras

    from covid_xray.imaging import rotate
    from covid_xray.modeling import build_backbone, build_head, pooled_features
    from covid_xray.params import load_params
    from covid_xray.training import LOSS

    params = load_params(root / "params.yaml")
    size = params.model.img_size
    started = time.perf_counter()
    split = [line.split(",") for line in
             (root / "data" / "splits" / f"{MODEL}.csv").read_text().splitlines()[1:]]
    data, labels, sides = [], [], []
    for path, label, _, _, side in split:  # the seed: cv2.imread -> RGB -> resize, in a list
        image = cv2.imread(str(root / "data" / "datasets" / path))
        data.append(cv2.resize(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), (size, size)))
        labels.append([1.0, 0.0] if label == "covid" else [0.0, 1.0])
        sides.append(side)
    data_f64 = np.array(data) / 255.0  # float64, as in the seed
    del data
    y = np.array(labels)
    train_mask = np.array(sides) == "train"
    train_x, train_y = data_f64[train_mask], y[train_mask]
    test_x, test_y = data_f64[~train_mask], y[~train_mask]
    load_s = time.perf_counter() - started

    keras.utils.set_random_seed(42)
    backbone = build_backbone("vgg16", size, "none", seed=42)
    shape = tuple(backbone.output_shape[1:])
    dim = pooled_features(np.zeros((1, *shape), np.float32), params.model.pool_size).shape[1]
    head = build_head(shape, params.model.pool_size, params.model.dense_nodes,
                      params.train.dropout, mean=np.zeros(dim), variance=np.ones(dim))
    inputs = keras.Input((size, size, 3))
    model = keras.Model(inputs, head(backbone(inputs, training=False)))
    model.compile(optimizer=keras.optimizers.Adam(params.train.init_lr),
                  loss=LOSS, metrics=["accuracy"])
    rng = np.random.default_rng(42)
    deg = params.train.rotation_deg

    class Augmented(keras.utils.PyDataset):
        """ImageDataGenerator(rotation_range=deg).flow(trainX, trainY, batch_size) in Keras 3."""

        def __init__(self) -> None:
            super().__init__()
            self.order = rng.permutation(len(train_x))

        def __len__(self) -> int:
            return len(train_x) // params.train.batch_size

        def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
            idx = self.order[i * params.train.batch_size:(i + 1) * params.train.batch_size]
            batch = np.stack([rotate(train_x[j], rng.uniform(-deg, deg)) for j in idx])
            return batch.astype(np.float32), train_y[idx]

        def on_epoch_end(self) -> None:
            self.order = rng.permutation(len(train_x))

    started = time.perf_counter()
    model.fit(Augmented(), epochs=params.train.epochs, validation_data=(test_x, test_y),
              verbose=0)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    model.save(root / "seed_model.keras")  # the seed saved its model too
    save_s = time.perf_counter() - started
    return {"load_s": load_s, "train_s": train_s, "save_s": save_s, "images": len(split),
            "array_mb": data_f64.nbytes / 2**20}


def worker_featurize(root: Path) -> dict[str, Any]:
    """Our featurize stage, as the pipeline runs it."""
    from covid_xray.config import Paths
    from covid_xray.features import featurize
    from covid_xray.params import load_params

    paths = Paths(root)
    started = time.perf_counter()
    info = featurize(paths, load_params(paths.params), progress=False)
    return {"featurize_s": time.perf_counter() - started, "rows": info["rows"],
            "images_per_s": info["images_per_s"], "jit_compile": info["jit_compile"]}


def worker_train(root: Path) -> dict[str, Any]:
    """Our train stage for one model (head on cached features, dvclive, full model saved)."""
    from covid_xray.config import Paths
    from covid_xray.params import load_params
    from covid_xray.training import train_model

    paths = Paths(root)
    started = time.perf_counter()
    result = train_model(MODEL, paths, load_params(paths.params), verbose=0)
    return {"train_s": time.perf_counter() - started, "rows": result.n_train_rows,
            "fit_s": result.seconds["fit"], "save_s": result.seconds["assemble_save"],
            "ood_s": result.seconds["ood"]}


WORKERS = {"seed": worker_seed, "featurize": worker_featurize, "train": worker_train}


# ---------------------------------------------------------------------------------------------
# Driver


def run_child(kind: str, root: Path) -> dict[str, Any]:
    """Run one worker in a fresh interpreter; its peak RSS via ``os.wait4``."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--worker", kind, str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=root)
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{err.decode()[-3000:]}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    return result


def run_repeated(kind: str, root: Path, repeats: int) -> dict[str, Any]:
    """``run_child`` ``repeats`` times: median of every timing, largest peak RSS, all fit times."""
    runs = [run_child(kind, root) for _ in range(repeats)]
    result: dict[str, Any] = {
        key: statistics.median(run[key] for run in runs) if isinstance(value, float) else value
        for key, value in runs[0].items()}
    result["peak_rss_mb"] = max(run["peak_rss_mb"] for run in runs)
    fit_key = {"seed": "train_s", "train": "fit_s"}.get(kind)
    if fit_key:
        result["fit_runs"] = [run[fit_key] for run in runs]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs=2, default=[30, 300],
                        help="two image counts, e.g. 10x apart")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--augment-copies", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per configuration; medians are reported")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, root = args.worker
        print(json.dumps(WORKERS[kind](Path(root))))
        return

    print(f"img_size {args.img_size}, epochs {args.epochs}, batch {args.batch_size}, "
          f"augment_copies {args.augment_copies}, {args.repeats} runs each (medians); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rows = []
    for n in args.sizes:
        workdir = Path(tempfile.mkdtemp(prefix="bench-training-"))
        try:
            make_data(workdir, n, args.img_size, args.epochs, args.batch_size,
                      args.augment_copies)
            seed = run_repeated("seed", workdir, args.repeats)
            feat = run_repeated("featurize", workdir, args.repeats)
            train = run_repeated("train", workdir, args.repeats)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        rows.append((n, seed, feat, train))
        seed_total = seed["load_s"] + seed["train_s"] + seed["save_s"]
        ours_total = feat["featurize_s"] + train["train_s"]
        print(f"\n{n} images ({int(n * 0.8)} train):")
        print(f"  seed: load {seed['load_s']:.1f} s (float64 array {seed['array_mb']:.1f} MiB), "
              f"fit {seed['train_s']:.1f} s, save {seed['save_s']:.1f} s; total "
              f"{seed_total:.1f} s; peak RSS {seed['peak_rss_mb']:.0f} MiB")
        print(f"  ours: featurize {feat['featurize_s']:.1f} s ({feat['rows']} rows, "
              f"{feat['images_per_s']:.1f} img/s, xla={feat['jit_compile']}; peak RSS "
              f"{feat['peak_rss_mb']:.0f} MiB); train stage {train['train_s']:.1f} s = fit "
              f"{train['fit_s']:.1f} s + OOD stats {train['ood_s']:.1f} s + assemble/save "
              f"{train['save_s']:.1f} s + threshold/logging (peak RSS "
              f"{train['peak_rss_mb']:.0f} MiB); total {ours_total:.1f} s")
        print(f"  fit runs: seed {' / '.join(f'{v:.1f}' for v in seed['fit_runs'])} s, ours "
              f"{' / '.join(f'{v:.2f}' for v in train['fit_runs'])} s")
        print(f"  speed-up: fit {seed['train_s'] / train['fit_s']:.1f}x; whole training "
              f"(seed fit+save vs our train stage) "
              f"{(seed['train_s'] + seed['save_s']) / train['train_s']:.1f}x; "
              f"from decoded images to saved model {seed_total / ours_total:.1f}x; "
              f"two models (features shared, the seed retrains from pixels) "
              f"{2 * seed_total / (feat['featurize_s'] + 2 * train['train_s']):.1f}x")
    (small, s_seed, s_feat, s_train), (large, l_seed, l_feat, l_train) = rows
    print(f"\npeak RSS growth for {large / small:.0f}x the images ({small} -> {large}):")
    print(f"  seed      {s_seed['peak_rss_mb']:.0f} -> {l_seed['peak_rss_mb']:.0f} MiB "
          f"({l_seed['peak_rss_mb'] - s_seed['peak_rss_mb']:+.0f})")
    print(f"  featurize {s_feat['peak_rss_mb']:.0f} -> {l_feat['peak_rss_mb']:.0f} MiB "
          f"({l_feat['peak_rss_mb'] - s_feat['peak_rss_mb']:+.0f})")
    print(f"  train     {s_train['peak_rss_mb']:.0f} -> {l_train['peak_rss_mb']:.0f} MiB "
          f"({l_train['peak_rss_mb'] - s_train['peak_rss_mb']:+.0f})")


if __name__ == "__main__":
    main()
