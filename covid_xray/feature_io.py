"""featurize's engine-independent plumbing: image batches in, feature rows out.

In: plan rows -> decoded, resized (and rotated) image batches (:func:`prepare_batch`). Out: the
one writer of ``features.npy`` (:func:`write_features`), fed in plan order by whichever engine ran
the backbone. Both engines use both, so they skip the same images for the same reasons and write
the same bytes. No TensorFlow here: the Ray engine's decoding tasks import this module on every
worker, where TensorFlow would cost seconds and hundreds of MB for nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from covid_xray.errors import PipelineError
from covid_xray.imaging import DEFAULT_PREPROCESSING, ImageDecodeError, prepare_file
from covid_xray.params import Preprocessing


@dataclass
class Batch:
    """Prepared model inputs for consecutive plan rows (bad images already dropped)."""

    plan_rows: list[int]
    images: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)


def prepare_batch(plan: pd.DataFrame, start: int, stop: int, images_root: Path,
                  img_size: int, bad_images: dict[str, str],
                  preprocessing: Preprocessing = DEFAULT_PREPROCESSING) -> Batch:
    """Decode + preprocess (+ rotate) one batch with the shared imaging code (the function the
    app and the CLI use); skip unreadable files."""
    kept: list[int] = []
    arrays: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    for row, path, angle in plan.iloc[start:stop][["row", "path", "angle"]].itertuples(
            index=False, name=None):
        if path in bad_images:
            continue
        try:
            arrays.append(prepare_file(images_root / path, img_size, angle_deg=float(angle),
                                       preprocessing=preprocessing))
        except (ImageDecodeError, OSError) as exc:
            bad_images[path] = str(exc)
            skipped.append((path, str(exc)))
            continue
        kept.append(int(row))
    images = (np.stack(arrays) if arrays
              else np.zeros((0, img_size, img_size, 3), dtype=np.float32))
    return Batch(kept, images, skipped)


def iter_batches(plan: pd.DataFrame, images_root: Path, img_size: int, batch_size: int,
                 preprocessing: Preprocessing = DEFAULT_PREPROCESSING) -> Iterator[Batch]:
    """Stream prepared batches from disk, decoding the next batch while the current one runs.

    One background thread (OpenCV releases the GIL) overlaps decoding with the backbone; only two
    batches are in memory at any time, whatever the number of images.
    """
    bad_images: dict[str, str] = {}
    starts = list(range(0, len(plan), batch_size))
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for i, start in enumerate(starts):
            current = pending or pool.submit(prepare_batch, plan, start, start + batch_size,
                                             images_root, img_size, bad_images, preprocessing)
            current_batch = current.result()
            pending = (pool.submit(prepare_batch, plan, starts[i + 1], starts[i + 1] + batch_size,
                                   images_root, img_size, bad_images, preprocessing)
                       if i + 1 < len(starts) else None)
            yield current_batch


@dataclass
class FeaturizeResult:
    """What ``compute_features`` wrote and how fast."""

    index: pd.DataFrame
    feature_shape: tuple[int, ...]
    skipped: list[dict[str, str]]
    seconds: float
    rows_per_s: float
    devices: list[str] = field(default_factory=list)
    """Where the backbone ran (``CPU``, ``GPU:0 (<name>)``...), one entry per distinct device."""
    nodes: int = 1
    """Machines the backbone ran on (engine ``ray``: distinct Ray nodes of the actors)."""


@dataclass
class FeatureBatch:
    """Backbone output for consecutive plan rows: what the feature writer consumes, whichever
    engine computed it."""

    plan_rows: list[int]
    features: np.ndarray
    skipped: list[tuple[str, str]]
    done: int
    """Plan rows this batch accounts for (kept + skipped): the progress bar's step."""


def forward_padded(forward: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                   batch_size: int) -> np.ndarray:
    """``forward`` on ``images`` padded with zeros to ``batch_size`` rows (one compiled shape, so
    both engines trace once and compute the same numbers); returns the real rows, float32."""
    n = len(images)
    padded = images
    if n < batch_size:
        padded = np.concatenate([images, np.zeros((batch_size - n, *images.shape[1:]),
                                                  dtype=images.dtype)])
    return np.ascontiguousarray(forward(padded)[:n], dtype=np.float32)


def write_features(plan: pd.DataFrame, out_file: Path, feature_shape: tuple[int, ...],
                   batches: Iterable[FeatureBatch], progress: bool = True) -> FeaturizeResult:
    """Stream batches, in plan order, into the ``.npy`` at ``out_file``: the one writer of the
    feature store, so every engine produces the same files.

    A path's decoding failure is listed once, however many of its rows (rotated copies) failed.
    """
    offset = _create_npy(out_file, (len(plan), *feature_shape))
    written_rows: list[int] = []
    skipped: dict[str, str] = {}
    started = time.perf_counter()
    bar = tqdm(total=len(plan), desc="featurize", unit="img", disable=not progress,
               mininterval=2.0)
    # Plain sequential writes after the header, not a writable memmap: written pages then sit in
    # the page cache, not in this process's resident memory, which stays flat with the row count.
    with out_file.open("r+b") as handle:
        handle.seek(offset)
        for batch in batches:
            for path, reason in batch.skipped:
                skipped.setdefault(path, reason)
            if batch.plan_rows:
                if written_rows and batch.plan_rows[0] <= written_rows[-1]:
                    raise PipelineError(f"{out_file}: feature rows arrived out of plan order "
                                        f"(row {batch.plan_rows[0]} after {written_rows[-1]})")
                handle.write(np.ascontiguousarray(batch.features, dtype=np.float32).data)
                written_rows.extend(batch.plan_rows)
            bar.update(batch.done)
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(img_per_s=f"{len(written_rows) / elapsed:.1f}")
    bar.close()
    seconds = time.perf_counter() - started
    if len(written_rows) < len(plan):
        _truncate_rows(out_file, len(written_rows))
    index = plan.iloc[written_rows].copy()
    index["row"] = np.arange(len(index), dtype=np.int64)
    return FeaturizeResult(index=index.reset_index(drop=True), feature_shape=feature_shape,
                           skipped=[{"path": p, "reason": r} for p, r in skipped.items()],
                           seconds=seconds,
                           rows_per_s=len(written_rows) / seconds if seconds > 0 else 0.0)


def _create_npy(path: Path, shape: tuple[int, ...]) -> int:
    """Create a float32 ``.npy`` of ``shape`` (header + sparse zero data); returns the data
    offset in bytes."""
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape).flush()
    return _npy_offset(path)


def _npy_offset(path: Path) -> int:
    return int(np.load(path, mmap_mode="r").offset)


def _truncate_rows(path: Path, rows: int, chunk_bytes: int = 1 << 24) -> None:
    """Rewrite a ``.npy`` keeping its first ``rows`` rows (rare: only after skipped images)."""
    source_shape = np.load(path, mmap_mode="r").shape
    shorter = path.with_name(path.name + ".short")
    target_offset = _create_npy(shorter, (rows, *source_shape[1:]))
    remaining = rows * int(np.prod(source_shape[1:])) * 4
    with path.open("rb") as source, shorter.open("r+b") as target:
        source.seek(_npy_offset(path))
        target.seek(target_offset)
        while remaining > 0:
            chunk = source.read(min(chunk_bytes, remaining))
            target.write(chunk)
            remaining -= len(chunk)
    os.replace(shorter, path)
