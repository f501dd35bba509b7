"""Training one classifier's head on cached backbone features, choosing its operating threshold,
and saving the complete model (frozen backbone + head) with its sidecar and its predictions.

The recipe is the seed's (Adam(``train.init_lr``), binary cross-entropy on the 2-way softmax with
one-hot labels in class order [covid, <negative>], ``train.epochs``, ``train.batch_size``, rotation
augmentation) run on features instead of pixels: rotated copies were computed once by featurize.
Training rows = the ``train`` split's originals + their rotated copies; the ``val`` split is Keras's
``validation_data`` (dvclive's per-epoch ``eval/*`` curves) and chooses the threshold. The ``test``
split plays no part in training: its images are scored once, after fitting, with every other cached
image (``data/predictions``), and only the evaluate stage computes metrics on them.

The head's first two layers (AveragePooling2D + Flatten) have no weights, so their output is
computed once per row (``modeling.pooled_features``, 12x smaller than the feature maps at 224 px)
and the layers after them are fitted on it: the same layer objects, so the saved head holds the
trained weights. Fitting from pooled rows in memory is ~3x faster than streaming feature maps
(10 epochs ~3 s instead of ~9 s on the demo data: README, Performance), and the pooled rows were
already needed for the Normalization statistics and the out-of-distribution fit. Seeded
(``keras.utils.set_random_seed`` + deterministic ops): the same params give identical metrics.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covid_xray.config import POSITIVE_CLASS, Paths, class_names, resolve_path
from covid_xray.errors import PipelineError
from covid_xray.features import FeatureStore
from covid_xray.gradcam import gradcam_maps
from covid_xray.io import sha256_file
from covid_xray.model_info import DEMO_SOURCE
from covid_xray.modeling import (
    ModelInfo,
    assemble_classifier,
    build_backbone,
    build_head,
    pooled_features,
    pooled_input_model,
    save_classifier,
)
from covid_xray.ood import fit_ood_stats
from covid_xray.params import XRAY, Params
from covid_xray.scores import covid_labels, write_predictions
from covid_xray.splitting import read_split
from covid_xray.tf_runtime import keras, tf

log = logging.getLogger("covid_xray.training")

LOSS = "categorical_crossentropy"
"""The seed's "binary cross-entropy" of its 2-way softmax, as Keras 2 computed it (mean over both
outputs of the BCE of the probabilities = -log p(true class) = categorical cross-entropy). Keras 3
computes ``binary_crossentropy`` of a softmax output from the pre-softmax logits as if each were
an independent sigmoid (checked: 1.49 vs 2.17 on the same batch), a different loss."""

STEPS_PER_EXECUTION = 64
"""Training steps per compiled call. The head's steps are tiny, so per-step Python overhead
dominated: 0.27 s per epoch at 1, 0.10 s at 64 (444 rows, batch 8, this 2-core machine). The
same steps run in the same order, so results do not change."""


def one_hot(is_covid: np.ndarray) -> np.ndarray:
    """Seed-style one-hot targets in class order [covid, negative]."""
    return np.stack([is_covid, 1 - is_covid], axis=1).astype(np.float32)


@dataclass
class SplitRows:
    """Feature rows of one split and their labels (1 = COVID), one entry per row."""

    rows: np.ndarray
    is_covid: np.ndarray
    sha256: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


def split_rows(store: FeatureStore, split: pd.DataFrame, name: str,
               with_copies: bool = False) -> SplitRows:
    """Rows of the split ``name`` (``with_copies``: plus rotated copies, for training)."""
    part = split[split["split"] == name]
    rows, owner = store.rows(part["sha256"].tolist(), with_copies=with_copies,
                             what=f"{name}-split images")
    return SplitRows(rows=rows, is_covid=covid_labels(part["label"].to_numpy()[owner]),
                     sha256=part["sha256"].to_numpy()[owner])


def pooled_rows(store: FeatureStore, rows: np.ndarray, pool_size: int,
                chunk: int = 64) -> np.ndarray:
    """Pooled + flattened features (the head's Normalization input) of ``rows``, chunk by chunk.

    64 feature maps (6 MB at 224 px) at a time, like ``predict_cache``: 512 held 51 MB. Pooling
    is per row, so the result does not depend on the chunk.
    """
    parts = [pooled_features(store.take(rows[i:i + chunk]), pool_size)
             for i in range(0, len(rows), chunk)]
    return np.concatenate(parts).astype(np.float32)


@dataclass(frozen=True)
class ThresholdChoice:
    """The operating threshold (COVID if score >= threshold) and how it was chosen."""

    threshold: float
    rule: str
    n: int
    n_covid: int
    n_negative: int
    sensitivity: float | None
    specificity: float | None
    note: str = ""


def _rates(is_covid: np.ndarray, scores: np.ndarray, threshold: float
           ) -> tuple[float | None, float | None]:
    positive = scores >= threshold
    pos, neg = is_covid == 1, is_covid == 0
    sens = float(positive[pos].mean()) if pos.any() else None
    spec = float((~positive[neg]).mean()) if neg.any() else None
    return sens, spec


def choose_threshold(is_covid: np.ndarray, scores: np.ndarray, rule: str,
                     target_sensitivity: float = 0.95) -> ThresholdChoice:
    """Pick the threshold on held-aside (``val``) scores by ``rule``.

    Candidates are the midpoints between consecutive distinct scores (a threshold in the middle
    of a gap generalises better than one sitting on a score). ``youden`` maximises
    sensitivity + specificity - 1 (ties: the candidate nearest 0.5); ``target_sensitivity`` takes
    the highest threshold whose sensitivity reaches the target; ``argmax`` is the seed's 0.5.
    Without usable validation data the rule falls back to 0.5 and says so in ``note``.
    """
    is_covid = np.asarray(is_covid, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    n_covid, n_neg = int(is_covid.sum()), int((1 - is_covid).sum())

    def result(threshold: float, note: str = "") -> ThresholdChoice:
        sens, spec = _rates(is_covid, scores, threshold) if len(scores) else (None, None)
        return ThresholdChoice(float(threshold), rule, len(scores), n_covid, n_neg, sens, spec,
                               note)

    if rule == "argmax":
        return result(0.5)
    if n_covid == 0 or (rule == "youden" and n_neg == 0):
        return result(0.5, f"fallback to 0.5: the val split has {n_covid} COVID and {n_neg} "
                           f"negative images, too few for rule {rule}")
    distinct = np.unique(scores)
    candidates = np.concatenate([[0.0], (distinct[:-1] + distinct[1:]) / 2.0])
    positive = scores[np.newaxis, :] >= candidates[:, np.newaxis]
    sens = positive[:, is_covid == 1].mean(axis=1)
    if rule == "target_sensitivity":
        reaching = np.flatnonzero(sens >= target_sensitivity - 1e-12)
        return result(candidates[reaching.max()])
    if rule != "youden":
        raise PipelineError(f"threshold.rule: unknown rule {rule!r}")
    spec = (~positive[:, is_covid == 0]).mean(axis=1)
    youden = sens + spec - 1.0
    if youden.max() <= 0:
        return result(0.5, "fallback to 0.5: the val scores do not separate the classes "
                           "(Youden's J <= 0 at every threshold)")
    best = np.flatnonzero(np.isclose(youden, youden.max(), rtol=0, atol=1e-12))
    return result(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def git_revision(root: Path) -> str:
    """Short commit of the code that trained the model, or ``unknown`` outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def relevant_params(params: Params, store: FeatureStore | None = None) -> dict[str, Any]:
    """The params a model depends on, stored in its sidecar for provenance (with
    ``model.weights: xray``, also how the backbone was pretrained: featurize's record of it)."""
    pretrained = store.info.get("pretrain") if store is not None else None
    return {"seed": params.seed, "model": asdict(params.model),
            "preprocess": params.preprocess.as_dict(), "featurize": asdict(params.featurize),
            "train": asdict(params.train), "threshold": asdict(params.threshold),
            **({"pretrain": pretrained} if pretrained else {})}


def training_source(params: Params, root: Path) -> tuple[str, str]:
    """``(training_source, training_data)`` for the sidecar, from ``data.source``: what the model
    has seen, so the server can say why demo models refuse real X-rays."""
    kind = params.data.source_kind
    if kind == "demo":
        return DEMO_SOURCE, ("synthetic demo images (data.source=demo), generated by the "
                             "pipeline: never a real X-ray")
    if kind == "download":
        return "download", ("the public ieee8023 covid-chestxray-dataset and Kermany chest_xray "
                            "collections (data.source=download)")
    name = resolve_path(params.data.source, root).resolve().name
    return f"local:{name}", f"the X-ray collections in the local folder {name}/ (data.source)"


def features_weights_sha256(store: FeatureStore, params: Params, root: Path) -> str:
    """The SHA-256 of the weights file the features came from; refuses features computed from
    another file than the one at ``model.weights`` now.

    DVC re-runs featurize when ``model.weights`` (the path) changes, not when the file at that
    path is replaced: this is where a replaced file is noticed.
    """
    recorded = str(store.info.get("weights_sha256", ""))
    weights = params.model.weights
    if weights in ("imagenet", "none", XRAY):  # xray: models/pretrain is a featurize dep in DVC
        return recorded
    path = resolve_path(weights, root)
    current = sha256_file(path)
    if recorded and recorded != current:
        raise PipelineError(
            f"model.weights: {path} changed since featurize computed the features (SHA-256 "
            f"{recorded[:12]} then, {current[:12]} now); DVC follows the path in params.yaml, "
            "not the file: run `dvc repro -f -s featurize` and then `dvc repro`")
    return current


def load_backbone(store: FeatureStore, params: Params) -> keras.Model:
    """Rebuild the featurize backbone with the exact weights its features came from."""
    backbone = build_backbone(params.backbone, params.model.img_size, "none",
                              seed=params.seed)
    backbone.load_weights(store.backbone_weights)
    return backbone


@dataclass
class TrainResult:
    """What ``train_model`` produced, for the stage log and tests."""

    model_path: Path
    info: ModelInfo
    threshold: ThresholdChoice
    n_train_rows: int
    n_train_images: int
    n_val: int
    n_test: int
    history: dict[str, list[float]]
    seconds: dict[str, float]


def feature_batches(pooled: np.ndarray, is_covid: np.ndarray, batch_size: int,
                    shuffle_seed: int | None = None) -> tf.data.Dataset:
    """Pooled rows + one-hot targets as batches; reshuffled every epoch from ``shuffle_seed``."""
    data = tf.data.Dataset.from_tensor_slices((pooled, one_hot(is_covid)))
    if shuffle_seed is not None:
        data = data.shuffle(len(pooled), seed=shuffle_seed, reshuffle_each_iteration=True)
    return data.batch(batch_size)


@dataclass
class FittedHead:
    """A head fitted by :func:`fit_head`: the head, the same layers on pooled rows, the history
    and the pooled training rows (for the out-of-distribution fit)."""

    head: keras.Model
    on_pooled: keras.Model
    history: keras.callbacks.History
    pooled: np.ndarray


def fit_head(store: FeatureStore, train: SplitRows, val: SplitRows, params: Params,
             callbacks: Sequence[keras.callbacks.Callback] = (), verbose: int = 0) -> FittedHead:
    """The seed's recipe on cached features: a fresh head (Normalization statistics of the
    training rows), seeded, fitted for ``train.epochs`` on the pooled training rows with the
    ``val`` rows as validation data. The one fitting procedure: the train stage and
    cross-source validation (:mod:`covid_xray.cross_source`) both call it."""
    pool_size = params.model.pool_size
    pooled = pooled_rows(store, train.rows, pool_size)
    mean = pooled.astype(np.float64).mean(axis=0)
    variance = pooled.astype(np.float64).var(axis=0)

    keras.utils.set_random_seed(params.train.seed)
    tf.config.experimental.enable_op_determinism()
    head = build_head(store.feature_shape, pool_size, params.model.dense_nodes,
                      params.train.dropout, mean=mean, variance=variance)
    trainable = pooled_input_model(head)
    trainable.compile(optimizer=keras.optimizers.Adam(learning_rate=params.train.init_lr),
                      loss=LOSS, metrics=["accuracy"],
                      steps_per_execution=STEPS_PER_EXECUTION)
    train_batches = feature_batches(pooled, train.is_covid, params.train.batch_size,
                                    shuffle_seed=params.train.seed)
    val_batches = (feature_batches(pooled_rows(store, val.rows, pool_size), val.is_covid,
                                   max(params.train.batch_size, 64)) if len(val) else None)
    history = trainable.fit(train_batches, epochs=params.train.epochs,
                            validation_data=val_batches, verbose=verbose, shuffle=False,
                            callbacks=list(callbacks))
    return FittedHead(head=head, on_pooled=trainable, history=history, pooled=pooled)


def predict_cache(head: keras.Model, store: FeatureStore, positive_index: int,
                  chunk: int = 64) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Scores and Grad-CAM maps of the head for every original (un-rotated) cached image.

    Returns ``(index rows, scores, cams)`` in feature-row order; read in chunks, so memory stays
    bounded by ``chunk`` feature maps (with 256, the maps plus Grad-CAM's gradients made the train
    stage's peak memory grow by ~70 MiB from 20 to 200 images at 224 px).
    """
    originals = store.index[store.index["copy"] == 0].sort_values("row")
    rows = originals["row"].to_numpy(dtype=np.int64)
    scores = np.empty(len(rows), dtype=np.float64)
    cams = np.empty((len(rows), *store.feature_shape[:2]), dtype=np.float32)
    for start in range(0, len(rows), chunk):
        maps = store.take(rows[start:start + chunk])
        probs = np.asarray(head(maps, training=False))
        scores[start:start + len(maps)] = probs[:, positive_index]
        cams[start:start + len(maps)] = gradcam_maps(head, maps, positive_index)
    return originals, scores, cams


def train_model(model_name: str, paths: Paths, params: Params, verbose: int = 2) -> TrainResult:
    """The train stage for one model: fit the head, choose the threshold, save the classifier.

    dvclive logs loss/accuracy per epoch (``train/*`` on the training rows, ``eval/*`` on the val
    split: dvclive's name for Keras's validation data) to ``metrics/train/<model>/``; the summary
    also holds the threshold. Then the head scores every cached original image once (test split,
    held-out and external sets included) and draws its Grad-CAM maps, into
    ``data/predictions/<model>/`` (:mod:`covid_xray.scores`).
    """
    from dvclive import Live
    from dvclive.keras import DVCLiveCallback

    store = FeatureStore.open(paths.features)
    store.check_matches(params)
    weights_digest = features_weights_sha256(store, params, paths.root)
    source, source_text = training_source(params, paths.root)
    split = read_split(paths.split_file(model_name), model_name)
    train = split_rows(store, split, "train", with_copies=True)
    val = split_rows(store, split, "val")
    n_test = int((split["split"] == "test").sum())  # counted only: never read before evaluate
    names = class_names(model_name)
    positive_index = names.index(POSITIVE_CLASS)

    seconds: dict[str, float] = {}
    with Live(str(paths.metrics / "train" / model_name), dvcyaml=False, save_dvc_exp=False,
              report=None) as live:
        started = time.perf_counter()
        fitted = fit_head(store, train, val, params, callbacks=[DVCLiveCallback(live=live)],
                          verbose=verbose)
        head, history, pooled = fitted.head, fitted.history, fitted.pooled
        seconds["fit"] = time.perf_counter() - started
        started = time.perf_counter()
        originals, scores, cams = predict_cache(head, store, positive_index)
        seconds["predict_cache"] = time.perf_counter() - started
        score_of = pd.Series(scores, index=originals["sha256"].to_numpy())
        val_scores = score_of.loc[val.sha256].to_numpy(dtype=np.float64)
        choice = choose_threshold(val.is_covid, val_scores, params.threshold.rule,
                                  params.threshold.sensitivity)
        live.log_metric("threshold/value", choice.threshold, plot=False)
        for key in ("sensitivity", "specificity"):
            value = getattr(choice, key)
            if value is not None:
                live.log_metric(f"threshold/val_{key}", value, plot=False)
        live.log_metric("threshold/val_images", choice.n, plot=False)
        live.log_metric("data/train_rows", len(train), plot=False)
        live.log_metric("data/train_images", int(np.unique(train.sha256).size), plot=False)
    if choice.note:
        log.warning("%s: %s", model_name, choice.note)

    started = time.perf_counter()
    ood = fit_ood_stats(pooled, groups=train.sha256, seed=params.train.seed)
    seconds["ood"] = time.perf_counter() - started
    started = time.perf_counter()
    classifier = assemble_classifier(load_backbone(store, params), head, model_name)
    info = ModelInfo(
        model_name=model_name, class_names=names,
        positive_class=POSITIVE_CLASS, img_size=params.model.img_size,
        preprocess=store.preprocessing,  # what the features saw: the app/CLI apply the same
        backbone=params.backbone, weights=params.model.weights,
        threshold=choice.threshold, revision=git_revision(paths.root),
        params={**relevant_params(params, store), "threshold_choice": asdict(choice)},
        ood=ood, weights_sha256=weights_digest, training_source=source,
        training_data=source_text,
    )
    model_path = paths.model_file(model_name)
    info = save_classifier(classifier, info, model_path)
    write_predictions(paths.predictions_dir(model_name), originals["sha256"].tolist(),
                      originals["path"].tolist(), scores, cams)
    seconds["assemble_save"] = time.perf_counter() - started
    return TrainResult(model_path=model_path, info=info, threshold=choice,
                       n_train_rows=len(train), n_train_images=int(np.unique(train.sha256).size),
                       n_val=len(val), n_test=n_test,
                       history={k: [float(v) for v in vals]
                                for k, vals in history.history.items()},
                       seconds={k: round(v, 3) for k, v in seconds.items()})
