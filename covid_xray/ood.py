"""Out-of-distribution check: refuse a verdict for images unlike the training X-rays.

Peer systems answer "COVID" for any picture. Before any verdict the service runs two checks:

1. Cheap image-level checks on the decoded RGB image (no model): clearly coloured images
   (colour photographs), pages that are mostly white paper with sharp strokes (scanned text),
   and images dominated by pixel-level noise are refused.
2. A feature-distance check: the image's pooled backbone features (exactly the input of the head's
   ``Normalization`` layer, ``modeling.pooled_features``) are standardised, projected on the
   training set's principal components, and scored by the distance to their nearest training
   neighbours plus the part of the vector the components cannot explain (the PCA residual). The
   threshold is fitted at training time by cross-validation (each training image scored against
   a reference built *without* it), at a high quantile times a margin, and stored in
   ``ModelInfo.ood`` beside the model.

``fit_ood_stats`` runs at training time; ``feature_scores`` / ``check_image`` at serving time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

OOD_FORMAT = "pca-knn-residual/1"

# Image-level limits, chosen on the real sample (all its X-rays pass with a wide margin) and on
# colour photographs, text pages and noise (all refused); see tests/test_ood.py.
MAX_COLOURFULNESS = 30.0
"""Hasler-Suesstrunk colourfulness; grey X-rays score 0-4, one with red arrows 21, photos 35+."""
MAX_COLOURED_FRACTION = 0.10
"""Share of pixels with a strong hue (channel spread > 40); annotated X-rays stay below 0.01,
colour photographs are at 0.25-0.99."""
MAX_PAGE_FRACTION = 0.55
"""Share of pixels within +-10 grey levels of a bright (>= 150) histogram mode: the paper of a
page. X-rays with white borders reach 0.3; printed and scanned pages 0.8+."""
MAX_NOISE_RATIO = 0.35
"""Mean fine-scale residual (grey minus its Gaussian blur) over the mean absolute contrast: film
is smooth (X-rays 0.02-0.12), pixel noise is not (0.9) and nor are text strokes (0.5)."""
MIN_GREY_STD = 4.0
"""A (nearly) uniform image carries nothing to classify."""
MIN_SIDE = 32
"""Fewer pixels than this on a side (a thumbnail, a 1-pixel file) carry nothing to classify;
real X-rays have hundreds, the demo data at least 37 at its smallest setting."""
IMAGE_REASONS: tuple[str, ...] = ("too_small", "colour", "blank", "document", "noise")
"""``OodResult.reason`` of :func:`check_image`, in the order they are tried."""
ANALYSIS_SIZE = 256


@dataclass(frozen=True)
class OodResult:
    """Outcome of one check: ``ok`` False means no verdict, with a message for the user."""

    ok: bool
    reason: str = ""
    message: str = ""
    measures: dict[str, float] | None = None


# ---------------------------------------------------------------------------------------------
# Training time


def _standardiser(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and a floored scale, so near-constant features cannot explode distances."""
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    floor = max(float(np.median(std)) * 0.1, 1e-6)
    return mean, np.maximum(std, floor)


def _top_eigenpairs(symmetric: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenvalues (descending) and their eigenvectors (columns).

    Only the top ``k`` are computed (LAPACK ``syevr``): 2x faster than a full decomposition
    at 2,000 rows.
    """
    from scipy.linalg import eigh

    m = symmetric.shape[0]
    eigenvalues, vectors = eigh(symmetric, subset_by_index=[m - k, m - 1])
    return eigenvalues[::-1], vectors[:, ::-1]


def _fit_reference(features: np.ndarray, n_components: int) -> dict[str, np.ndarray]:
    """Standardisation + PCA basis + the training points' coordinates."""
    mean, scale = _standardiser(features)
    z = (features - mean) / scale
    centre = z.mean(axis=0)
    k = max(1, min(n_components, z.shape[0] - 1, z.shape[1]))
    centred = z - centre
    n, d = centred.shape
    if n < d:
        # Fewer rows than features (the usual case): the top right-singular vectors from the
        # small n x n Gram matrix, ~10x cheaper than an SVD of the n x d matrix; same subspace.
        eigenvalues, vectors = _top_eigenpairs(centred @ centred.T, k)
        singular = np.sqrt(np.maximum(eigenvalues, 1e-300))
        components = (vectors.T @ centred) / singular[:, np.newaxis]
    else:  # the d x d scatter matrix: the same top components
        components = _top_eigenpairs(centred.T @ centred, k)[1].T
    coords = centred @ components.T
    return {"mean": mean, "scale": scale, "centre": centre, "components": components,
            "coords": coords}


def _score(ref: dict[str, np.ndarray], features: np.ndarray, k_neighbors: int) -> np.ndarray:
    """Mean distance to the k nearest reference points in PCA space, plus the PCA residual.

    Both parts are measured in standardised units (per feature, divided by sqrt(d)) so the
    score's scale does not depend on the feature count.
    """
    z = (features - ref["mean"]) / ref["scale"] - ref["centre"]
    coords = z @ ref["components"].T
    residual = np.linalg.norm(z - coords @ ref["components"], axis=1)
    nearest = mean_nearest_distance(coords, ref["coords"], k_neighbors)
    return np.sqrt(nearest ** 2 + residual ** 2) / np.sqrt(z.shape[1])


def mean_nearest_distance(queries: np.ndarray, reference: np.ndarray, k: int,
                          chunk: int = 256) -> np.ndarray:
    """Mean Euclidean distance from each query row to its ``k`` nearest ``reference`` rows.

    Squared distances as |q|^2 + |r|^2 - 2 q.r (one matrix product per chunk of queries), so memory
    is ``chunk x len(reference)`` floats: broadcasting the differences took ``queries x reference
    x dims`` (~40 MiB at 300 images, growing with the square of the image count).
    """
    queries = np.asarray(queries, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    k = max(1, min(k, reference.shape[0]))
    reference_sq = np.einsum("ij,ij->i", reference, reference)
    nearest = np.empty(queries.shape[0])
    for start in range(0, queries.shape[0], chunk):
        block = queries[start:start + chunk]
        squared = (np.einsum("ij,ij->i", block, block)[:, np.newaxis] + reference_sq
                   - 2.0 * (block @ reference.T))
        smallest = np.partition(np.maximum(squared, 0.0), k - 1, axis=1)[:, :k]
        nearest[start:start + len(block)] = np.sqrt(np.sort(smallest, axis=1)).mean(axis=1)
    return nearest


def fit_ood_stats(features: np.ndarray, groups: np.ndarray | None = None,
                  **options: Any) -> dict[str, Any]:
    """:func:`_fit_ood_stats_unlimited` with BLAS on one thread.

    The SVDs here are small; two OpenBLAS threads fighting for a busy 2-core machine made them
    about 15x slower (9 s instead of 0.6 s per model) in the train stage.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_ood_stats_unlimited(features, groups, **options)


def _sample_whole_groups(group_ids: np.ndarray, max_rows: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Row mask of a seeded random set of whole groups holding at most ``max_rows`` rows."""
    order = rng.permutation(int(group_ids.max()) + 1)
    sizes = np.bincount(group_ids)[order]
    chosen = order[np.cumsum(sizes) <= max_rows]
    if chosen.size == 0:  # one group larger than max_rows: keep the first group anyway
        chosen = order[:1]
    return np.isin(group_ids, chosen)


def _fit_ood_stats_unlimited(features: np.ndarray, groups: np.ndarray | None = None, *,
                  n_components: int = 32, k_neighbors: int = 3, quantile: float = 0.99,
                  margin: float = 1.5, folds: int = 5, max_reference: int = 2000,
                  seed: int = 0) -> dict[str, Any]:
    """Fit the feature-distance check on the training images' pooled backbone features.

    ``features``: ``(n, d)``, ``modeling.pooled_features(feature_maps, pool_size)`` of the
    training split. ``groups``: optional id per row (e.g. the image's sha256) so rotated copies of
    one image fall in the same fold; otherwise each row is its own group. The threshold is the
    ``quantile`` of cross-validated scores (each row scored against a reference fitted without
    its group) times ``margin``: in-sample distances would be optimistic. At most
    ``max_reference`` rows are used (a seeded sample of whole groups), so time and memory stay
    bounded however large the training set. Returns a JSON-serialisable dict for ``ModelInfo.ood``.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 3:
        raise ValueError(f"fit_ood_stats needs (n >= 3, d) features, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError("fit_ood_stats: features contain NaN or infinity")
    n = n_train = features.shape[0]
    rng = np.random.default_rng(seed)
    group_ids = np.arange(n) if groups is None else np.unique(np.asarray(groups),
                                                                return_inverse=True)[1]
    if n > max_reference:
        keep = _sample_whole_groups(group_ids, max_reference, rng)
        features = features[keep]
        group_ids = np.unique(group_ids[keep], return_inverse=True)[1]
        n = features.shape[0]
    unique = np.unique(group_ids)
    n_folds = max(2, min(folds, unique.size))
    fold_of_group = rng.permutation(unique.size) % n_folds
    fold = fold_of_group[group_ids]
    cv_scores = np.empty(n)
    for f in range(n_folds):
        held = fold == f
        ref = _fit_reference(features[~held], n_components)
        cv_scores[held] = _score(ref, features[held], k_neighbors)
    threshold = float(np.quantile(cv_scores, quantile) * margin)

    ref = _fit_reference(features, n_components)
    coords = ref["coords"]

    def as_list(array: np.ndarray) -> list[Any]:
        return np.asarray(array, dtype=np.float32).round(6).tolist()

    return {
        "method": OOD_FORMAT,
        "n_train": int(n_train),
        "n_reference": int(n),
        "dim": int(features.shape[1]),
        "k_neighbors": int(k_neighbors),
        "quantile": float(quantile),
        "margin": float(margin),
        "threshold": threshold,
        "cv_score_median": float(np.median(cv_scores)),
        "cv_score_max": float(cv_scores.max()),
        "mean": as_list(ref["mean"]),
        "scale": as_list(ref["scale"]),
        "centre": as_list(ref["centre"]),
        "components": as_list(ref["components"]),
        "coords": as_list(coords),
    }


# ---------------------------------------------------------------------------------------------
# Serving time


class OodStats:
    """``ModelInfo.ood`` as arrays, parsed once at load time."""

    def __init__(self, stats: dict[str, Any]) -> None:
        if stats.get("method") != OOD_FORMAT:
            raise ValueError(f"unknown OOD statistics format {stats.get('method')!r} "
                             f"(this code reads {OOD_FORMAT!r}); retrain the model")
        self.threshold = float(stats["threshold"])
        self.k_neighbors = int(stats["k_neighbors"])
        self.dim = int(stats["dim"])
        self.ref = {key: np.asarray(stats[key], dtype=np.float64)
                    for key in ("mean", "scale", "centre", "components", "coords")}
        if self.ref["mean"].shape != (self.dim,) or self.ref["components"].shape[1] != self.dim:
            raise ValueError("OOD statistics are inconsistent (dimension mismatch)")

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Score / threshold per row: above 1 means unlike the training images."""
        features = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
        if features.shape[1] != self.dim:
            raise ValueError(f"features have {features.shape[1]} dimensions, the OOD statistics "
                             f"{self.dim}")
        return _score(self.ref, features, self.k_neighbors) / self.threshold


def feature_scores(stats: dict[str, Any], features: np.ndarray) -> np.ndarray:
    """Convenience: ``OodStats(stats).scores(features)`` (ratio to the threshold, per row)."""
    return OodStats(stats).scores(features)


def image_measures(rgb: np.ndarray) -> dict[str, float]:
    """Cheap statistics of a decoded uint8 RGB image, computed at a fixed analysis size."""
    height, width = rgb.shape[:2]
    scale = ANALYSIS_SIZE / max(height, width)
    if scale < 1:
        rgb = cv2.resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))),
                         interpolation=cv2.INTER_AREA)
    pixels = rgb.astype(np.float32)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    colourfulness = float(np.sqrt(rg.std() ** 2 + yb.std() ** 2)
                          + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2))
    spread = pixels.max(axis=2) - pixels.min(axis=2)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    smooth = cv2.GaussianBlur(grey, (0, 0), 1.5)
    fine = float(np.abs(grey - smooth).mean())
    contrast = float(np.abs(grey - grey.mean()).mean()) + 1e-6
    return {
        "colourfulness": colourfulness,
        "coloured_fraction": float((spread > 40).mean()),
        "page_fraction": _page_fraction(grey),
        "noise_ratio": fine / contrast,
        "grey_std": float(grey.std()),
    }


def _page_fraction(grey: np.ndarray) -> float:
    """Share of pixels at a bright histogram mode (a document's paper); 0 if the mode is dark."""
    histogram = np.bincount(grey.astype(np.uint8).ravel(), minlength=256)
    mode = int(histogram.argmax())
    if mode < 150:
        return 0.0
    return float(histogram[max(0, mode - 10): mode + 11].sum() / grey.size)


def check_image(rgb: np.ndarray) -> OodResult:
    """Image-level checks (no model): size, colour, printed page, noise, blank.

    The server runs them before the models; the data stages through ``imaging.decode_checked``,
    so training data holds nothing the server would refuse.
    """
    height, width = rgb.shape[:2]
    if min(height, width) < MIN_SIDE:
        return OodResult(False, "too_small", f"This image is only {width}x{height} pixels; a "
                         f"chest X-ray needs at least {MIN_SIDE} on each side.",
                         {"width": float(width), "height": float(height)})
    m = image_measures(rgb)
    if m["colourfulness"] > MAX_COLOURFULNESS or m["coloured_fraction"] > MAX_COLOURED_FRACTION:
        return OodResult(False, "colour", "This image is in colour; chest X-rays are greyscale. "
                         "Upload a chest X-ray (PA view).", m)
    if m["grey_std"] < MIN_GREY_STD:
        return OodResult(False, "blank", "This image is (almost) uniform; it is not a chest "
                         "X-ray.", m)
    if m["page_fraction"] > MAX_PAGE_FRACTION:
        return OodResult(False, "document", "This image is mostly white like a page or a "
                         "drawing; it does not look like a chest X-ray.", m)
    if m["noise_ratio"] > MAX_NOISE_RATIO:
        return OodResult(False, "noise", "This image is dominated by pixel noise; it does not "
                         "look like a chest X-ray.", m)
    return OodResult(True, measures=m)


def check_features(stats: OodStats, features: np.ndarray, model_name: str) -> OodResult:
    """Feature-distance check for one image's pooled features against one model's statistics."""
    ratio = float(stats.scores(features.reshape(1, -1))[0])
    if ratio > 1.0:
        return OodResult(False, "features", f"This image is unlike the chest X-rays "
                         f"{model_name} was trained on (distance {ratio:.2f}x the accepted "
                         "limit); no verdict is given.", {"feature_distance_ratio": ratio})
    return OodResult(True, measures={"feature_distance_ratio": ratio})
