"""Featurize's input side: plan rows -> decoded, resized (and rotated) image batches.

Kept apart from :mod:`covid_xray.features` because it needs no TensorFlow: the Ray engine's
decoding tasks import it on every worker, and importing TensorFlow there would cost each worker
seconds and hundreds of MB for nothing. Both engines decode with :func:`prepare_batch`, so both
skip exactly the same images for the same reasons.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from covid_xray.imaging import ImageDecodeError, prepare_file


@dataclass
class Batch:
    """Prepared model inputs for consecutive plan rows (bad images already dropped)."""

    plan_rows: list[int]
    images: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)


def prepare_batch(plan: pd.DataFrame, start: int, stop: int, images_root: Path,
                   img_size: int, bad_images: dict[str, str]) -> Batch:
    """Decode + resize (+ rotate) one batch with the shared imaging code; skip unreadable files."""
    kept: list[int] = []
    arrays: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    for row, path, angle in plan.iloc[start:stop][["row", "path", "angle"]].itertuples(
            index=False, name=None):
        if path in bad_images:
            continue
        try:
            arrays.append(prepare_file(images_root / path, img_size, angle_deg=float(angle)))
        except (ImageDecodeError, OSError) as exc:
            bad_images[path] = str(exc)
            skipped.append((path, str(exc)))
            continue
        kept.append(int(row))
    images = (np.stack(arrays) if arrays
              else np.zeros((0, img_size, img_size, 3), dtype=np.float32))
    return Batch(kept, images, skipped)


def iter_batches(plan: pd.DataFrame, images_root: Path, img_size: int,
                 batch_size: int) -> Iterator[Batch]:
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
                                             images_root, img_size, bad_images)
            current_batch = current.result()
            pending = (pool.submit(prepare_batch, plan, starts[i + 1], starts[i + 1] + batch_size,
                                   images_root, img_size, bad_images)
                       if i + 1 < len(starts) else None)
            yield current_batch
