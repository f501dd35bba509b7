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

Backbone weights from a file (``model.weights: <path>``) are checked with h5py before anything is
built from them (:func:`check_weights_file`): Keras reports a file of another architecture in many
lines, or loads part of it and only warns.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from covid_xray.config import resolve_path
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
_MOBILENET_SIZES = (96, 128, 160, 192, 224)
"""Keras publishes MobileNetV2 ImageNet weights for these input sizes and loads the 224 px file
for any other size."""
BACKBONE_LABELS = {"vgg16": "VGG16", "mobilenetv2": "MobileNetV2", "smallcnn": "small CNN"}
KERAS3_SUFFIX = ".weights.h5"
"""``save_weights`` writes, and ``load_weights`` reads, the Keras 3 layout only under this name."""
LEGACY_SUFFIXES = (".h5", ".hdf5")
"""Keras reads the Keras 2 layout (e.g. the published ``..._notop.h5`` files) under these names."""


SMALL_CNN_FILTERS: tuple[int, ...] = (16, 32, 64, 128, 256)
"""Filters of the small CNN's five blocks (3x3 conv + ReLU, 2x2 max-pool each)."""


def feature_map_size(img_size: int) -> int:
    """Every supported backbone downsamples by 32 (the small CNN too: five 2x2 pools)."""
    return img_size // 32


def small_cnn(shape: tuple[int, int, int]) -> keras.Model:
    """A plain five-block CNN, the backbone the ``pretrain`` stage trains from scratch.

    Why not VGG16 or MobileNetV2 from scratch, measured at 128 px on 2 busy CPU cores: VGG16
    trains at 1.9 images/s (this net at 43: 22x faster), and MobileNetV2 (35 images/s) reached
    0.90 training accuracy in 6 epochs on the 720 real Kermany images but ROC AUC 0.50 on
    Kermany's test folder (its BatchNorm statistics had not settled), while this net (0.39 M
    weights, no BatchNorm) reached 0.96-0.97 in 12-15 epochs of ~5-8 s each (README, "A
    backbone that has seen chest X-rays"). Same contract as the others: input float32 RGB in
    [0, 1], output the last conv block's map at 1/32 of the input (pooled by the head, read by
    Grad-CAM).
    """
    inputs = keras.Input(shape=shape, name="image")
    x = inputs
    for block, filters in enumerate(SMALL_CNN_FILTERS, start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                                name=f"block{block}_conv")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    return keras.Model(inputs, x, name="smallcnn")


def imagenet_file(backbone: str, img_size: int) -> Path:
    """Where Keras caches the ImageNet notop weights it would load for this backbone and size."""
    size = img_size if img_size in _MOBILENET_SIZES else 224
    cached = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    return cached / _IMAGENET_FILES[backbone].format(size=size)


def _imagenet_available(backbone: str, img_size: int) -> bool:
    if imagenet_file(backbone, img_size).is_file():
        return True
    try:
        with socket.create_connection(("storage.googleapis.com", 443), timeout=5):
            return True
    except OSError:
        return False


def _check_imagenet(backbone: str, img_size: int) -> None:
    """Offline, ``imagenet`` fails at once with instructions instead of hanging on a download."""
    if not _imagenet_available(backbone, img_size):
        name = imagenet_file(backbone, img_size).name
        raise PipelineError(
            f"model.weights=imagenet: the {backbone} ImageNet weights are not cached and the "
            f"download host cannot be reached (offline?). Either pre-place {name} in "
            f"~/.keras/models/, set model.weights to the path of a local weights file, or use "
            "`-S model.weights=none` (random frozen backbone; learns, but less well).")


def _architecture(backbone: str, img_size: int, weights: str | None) -> keras.Model:
    """``keras.applications``' backbone without its top, or the small CNN (the one place that
    names them); ``weights``: ``imagenet``, a weights file, or None (random)."""
    shape = (img_size, img_size, 3)
    if backbone == "smallcnn":
        model = small_cnn(shape)
        if weights is not None:
            model.load_weights(weights)
        return model
    if backbone == "vgg16":
        return keras.applications.VGG16(include_top=False, weights=weights, input_shape=shape)
    if backbone == "mobilenetv2":
        return keras.applications.MobileNetV2(include_top=False, weights=weights,
                                              input_shape=shape)
    raise PipelineError(f"model.backbone: unknown backbone {backbone!r}")


# -- weights files: what they hold, checked before anything is built or loaded -------------------

Shapes = tuple[tuple[int, ...], ...]
"""The weight shapes of one layer, in the layer's order (kernel, bias, ...)."""


@dataclass(frozen=True)
class WeightsLayout:
    """What a weights file (or an architecture) holds: the shapes of each layer with weights.

    ``keras3``: the ``save_weights`` layout of Keras 3 (``layers/<key>/vars/<i>``, keys named
    after the layer class, so only the multiset of layers is comparable); otherwise the Keras 2
    layout (``layer_names`` / ``weight_names`` attributes, in the model's layer order, which
    Keras loads by position). ``names``: each layer's name (Keras 2) or key (Keras 3).
    """

    layers: tuple[Shapes, ...]
    names: tuple[str, ...]
    keras3: bool = False

    def describe(self) -> str:
        kernels = [shape for layer in self.layers for shape in layer if len(shape) == 4]
        return f"{len(self.layers)} layers with weights, first kernel {_dims(kernels[:1])}"

    def same_weights_as(self, expected: WeightsLayout) -> bool:
        if self.keras3:
            return Counter(self.layers) == Counter(expected.layers)
        return self.layers == expected.layers

    def first_difference(self, expected: WeightsLayout) -> str:
        """Where the two differ, when their counts do not already say it."""
        if len(self.layers) != len(expected.layers):
            return ""
        if not self.keras3:
            for i, (mine, theirs) in enumerate(zip(self.layers, expected.layers, strict=True)):
                if mine != theirs:
                    return (f"; its layer {i + 1} with weights ({self.names[i]}) has "
                            f"{_dims(mine)}, expected {_dims(theirs)}")
        extra = Counter(self.layers) - Counter(expected.layers)
        if extra:
            shapes = next(iter(extra))
            name = self.names[self.layers.index(shapes)]
            return f"; its layer {name} has {_dims(shapes)}, which the architecture has nowhere"
        return ""


def _dims(shapes: Iterable[tuple[int, ...]]) -> str:
    return " + ".join("x".join(map(str, shape)) for shape in shapes) or "none"


def _texts(values: Iterable[Any]) -> list[str]:
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _natural(key: str) -> tuple[str, int]:
    """``conv2d_10`` after ``conv2d_2``: Keras 3 numbers the layers of one class in order."""
    match = re.fullmatch(r"(.*?)(?:_(\d+))?", key)
    assert match is not None
    return match.group(1), int(match.group(2) or 0)


def _keras3_layers(group: h5py.Group, prefix: str = "") -> list[tuple[str, Shapes]]:
    layers: list[tuple[str, Shapes]] = []
    for key in sorted(group, key=_natural):
        item = group[key]
        if "layers" in item:  # a nested model
            layers += _keras3_layers(item["layers"], f"{prefix}{key}/")
        variables = item.get("vars")
        if variables is not None and len(variables):
            layers.append((f"{prefix}{key}", tuple(tuple(variables[str(i)].shape)
                                                   for i in range(len(variables)))))
    return layers


def read_weights_layout(path: Path) -> WeightsLayout:
    """The layout of a Keras weights file, read with h5py: nothing is built or loaded.

    Raises ``OSError`` (not HDF5, truncated), ``KeyError`` (a listed weight is missing) or
    ``ValueError`` (an HDF5 file that holds no Keras weights).
    """
    with h5py.File(path, "r") as handle:
        group = handle["model_weights"] if ("layer_names" not in handle.attrs
                                            and "model_weights" in handle) else handle
        if "layer_names" in group.attrs:  # Keras 2 (and keras.applications' published files)
            layers: list[tuple[str, Shapes]] = []
            for name in _texts(group.attrs["layer_names"]):
                names = _texts(group[name].attrs.get("weight_names", []))
                if names:
                    layers.append((name, tuple(tuple(group[name][n].shape) for n in names)))
            return WeightsLayout(tuple(s for _, s in layers), tuple(n for n, _ in layers))
        if "layers" in handle:
            found = _keras3_layers(handle["layers"])
            return WeightsLayout(tuple(s for _, s in found), tuple(n for n, _ in found),
                                 keras3=True)
    raise ValueError("an HDF5 file without Keras weights (no `layer_names` attribute, no "
                     "`layers` group)")


@functools.cache
def expected_layout(backbone: str) -> WeightsLayout:
    """The layers with weights of the backbone without top (their shapes do not depend on the
    input size, so it is built once, small and without weights)."""
    model = _architecture(backbone, 32, None)
    layers = [layer for layer in model.layers if layer.weights]
    return WeightsLayout(tuple(tuple(tuple(int(d) for d in w.shape) for w in layer.weights)
                               for layer in layers), tuple(layer.name for layer in layers))


def check_weights_file(path: Path | str, backbone: str) -> None:
    """Refuse, in one line naming the file and what was expected, a weights file that cannot
    load into ``backbone`` without its top: unreadable or truncated, another architecture or
    shape, or a layout whose file name Keras would read as the other layout.

    Keras itself reports such files in many lines (or loads part of the file and warns).
    """
    path = Path(path)
    label = BACKBONE_LABELS.get(backbone, backbone)
    expected = expected_layout(backbone)
    wanted = f"expected {label} notop weights: {expected.describe()}"
    try:
        layout = read_weights_layout(path)
    except (OSError, KeyError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise PipelineError(f"model.weights: {path} is not a readable Keras weights file "
                            f"({reason}); {wanted}") from None
    if not layout.same_weights_as(expected):
        raise PipelineError(f"model.weights: {path}: {wanted}; the file has "
                            f"{layout.describe()}{layout.first_difference(expected)}"
                            f"{_what_it_holds(layout, backbone)}")
    name = path.name.lower()
    if layout.keras3 and not name.endswith(KERAS3_SUFFIX):
        raise PipelineError(f"model.weights: {path} holds {label} weights in the Keras 3 layout "
                            f"(save_weights), which Keras reads only from a name ending in "
                            f"{KERAS3_SUFFIX}; rename the file")
    if not layout.keras3 and (name.endswith(KERAS3_SUFFIX) or not name.endswith(LEGACY_SUFFIXES)):
        raise PipelineError(f"model.weights: {path} holds {label} weights in the Keras 2 layout "
                            f"(like Keras's published {imagenet_file(backbone, 224).name}), which "
                            "Keras reads only from a name ending in .h5 (not .weights.h5); "
                            "rename the file")


def _what_it_holds(layout: WeightsLayout, backbone: str) -> str:
    """A hint when the file is recognisably something else (only on the error path)."""
    for other, label in BACKBONE_LABELS.items():
        if other != backbone and layout.same_weights_as(expected_layout(other)):
            return (f" (these are {label} notop weights: set model.backbone={other}, or use "
                    f"a {BACKBONE_LABELS[backbone]} file)")
    expected = expected_layout(backbone).layers
    if not layout.keras3 and layout.layers[:len(expected)] == expected:
        extra = len(layout.layers) - len(expected)
        return (f" (the {BACKBONE_LABELS[backbone]} layers followed by {extra} more: a model "
                "with its classifier top; use the notop file, e.g. "
                f"{_IMAGENET_FILES.get(backbone, '').format(size=224)})")
    return ""


def check_backbone_weights(backbone: str, img_size: int, weights: str,
                           root: Path | None = None) -> None:
    """What ``build_backbone`` would refuse, checked before any other work (featurize's first
    step): offline ImageNet, or a weights file that does not fit the backbone. ``root``
    resolves a relative path (params.yaml's folder; default: the working directory)."""
    if weights == "imagenet":
        if backbone not in _IMAGENET_FILES:
            raise PipelineError(f"model.weights=imagenet: there are no ImageNet weights for the "
                                f"{backbone} backbone; use `none`, `xray` or a weights file")
        _check_imagenet(backbone, img_size)
    elif weights != "none":
        check_weights_file(resolve_path(weights, root or Path.cwd()), backbone)


def weights_sha256(backbone: str, img_size: int, weights: str, root: Path | None = None) -> str:
    """SHA-256 of the weights file a backbone was built from: the ``weights`` file, or Keras's
    cached ImageNet file; ``""`` for ``none`` (seeded random weights, nothing to identify)."""
    if weights == "none":
        return ""
    path = (imagenet_file(backbone, img_size) if weights == "imagenet"
            else resolve_path(weights, root or Path.cwd()))
    return sha256_file(path) if path.is_file() else ""


def build_backbone(backbone: str, img_size: int, weights: str, seed: int) -> keras.Model:
    """The frozen feature extractor; ``weights`` is ``imagenet``, ``none`` or a weights file path.

    ``none`` draws random weights from ``seed`` (deterministic). A weights file is checked
    first (:func:`check_weights_file`); offline, ``imagenet`` fails at once with instructions.
    """
    check_backbone_weights(backbone, img_size, weights)
    keras.utils.set_random_seed(seed)
    try:
        base = _architecture(backbone, img_size, None if weights == "none" else weights)
    except (ValueError, OSError) as exc:
        if weights in ("imagenet", "none"):
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"model.weights: cannot load {weights} into {backbone} at "
                            f"{img_size}px: {reason}") from exc
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
