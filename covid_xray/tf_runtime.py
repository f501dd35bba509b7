"""Where TensorFlow and Keras are imported: ``from covid_xray.tf_runtime import keras, tf``.

One place so that every module gets the same process setting, made before TensorFlow loads:
quiet C++ logs (``TF_CPP_MIN_LOG_LEVEL=2`` unless the user set it). Keras is imported whole, as
published (its optional scikit-learn and matplotlib integrations included): Keras offers no
supported switch to skip them, and hiding installed modules from it was a workaround of its
internals (README, Performance, gives the measured cost).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

__all__ = ["keras", "tf"]
