"""Where TensorFlow and Keras are imported: ``from covid_xray.tf_runtime import keras, tf``.

Two process-level costs of TensorFlow are paid here once, on purpose, instead of in every module:

- **Quiet C++ logs** (``TF_CPP_MIN_LOG_LEVEL=2`` unless the user set it).
- **No optional integrations at import.** ``import keras`` also imports scikit-learn (for
  ``keras.wrappers``) and matplotlib.pyplot (for ``keras.visualization``) when they are installed:
  ~1.5 s of a train stage's ~13 s on the 2-core build machine, repeated in every experiment.
  Keras treats both as optional (``try: import ... except ImportError``), so they are hidden while
  Keras imports and visible again right after: the process can still import scikit-learn and
  matplotlib itself; only Keras's scikit-learn wrappers and image-gallery plots are unavailable
  in it (nothing here uses them). If they were already imported, nothing is hidden.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

KERAS_OPTIONAL_IMPORTS = ("sklearn", "matplotlib")
"""Packages Keras imports only for optional integrations this project does not use."""


def _import_keras_without_optional_integrations() -> None:
    hidden = [name for name in KERAS_OPTIONAL_IMPORTS if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # import -> ModuleNotFoundError
    try:
        import keras  # noqa: F401
    finally:
        for name in hidden:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]


if "keras" not in sys.modules:
    _import_keras_without_optional_integrations()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

__all__ = ["KERAS_OPTIONAL_IMPORTS", "keras", "tf"]
