"""Project paths: the one place that knows where things live.

Every path is derived from ``PROJ_ROOT`` so stages, the app and tests agree; tests that run the
pipeline in a temporary copy set ``COVID_XRAY_ROOT`` or simply run from that copy (stages use the
current working directory, which DVC sets to the repository root).
"""

from __future__ import annotations

import os
from pathlib import Path

from covid_xray.errors import PipelineError

MODEL_NAMES: tuple[str, ...] = ("covid_normal", "covid_pneumonia")
"""The two classifiers of the seed: COVID vs NORMAL (model 1) and COVID vs PNEUMONIA (model 2)."""

NEGATIVE_CLASS: dict[str, str] = {"covid_normal": "normal", "covid_pneumonia": "pneumonia"}
POSITIVE_CLASS = "covid"


NO_EXTERNAL_FILE = ".no-external-set"
"""The note acquire leaves in ``data/raw/external/`` when the data source has no external test set:
the stages that list external sets skip a folder holding only this note (see
``datasets.external_sets``)."""


def class_names(model_name: str) -> list[str]:
    """The output order of every classifier: [covid, <negative class>]."""
    if model_name not in NEGATIVE_CLASS:
        raise PipelineError(f"unknown model {model_name!r}; expected one of "
                            f"{', '.join(NEGATIVE_CLASS)}")
    return [POSITIVE_CLASS, NEGATIVE_CLASS[model_name]]


def resolve_path(value: str | Path, root: Path) -> Path:
    """A user-given path from params.yaml: ``~`` expanded, relative paths taken from ``root``."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


def project_root() -> Path:
    """The repository root: ``$COVID_XRAY_ROOT`` if set, else the current directory."""
    return Path(os.environ.get("COVID_XRAY_ROOT", os.getcwd())).resolve()


class Paths:
    """All pipeline locations under one root (a temp copy in tests, the repo otherwise)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else project_root()
        self.params = self.root / "params.yaml"
        self.data = self.root / "data"
        self.raw = self.data / "raw"
        self.downloads = self.data / "downloads"
        self.interim = self.data / "interim"
        self.datasets = self.data / "datasets"
        self.splits = self.data / "splits"
        self.features = self.data / "features"
        self.predictions = self.data / "predictions"
        self.models = self.root / "models"
        self.pretrain = self.models / "pretrain"
        self.metrics = self.root / "metrics"
        self.plots = self.root / "plots"
        self.reports = self.root / "reports"

    @property
    def covid_dataset(self) -> Path:
        return self.raw / "covid-chestxray-dataset"

    @property
    def kermany_dataset(self) -> Path:
        return self.raw / "chest_xray"

    @property
    def manifest(self) -> Path:
        return self.datasets / "manifest.csv"

    @property
    def excluded(self) -> Path:
        """Training images copy_images left out to keep sets disjoint (docs/contracts.md)."""
        return self.datasets / "excluded.csv"

    @property
    def kermany_pool(self) -> Path:
        """Kermany train images clear of every evaluation set (copy_images; docs/contracts.md)."""
        return self.datasets / "kermany_pool.csv"

    @property
    def pretrain_metrics(self) -> Path:
        """The pretrain stage's dvclive folder (``metrics.json`` + ``plots/``)."""
        return self.metrics / "pretrain"

    def split_file(self, model_name: str) -> Path:
        return self.splits / f"{model_name}.csv"

    def predictions_dir(self, model_name: str) -> Path:
        return self.predictions / model_name

    def model_file(self, model_name: str) -> Path:
        return self.models / f"{model_name}.keras"

    def details(self, stage: str) -> Path:
        """Every figure a stage computed (``reports/<stage>/details.json``, read by the report);
        ``metrics/<stage>.json`` keeps only the few that DVC tracks across experiments."""
        return self.reports / stage / "details.json"
