"""featurize on Ray Data (``featurize.engine: ray``): the same features, computed on a cluster.

Ray Data's batch-inference recipe, with the project's own pieces:

- a dataset of the plan's rows (``row, path, angle``: a few bytes each; the images stay on disk);
- ``map_batches`` tasks decode, resize and rotate each batch with
  :func:`covid_xray.feature_io.prepare_batch`, the local engine's function (TensorFlow-free:
  decoding workers stay light);
- ``map_batches`` with a callable class in an actor pool (``featurize.workers`` actors, each
  asking ``featurize.cpus_per_worker`` CPUs and ``featurize.gpus_per_worker`` GPUs): every actor
  builds the backbone once and loads the driver's exact weights (shipped through Ray's object
  store, so workers need no weights file), then runs the local engine's compiled forward pass on
  the same fixed batch shape;
- the driver streams the results in plan order (``preserve_order``) into the one feature writer,
  :func:`covid_xray.feature_io.write_features`: same files, same order, same bytes, bounded memory.

Where it runs: ``featurize.ray_address`` if set, else ``RAY_ADDRESS``, else an embedded Ray started
here and shut down afterwards. Every node reads the images at the driver's absolute path
(``data/datasets``): share that folder (NFS, a cloud file system) or pull it from the DVC remote
on each node. The ``covid_xray`` package is shipped to the workers with the job (``py_modules``),
so they run the driver's code; its dependencies must be installed on every node.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import ray
import ray.data

from covid_xray.errors import PipelineError
from covid_xray.feature_io import (
    FeatureBatch,
    FeaturizeResult,
    forward_padded,
    prepare_batch,
    write_features,
)
from covid_xray.imaging import DEFAULT_PREPROCESSING
from covid_xray.params import FeaturizeParams, Params, Preprocessing

if TYPE_CHECKING:
    from covid_xray.tf_runtime import keras

log = logging.getLogger("covid_xray.ray_featurize")

PACKAGE_DIR = Path(__file__).resolve().parent
DECODE_CPUS = 1.0
"""Logical CPUs a decoding task asks for (Ray's default for tasks). The actors keep theirs for
the whole run, so the cluster needs at least this much more, or the first decoding task would
wait forever (no error, just pending): checked before starting."""

ACTOR_START_TIMEOUT_S = 600
"""How long to wait for the actor pool (model build; on an autoscaling cluster, new nodes)."""


def cluster_address(params: FeaturizeParams, environ: dict[str, str] | None = None) -> str:
    """``featurize.ray_address``, else ``RAY_ADDRESS``, else ``""`` (start an embedded Ray)."""
    env = os.environ if environ is None else environ
    return params.ray_address.strip() or env.get("RAY_ADDRESS", "").strip()


def embedded_cpus(params: FeaturizeParams) -> int:
    """Logical CPUs of the embedded Ray: the machine's cores, and at least enough for the actors
    plus one decoding task (logical CPUs are Ray's bookkeeping; TensorFlow threads are not
    limited by them)."""
    return max(os.cpu_count() or 1,
               math.ceil(params.workers * params.cpus_per_worker + DECODE_CPUS))


@contextlib.contextmanager
def ray_session(params: FeaturizeParams) -> Iterator[str]:
    """Connect to the cluster (or start an embedded Ray); yields a description for the log.

    Shuts down what it connected or started; a connection the caller opened before (a notebook,
    a test) is used and left open.
    """
    if ray.is_initialized():
        yield "the caller's Ray connection"
        return
    address = cluster_address(params)
    runtime_env = {"py_modules": [str(PACKAGE_DIR)],
                   "env_vars": {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL",
                                                                       "2")}}
    common: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": False,
                              "logging_level": logging.WARNING, "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **common)
            where = f"the Ray cluster at {address}"
        else:
            # address="local": always a new instance, never a cluster someone else started here.
            ray.init(address="local", num_cpus=embedded_cpus(params), include_dashboard=False,
                     **common)
            where = "an embedded Ray on this machine"
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise PipelineError(
            f"featurize.engine=ray: cannot connect to Ray at {address or 'a new local instance'}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. Check "
            "featurize.ray_address / RAY_ADDRESS (`ray status` on the head node), or leave both "
            "empty for an embedded Ray") from exc
    try:
        yield where
    finally:
        ray.shutdown()


def check_resources(params: FeaturizeParams, available: dict[str, float], where: str) -> None:
    """Refuse a pool the cluster cannot hold: Ray would otherwise wait forever, silently."""
    cpus = params.workers * params.cpus_per_worker + DECODE_CPUS
    gpus = params.workers * params.gpus_per_worker
    have_cpus, have_gpus = available.get("CPU", 0.0), available.get("GPU", 0.0)
    if have_cpus < cpus:
        raise PipelineError(
            f"featurize.workers={params.workers} x featurize.cpus_per_worker="
            f"{params.cpus_per_worker:g} plus {DECODE_CPUS:g} CPU for decoding need {cpus:g} "
            f"logical CPUs; {where} has {have_cpus:g}: lower them or add nodes")
    if have_gpus < gpus:
        raise PipelineError(
            f"featurize.workers={params.workers} x featurize.gpus_per_worker="
            f"{params.gpus_per_worker:g} need {gpus:g} GPUs; {where} has {have_gpus:g}: lower "
            "them, set featurize.gpus_per_worker: 0 for CPU actors, or add GPU nodes")


def decode_batch(batch: dict[str, np.ndarray], images_root: str, img_size: int,
                 preprocess: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Ray task: decode one batch of plan rows; undecodable rows get ``ok=False`` and a reason.

    A node that cannot see the data folder at all is not a bad image: its rows carry the problem
    in ``fatal``, and the driver stops with that one line (an exception raised here would reach
    the driver wrapped in Ray's remote tracebacks, with the message's type lost).
    """
    root = Path(images_root)
    rows = np.asarray(batch["row"], dtype=np.int64)
    if not root.is_dir():
        fatal = (f"{root}: not found on Ray node "
                 f"{ray.get_runtime_context().get_node_id()[:12]} (host {os.uname().nodename}): "
                 "every node reads the images at the driver's path; share data/datasets there "
                 "(NFS, a cloud file system) or `dvc pull` it on each node")
        return {"row": rows, "path": np.asarray(batch["path"], dtype=object),
                "ok": np.zeros(len(rows), dtype=bool),
                "reason": np.full(len(rows), "", dtype=object),
                "fatal": np.full(len(rows), fatal, dtype=object),
                "image": np.zeros((len(rows), img_size, img_size, 3), dtype=np.float32)}
    plan = pd.DataFrame({"row": rows, "path": batch["path"], "angle": batch["angle"]})
    preprocessing = Preprocessing(**preprocess) if preprocess else DEFAULT_PREPROCESSING
    prepared = prepare_batch(plan, 0, len(plan), root, img_size, {}, preprocessing)
    ok = np.isin(rows, np.asarray(prepared.plan_rows, dtype=np.int64))
    images = np.zeros((len(rows), img_size, img_size, 3), dtype=np.float32)
    images[ok] = prepared.images
    reasons = dict(prepared.skipped)
    return {"row": rows, "path": plan["path"].to_numpy(dtype=object), "ok": ok,
            "reason": np.array([reasons.get(p, "") for p in plan["path"]], dtype=object),
            "fatal": np.full(len(rows), "", dtype=object), "image": images}


class BackboneActor:
    """Ray actor: holds the frozen backbone once and runs the local engine's forward pass."""

    def __init__(self, backbone: str, img_size: int, seed: int, weights: list[Any],
                 jit_compile: bool, batch_size: int) -> None:
        # TensorFlow only here: the actors need it, the decoding tasks do not.
        from covid_xray.modeling import build_backbone, make_feature_fn, tf_devices

        model = build_backbone(backbone, img_size, "none", seed=seed)
        model.set_weights(ray.get(weights[0]))  # the driver's exact weights, whatever their source
        self.forward = make_feature_fn(model, jit_compile=jit_compile)
        self.feature_shape = tuple(int(d) for d in model.output_shape[1:])
        self.batch_size = batch_size
        self.node = ray.get_runtime_context().get_node_id()
        self.device = ", ".join(tf_devices())
        granted = ray.get_gpu_ids()
        if granted and self.device == "CPU":  # e.g. the CPU-only TensorFlow on a GPU node
            self.device = (f"CPU, not the GPU {', '.join(map(str, granted))} Ray gave this actor "
                           "(TensorFlow sees no GPU: pip install -e \".[gpu]\" on that node)")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"], dtype=bool)
        features = np.zeros((len(ok), *self.feature_shape), dtype=np.float32)
        if ok.any():
            features[ok] = forward_padded(self.forward, batch["image"][ok], self.batch_size)
        n = len(ok)
        return {"row": batch["row"], "path": batch["path"], "ok": ok, "reason": batch["reason"],
                "fatal": batch["fatal"], "features": features,
                "node": np.full(n, self.node, dtype=object),
                "device": np.full(n, self.device, dtype=object)}


def compute_features_ray(plan: pd.DataFrame, images_root: Path, backbone: keras.Model,
                         out_file: Path, params: Params, jit_compile: bool = True,
                         progress: bool = True) -> FeaturizeResult:
    """:func:`covid_xray.features.compute_features` on Ray Data: same arguments, same files."""
    settings = params.featurize
    feature_shape = tuple(int(d) for d in backbone.output_shape[1:])
    img_size = int(backbone.input_shape[1])
    batch_size = settings.batch_size
    nodes: set[str] = set()
    devices: set[str] = set()
    with ray_session(settings) as where:
        check_resources(settings, ray.cluster_resources(), where)
        log.info("featurize on %s: %d actor(s) x %g CPU, %g GPU, batch %d", where,
                 settings.workers, settings.cpus_per_worker, settings.gpus_per_worker, batch_size)
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # rows come back in plan order
        context.enable_progress_bars = False  # the feature writer's tqdm bar is the one bar
        # Start once the whole pool is up (it then shares every batch), not with the first actor
        # ready; and fail, rather than wait forever, when the cluster never provides it.
        context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
        weights = ray.put(backbone.get_weights())
        items = plan[["row", "path", "angle"]].to_dict("records")
        dataset = ray.data.from_items(
            items, override_num_blocks=max(1, min(math.ceil(len(items) / batch_size), 10_000)))
        dataset = dataset.map_batches(
            decode_batch, batch_size=batch_size, num_cpus=DECODE_CPUS,
            fn_kwargs={"images_root": str(images_root.resolve()), "img_size": img_size,
                       "preprocess": params.preprocess.as_dict()})
        dataset = dataset.map_batches(
            BackboneActor, batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=settings.workers),
            num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus_per_worker or None,
            fn_constructor_kwargs={
                "backbone": params.backbone, "img_size": img_size, "seed": params.seed,
                "weights": [weights], "jit_compile": jit_compile, "batch_size": batch_size})

        def batches() -> Iterator[FeatureBatch]:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy",
                                              prefetch_batches=1):
                fatal = next((str(f) for f in batch["fatal"] if f), "")
                if fatal:
                    raise PipelineError(fatal)
                ok = np.asarray(batch["ok"], dtype=bool)
                nodes.update(batch["node"])
                devices.update(batch["device"])
                skipped = [(str(p), str(r)) for p, r, good
                           in zip(batch["path"], batch["reason"], ok, strict=True) if not good]
                yield FeatureBatch([int(r) for r in batch["row"][ok]], batch["features"][ok],
                                   skipped, len(ok))

        result = write_features(plan, out_file, feature_shape, batches(), progress=progress)
    for device in sorted(devices):
        if "Ray gave" in device:
            log.warning("an actor ran on the %s", device)
    result.devices = sorted(devices)
    result.nodes = len(nodes)
    return result
