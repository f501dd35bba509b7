"""The model builder and the saved-classifier format: one place for both.

A classifier is the seed's network: a frozen backbone without top (VGG16 by default) and a head
AveragePooling2D(pool) -> Flatten -> Normalization -> Dense(nodes, relu) -> Dropout ->
Dense(2, softmax).

The one addition to the seed's head is ``Normalization`` (mean/variance fitted on the training
split's pooled features). With ImageNet weights it is harmless; with a random backbone
(``model.weights: none``, the offline default) raw features are ~1e-3 in scale and the un-normalised
head never learns (it predicted every image as COVID in our checks).

Saved format: ``models/<name>.keras`` (the complete model, backbone + head, input = float32 RGB in
[0, 1] of ``img_size``) plus ``models/<name>.json`` beside it, holding what nobody should have to
remember: class order, positive class, image size, preprocessing recipe, operating threshold,
backbone and weights, the revision it was trained at, the out-of-distribution statistics, and the
``.keras`` file's SHA-256 (``model_sha256``): a model beside another run's sidecar is refused.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from covid_xray.errors import PipelineError
from covid_xray.io import atomic_path, sha256_file, write_json
from covid_xray.model_info import (  # noqa: F401  (re-exported: the saved-model API)
    FORMAT_VERSION,
    PREPROCESSING,
    ModelInfo,
    ModelLoadError,
    check_model_binding,
    info_path,
    read_model_info,
)
from covid_xray.tf_runtime import keras, tf

_IMAGENET_FILES = {
    "vgg16": "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "mobilenetv2": "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}_no_top.h5",
}


def feature_map_size(img_size: int) -> int:
    """Both supported backbones downsample by 32."""
    return img_size // 32


def _imagenet_available(backbone: str, img_size: int) -> bool:
    cached = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    name = _IMAGENET_FILES[backbone].format(size=img_size)
    if (cached / name).is_file():
        return True
    try:
        with socket.create_connection(("storage.googleapis.com", 443), timeout=5):
            return True
    except OSError:
        return False


def build_backbone(backbone: str, img_size: int, weights: str, seed: int) -> keras.Model:
    """The frozen feature extractor; ``weights`` is ``imagenet``, ``none`` or a weights file path.

    ``none`` draws random weights from ``seed`` (deterministic). Offline, ``imagenet`` fails at once
    with instructions instead of hanging on a download.
    """
    if weights == "imagenet" and not _imagenet_available(backbone, img_size):
        name = _IMAGENET_FILES[backbone].format(size=img_size)
        raise PipelineError(
            f"model.weights=imagenet: the {backbone} ImageNet weights are not cached and the "
            f"download host cannot be reached (offline?). Either pre-place {name} in "
            f"~/.keras/models/, set model.weights to the path of a local weights file, or use "
            "`-S model.weights=none` (random frozen backbone; learns, but less well).")
    keras.utils.set_random_seed(seed)
    keras_weights: str | None = None if weights == "none" else weights
    shape = (img_size, img_size, 3)
    try:
        if backbone == "vgg16":
            base = keras.applications.VGG16(include_top=False, weights=keras_weights,
                                            input_shape=shape)
        elif backbone == "mobilenetv2":
            base = keras.applications.MobileNetV2(include_top=False, weights=keras_weights,
                                                  input_shape=shape)
        else:
            raise PipelineError(f"model.backbone: unknown backbone {backbone!r}")
    except (ValueError, OSError) as exc:
        if weights in ("imagenet", "none"):
            raise
        raise PipelineError(f"model.weights: cannot load {weights} into {backbone} at "
                            f"{img_size}px: {exc}") from exc
    base.trainable = False
    # Single tensors in and out (not one-element lists): no input-structure warning per call.
    return keras.Model(base.input, base.output, name="backbone")


def make_feature_fn(backbone: keras.Model, jit_compile: bool = True
                    ) -> Callable[[np.ndarray], np.ndarray]:
    """The backbone's forward pass as a compiled function (XLA when ``jit_compile``).

    Measured on the 2-core build machine at 224 px: Keras ``predict`` 3.4 img/s, ``tf.function``
    3.8, with XLA 4.7 (docs/dvc-keras-notes.md). Batches must have a fixed shape (pad the last
    one) so the function is traced and compiled once.
    """
    @tf.function(jit_compile=jit_compile, reduce_retracing=True)
    def forward(images: tf.Tensor) -> tf.Tensor:
        return backbone(images, training=False)

    def call(images: np.ndarray) -> np.ndarray:
        return np.asarray(forward(tf.convert_to_tensor(images)))

    return call


def tf_devices() -> list[str]:
    """The devices TensorFlow computes on in this process: its GPUs if it sees any, else CPU.

    Nothing in the project pins a device, so TensorFlow places the backbone on ``GPU:0`` when one
    is visible (``pip install -e ".[gpu]"``) and on the CPU otherwise.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return ["CPU"]
    names = []
    for i, gpu in enumerate(gpus):
        details = tf.config.experimental.get_device_details(gpu)
        names.append(f"GPU:{i} ({details.get('device_name', 'unknown')})")
    return names


def pooled_features(feature_maps: np.ndarray, pool_size: int) -> np.ndarray:
    """What the head's AveragePooling2D(padding="same") + Flatten produce, in NumPy.

    Used to fit the head's Normalization and the out-of-distribution statistics on cached
    features. Windows that overhang the map average their valid cells only (as TensorFlow does).
    """
    n, height, width, _ = feature_maps.shape

    def windows(size: int) -> list[tuple[int, int]]:
        count = -(-size // pool_size)
        before = max((count - 1) * pool_size + pool_size - size, 0) // 2
        return [(max(i * pool_size - before, 0), min(i * pool_size - before + pool_size, size))
                for i in range(count)]

    pooled = np.stack([
        np.stack([feature_maps[:, r0:r1, c0:c1, :].mean(axis=(1, 2)) for c0, c1 in windows(width)],
                 axis=1)
        for r0, r1 in windows(height)], axis=1)
    return pooled.reshape(n, -1).astype(np.float32)


def build_head(feature_shape: tuple[int, int, int], pool_size: int, dense_nodes: int,
               dropout: float, mean: np.ndarray, variance: np.ndarray) -> keras.Model:
    """The trainable head on top of cached backbone features."""
    inputs = keras.Input(shape=feature_shape, name="features")
    # padding="same": the seed's valid pooling of VGG16's 7x7 map with pool 4 kept only the
    # top-left 4x4 cells, so the lower lung zones never reached the head.
    x = keras.layers.AveragePooling2D(pool_size=(pool_size, pool_size), padding="same",
                                      name="pool")(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Normalization(mean=mean, variance=np.maximum(variance, 1e-12),
                                   name="standardise")(x)
    x = keras.layers.Dense(dense_nodes, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="softmax")(x)
    return keras.Model(inputs, outputs, name="head")


def pooled_input_model(head: keras.Model) -> keras.Model:
    """The head after its weightless pool + flatten, taking pooled rows (``pooled_features``).

    Built from the head's own layer objects, so fitting it trains the head: training then reads
    small pooled vectors instead of whole feature maps.
    """
    layers = [layer for layer in head.layers if not isinstance(layer, keras.layers.InputLayer)]
    names = [layer.name for layer in layers]
    if names[:2] != ["pool", "flatten"]:
        raise ValueError(f"expected a head starting pool -> flatten, got {names}")
    inputs = keras.Input(shape=tuple(head.get_layer("flatten").output.shape[1:]), name="pooled")
    x = inputs
    for layer in layers[2:]:
        x = layer(x)
    return keras.Model(inputs, x, name="head_on_pooled")


def assemble_classifier(backbone: keras.Model, head: keras.Model, name: str) -> keras.Model:
    """Backbone + head as one model taking float32 RGB in [0, 1]."""
    inputs = keras.Input(shape=backbone.input_shape[1:], name="image")
    features = backbone(inputs, training=False)
    outputs = head(features)
    return keras.Model(inputs, outputs, name=name)


def save_classifier(model: keras.Model, info: ModelInfo, model_path: Path | str) -> ModelInfo:
    """Write the .keras file, then its sidecar bound to it by the file's SHA-256; both atomic.

    The model goes first: a crash between the two renames leaves a new model beside an old
    sidecar, which ``Classifier.load`` refuses (hash mismatch) instead of serving it with the
    old threshold. Every classifier carries its out-of-distribution statistics: without them the
    service would give verdicts on any picture, so saving one without them is a bug. Returns the
    info as written (with ``model_sha256``).
    """
    if not info.ood:
        raise ValueError(f"{model_path}: refusing to save a classifier without "
                         "out-of-distribution statistics (ModelInfo.ood is empty)")
    model_path = Path(model_path)
    with atomic_path(model_path, suffix=".keras") as tmp:
        model.save(tmp)
        digest = sha256_file(tmp)
    info = replace(info, model_sha256=digest)
    write_json(info_path(model_path), asdict(info))
    return info


@dataclass
class Classifier:
    """A loaded classifier: the Keras model, its sidecar info and the model file's SHA-256."""

    model: keras.Model
    info: ModelInfo
    path: Path
    sha256: str

    @classmethod
    def load(cls, model_path: Path | str) -> Classifier:
        """Load a model + sidecar pair; a pair from two runs is refused, naming both files."""
        model_path = Path(model_path)
        if not model_path.is_file():
            raise ModelLoadError(f"{model_path}: model file not found; run `dvc repro` to "
                                 "train the models, or point to an existing one")
        sidecar = info_path(model_path)
        info = read_model_info(sidecar)
        digest = sha256_file(model_path)
        check_model_binding(info, model_path, sidecar, digest)
        try:
            model = keras.models.load_model(model_path, compile=False)
        except Exception as exc:
            raise ModelLoadError(f"{model_path}: cannot load the Keras model ({exc})") from exc
        expected = (None, info.img_size, info.img_size, 3)
        if tuple(model.input_shape) != expected or tuple(model.output_shape) != (None, 2):
            raise ModelLoadError(f"{model_path}: input {model.input_shape} / output "
                                 f"{model.output_shape} do not match {sidecar} "
                                 f"(expected {expected} -> (None, 2))")
        return cls(model=model, info=info, path=model_path, sha256=digest)

    def covid_scores(self, batch: np.ndarray) -> np.ndarray:
        """Probability of COVID for a float32 batch ``(n, S, S, 3)`` in [0, 1]."""
        probs = np.asarray(self.model(batch, training=False))
        return probs[:, self.info.positive_index].astype(np.float64)

    def is_positive(self, score: float) -> bool:
        return bool(score >= self.info.threshold)
