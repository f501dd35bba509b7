"""The sidecar ``models/<name>.json``: what nobody should have to remember about a model.

Kept apart from the Keras code (:mod:`covid_xray.modeling`) so that evaluate, validate and the
report read thresholds and class order without importing TensorFlow (seconds per process).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covid_xray.errors import ParamsError, PipelineError
from covid_xray.params import Preprocessing, parse_preprocessing

PREPROCESSING = Preprocessing().describe()
"""The seed's recipe in words (what every sidecar said before ``preprocess`` was recorded)."""
FORMAT_VERSION = 1
DEMO_SOURCE = "demo"
"""``training_source`` of models trained on the synthetic demo data (``data.source: demo``)."""
UNKNOWN_SOURCE = "unknown"
"""``training_source`` of sidecars written before the training source was recorded."""


class ModelLoadError(PipelineError):
    """A model file is missing, unreadable or incompatible; the message names the file."""


@dataclass
class ModelInfo:
    """The sidecar ``<name>.json``: everything needed to use the model correctly."""

    model_name: str
    class_names: list[str]
    positive_class: str
    img_size: int
    backbone: str
    weights: str
    threshold: float = 0.5
    preprocess: Preprocessing = field(default_factory=Preprocessing)
    """The steps from decoded image to model input (``params.preprocess`` at featurize): the app
    and the CLI apply exactly these, never params.yaml's. Absent in older sidecars: the defaults,
    the only recipe there was then."""
    preprocessing: str = PREPROCESSING
    """``preprocess`` in words, for people (always derived from it)."""
    format_version: int = FORMAT_VERSION
    revision: str = "unknown"
    params: dict[str, Any] = field(default_factory=dict)
    ood: dict[str, Any] = field(default_factory=dict)
    model_sha256: str = ""
    """SHA-256 of the ``.keras`` file this sidecar was written with: binds the pair, so a model
    beside another run's sidecar (another threshold, other OOD statistics) is refused."""
    weights_sha256: str = ""
    """SHA-256 of the backbone weights file the features were computed with: ``weights`` a file,
    or Keras's cached ImageNet file; empty for ``none`` (seeded random weights)."""
    training_source: str = UNKNOWN_SOURCE
    """What the model was trained on: ``demo``, ``download`` or ``local:<folder name>``
    (``data.source``). The server says so when demo models refuse a real X-ray."""
    training_data: str = ""
    """The same for people: a sentence the server's page and ``/healthz`` show."""

    @property
    def trained_on_demo(self) -> bool:
        return self.training_source == DEMO_SOURCE

    @property
    def trained_on(self) -> str:
        """``training_data``, or what can be said without it (older or hand-written sidecars)."""
        if self.training_data:
            return self.training_data
        if self.training_source == UNKNOWN_SOURCE:
            return "data not recorded (the sidecar predates training sources)"
        return f"data.source {self.training_source}"

    def __post_init__(self) -> None:
        if not isinstance(self.preprocess, Preprocessing):
            self.preprocess = parse_preprocessing(self.preprocess, f"{self.model_name} sidecar")
        self.preprocessing = self.preprocess.describe()

    @property
    def positive_index(self) -> int:
        return self.class_names.index(self.positive_class)


def info_path(model_path: Path | str) -> Path:
    """``models/<name>.keras`` -> ``models/<name>.json``."""
    return Path(model_path).with_suffix(".json")


def check_model_binding(info: ModelInfo, model_path: Path, sidecar: Path,
                        model_sha256: str) -> None:
    """Refuse a model file whose SHA-256 is not the one its sidecar was written with.

    ``model_sha256`` is the hash of ``model_path`` as it is now. Sidecars written before the pair
    was bound (no ``model_sha256``) are refused too: nothing says they belong to this file.
    """
    retrain = (f"re-run `dvc repro train@{info.model_name}` to write both files again, or copy "
               f"{model_path.name} and {sidecar.name} together from one run")
    if not info.model_sha256:
        raise ModelLoadError(f"{sidecar}: has no model_sha256 (written before models were bound "
                             f"to their sidecars), so nothing shows it belongs to {model_path}; "
                             f"{retrain}")
    if info.model_sha256 != model_sha256:
        raise ModelLoadError(f"{model_path} (SHA-256 {model_sha256[:12]}) and {sidecar} (written "
                             f"for {info.model_sha256[:12]}) are not from the same training run; "
                             f"{retrain}")


def read_model_info(sidecar: Path | str) -> ModelInfo:
    """Read and check a sidecar; every problem is a :class:`ModelLoadError` naming the file."""
    sidecar = Path(sidecar)
    if not sidecar.is_file():
        raise ModelLoadError(f"{sidecar}: model file not found; run `dvc repro` to train the "
                             "models, or point to an existing one")
    try:
        raw = json.loads(sidecar.read_text(encoding="utf-8"))
        if isinstance(raw, dict) and "preprocess" in raw:
            raw["preprocess"] = parse_preprocessing(raw["preprocess"], str(sidecar))
        info = ModelInfo(**raw)
    except ParamsError as exc:
        raise ModelLoadError(f"{exc}; retrain with `dvc repro` or fix the file") from exc
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{sidecar}: not a covid-xray model info file ({exc})") from exc
    if info.format_version != FORMAT_VERSION:
        raise ModelLoadError(f"{sidecar}: format_version {info.format_version}, this "
                             f"code reads {FORMAT_VERSION}; retrain with `dvc repro`")
    return info
