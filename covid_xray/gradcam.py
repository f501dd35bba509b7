"""Grad-CAM (Selvaraju et al. 2017): where in the image the classifier looked.

One implementation, used by train (maps of every cached image, rendered by the validate stage's
image plots) and by the web app (overlay). The map is taken on the backbone's last feature map,
the input of the ``head`` sub-model. TensorFlow is imported only by the functions that need
gradients, so rendering a stored map (validate) stays TensorFlow-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    from covid_xray.modeling import Classifier


def gradcam_maps(head: Any, feature_maps: np.ndarray, class_index: int,
                 batch_size: int = 128) -> np.ndarray:
    """Grad-CAM of ``class_index`` for a batch of backbone outputs ``(n, f, f, C)``: ``(n, f, f)``.

    ReLU of the gradient-weighted sum of channels, on the backbone grid, not normalised. A batch
    is exact: the head treats images independently (inference mode), so the gradient of the summed
    class scores with respect to each image's map is that image's own gradient.
    """
    from covid_xray.tf_runtime import tf

    feature_maps = np.asarray(feature_maps, dtype=np.float32)
    parts = []
    for start in range(0, len(feature_maps), batch_size):
        maps = tf.convert_to_tensor(feature_maps[start:start + batch_size])
        with tf.GradientTape() as tape:
            tape.watch(maps)
            score = head(maps, training=False)[:, class_index]
        grads = tape.gradient(score, maps)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        parts.append(tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1)).numpy())
    if not parts:
        return np.zeros((0, *feature_maps.shape[1:3]), dtype=np.float32)
    return np.concatenate(parts).astype(np.float32)


def heatmap_from_cam(cam: np.ndarray, size: int) -> np.ndarray:
    """A grid-sized Grad-CAM map upsampled to ``(size, size)`` and scaled to [0, 1]."""
    heatmap = cv2.resize(np.asarray(cam, dtype=np.float32), (size, size),
                         interpolation=cv2.INTER_LINEAR)
    peak = float(heatmap.max())
    return heatmap / peak if peak > 0 else np.zeros_like(heatmap)


def gradcam_heatmap(classifier: Classifier, image01: np.ndarray,
                    class_index: int | None = None,
                    feature_map: np.ndarray | None = None) -> np.ndarray:
    """Heatmap in [0, 1], shape ``(S, S)``, for one float32 ``(S, S, 3)`` model input.

    ``class_index`` defaults to the positive (COVID) class, so the map answers "what looked like
    COVID" whatever the verdict. ``feature_map`` (the backbone's output for this image, shape
    ``(1, f, f, C)``) skips a second backbone pass when the caller already has it.
    """
    index = classifier.info.positive_index if class_index is None else class_index
    if feature_map is None:
        backbone = classifier.model.get_layer("backbone")
        feature_map = np.asarray(backbone(image01[np.newaxis].astype(np.float32),
                                          training=False))
    cam = gradcam_maps(classifier.model.get_layer("head"), feature_map, index)[0]
    return heatmap_from_cam(cam, image01.shape[0])


def overlay(rgb_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend a JET-coloured heatmap over an RGB uint8 image of the same size."""
    coloured = cv2.applyColorMap((heatmap * 255).astype(np.uint8), cv2.COLORMAP_JET)
    coloured = cv2.cvtColor(coloured, cv2.COLOR_BGR2RGB)
    blended = (1.0 - alpha) * rgb_uint8.astype(np.float32) + alpha * coloured.astype(np.float32)
    return np.clip(blended, 0, 255).astype(np.uint8)
