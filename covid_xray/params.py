"""Reading and validating ``params.yaml``: the one place that knows every key.

Stages call :func:`load_params` first, so a bad value (``train.dropout: 1.5``,
``train.batch_size: 0``,
an unknown backbone, a weights file that does not exist) stops the stage before any work, with a
message that names the key, the value and what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from covid_xray.config import resolve_path
from covid_xray.errors import ParamsError

BACKBONES: tuple[str, ...] = ("vgg16", "mobilenetv2")
THRESHOLD_RULES: tuple[str, ...] = ("youden", "target_sensitivity", "argmax")


@dataclass(frozen=True)
class DemoParams:
    covid_patients: int = 70
    kermany_train: int = 160
    kermany_test: int = 30
    max_side: int = 320
    plant_artifact: bool = False


@dataclass(frozen=True)
class DataParams:
    source: str = "demo"
    demo: DemoParams = field(default_factory=DemoParams)

    @property
    def source_kind(self) -> str:
        """``demo``, ``download`` or ``local`` (any other value is a folder path)."""
        return self.source if self.source in ("demo", "download") else "local"


@dataclass(frozen=True)
class SelectParams:
    modalities: tuple[str, ...] = ("X-ray",)
    views: tuple[str, ...] = ("PA",)
    findings: tuple[str, ...] = ("COVID-19",)
    heldout_from: str = "2020-03"


@dataclass(frozen=True)
class CopyParams:
    heldout_normal: int = 20
    heldout_pneumonia: int = 20
    max_per_class: int = 0


@dataclass(frozen=True)
class SplitParams:
    test_size: float = 0.2
    val_size: float = 0.2
    group_by_patient: bool = True


@dataclass(frozen=True)
class ModelParams:
    backbone: str = "vgg16"
    weights: str = "none"
    img_size: int = 224
    pool_size: int = 4
    dense_nodes: int = 64


@dataclass(frozen=True)
class FeaturizeParams:
    augment_copies: int = 2
    batch_size: int = 16


@dataclass(frozen=True)
class TrainParams:
    seed: int = 42
    init_lr: float = 1e-3
    epochs: int = 10
    batch_size: int = 8
    dropout: float = 0.5
    rotation_deg: float = 15.0


@dataclass(frozen=True)
class ThresholdParams:
    rule: str = "youden"
    sensitivity: float = 0.95


@dataclass(frozen=True)
class ValidateParams:
    gradcam_images: int = 3
    bootstrap: int = 1000
    external: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditParams:
    fail_on_leak: bool = True
    phash_max_distance: int = 4


@dataclass(frozen=True)
class ProbeParams:
    auc_threshold: float = 0.8
    folds: int = 5


@dataclass(frozen=True)
class Params:
    seed: int = 42
    data: DataParams = field(default_factory=DataParams)
    select: SelectParams = field(default_factory=SelectParams)
    copy: CopyParams = field(default_factory=CopyParams)
    split: SplitParams = field(default_factory=SplitParams)
    model: ModelParams = field(default_factory=ModelParams)
    featurize: FeaturizeParams = field(default_factory=FeaturizeParams)
    train: TrainParams = field(default_factory=TrainParams)
    threshold: ThresholdParams = field(default_factory=ThresholdParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    audit: AuditParams = field(default_factory=AuditParams)
    probe: ProbeParams = field(default_factory=ProbeParams)


class _Reader:
    """Pulls typed values out of the raw mapping, naming the dotted key on any error."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw = raw
        self.source = source

    def _fail(self, key: str, message: str) -> ParamsError:
        return ParamsError(f"{self.source}: `{key}` {message}")

    def get(self, key: str, default: Any) -> Any:
        node: Any = self.raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def integer(self, key: str, default: int, minimum: int | None = None,
                maximum: int | None = None) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, f"must be a whole number, got {value!r}")
        if minimum is not None and value < minimum:
            raise self._fail(key, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self._fail(key, f"must be at most {maximum}, got {value}")
        return value

    def number(self, key: str, default: float, low: float, high: float,
               low_open: bool = False, high_open: bool = False) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(key, f"must be a number, got {value!r}")
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            left = "(" if low_open else "["
            right = ")" if high_open else "]"
            raise self._fail(key, f"must be in {left}{low}, {high}{right}, got {value}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, f"must be true or false, got {value!r}")
        return value

    def string(self, key: str, default: str, choices: tuple[str, ...] | None = None) -> str:
        value = self.get(key, default)
        if not isinstance(value, str) or not value.strip():
            raise self._fail(key, f"must be a non-empty string, got {value!r}")
        if choices is not None and value.lower() not in choices:
            raise self._fail(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value.lower() if choices is not None else value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(key, list(default))
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(
                isinstance(v, str) and v.strip() for v in value):
            raise self._fail(key, f"must be a non-empty list of strings, got {value!r}")
        return tuple(v.strip() for v in value)


def parse_params(raw: dict[str, Any], source: str = "params.yaml",
                 root: Path | None = None) -> Params:
    """Validate a raw params mapping; ``root`` resolves relative paths (weights, local source)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    r = _Reader(raw, source)
    root = root or Path.cwd()

    data_source = r.string("data.source", "demo")
    if data_source not in ("demo", "download"):
        folder = resolve_path(data_source, root)
        if not folder.is_dir():
            raise ParamsError(
                f"{source}: `data.source` is {data_source!r}, which is neither `demo`, `download` "
                f"nor an existing folder ({folder} not found). Point it at a folder holding "
                "covid-chestxray-dataset/ and chest_xray/.")
    demo = DemoParams(
        covid_patients=r.integer("data.demo.covid_patients", 70, minimum=6, maximum=100_000),
        kermany_train=r.integer("data.demo.kermany_train", 160, minimum=4, maximum=1_000_000),
        kermany_test=r.integer("data.demo.kermany_test", 30, minimum=1, maximum=1_000_000),
        max_side=r.integer("data.demo.max_side", 320, minimum=32, maximum=4096),
        plant_artifact=r.boolean("data.demo.plant_artifact", False),
    )

    heldout_from = r.string("select.heldout_from", "2020-03")
    if not re.fullmatch(r"\d{4}-\d{2}", heldout_from) or not 1 <= int(heldout_from[5:]) <= 12:
        raise ParamsError(f"{source}: `select.heldout_from` must be a month as YYYY-MM, "
                          f"got {heldout_from!r}")

    model_weights = r.string("model.weights", "none")
    if model_weights.lower() in ("imagenet", "none"):
        model_weights = model_weights.lower()
    else:
        weights_path = resolve_path(model_weights, root)
        if not weights_path.is_file():
            raise ParamsError(
                f"{source}: `model.weights` is {model_weights!r}: no such file ({weights_path}). "
                "Use `imagenet` (needs internet or a pre-placed file in ~/.keras/models), `none` "
                "(random frozen backbone), or the path to a local weights file.")

    img_size = r.integer("model.img_size", 224, minimum=32, maximum=1024)
    pool_size = r.integer("model.pool_size", 4, minimum=1, maximum=32)
    if pool_size > img_size // 32:
        raise ParamsError(
            f"{source}: `model.pool_size` {pool_size} is larger than the backbone's feature map "
            f"({img_size // 32} px at model.img_size {img_size}); use at most {img_size // 32}.")

    return Params(
        seed=r.integer("base.seed", 42, minimum=0),
        data=DataParams(source=data_source, demo=demo),
        select=SelectParams(
            modalities=r.strings("select.modalities", ("X-ray",)),
            views=r.strings("select.views", ("PA",)),
            findings=r.strings("select.findings", ("COVID-19",)),
            heldout_from=heldout_from,
        ),
        copy=CopyParams(
            heldout_normal=r.integer("copy.heldout_normal", 20, minimum=0),
            heldout_pneumonia=r.integer("copy.heldout_pneumonia", 20, minimum=0),
            max_per_class=r.integer("copy.max_per_class", 0, minimum=0),
        ),
        split=SplitParams(
            test_size=r.number("split.test_size", 0.2, 0.0, 1.0, low_open=True, high_open=True),
            val_size=r.number("split.val_size", 0.2, 0.0, 1.0, high_open=True),
            group_by_patient=r.boolean("split.group_by_patient", True),
        ),
        model=ModelParams(
            backbone=r.string("model.backbone", "vgg16", choices=BACKBONES),
            weights=model_weights,
            img_size=img_size,
            pool_size=pool_size,
            dense_nodes=r.integer("model.dense_nodes", 64, minimum=1, maximum=65_536),
        ),
        featurize=FeaturizeParams(
            augment_copies=r.integer("featurize.augment_copies", 2, minimum=0, maximum=64),
            batch_size=r.integer("featurize.batch_size", 16, minimum=1, maximum=4096),
        ),
        train=TrainParams(
            seed=r.integer("train.seed", 42, minimum=0),
            init_lr=r.number("train.init_lr", 1e-3, 0.0, 10.0, low_open=True),
            epochs=r.integer("train.epochs", 10, minimum=1, maximum=10_000),
            batch_size=r.integer("train.batch_size", 8, minimum=1, maximum=65_536),
            dropout=r.number("train.dropout", 0.5, 0.0, 1.0, high_open=True),
            rotation_deg=r.number("train.rotation_deg", 15.0, 0.0, 180.0),
        ),
        threshold=ThresholdParams(
            rule=r.string("threshold.rule", "youden", choices=THRESHOLD_RULES),
            sensitivity=r.number("threshold.sensitivity", 0.95, 0.0, 1.0, low_open=True),
        ),
        validate=ValidateParams(
            gradcam_images=r.integer("validate.gradcam_images", 3, minimum=0, maximum=1000),
            bootstrap=r.integer("validate.bootstrap", 1000, minimum=0, maximum=1_000_000),
            external=_external_sets(r, root),
        ),
        audit=AuditParams(
            fail_on_leak=r.boolean("audit.fail_on_leak", True),
            phash_max_distance=r.integer("audit.phash_max_distance", 4, minimum=0, maximum=64),
        ),
        probe=ProbeParams(
            auc_threshold=r.number("probe.auc_threshold", 0.8, 0.5, 1.0),
            folds=r.integer("probe.folds", 5, minimum=2, maximum=50),
        ),
    )


def _external_sets(r: _Reader, root: Path) -> dict[str, str]:
    """``validate.external``: name -> folder with class subfolders (covid/, normal/, pneumonia/).

    Folders are checked when the validate stage runs (a demo external set only exists after
    acquire), so here only the shape is validated.
    """
    value = r.get("validate.external", {}) or {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in value.items()):
        raise ParamsError(f"{r.source}: `validate.external` must map a set name to a folder "
                          f"path (with covid/, normal/ or pneumonia/ subfolders), got {value!r}")
    return {name: folder.strip() for name, folder in value.items()}


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; raises :class:`ParamsError` naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the repository root (where dvc.yaml is)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    return parse_params(raw, source=str(path), root=path.resolve().parent)
