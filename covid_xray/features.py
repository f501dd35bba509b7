"""Backbone features, computed once: the cache that makes head-only experiments cheap.

The backbone is frozen, so its output for a given image never changes while the head is trained.
The seed pushed every image through VGG16 again in every epoch (and held all images in memory as
float64); here each unique image (by content hash: the COVID images are shared by both models) goes
through the backbone once, plus ``featurize.augment_copies`` rotated copies of each training-set
image (the seed's rotation augmentation, drawn once instead of per epoch). The images of the
``validate.external`` sets are featurized too (originals only), so that train can score every
image the later stages report on, and evaluate/validate never run the backbone.

Images go through ``imaging.prepare_file`` with ``params.preprocess`` (the function the app and
the CLI use); the settings are recorded in ``info.json``, and train copies them into each model's
sidecar so serving applies the same. Images are streamed from disk in batches into a ``.npy``
memmap, so memory does not grow with the number of images (reading and writing:
:mod:`covid_xray.feature_io`). ``featurize.engine`` picks who runs the backbone: this process
(``local``) or a Ray cluster (``ray``, :mod:`covid_xray.ray_featurize`); both write the same
bytes. Nothing here depends on head or
training params (dropout, learning rate, epochs, batch size, dense nodes, pool size): changing
those never re-runs this stage.

Layout of ``data/features/`` (docs/contracts.md): ``features.npy`` float32 ``(rows, f, f, C)``,
``index.csv`` (``row, sha256, path, copy, angle``), ``backbone.weights.h5``, ``info.json``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from covid_xray import splitting
from covid_xray.config import Paths
from covid_xray.datasets import external_sets
from covid_xray.errors import PipelineError
from covid_xray.feature_io import (
    FeatureBatch,
    FeaturizeResult,
    forward_padded,
    iter_batches,
    write_features,
)
from covid_xray.imaging import DEFAULT_PREPROCESSING
from covid_xray.io import (
    atomic_dir,
    read_json,
    require_stage_file,
    write_csv,
    write_json,
)
from covid_xray.modeling import (
    build_backbone,
    make_feature_fn,
    tf_devices,
    weights_sha256,
)
from covid_xray.params import Params, Preprocessing, parse_preprocessing
from covid_xray.pretrain_data import WEIGHTS_FILE, pretrain_info
from covid_xray.tf_runtime import keras

log = logging.getLogger("covid_xray.features")

FEATURES_FILE = "features.npy"
INDEX_FILE = "index.csv"
INFO_FILE = "info.json"
BACKBONE_WEIGHTS_FILE = "backbone.weights.h5"
INDEX_COLUMNS: tuple[str, ...] = ("row", "sha256", "path", "copy", "angle")
TRAINING_SETS: tuple[str, ...] = ("covid_normal", "covid_pneumonia")
"""Manifest sets whose images get rotated copies (the held-out sets are only ever scored)."""
MANIFEST_COLUMNS: tuple[str, ...] = ("path", "set", "label", "sha256")
XLA_MIN_IMG_SIZE = 160
"""XLA (``jit_compile``) only from this input size: it helps VGG16 at 224 px (4.7 vs 3.8 img/s on
the quiet build machine) but is ~8x SLOWER at 32 px (5 vs 45 img/s, measured here). A fixed rule
rather than a timing race, so the same params always give bit-identical features."""


def use_xla(img_size: int) -> bool:
    """Whether featurize compiles the backbone with XLA at this input size."""
    return img_size >= XLA_MIN_IMG_SIZE


def read_manifest(path: Path) -> pd.DataFrame:
    """The copy_images manifest with the columns featurize needs and well-formed digests."""
    manifest = splitting.read_manifest(path, required=MANIFEST_COLUMNS)
    bad = manifest[~manifest["sha256"].str.fullmatch(r"[0-9a-fA-F]{64}")]
    if not bad.empty:
        raise PipelineError(f"{path}: column sha256 is not a 64-digit hex digest for "
                            f"{len(bad)} row(s), e.g. path {bad['path'].iloc[0]!r}; "
                            "re-run copy_images")
    return manifest


def with_external(manifest: pd.DataFrame, externals: dict[str, pd.DataFrame],
                  images_root: Path) -> pd.DataFrame:
    """The manifest plus every external set's images (set ``external/<name>``, no rotated copies).

    External paths are stored relative to ``images_root`` (``../raw/external/...`` for the demo's
    set), so the features' index is the same on every clone.
    """
    parts = [manifest[list(MANIFEST_COLUMNS)]]
    for name, files in externals.items():
        parts.append(pd.DataFrame({
            "path": [os.path.relpath(p, images_root) for p in files["path"]],
            "set": f"external/{name}", "label": files["label"], "sha256": files["sha256"]}))
    return pd.concat(parts, ignore_index=True)


def rotation_angle(sha256: str, copy: int, max_deg: float, seed: int) -> float:
    """Angle in degrees, uniform in [-max_deg, max_deg], for one (image, copy).

    A pure function of (seed, image content, copy number) rather than one stream over all images,
    so adding or removing an image never changes the other images' augmentations.
    """
    rng = np.random.default_rng([seed, int(sha256, 16), copy])
    return float(rng.uniform(-max_deg, max_deg))


def plan_rows(manifest: pd.DataFrame, augment_copies: int, rotation_deg: float,
              seed: int) -> pd.DataFrame:
    """One row per (unique image by sha256, copy), in manifest order (the ``index.csv`` plan).

    Copy 0 is the original; copies 1..k (only for images of a training set, and only when
    ``rotation_deg`` > 0, since unrotated copies would be exact duplicates) are rotated.
    """
    copies = augment_copies if rotation_deg > 0 else 0
    in_training = set(manifest.loc[manifest["set"].isin(TRAINING_SETS), "sha256"])
    rows: list[tuple[str, str, int, float]] = []
    for sha, path in manifest.drop_duplicates("sha256")[["sha256", "path"]].itertuples(
            index=False, name=None):
        rows.append((sha, path, 0, 0.0))
        if sha in in_training:
            rows.extend((sha, path, c, round(rotation_angle(sha, c, rotation_deg, seed), 4))
                        for c in range(1, copies + 1))
    plan = pd.DataFrame(rows, columns=["sha256", "path", "copy", "angle"])
    plan.insert(0, "row", np.arange(len(plan), dtype=np.int64))
    return plan


def save_weights_reproducibly(model: keras.Model, path: Path) -> None:
    """``model.save_weights(path)``, minus the HDF5 object timestamps Keras leaves in.

    With timestamps the same weights give a different file (and a different DVC hash) on every
    run, so a forced re-run of featurize would needlessly invalidate train/evaluate/validate. The
    Keras file is rewritten with the same groups and datasets, times not tracked, and without the
    informational ``name`` of weightless layers (auto-generated, e.g. ``input_layer_3``, so it
    depends on how many models the process built before; loading goes by path, not by it).
    ``model.load_weights`` reads the result as usual (the name must end in ``.weights.h5``).
    """
    scratch = path.with_name(f".{path.stem}.keras-raw.weights.h5")
    model.save_weights(scratch)
    try:
        with h5py.File(scratch, "r") as source, h5py.File(path, "w") as target:
            _copy_h5_group(source, target)
    finally:
        scratch.unlink(missing_ok=True)


def _copy_h5_group(source: h5py.Group, target: h5py.Group) -> None:
    weightless = len(source) == 0
    for key in sorted(source.attrs):
        if not (weightless and key == "name"):
            target.attrs[key] = source.attrs[key]
    for name in sorted(source):
        item = source[name]
        if isinstance(item, h5py.Group):
            gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
            gcpl.set_obj_track_times(False)
            _copy_h5_group(item, h5py.Group(h5py.h5g.create(target.id, name.encode(), gcpl=gcpl)))
        else:
            dataset = target.create_dataset(name, data=item[()], track_times=False)
            for key in sorted(item.attrs):
                dataset.attrs[key] = item.attrs[key]


def compute_features(plan: pd.DataFrame, images_root: Path, backbone: keras.Model,
                     out_file: Path, batch_size: int, jit_compile: bool = True,
                     progress: bool = True,
                     preprocessing: Preprocessing = DEFAULT_PREPROCESSING) -> FeaturizeResult:
    """Run the backbone over every planned row, writing features incrementally to ``out_file``.

    Rows of images that cannot be decoded are dropped (listed in ``skipped``); the written file
    and the returned index hold only the good rows, renumbered consecutively.
    """
    feature_shape = tuple(int(d) for d in backbone.output_shape[1:])
    img_size = int(backbone.input_shape[1])
    forward = make_feature_fn(backbone, jit_compile=jit_compile)

    def batches() -> Iterator[FeatureBatch]:
        done = 0
        for batch in iter_batches(plan, images_root, img_size, batch_size, preprocessing):
            features = (forward_padded(forward, batch.images, batch_size) if batch.plan_rows
                        else np.zeros((0, *feature_shape), dtype=np.float32))
            step = min(batch_size, len(plan) - done)
            done += step
            yield FeatureBatch(batch.plan_rows, features, batch.skipped, step)

    result = write_features(plan, out_file, feature_shape, batches(), progress=progress)
    result.devices = tf_devices()
    return result


TIMING_KEYS: tuple[str, ...] = ("seconds", "images_per_s")
"""Kept OUT of ``info.json``: a timing inside ``data/features`` would change the output's hash on
every run, and DVC would then re-run train/evaluate/validate although the features are
bit-identical. The stage reports them in ``metrics/featurize.json`` instead. So is how they were
computed (engine, devices, nodes): downstream stages must not know which engine ran."""


def ray_engine() -> Callable[..., FeaturizeResult]:
    """:func:`covid_xray.ray_featurize.compute_features_ray`, imported only for engine ``ray``
    (Ray is an extra); without Ray, a one-line error saying how to install it."""
    try:
        from covid_xray.ray_featurize import compute_features_ray
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "ray":
            raise
        raise PipelineError("featurize.engine=ray: Ray is not installed here; "
                            "`pip install -e \".[ray]\"` (on every node of the cluster too), or "
                            "set featurize.engine: local") from None
    return compute_features_ray


def featurize(paths: Paths, params: Params, jit_compile: bool | None = None,
              progress: bool = True) -> dict[str, Any]:
    """The featurize stage: manifest -> ``data/features/`` (written whole, atomically).

    ``jit_compile`` defaults to :func:`use_xla` for the image size. Returns the ``info.json``
    payload plus the run's timing (``seconds``, ``images_per_s``: backbone passes per second).
    """
    if jit_compile is None:
        jit_compile = use_xla(params.model.img_size)
    compute_ray = ray_engine() if params.featurize.engine == "ray" else None  # before any work
    manifest = read_manifest(paths.manifest)
    externals = external_sets(params.validate.external, paths.root)  # fail before any work
    plan = plan_rows(with_external(manifest, externals, paths.datasets),
                     params.featurize.augment_copies, params.train.rotation_deg,
                     params.seed)
    if plan.empty:
        raise PipelineError(f"{paths.manifest}: no images listed; re-run copy_images")
    backbone, weights, pretrained = feature_backbone(paths, params)
    with atomic_dir(paths.features) as folder:
        save_weights_reproducibly(backbone, folder / BACKBONE_WEIGHTS_FILE)
        if compute_ray is not None:
            result = compute_ray(plan, paths.datasets, backbone, folder / FEATURES_FILE,
                                 params, jit_compile=jit_compile, progress=progress)
        else:
            result = compute_features(plan, paths.datasets, backbone, folder / FEATURES_FILE,
                                      params.featurize.batch_size, jit_compile=jit_compile,
                                      progress=progress, preprocessing=params.preprocess)
        if result.index.empty:
            raise PipelineError(f"{paths.datasets}: none of the {plan['path'].nunique()} images "
                                f"could be decoded (first: {result.skipped[0]['reason']})")
        write_csv(folder / INDEX_FILE, INDEX_COLUMNS,
                  list(result.index[list(INDEX_COLUMNS)].itertuples(index=False, name=None)))
        info = {
            "backbone": params.backbone,
            "weights": params.model.weights,
            # which file: a path says nothing when the file at it is replaced (train checks it)
            "weights_sha256": weights_sha256(params.backbone, params.model.img_size, weights,
                                             paths.root),
            **({"pretrain": pretrained} if pretrained else {}),
            "img_size": params.model.img_size,
            "preprocess": params.preprocess.as_dict(),
            "feature_shape": list(result.feature_shape),
            "augment_copies": params.featurize.augment_copies,
            "rotation_deg": params.train.rotation_deg,
            "jit_compile": jit_compile,
            "images": int(result.index["sha256"].nunique()),
            "rows": len(result.index),
            "rotated_rows": int((result.index["copy"] > 0).sum()),
            "manifest_rows": len(manifest),
            "external_images": int(sum(len(files) for files in externals.values())),
            "skipped": result.skipped,
        }
        write_json(folder / INFO_FILE, info)
    return {**info, "seconds": round(result.seconds, 3),
            "images_per_s": round(result.rows_per_s, 3),
            "engine": params.featurize.engine, "devices": result.devices, "nodes": result.nodes}


def backbone_weights(paths: Paths, params: Params) -> str:
    """What :func:`build_backbone` loads: ``model.weights``, or with ``xray`` the pretrain
    stage's weights file, once its info.json shows it trained the architecture params ask for."""
    if not params.uses_pretrain:
        return params.model.weights
    info = pretrain_info(paths.pretrain)
    if not info.get("used") or info.get("architecture") != params.backbone:
        raise PipelineError(f"{paths.pretrain}: holds no pretrained {params.backbone} backbone "
                            f"(info.json: used={info.get('used')}, architecture="
                            f"{info.get('architecture')}); run the pretrain stage with "
                            "model.weights=xray first (`dvc repro`)")
    return str(paths.pretrain / WEIGHTS_FILE)


def feature_backbone(paths: Paths, params: Params) -> tuple[keras.Model, str, dict[str, Any]]:
    """The frozen backbone params ask for, the weights it was built from
    (:func:`backbone_weights`), and (``model.weights: xray``) how it was pretrained: the summary
    of the pretrain's info.json that travels on to the sidecars and model cards."""
    weights = backbone_weights(paths, params)
    backbone = build_backbone(params.backbone, params.model.img_size, weights, seed=params.seed)
    if not params.uses_pretrain:
        return backbone, weights, {}
    info = pretrain_info(paths.pretrain)
    summary = {key: info[key] for key in ("architecture", "params", "task", "kermany_test",
                                          "kermany_test_at_model_size", "weights_sha256")}
    summary["images"] = {key: info["images"][key] for key in ("train", "val", "pool",
                                                              "not_drawn", "left_out")}
    return backbone, weights, summary


def featurize_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """``metrics/featurize.json``: counts and throughput (numbers only, for ``dvc metrics``)."""
    keys = ("images", "rows", "rotated_rows", "manifest_rows", "external_images", *TIMING_KEYS)
    return {**{key: report[key] for key in keys}, "skipped": len(report["skipped"]),
            "img_size": report["img_size"], "xla": int(report["jit_compile"]),
            "gpus": sum(d.startswith("GPU") for d in report["devices"]),
            "ray_nodes": report["nodes"] if report["engine"] == "ray" else 0}


@dataclass
class FeatureStore:
    """The cached features, read on demand.

    ``features`` is a read-only memmap (shape, dtype, random access in tests); :meth:`take`, used
    by training and scoring, reads rows with plain file reads instead, so that the pages it
    touches are not counted in the process's resident memory: peak RSS stays flat however many
    rows an epoch goes through.
    """

    folder: Path
    features: np.ndarray
    index: pd.DataFrame
    info: dict[str, Any]

    @classmethod
    def open(cls, folder: Path) -> FeatureStore:
        """Open ``data/features``; a clear error when it is missing or inconsistent."""
        files = [folder / name for name in (FEATURES_FILE, INDEX_FILE, INFO_FILE,
                                            BACKBONE_WEIGHTS_FILE)]
        for required in files:
            require_stage_file(required, "featurize")
        features = np.load(folder / FEATURES_FILE, mmap_mode="r")
        index = pd.read_csv(folder / INDEX_FILE, dtype={"sha256": str, "path": str})
        missing = [c for c in INDEX_COLUMNS if c not in index.columns]
        if missing or len(index) != features.shape[0]:
            raise PipelineError(f"{folder}: index.csv ({len(index)} rows, missing columns "
                                f"{missing or 'none'}) does not match features.npy "
                                f"({features.shape[0]} rows); re-run featurize")
        return cls(folder=folder, features=features, index=index,
                   info=read_json(folder / INFO_FILE))

    @property
    def backbone_weights(self) -> Path:
        return self.folder / BACKBONE_WEIGHTS_FILE

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        height, width, channels = self.features.shape[1:]
        return int(height), int(width), int(channels)

    @property
    def preprocessing(self) -> Preprocessing:
        """The preprocessing the features were computed with (the models must be served with
        it); a store written before the setting existed used the defaults."""
        return parse_preprocessing(self.info.get("preprocess"), str(self.folder / INFO_FILE))

    def check_matches(self, params: Params) -> None:
        """Refuse features computed with another backbone/size/preprocessing than params say
        (stale cache)."""
        expected = {"backbone": params.backbone, "weights": params.model.weights,
                    "img_size": params.model.img_size, "preprocess": params.preprocess.as_dict()}
        found = {key: self.info.get(key) for key in expected}
        found["preprocess"] = self.preprocessing.as_dict()
        if found != expected:
            raise PipelineError(f"{self.folder / INFO_FILE}: features were computed for {found}, "
                                f"params.yaml says {expected}; re-run featurize (`dvc repro`)")

    def rows(self, sha256s: Sequence[str], with_copies: bool = False,
             what: str = "images") -> tuple[np.ndarray, np.ndarray]:
        """Feature rows for images (by sha256): ``(rows, owner)``, owner = position in ``sha256s``.

        ``with_copies`` adds the rotated copies. Images with no cached features (skipped at
        featurize as undecodable) raise, naming the first one: the split lists them, so the cache
        and the split disagree.
        """
        table = self.index if with_copies else self.index[self.index["copy"] == 0]
        position = pd.Series(np.arange(len(sha256s)), index=pd.Index(list(sha256s)))
        position = position[~position.index.duplicated()]
        present = table[table["sha256"].isin(position.index)]
        absent = set(position.index) - set(present["sha256"])
        if absent:
            example = next(iter(sorted(absent)))
            raise PipelineError(f"{self.folder / INDEX_FILE}: {len(absent)} of the {what} have no "
                                f"cached features (e.g. sha256 {example[:12]}...); re-run "
                                "featurize after copy_images/split (`dvc repro`)")
        present = present.sort_values("row")
        return (present["row"].to_numpy(dtype=np.int64),
                position.loc[present["sha256"]].to_numpy(dtype=np.int64))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Read rows into memory (float32), in the given order; runs of consecutive rows are read
        in one call."""
        rows = np.asarray(rows, dtype=np.int64)
        shape = self.features.shape[1:]
        dtype = self.features.dtype
        row_bytes = int(np.prod(shape)) * dtype.itemsize
        out = np.empty((len(rows), *shape), dtype=np.float32)
        if len(rows) == 0:
            return out
        if rows.min() < 0 or rows.max() >= self.features.shape[0]:
            raise IndexError(f"feature rows out of range 0..{self.features.shape[0] - 1}")
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
        with (self.folder / FEATURES_FILE).open("rb") as handle:
            for run in np.split(np.arange(len(rows)), breaks):
                first, count = int(sorted_rows[run[0]]), len(run)
                handle.seek(self.features.offset + first * row_bytes)
                block = np.frombuffer(handle.read(count * row_bytes), dtype=dtype)
                out[order[run]] = block.reshape(count, *shape)
        return out
