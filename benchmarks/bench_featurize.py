"""Featurize throughput (images/s) and the fraction of this machine's FP32 peak it reaches.

Measures, for the frozen backbone with random weights (``model.weights: none``; the FLOPs are the
same with ImageNet weights):
- the machine's FP32 matmul rate (NumPy and TensorFlow, large float32 matrices): the practical peak;
- the backbone's forward pass alone, as Keras ``predict``, a ``tf.function`` and with XLA;
- the featurize stage's own loop (decode from disk + resize + rotate + forward + memmap write)
  on synthetic JPEG files.

    python benchmarks/bench_featurize.py                 # 224 px VGG16, batch 16
    python benchmarks/bench_featurize.py --img-size 64 --images 128

Prints figures; it is not a test. The build machine may be shared: the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2
import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from covid_xray.features import compute_features, make_feature_fn, plan_rows, use_xla
from covid_xray.modeling import build_backbone

NOTES_PEAK_GFLOPS = 157.0
"""FP32 peak of the 2-core AVX2/FMA build machine, from docs/dvc-keras-notes.md."""


def conv_gflops(model: keras.Model) -> float:
    """FLOPs (2 per multiply-add) of every convolution, in billions per image.

    VGG16 at 224 px: 15.35 G multiply-adds = 30.7 GFLOPs. The often quoted "15.4 GFLOPs" counts
    multiply-adds; the machine's peak (157 GFLOP/s = 2 cores x 2 FMA units x 8 floats x 2 FLOPs x
    2.45 GHz) counts an FMA as 2 FLOPs, so fractions of peak must use 30.7.
    """
    total = 0.0

    def walk(layer: keras.layers.Layer) -> None:
        nonlocal total
        if isinstance(layer, keras.Model):
            for inner in layer.layers:
                walk(inner)
            return
        if isinstance(layer, keras.layers.Conv2D) and not isinstance(
                layer, keras.layers.DepthwiseConv2D):
            _, height, width, channels_out = layer.output.shape
            kh, kw = layer.kernel_size
            channels_in = layer.input.shape[-1]
            total += 2.0 * height * width * kh * kw * channels_in * channels_out
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            _, height, width, channels = layer.output.shape
            kh, kw = layer.kernel_size
            total += 2.0 * height * width * kh * kw * channels
    walk(model)
    return total / 1e9


def best_rate(run: Callable[[], None], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls (seconds), after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def matmul_peak(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """GFLOP/s of a float32 n x n matmul in NumPy and in TensorFlow (best of ``repeats``)."""
    rng = np.random.default_rng(0)
    a, b = (rng.random((n, n), dtype=np.float32) for _ in range(2))
    flops = 2.0 * n ** 3
    numpy_s = best_rate(lambda: np.matmul(a, b), repeats)
    ta, tb = tf.constant(a), tf.constant(b)
    tf_s = best_rate(lambda: tf.linalg.matmul(ta, tb).numpy(), repeats)
    return flops / numpy_s / 1e9, flops / tf_s / 1e9


def forward_rates(backbone: keras.Model, batch: int, repeats: int) -> dict[str, float]:
    """Images/s of the forward pass alone: predict, tf.function, tf.function + XLA."""
    size = backbone.input_shape[1]
    images = np.random.default_rng(0).random((batch, size, size, 3), dtype=np.float32)
    plain, xla = make_feature_fn(backbone, False), make_feature_fn(backbone, True)
    return {
        "keras predict": batch / best_rate(lambda: backbone.predict(images, batch_size=batch,
                                                                    verbose=0), repeats),
        "tf.function": batch / best_rate(lambda: plain(images), repeats),
        "tf.function + XLA": batch / best_rate(lambda: xla(images), repeats),
    }


def stage_rate(backbone: keras.Model, n_images: int, batch: int, copies: int) -> float:
    """Images/s of ``compute_features`` on JPEG files (decode, resize, rotate, forward, write)."""
    folder = Path(tempfile.mkdtemp(prefix="bench-featurize-"))
    try:
        rng = np.random.default_rng(0)
        rows = []
        for i in range(n_images):
            image = cv2.GaussianBlur(rng.integers(0, 255, (1024, 1024), dtype=np.uint8),
                                     (0, 0), 3)
            name = f"covid_normal/covid/{i:04d}.jpeg"
            (folder / "covid_normal" / "covid").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / name), image)
            rows.append((name, "covid_normal", "covid", f"{i:064x}"))
        manifest = pd.DataFrame(rows, columns=["path", "set", "label", "sha256"])
        plan = plan_rows(manifest, copies, 15.0, seed=0)
        result = compute_features(plan, folder, backbone, folder / "features.npy", batch,
                                  jit_compile=use_xla(backbone.input_shape[1]), progress=False)
        return result.rows_per_s
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--backbone", default="vgg16", choices=("vgg16", "mobilenetv2"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=64,
                        help="JPEG files (1024x1024) for the stage-loop measurement")
    parser.add_argument("--copies", type=int, default=2, help="rotated copies per image")
    args = parser.parse_args()

    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} "
          f"(other jobs on a shared machine lower every figure)")
    numpy_gflops, tf_gflops = matmul_peak()
    peak = max(numpy_gflops, tf_gflops)
    print(f"FP32 matmul 2048^2: NumPy {numpy_gflops:.1f} GFLOP/s, TensorFlow {tf_gflops:.1f} "
          f"GFLOP/s (notes: {NOTES_PEAK_GFLOPS:.0f} GFLOP/s on the quiet build machine)")

    backbone = build_backbone(args.backbone, args.img_size, "none", seed=0)
    gflops = conv_gflops(backbone)
    print(f"{args.backbone} at {args.img_size} px: {gflops / 2:.2f} G multiply-adds = "
          f"{gflops:.2f} GFLOPs per image (convolutions; FLOPs count 2 per multiply-add, as the "
          f"peak does)")

    def describe(name: str, rate: float) -> str:
        achieved = rate * gflops
        return (f"  {name:<18} {rate:7.2f} img/s = {achieved:6.1f} GFLOP/s: "
                f"{achieved / peak:5.1%} of the measured matmul peak, "
                f"{achieved / NOTES_PEAK_GFLOPS:5.1%} of {NOTES_PEAK_GFLOPS:.0f}")

    for name, rate in forward_rates(backbone, args.batch, args.repeats).items():
        print(describe(name, rate))
    rate = stage_rate(backbone, args.images, args.batch, args.copies)
    print(describe("featurize loop", rate) + f" ({args.images} JPEGs of 1024 px + "
          f"{args.copies} rotated copies each, XLA={use_xla(args.img_size)})")

if __name__ == "__main__":
    main()
