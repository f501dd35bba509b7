"""The ``pretrain`` stage: a backbone that has seen chest X-rays (``model.weights: xray``).

A random frozen backbone (the offline default) carries where an image came from but nothing about
disease. This stage trains ``pretrain.architecture`` (the small CNN by default: see
:func:`covid_xray.modeling.small_cnn` for why) end to end on Kermany ``chest_xray/train`` NORMAL vs
PNEUMONIA, from random or ImageNet weights (``pretrain.init``), on the images
:mod:`covid_xray.pretrain_data` allows (no held-out, Kermany-test, val or test patient). Its head
(global average pooling, dropout, one sigmoid unit) is thrown away; featurize then uses the trained
backbone, frozen, exactly as it uses a random or ImageNet one.

Recipe: Adam(``pretrain.init_lr``), binary cross-entropy with balanced class weights,
``pretrain.epochs`` epochs of ``pretrain.batch_size``, random rotation (and flips, if asked) as
Keras layers, so a new angle per image and epoch. dvclive logs the curves (``train/*`` on the
training images, ``eval/*`` on the pretrain's own val patients); after training, Kermany's test
folder is scored once (ROC AUC with a patient-bootstrap 95% interval), at ``pretrain.img_size``
and at ``model.img_size`` (where featurize will run the backbone). Seeded, deterministic ops.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from covid_xray.config import Paths
from covid_xray.errors import PipelineError
from covid_xray.evaluation import metrics_with_ci
from covid_xray.features import save_weights_reproducibly
from covid_xray.imaging import ImageDecodeError, load_image, model_view
from covid_xray.io import atomic_dir, sha256_file, write_csv, write_json
from covid_xray.modeling import build_backbone
from covid_xray.params import Params, Preprocessing, PretrainParams
from covid_xray.pretrain_data import (
    IMAGES_COLUMNS,
    IMAGES_FILE,
    INFO_FILE,
    POSITIVE_LABEL,
    WEIGHTS_FILE,
    select_images,
)
from covid_xray.splitting import GROUP
from covid_xray.tf_runtime import keras, tf

log = logging.getLogger("covid_xray.pretraining")

DROPOUT = 0.3
"""Before the pretraining head's single unit (the head is discarded afterwards)."""


def load_images(files: pd.Series, img_size: int, preprocessing: Preprocessing
                ) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """The model's view of each file (``imaging.model_view`` with ``params.preprocess``: what
    featurize will show the backbone), kept as uint8, a quarter of float32's memory. Returns the
    images of the readable files (in order) and ``(file, reason)`` of the others."""
    def one(file: str) -> np.ndarray | str:
        try:
            return model_view(load_image(file), img_size, preprocessing)
        except (ImageDecodeError, OSError) as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=2) as pool:  # OpenCV releases the GIL
        results = list(pool.map(one, files))
    skipped = [(f, r) for f, r in zip(files, results, strict=True) if isinstance(r, str)]
    images = [r for r in results if not isinstance(r, str)]
    return (np.stack(images) if images
            else np.zeros((0, img_size, img_size, 3), np.uint8)), skipped


def _labels(frame: pd.DataFrame) -> np.ndarray:
    return (frame["label"].to_numpy() == POSITIVE_LABEL).astype(np.float32)


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
            shuffle_seed: int | None = None) -> tf.data.Dataset:
    """uint8 images -> float32 in [0, 1] batches (reshuffled every epoch from ``shuffle_seed``)."""
    data = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle_seed is not None:
        data = data.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=True)
    return data.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y))


def build_pretrain_model(backbone: keras.Model, params: PretrainParams) -> keras.Model:
    """Augmentation -> trainable backbone -> global average pool -> dropout -> P(pneumonia)."""
    inputs = keras.Input(shape=backbone.input_shape[1:], name="image")
    x = inputs
    if params.rotation_deg > 0:
        x = keras.layers.RandomRotation(params.rotation_deg / 360.0, fill_mode="nearest",
                                        seed=params.seed, name="rotate")(x)
    if params.flip:
        x = keras.layers.RandomFlip("horizontal", seed=params.seed, name="flip")(x)
    for layer in backbone.layers:  # build_backbone froze them layer by layer; here they learn
        layer.trainable = True
    x = backbone(x)
    head = pretrain_head()
    return keras.Model(inputs, head(x), name="pretrain")


def pretrain_head() -> keras.Sequential:
    return keras.Sequential([keras.layers.GlobalAveragePooling2D(name="gap"),
                             keras.layers.Dropout(DROPOUT, name="dropout"),
                             keras.layers.Dense(1, activation="sigmoid", name="pneumonia")],
                            name="pretrain_head")


def score(model: keras.Model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """P(pneumonia) per image, inference mode (no augmentation)."""
    if len(images) == 0:
        return np.zeros(0, dtype=np.float64)
    out = model.predict(batches(images, np.zeros(len(images), np.float32), batch_size),
                        verbose=0)
    return np.asarray(out, dtype=np.float64).reshape(-1)


def kermany_test_metrics(test: pd.DataFrame, scores: np.ndarray, resamples: int, seed: int
                 ) -> dict[str, Any]:
    """ROC AUC on Kermany test, PNEUMONIA as the positive class, with the patient-bootstrap 95%
    interval of the evaluate stage (no threshold: the pretrain's head is thrown away)."""
    metrics = metrics_with_ci(_labels(test).astype(np.int64), scores, 0.5, resamples, seed,
                              patients=test[GROUP].to_numpy())
    return {key: metrics[key] for key in ("n", "roc_auc", "roc_auc_ci_low", "roc_auc_ci_high")}


def _class_weights(labels: np.ndarray) -> dict[int, float]:
    counts = np.bincount(labels.astype(np.int64), minlength=2)
    return {k: float(len(labels) / (2.0 * counts[k])) for k in (0, 1)}


def pretrain(paths: Paths, params: Params, verbose: int = 2) -> dict[str, Any]:
    """Train the backbone, score Kermany test, write ``models/pretrain/`` whole (atomically).

    Returns the ``info.json`` payload plus ``seconds`` (timings stay out of ``models/pretrain``:
    the same params give the same files, so a forced re-run does not re-run featurize).
    """
    from dvclive import Live
    from dvclive.keras import DVCLiveCallback

    settings = params.pretrain
    chosen = select_images(paths, settings)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    readable: dict[str, tuple[pd.DataFrame, np.ndarray]] = {}  # the decodable rows, their images
    skipped: list[tuple[str, str]] = []
    for use, part in (("train", chosen.part("train")), ("val", chosen.part("val")),
                      ("test", chosen.test)):
        images, bad = load_images(part["file"], settings.img_size, params.preprocess)
        readable[use] = (part[~part["file"].isin({f for f, _ in bad})], images)
        skipped += bad
    seconds["decode"] = time.perf_counter() - started
    if skipped:
        log.warning("%d image(s) could not be decoded and are not used, e.g. %s", len(skipped),
                    skipped[0][1])
    arrays = {use: (images, _labels(rows)) for use, (rows, images) in readable.items()}
    test, test_images = readable["test"]
    train_x, train_y = arrays["train"]
    if len(np.unique(train_y)) < 2:
        raise PipelineError(f"{paths.kermany_pool}: the pretrain needs NORMAL and PNEUMONIA "
                            "training images; only one class is readable")

    keras.utils.set_random_seed(settings.seed)
    tf.config.experimental.enable_op_determinism()
    backbone = build_backbone(settings.architecture, settings.img_size, settings.init,
                              seed=settings.seed)
    model = build_pretrain_model(backbone, settings)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=settings.init_lr),
                  loss="binary_crossentropy",
                  metrics=["accuracy", keras.metrics.AUC(name="roc_auc")])
    val_x, val_y = arrays["val"]
    validation = (batches(val_x, val_y, max(settings.batch_size, 64))
                  if len(val_x) and len(np.unique(val_y)) == 2 else None)
    with Live(str(paths.pretrain_metrics), dvcyaml=False, save_dvc_exp=False,
              report=None) as live:
        started = time.perf_counter()
        model.fit(batches(train_x, train_y, settings.batch_size, shuffle_seed=settings.seed),
                  epochs=settings.epochs, validation_data=validation, verbose=verbose,
                  class_weight=_class_weights(train_y), callbacks=[DVCLiveCallback(live=live)])
        seconds["fit"] = time.perf_counter() - started
        kermany = kermany_test_metrics(test, score(model, test_images),
                                       params.validate.bootstrap, params.seed)
        at_model_size = kermany
        if params.model.img_size != settings.img_size:
            at_model_size = kermany_test_at_size(backbone, model, test, params)
        counts = chosen.counts()
        for key, value in kermany.items():
            if value is not None:  # undefined without both classes: left out, not logged as 0
                live.log_metric(f"kermany_test/{key}", value, plot=False)
        if at_model_size["roc_auc"] is not None:
            live.log_metric("kermany_test_at_model_size/roc_auc", at_model_size["roc_auc"],
                            plot=False)
        # tracked: what experiments compare (the image counts are in models/pretrain/info.json)
        live.log_metric("seconds/fit", round(seconds["fit"], 1), plot=False)
        live.log_metric("seconds/per_epoch", round(seconds["fit"] / settings.epochs, 2),
                        plot=False)

    info = {
        "used": True,
        "architecture": settings.architecture,
        "params": asdict(settings),
        "task": "Kermany chest_xray/train NORMAL vs PNEUMONIA",
        "images": counts,
        "skipped": [{"file": f, "reason": r} for f, r in skipped],
        "kermany_test": kermany,
        "kermany_test_at_model_size": {"img_size": params.model.img_size, **at_model_size},
    }
    with atomic_dir(paths.pretrain) as folder:
        save_weights_reproducibly(backbone, folder / WEIGHTS_FILE)
        info["weights_sha256"] = sha256_file(folder / WEIGHTS_FILE)
        write_csv(folder / IMAGES_FILE, IMAGES_COLUMNS, chosen.listing())
        write_json(folder / INFO_FILE, info)
    return {**info, "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def kermany_test_at_size(backbone: keras.Model, model: keras.Model, test: pd.DataFrame,
                 params: Params) -> dict[str, Any]:
    """Kermany test metrics of the trained backbone + head run at ``model.img_size``, the size
    featurize will use (the convolutions fit any size; the scale of what they see changes)."""
    size = params.model.img_size
    resized = build_backbone(params.pretrain.architecture, size, "none", seed=params.pretrain.seed)
    resized.set_weights(backbone.get_weights())  # same layers, same order: only the size differs
    inputs = keras.Input(shape=(size, size, 3))
    x = resized(inputs)
    for layer in model.get_layer("pretrain_head").layers:  # the trained layers, any map size
        x = layer(x)
    at_size = keras.Model(inputs, x)
    images, _ = load_images(test["file"], size, params.preprocess)
    return kermany_test_metrics(test, score(at_size, images), params.validate.bootstrap,
                                params.seed)
