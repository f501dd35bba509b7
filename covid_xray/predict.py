"""The one prediction service behind the web app, the JSON API and the ``predict`` CLI.

Both front ends call :meth:`PredictionService.predict_bytes`, so a file gives the same numbers
whichever way it is submitted. Models are loaded once and warmed up at start-up; a missing or
incompatible model file stops start-up with a message naming the file.

Pipeline per image: content-based decode (``imaging.decode_image``: pixel and decoded-bytes caps,
truncated/corrupt data refused, large decodes bounded by ``decode_slots``) -> image-level
out-of-distribution checks (colour, page, noise) -> ``imaging.prepare_rgb`` with the
preprocessing recorded in each model's sidecar (what its features were computed with at training,
never params.yaml's) -> backbone -> each model's head -> feature-distance check per model ->
verdict with the model's own operating threshold. When the two models share the identical frozen
backbone (same weights hash, the normal case: both heads are trained on one featurize run) and the
same preprocessing, the backbone runs once per image and only the heads run per model; the scores
equal ``Classifier.covid_scores``. Models with different preprocessing each get their own input.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from covid_xray import imaging, ood
from covid_xray.config import MODEL_NAMES, POSITIVE_CLASS
from covid_xray.modeling import (
    Classifier,
    ModelInfo,
    ModelLoadError,
    pooled_features,
)
from covid_xray.params import Preprocessing
from covid_xray.serving.settings import DEFAULT_DECODE_SLOTS
from covid_xray.tf_runtime import tf

REFUSAL = ("This image is unlike the chest X-rays the models were trained on, so no verdict is "
           "given. Upload a frontal (PA) chest X-ray.")
DEMO_REFUSAL = (
    "This image is unlike the synthetic demo images that {who} trained on (data.source=demo): "
    "{they} never seen a real X-ray, so {they_refuse} real X-rays too and no verdict is given. To "
    "classify real X-rays, train on real data: `dvc exp run -S data.source=download` (or "
    "`-S data.source=<folder holding covid-chestxray-dataset/ and chest_xray/>`); to try these "
    "models anyway, widen the check with `--ood-tolerance 2`.")
"""The feature check's refusal when demo models refuse: the generic one asks for a chest X-ray
from someone who most likely just uploaded one."""
DISCLAIMER = ("Not a diagnostic device: an educational demonstration only. Do not use it for any "
              "medical decision; the models were trained on small public data sets.")
PREVIEW_SIZE = 384
"""Longest side of the preview and Grad-CAM images returned to the web page."""
VERSION_HASH_CHARS = 12
LARGE_DECODE_BYTES = 16 * 1024 * 1024
"""Decodes up to this size (any ordinary X-ray: 2,000 x 2,000 grey is 4 MiB) never wait for a slot.
Worst case held by decoding: threads x 16 MiB + slots x (128 MiB cap + its RGB copy)."""
DECODE_WAIT_S = 30.0
"""How long a large upload waits for a decode slot before the answer is 503."""


class InputError(ValueError):
    """The upload cannot be used; ``status`` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def weights_digest(model: Any) -> str:
    """Hash of a Keras model's weights, to detect a backbone shared by several classifiers."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        array = np.ascontiguousarray(weight)
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass
class LoadedModel:
    """One classifier ready to serve: Keras parts, sidecar info, version and OOD statistics."""

    name: str
    classifier: Classifier
    sha256: str
    pool_size: int
    ood_stats: ood.OodStats

    @property
    def info(self) -> ModelInfo:
        return self.classifier.info

    def version(self) -> dict[str, str]:
        return {"revision": self.info.revision, "sha256": self.sha256[:VERSION_HASH_CHARS],
                "file": self.classifier.path.name}


def _load_model(name: str, models_dir: Path) -> LoadedModel:
    """Load and check one model; every problem is a ``ModelLoadError`` naming the file.

    ``Classifier.load`` refuses a ``.keras`` file beside a sidecar written for another file
    (``model_sha256``), naming both; the version shown to users is that same hash.
    """
    path = Path(models_dir) / f"{name}.keras"
    classifier = Classifier.load(path)
    sidecar = path.with_suffix(".json")
    try:
        head = classifier.model.get_layer("head")
        classifier.model.get_layer("backbone")
        pool_size = int(head.get_layer("pool").pool_size[0])
        feature_dim = int(np.prod(head.get_layer("flatten").output.shape[1:]))
    except (ValueError, AttributeError, TypeError) as exc:
        raise ModelLoadError(f"{path}: not a covid-xray classifier (needs 'backbone' and 'head' "
                             f"sub-models with a 'pool' layer): {exc}") from exc
    info = classifier.info
    if POSITIVE_CLASS not in info.class_names or len(info.class_names) != 2:
        raise ModelLoadError(f"{sidecar}: class_names {info.class_names} must be two classes "
                             f"including {POSITIVE_CLASS!r}")
    if not 0.0 <= float(info.threshold) <= 1.0:
        raise ModelLoadError(f"{sidecar}: threshold {info.threshold} is not a probability")
    retrain = f"re-run `dvc repro train@{name}` to write the model and its sidecar again"
    if not info.ood:
        # The train stage always writes them (save_classifier refuses to save without): an empty
        # `ood` was edited by hand or comes from elsewhere, and without it any picture gets a
        # verdict.
        raise ModelLoadError(f"{sidecar}: has no out-of-distribution statistics (`ood` is "
                             "empty), so the feature check cannot tell a chest X-ray from any "
                             f"other picture; the pipeline always writes them, so {retrain}")
    try:
        stats = ood.OodStats(info.ood)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{sidecar}: unusable out-of-distribution statistics "
                             f"({exc}); {retrain}") from exc
    if stats.dim != feature_dim:
        raise ModelLoadError(f"{sidecar}: out-of-distribution statistics have {stats.dim} "
                             f"features, the model's head {feature_dim}; the files do not "
                             "belong together")
    return LoadedModel(name=name, classifier=classifier, sha256=classifier.sha256,
                       pool_size=pool_size, ood_stats=stats)


class _Group:
    """Models that share img_size, preprocessing and identical backbone weights: one input,
    one backbone pass."""

    def __init__(self, models: list[LoadedModel]) -> None:
        self.models = models
        self.img_size = models[0].info.img_size
        self.preprocessing = models[0].info.preprocess
        backbone = models[0].classifier.model.get_layer("backbone")
        heads = [m.classifier.model.get_layer("head") for m in models]
        spec = tf.TensorSpec([None, self.img_size, self.img_size, 3], tf.float32)

        @tf.function(input_signature=[spec])
        def infer(batch: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
            feature_maps = backbone(batch, training=False)
            return feature_maps, [head(feature_maps, training=False) for head in heads]

        self.infer = infer

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """A decoded uint8 RGB image -> the models' input batch ``(1, S, S, 3)``, by the one
        preprocessing function training used, with the settings the models were trained with."""
        return imaging.prepare_rgb(rgb, self.img_size, self.preprocessing)[np.newaxis]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        feature_maps, probs = self.infer(tf.convert_to_tensor(batch, dtype=tf.float32))
        return feature_maps.numpy(), [p.numpy() for p in probs]


def _data_url(rgb: np.ndarray) -> str:
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 RGB array
        raise RuntimeError("JPEG encoding failed")
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def _preview(rgb: np.ndarray) -> np.ndarray:
    height, width = rgb.shape[:2]
    scale = PREVIEW_SIZE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


class PredictionService:
    """Both models, loaded once; ``predict_bytes`` turns an upload into the JSON answer."""

    def __init__(self, models: list[LoadedModel], max_pixels: int = imaging.MAX_PIXELS_DEFAULT,
                 share_backbone: bool = True, ood_tolerance: float = 1.0,
                 max_bytes: int = imaging.MAX_DECODED_BYTES_DEFAULT,
                 decode_slots: int = DEFAULT_DECODE_SLOTS,
                 decode_wait_s: float = DECODE_WAIT_S) -> None:
        if not models:
            raise ModelLoadError("no models to serve")
        if ood_tolerance <= 0:
            raise ValueError(f"ood_tolerance must be positive, got {ood_tolerance}")
        if decode_slots < 1:
            raise ValueError(f"decode_slots must be at least 1, got {decode_slots}")
        self.models = models
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.decode_wait_s = decode_wait_s
        self.decode_slot_count = decode_slots
        self.decode_slots = threading.BoundedSemaphore(decode_slots)
        self.ood_tolerance = ood_tolerance
        self._gradcam_lock = threading.Lock()
        groups: dict[tuple[int, Preprocessing, str], list[LoadedModel]] = {}
        for model in models:
            backbone = model.classifier.model.get_layer("backbone")
            key = (model.info.img_size, model.info.preprocess,
                   weights_digest(backbone) if share_backbone else model.name)
            groups.setdefault(key, []).append(model)
        self.groups = [_Group(members) for members in groups.values()]
        self.shared_backbone = len(self.groups) < len(models)

    @classmethod
    def load(cls, models_dir: Path | str = "models", names: Sequence[str] = MODEL_NAMES,
             max_pixels: int = imaging.MAX_PIXELS_DEFAULT, warm_up: bool = True,
             share_backbone: bool = True, ood_tolerance: float = 1.0,
             max_bytes: int = imaging.MAX_DECODED_BYTES_DEFAULT,
             decode_slots: int = DEFAULT_DECODE_SLOTS) -> PredictionService:
        """Load every model (``<models_dir>/<name>.keras`` + ``.json``) and warm them up.

        ``ood_tolerance`` scales the fitted feature-distance limit (1 = as fitted at training;
        larger accepts images further from the training set, e.g. real X-rays for models trained
        on the synthetic demo data).
        """
        models_dir = Path(models_dir)
        if not models_dir.is_dir():
            raise ModelLoadError(f"{models_dir}: models directory not found; run `dvc repro` "
                                 "or pass --models-dir")
        service = cls([_load_model(name, models_dir) for name in names], max_pixels=max_pixels,
                      share_backbone=share_backbone, ood_tolerance=ood_tolerance,
                      max_bytes=max_bytes, decode_slots=decode_slots)
        if warm_up:
            service.warm_up()
        return service

    def warm_up(self) -> None:
        """Trace the inference graphs and Grad-CAM once, so the first user waits no longer."""
        rng = np.random.default_rng(0)
        grey = cv2.GaussianBlur(rng.integers(0, 255, (64, 64), dtype=np.uint8), (0, 0), 4)
        rgb = np.repeat(grey[:, :, np.newaxis], 3, axis=2)
        self._run_models(rgb, gradcam=True)

    def health(self) -> dict[str, Any]:
        """``/healthz``: each model's version, what it was trained on and how its input is
        preprocessed, and the limits."""
        return {"status": "ok",
                "models": {m.name: {**m.version(), "img_size": m.info.img_size,
                                    "preprocessing": m.info.preprocessing,
                                    "training_source": m.info.training_source,
                                    "training_data": m.info.trained_on}
                           for m in self.models},
                "shared_backbone": self.shared_backbone, "ood_tolerance": self.ood_tolerance,
                "limits": {"max_pixels": self.max_pixels, "max_decoded_bytes": self.max_bytes,
                           "decode_slots": self.decode_slot_count}}

    # -- the prediction ------------------------------------------------------------------------

    def decode(self, data: bytes) -> tuple[np.ndarray, imaging.ImageInfo]:
        """``imaging.decode_image`` (the stages' decode); errors become ``InputError``.

        415 for content that is not an image, 400 for an empty, too large, truncated or corrupt
        one. Both caps are checked on the header first; a decode needing more than
        ``LARGE_DECODE_BYTES`` waits for one of ``decode_slots`` (503 after ``decode_wait_s``), so
        concurrent large uploads cannot exhaust memory or stall small ones.
        """
        if not data:
            raise InputError("empty upload: send an image file (JPEG or PNG)", 400)
        try:
            info = imaging.read_image_info(data)
            needed = imaging.check_limits(info, self.max_pixels, self.max_bytes)
        except imaging.ImageDecodeError as exc:
            if exc.reason == "not_image":
                raise InputError(f"not an image: {exc}; send a JPEG or PNG chest X-ray",
                                 415) from exc
            raise InputError(f"image refused: {exc}", 400) from exc
        if needed <= LARGE_DECODE_BYTES:
            return self._decode_known(data, info), info
        if not self.decode_slots.acquire(timeout=self.decode_wait_s):
            raise InputError("server busy decoding other large images; retry in a moment", 503)
        try:
            return self._decode_known(data, info), info
        finally:
            self.decode_slots.release()

    def _decode_known(self, data: bytes, info: imaging.ImageInfo) -> np.ndarray:
        try:
            return imaging.decode_image(data, max_pixels=self.max_pixels,
                                        max_bytes=self.max_bytes)
        except imaging.ImageDecodeError as exc:
            raise InputError(f"cannot use this {info.format} image: {exc}", 400) from exc

    def predict_bytes(self, data: bytes, gradcam: bool = False) -> dict[str, Any]:
        """Upload bytes -> the JSON-ready answer (see docs/serving.md for the fields)."""
        start = time.perf_counter()
        rgb, info = self.decode(data)
        decoded = time.perf_counter()
        result = self.predict_rgb(rgb, gradcam=gradcam)
        result["image"] = {"format": info.format, "width": info.width, "height": info.height,
                           "mode": info.mode, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()}
        result["timing_ms"]["decode"] = round((decoded - start) * 1000, 2)
        result["timing_ms"]["total"] = round((time.perf_counter() - start) * 1000, 2)
        return result

    def predict_rgb(self, rgb: np.ndarray, gradcam: bool = False) -> dict[str, Any]:
        """A decoded uint8 RGB image -> the answer (no ``image`` block, no decode timing)."""
        check = ood.check_image(rgb)
        result: dict[str, Any] = {
            "in_distribution": check.ok,
            "message": None if check.ok else check.message,
            "refused_by": None if check.ok else check.reason,
            "checks": {"image": _rounded(check.measures or {})},
            "shared_backbone": self.shared_backbone,
            "disclaimer": DISCLAIMER,
        }
        if gradcam:
            result["preview"] = _data_url(_preview(rgb))
        if not check.ok:
            result["models"] = {m.name: self._no_verdict(m, None, 0.0) for m in self.models}
            result["timing_ms"] = {"models": 0.0}
            return result
        answers, timing = self._run_models(rgb, gradcam=gradcam)
        refusals = [a for a in answers.values() if not a["in_distribution"]]
        if refusals:
            result["in_distribution"] = False
            result["refused_by"] = "features"
            result["message"] = self.feature_refusal()
            for name, answer in answers.items():
                answers[name] = self._no_verdict(self._model(name), answer["ood_distance"],
                                                 answer["timing_ms"])
        result["models"] = answers
        result["checks"]["features"] = {name: a["ood_distance"] for name, a in answers.items()}
        result["timing_ms"] = timing
        return result

    def feature_refusal(self) -> str:
        """The feature check's message: names the demo training data when that is the cause."""
        demo = [m.name for m in self.models if m.info.trained_on_demo]
        if not demo:
            return REFUSAL
        if len(demo) == len(self.models):
            return DEMO_REFUSAL.format(who="these models were", they="they have",
                                       they_refuse="they refuse")
        return DEMO_REFUSAL.format(who=f"model {', '.join(demo)} was", they="it has",
                                   they_refuse="it refuses")

    def _model(self, name: str) -> LoadedModel:
        return next(m for m in self.models if m.name == name)

    @staticmethod
    def _no_verdict(model: LoadedModel, distance: float | None, timing: float) -> dict[str, Any]:
        """A model's entry when the image is refused: no label, no probabilities."""
        return {"label": None, "class": None, "probabilities": None, "covid_probability": None,
                "threshold": model.info.threshold, "in_distribution": False,
                "ood_distance": distance, "version": model.version(), "timing_ms": timing}

    def _run_models(self, rgb: np.ndarray,
                    gradcam: bool) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
        answers: dict[str, dict[str, Any]] = {}
        timing: dict[str, float] = {"preprocess": 0.0, "models": 0.0, "gradcam": 0.0}
        for group in self.groups:
            t0 = time.perf_counter()
            batch = group.prepare(rgb)
            t1 = time.perf_counter()
            feature_maps, probs = group.run(batch)
            t2 = time.perf_counter()
            backbone_ms = (t2 - t1) * 1000
            timing["preprocess"] += (t1 - t0) * 1000
            timing["models"] += backbone_ms
            for model, model_probs in zip(group.models, probs, strict=True):
                t3 = time.perf_counter()
                answers[model.name] = self._verdict(model, model_probs[0], feature_maps)
                answers[model.name]["timing_ms"] = round(backbone_ms / len(group.models)
                                                         + (time.perf_counter() - t3) * 1000, 2)
                if gradcam:
                    t4 = time.perf_counter()
                    answers[model.name]["gradcam"] = self._gradcam(model, batch[0], rgb,
                                                                   feature_maps)
                    timing["gradcam"] += (time.perf_counter() - t4) * 1000
        timing = {key: round(value, 2) for key, value in timing.items()}
        return answers, timing

    def _verdict(self, model: LoadedModel, probs: np.ndarray,
                 feature_maps: np.ndarray) -> dict[str, Any]:
        info = model.info
        features = pooled_features(feature_maps, model.pool_size)
        distance = round(float(model.ood_stats.scores(features)[0]), 4)
        in_distribution = distance <= self.ood_tolerance
        covid = float(probs[info.positive_index])
        positive = model.classifier.is_positive(covid)
        negative_class = next(c for c in info.class_names if c != info.positive_class)
        return {
            "label": "POSITIVE" if positive else "NEGATIVE",
            "class": info.positive_class if positive else negative_class,
            "probabilities": {name: round(float(p), 6)
                              for name, p in zip(info.class_names, probs, strict=True)},
            "covid_probability": round(covid, 6),
            "threshold": info.threshold,
            "in_distribution": in_distribution,
            "ood_distance": distance,
            "version": model.version(),
        }

    def _gradcam(self, model: LoadedModel, image01: np.ndarray, rgb: np.ndarray,
                 feature_maps: np.ndarray | None = None) -> str:
        """Grad-CAM for the COVID class, blended over the preview image, as a data: URL.

        ``feature_maps`` (the backbone output already computed for the verdict) saves a second
        backbone pass per model. The heatmap is mapped back onto the part of the upload the model
        saw (:func:`heatmap_on_image`), so a cropped or padded input still lines up.
        """
        from covid_xray.gradcam import gradcam_heatmap, overlay

        with self._gradcam_lock:  # GradientTape on shared Keras layers: one at a time
            heatmap = gradcam_heatmap(model.classifier, image01, feature_map=feature_maps)
        shown = _preview(rgb)
        return _data_url(overlay(shown, heatmap_on_image(heatmap, rgb.shape[:2], shown.shape[:2],
                                                         model.info.preprocess)))

    # -- the same computation, without any API, for the benchmark --------------------------

    def scores_direct(self, batch01: np.ndarray) -> dict[str, np.ndarray]:
        """COVID scores of a preprocessed batch through each full Keras model (no sharing)."""
        return {m.name: m.classifier.covid_scores(batch01) for m in self.models}


def heatmap_on_image(heatmap: np.ndarray, decoded_shape: tuple[int, int],
                     shown_shape: tuple[int, int], preprocessing: Preprocessing) -> np.ndarray:
    """A model-input heatmap ``(S, S)`` -> ``shown_shape``, aligned with the decoded image.

    The part of the model input that came from the image (``imaging.view_geometry``'s target box:
    all of it but ``pad``'s bars) is resized onto the part of the image the model saw (its source
    box, scaled to ``shown_shape``); what the model never saw (``crop_border``, ``center_crop``'s
    sides) stays 0. With the default stretch this is a plain resize of the whole heatmap.
    """
    height, width = decoded_shape
    shown_h, shown_w = shown_shape
    geometry = imaging.view_geometry(height, width, heatmap.shape[0], preprocessing)
    top, bottom, left, right = geometry.source
    y0, y1 = round(top * shown_h / height), round(bottom * shown_h / height)
    x0, x1 = round(left * shown_w / width), round(right * shown_w / width)
    ty0, ty1, tx0, tx1 = geometry.target
    placed = np.zeros((shown_h, shown_w), dtype=np.float32)
    if y1 > y0 and x1 > x0:
        placed[y0:y1, x0:x1] = cv2.resize(np.ascontiguousarray(heatmap[ty0:ty1, tx0:tx1]),
                                          (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    return placed


def _rounded(measures: dict[str, float]) -> dict[str, float]:
    return {key: round(float(value), 4) for key, value in measures.items()}
