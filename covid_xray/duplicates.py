"""Content identity of images: the ONE "same picture" criterion of copy_images and the audit.

Two files are the same picture when their bytes are identical (SHA-256) or when they are a
near-duplicate: the same X-ray re-encoded, resized or recompressed. copy_images groups such
pictures into one patient group before the split, and keeps training images clear of held-out,
test and external pictures; the audit then checks the result with the very same function, so the
data stages cannot pass by a looser test than the audit applies.

Near-duplicate: the 64-bit DCT perceptual hash within ``max_distance`` bits
(``audit.phash_max_distance``) AND the two 32 x 32 grey reductions the hash came from correlating
at >= :data:`MIN_CORRELATION`.

Why a pHash match needs a second look: a 64-bit pHash keeps only the 8 x 8 lowest DCT frequencies,
and on chest X-rays those are dominated by the anatomy every film shares. Measured on the demo data
(487 images), 0.3% of pairs of DIFFERENT images lie within 4 bits (hundreds of false alarms a run);
on the real sample none do (closest pair: 8 bits). So a pHash match is only a candidate, confirmed
when the reductions correlate at >= :data:`MIN_CORRELATION` (re-encoded or resized copies: >= 0.996
even at 96 px; different demo images: <= 0.988; different real X-rays: <= 0.92).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from covid_xray.imaging import ImageDecodeError, decode_image

PHASH_SIZE = 32
"""Images are reduced to 32 x 32 grey before the DCT; the 8 x 8 lowest frequencies give 64 bits."""
MIN_CORRELATION = 0.993
"""Pearson correlation of the 32 x 32 reductions that confirms a pHash candidate (see above)."""


@dataclass(frozen=True)
class Fingerprint:
    """Content identity of a file: SHA-256 of its bytes, 64-bit pHash and the unit-norm,
    zero-mean 32 x 32 grey reduction it came from (both None: undecodable)."""

    sha256: str
    phash: int | None
    thumb: np.ndarray | None = field(default=None, compare=False, repr=False)


# ---------------------------------------------------------------------------------------------
# Perceptual hash


def reduce_image(image: np.ndarray) -> np.ndarray:
    """Grey, 32 x 32 (area interpolation), float32: the common input of pHash and correlation."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (PHASH_SIZE, PHASH_SIZE), interpolation=cv2.INTER_AREA)
    return small.astype(np.float32)


def phash_reduced(small: np.ndarray) -> int:
    coefficients = cv2.dct(small)[:8, :8]
    bits = (coefficients > np.median(coefficients)).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def phash(image: np.ndarray) -> int:
    """64-bit DCT perceptual hash (the classic pHash, as in the ``imagehash`` package).

    Grey, 32 x 32, 2-D DCT, keep the 8 x 8 lowest frequencies, one bit per coefficient: above
    their median or not. Re-encoding, recompression and small resizes move few bits.
    """
    return phash_reduced(reduce_image(image))


def unit_thumb(small: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm flattening: the dot product of two is their Pearson correlation
    (all zeros for a flat image, which then correlates with nothing)."""
    flat = small.ravel().astype(np.float32)
    flat = flat - flat.mean()
    norm = float(np.linalg.norm(flat))
    return flat / norm if norm > 1e-6 else np.zeros_like(flat)


def signature(image: np.ndarray) -> tuple[int, np.ndarray]:
    """pHash and unit thumbnail of one decoded image (one reduction for both)."""
    small = reduce_image(image)
    return phash_reduced(small), unit_thumb(small)


def fingerprint(data: bytes, image: np.ndarray | None) -> Fingerprint:
    """The fingerprint of a file's bytes and its decoded pixels (None: undecodable)."""
    sha = hashlib.sha256(data).hexdigest()
    if image is None:
        return Fingerprint(sha256=sha, phash=None)
    hash64, thumb = signature(image)
    return Fingerprint(sha256=sha, phash=hash64, thumb=thumb)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def near_pairs(hashes_a: np.ndarray, hashes_b: np.ndarray, max_distance: int,
               chunk: int = 1024) -> Iterator[tuple[int, int, int]]:
    """All ``(i, j, distance)`` with Hamming distance <= ``max_distance`` (exact, chunked).

    XOR + popcount on uint64 over the full cross product: for 5,000 x 5,000 images that is 25 M
    operations in NumPy, about a second, and never more than ``chunk`` x ``len(b)`` in memory.
    """
    a = np.asarray(hashes_a, dtype=np.uint64)
    b = np.asarray(hashes_b, dtype=np.uint64)
    if a.size == 0 or b.size == 0:
        return
    for start in range(0, a.size, chunk):
        distances = np.bitwise_count(a[start:start + chunk, None] ^ b[None, :])
        rows, cols = np.nonzero(distances <= max_distance)
        for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
            yield start + i, j, int(distances[i, j])


def near_duplicates(prints_a: Sequence[Fingerprint], prints_b: Sequence[Fingerprint],
                    max_distance: int, min_correlation: float = MIN_CORRELATION
                    ) -> Iterator[tuple[int, int, int]]:
    """``(i, j, pHash distance)`` of every pair that is the same picture by content: pHash within
    ``max_distance`` bits AND thumbnail correlation >= ``min_correlation``.

    Identical decodable files match too (distance 0, unless blank); undecodable files (no pHash)
    never do here: compare their ``sha256`` for identity.
    """
    index_a = [i for i, p in enumerate(prints_a) if p.phash is not None]
    index_b = [j for j, p in enumerate(prints_b) if p.phash is not None]
    hashes_a = np.array([prints_a[i].phash for i in index_a], dtype=np.uint64)
    hashes_b = np.array([prints_b[j].phash for j in index_b], dtype=np.uint64)
    for i, j, distance in near_pairs(hashes_a, hashes_b, max_distance):
        a, b = prints_a[index_a[i]], prints_b[index_b[j]]
        if float(a.thumb @ b.thumb) >= min_correlation:
            yield index_a[i], index_b[j], distance


def same_pictures(prints_a: Sequence[Fingerprint], prints_b: Sequence[Fingerprint],
                  max_distance: int) -> dict[int, tuple[int, int]]:
    """For each index of ``prints_a`` that is the same picture as some file of ``prints_b``: the
    index in ``b`` and the pHash distance. A file with identical bytes wins (the first, distance
    0), else the closest near-duplicate (lowest distance, then lowest index)."""
    by_sha: dict[str, int] = {}
    for j, other in enumerate(prints_b):
        by_sha.setdefault(other.sha256, j)
    matches = {i: (by_sha[own.sha256], 0) for i, own in enumerate(prints_a)
               if own.sha256 in by_sha}
    closest: dict[int, tuple[int, int]] = {}
    for i, j, distance in near_duplicates(prints_a, prints_b, max_distance):
        if i not in matches and (i not in closest or (distance, j) < closest[i]):
            closest[i] = (distance, j)
    matches.update({i: (j, distance) for i, (distance, j) in closest.items()})
    return matches


def fingerprint_files(files: Iterable[Path], progress: bool = True, desc: str = "hashing"
                      ) -> tuple[dict[Path, Fingerprint], list[tuple[Path, str]]]:
    """SHA-256 and pHash of every file (each decoded once; identical bytes hashed once).

    Undecodable files keep their SHA-256 (identical-file checks still apply) with ``phash`` None,
    and are returned with the reason so the caller can list them.
    """
    unique = sorted(set(files))
    prints: dict[Path, Fingerprint] = {}
    by_sha: dict[str, Fingerprint] = {}
    unreadable: list[tuple[Path, str]] = []
    for file in tqdm(unique, desc=desc, unit="img", disable=not progress, leave=False):
        data = file.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if sha not in by_sha:
            try:
                by_sha[sha] = fingerprint(data, decode_image(data))
            except ImageDecodeError as exc:
                by_sha[sha] = Fingerprint(sha256=sha, phash=None)
                unreadable.append((file, str(exc)))
        prints[file] = by_sha[sha]
    return prints, unreadable


def external_image_files(folder: Path) -> list[Path]:
    """Every non-hidden file under an external set's folder: what the audit compares training
    against, so what copy_images keeps training clear of (sorted)."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".")
                                             for part in p.relative_to(folder).parts))
