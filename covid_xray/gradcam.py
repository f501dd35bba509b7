"""Grad-CAM (Selvaraju et al. 2017): where in the image the classifier looked.

One implementation, used by the ``validate`` stage (image plots) and the web app (overlay).
The heatmap is taken on the backbone's last feature map, the input of the ``head`` sub-model.
"""

from __future__ import annotations

import cv2
import numpy as np
import tensorflow as tf

from covid_xray.modeling import Classifier


def gradcam_heatmap(classifier: Classifier, image01: np.ndarray,
                    class_index: int | None = None,
                    feature_map: np.ndarray | None = None) -> np.ndarray:
    """Heatmap in [0, 1], shape ``(S, S)``, for one float32 ``(S, S, 3)`` model input.

    ``class_index`` defaults to the positive (COVID) class, so the map answers "what looked like
    COVID" whatever the verdict. ``feature_map`` (the backbone's output for this image, shape
    ``(1, f, f, C)``) skips a second backbone pass when the caller already has it.
    """
    backbone = classifier.model.get_layer("backbone")
    head = classifier.model.get_layer("head")
    index = classifier.info.positive_index if class_index is None else class_index
    if feature_map is None:
        batch = tf.convert_to_tensor(image01[np.newaxis].astype(np.float32))
        maps = backbone(batch, training=False)
    else:
        maps = tf.convert_to_tensor(np.asarray(feature_map, dtype=np.float32))
    with tf.GradientTape() as tape:
        tape.watch(maps)
        score = head(maps, training=False)[:, index]
    grads = tape.gradient(score, maps)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1))[0].numpy()
    size = image01.shape[0]
    cam = cv2.resize(cam.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    peak = float(cam.max())
    return cam / peak if peak > 0 else np.zeros_like(cam)


def overlay(rgb_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend a JET-coloured heatmap over an RGB uint8 image of the same size."""
    coloured = cv2.applyColorMap((heatmap * 255).astype(np.uint8), cv2.COLORMAP_JET)
    coloured = cv2.cvtColor(coloured, cv2.COLOR_BGR2RGB)
    blended = (1.0 - alpha) * rgb_uint8.astype(np.float32) + alpha * coloured.astype(np.float32)
    return np.clip(blended, 0, 255).astype(np.uint8)
