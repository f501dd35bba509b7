"""Reading and validating ``params.yaml``: the one place that knows every key.

The section classes below are the single source of truth for each key's type, default, allowed
values and meaning; the README's parameter table is generated from them
(``python -m covid_xray.params README.md``) and a test checks that the committed params.yaml holds
their defaults. Stages call :func:`load_params` first, so an unknown key or section (a typo:
``train.droput``), a bad value (``train.dropout: 1.5``), an unknown backbone or a weights file that
does not exist stops the stage before any work, one line per problem naming the dotted key, the
value and what is allowed.

They are pydantic dataclasses rather than ``BaseModel``: two sections are named ``copy`` and
``validate``, which would shadow BaseModel methods, and dataclasses keep ``dataclasses.asdict``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    AllowInfNan,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo

from covid_xray.config import resolve_path
from covid_xray.errors import ParamsError
from covid_xray.io import write_text

Backbone = Literal["vgg16", "mobilenetv2", "smallcnn"]
PretrainInit = Literal["none", "imagenet"]
ThresholdRule = Literal["youden", "target_sensitivity", "argmax"]
Equalize = Literal["none", "hist", "clahe"]
ResizeMode = Literal["stretch", "pad", "center_crop"]
FeaturizeEngine = Literal["local", "ray"]
BACKBONES: tuple[str, ...] = get_args(Backbone)
IMAGENET_BACKBONES: tuple[str, ...] = ("vgg16", "mobilenetv2")
"""Backbones Keras publishes ImageNet weights for (``smallcnn`` is this project's own)."""
XRAY = "xray"
"""``model.weights: xray``: the backbone the ``pretrain`` stage trained on chest X-rays."""
THRESHOLD_RULES: tuple[str, ...] = get_args(ThresholdRule)

# YAML's 3 is a whole number, but 3.0, "3" and true are refused (strict); a number takes 3 or 0.3.
Whole = StrictInt
Number = Annotated[float, Strict(), AllowInfNan(False)]

_CONFIG = ConfigDict(extra="forbid", frozen=True)


def _root(info: ValidationInfo) -> Path:
    """The folder relative paths are taken from: params.yaml's own (load_params), else the cwd."""
    return Path((info.context or {}).get("root") or Path.cwd())


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


@dataclass(config=_CONFIG)
class _Section:
    @model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, data: Any) -> Any:
        """A section whose keys are all commented out is YAML null: it takes the defaults."""
        return {} if data is None else data


@dataclass(config=_CONFIG)
class BaseParams(_Section):
    seed: Whole = Field(42, ge=0, description="seeds every data-side random choice (demo data, "
                                              "sampling, split, random backbone)")


@dataclass(config=_CONFIG)
class DemoParams(_Section):
    covid_patients: Whole = Field(70, ge=6, le=100_000, description=(
        "COVID patients of the synthetic data set (1-3 images each, some dated March 2020 or "
        "later)"))
    kermany_train: Whole = Field(160, ge=4, le=1_000_000, description=(
        "synthetic NORMAL and PNEUMONIA images each in chest_xray/train"))
    kermany_test: Whole = Field(30, ge=1, le=1_000_000, description=(
        "synthetic NORMAL and PNEUMONIA images each in chest_xray/test"))
    max_side: Whole = Field(320, ge=32, le=4096, description=(
        "largest side of a synthetic image in pixels (real files are much larger)"))
    collection_negatives: Whole = Field(24, ge=0, le=100_000, description=(
        "patients with the COVID collection's own non-COVID PA X-rays (No Finding, other "
        "pneumonias) from the same sites as its COVID images (`copy.negatives`: "
        "covid_collection)"))
    plant_artifact: StrictBool = Field(False, description=(
        "burn a source marker into every COVID image (to see the shortcut probe fire)"))


@dataclass(config=_CONFIG)
class DataParams(_Section):
    source: StrictStr = Field("demo", description=(
        "`demo` (synthetic, offline), `download` (both public archives) or a folder path holding "
        "covid-chestxray-dataset/ and chest_xray/"))
    demo: DemoParams = Field(default_factory=DemoParams)

    @field_validator("source")
    @classmethod
    def _source_exists(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip():
            raise ValueError("must not be empty: `demo`, `download` or a folder path")
        if value not in ("demo", "download"):
            folder = resolve_path(value, _root(info))
            if not folder.is_dir():
                raise ValueError(
                    f"is {value!r}, which is neither `demo`, `download` nor an existing folder "
                    f"({folder} not found). Point it at a folder holding covid-chestxray-dataset/ "
                    "and chest_xray/.")
        return value

    @property
    def source_kind(self) -> str:
        """``demo``, ``download`` or ``local`` (any other value is a folder path)."""
        return self.source if self.source in ("demo", "download") else "local"


def _string_list(value: Any) -> tuple[str, ...]:
    """One string or a non-empty list of non-empty strings, stripped."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value or not all(
            isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"must be a non-empty list of strings, got {value!r}")
    return tuple(v.strip() for v in value)


@dataclass(config=_CONFIG)
class SelectParams(_Section):
    modalities: tuple[str, ...] = Field(("X-ray",), description="modalities kept (the seed's)")
    views: tuple[str, ...] = Field(("PA",), description="views kept (the seed's)")
    findings: tuple[str, ...] = Field(("COVID-19",), description=(
        "findings kept, matched on the last `/` segment of `finding`, any case"))
    heldout_from: StrictStr = Field("2020-03", description=(
        "COVID images dated in or after this month (YYYY-MM) are held out"))

    @field_validator("modalities", "views", "findings", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> tuple[str, ...]:
        return _string_list(value)

    @field_validator("heldout_from")
    @classmethod
    def _month(cls, value: str) -> str:
        if not re.fullmatch(r"\d{4}-\d{2}", value) or not 1 <= int(value[5:]) <= 12:
            raise ValueError(f"must be a month as YYYY-MM, got {value!r}")
        return value


NEGATIVE_SOURCES: tuple[str, ...] = ("kermany", "covid_collection")
"""Built-in sources of negative (normal / pneumonia) training images; any other name is an entry
of ``copy.folders``."""
RESERVED_NAMES: tuple[str, ...] = (*NEGATIVE_SOURCES, "unknown")
"""Names a ``copy.folders`` entry may not take: they are sources or origins already."""
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(config=_CONFIG)
class NegativesParams(_Section):
    normal: tuple[str, ...] = Field(("kermany",), description=(
        "sources of NORMAL training images: `kermany`, `covid_collection` (the COVID "
        "collection's own `No Finding` rows) or a `copy.folders` name; the count balancing the "
        "COVID images is shared equally among them (README, Negatives from several sources)"))
    pneumonia: tuple[str, ...] = Field(("kermany",), description=(
        "sources of PNEUMONIA training images: `kermany`, `covid_collection` (the collection's "
        "non-COVID pneumonias) or a `copy.folders` name"))

    @field_validator("normal", "pneumonia", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> tuple[str, ...]:
        sources = _string_list(value)
        twice = sorted({s for s in sources if sources.count(s) > 1})
        if twice:
            raise ValueError(f"lists {', '.join(twice)} more than once, got {list(sources)!r}")
        return sources


@dataclass(config=_CONFIG)
class CopyParams(_Section):
    heldout_normal: Whole = Field(20, ge=0, description=(
        "Kermany NORMAL images held out for validation, never trained on"))
    heldout_pneumonia: Whole = Field(20, ge=0, description=(
        "Kermany PNEUMONIA images held out for validation, never trained on"))
    max_per_class: Whole = Field(0, ge=0, description=(
        "cap on training images per class (0: all COVID images, negatives balanced to them)"))
    folders: dict[str, str] = Field(default_factory=dict, description=(
        "labelled folders of negatives, name: folder with normal/ and/or pneumonia/ subfolders "
        "(the layout of `validate.external`); used where `copy.negatives` lists the name; never "
        "an external set"))
    negatives: NegativesParams = Field(default_factory=NegativesParams)

    @field_validator("folders", mode="before")
    @classmethod
    def _folders_shape(cls, value: Any) -> dict[str, str]:
        """Only the shape and the names: copy_images checks that the folders exist."""
        value = value or {}
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in value.items()):
            raise ValueError(f"must map a name to a folder path (with normal/ or pneumonia/ "
                             f"subfolders), got {value!r}")
        for name in value:
            if name in RESERVED_NAMES or not _FOLDER_NAME.fullmatch(name):
                raise ValueError(
                    f"has the name {name!r}: use letters, digits, `_` or `-` (up to 64), not one "
                    f"of {', '.join(RESERVED_NAMES)}")
        return {name: folder.strip() for name, folder in value.items()}

    @field_validator("negatives")
    @classmethod
    def _known_sources(cls, value: NegativesParams, info: ValidationInfo) -> NegativesParams:
        folders = info.data.get("folders")
        if folders is None:  # folders itself was refused: that error is reported
            return value
        known = [*NEGATIVE_SOURCES, *folders]
        for label in ("normal", "pneumonia"):
            unknown = [s for s in getattr(value, label) if s not in known]
            if unknown:
                raise ValueError(
                    f"has unknown source(s) {', '.join(unknown)} in `{label}`; known: "
                    f"{', '.join(known)} (add a folder under `copy.folders` first)")
        return value

    def sources(self, label: str) -> tuple[str, ...]:
        """The sources of training images of negative class ``label`` (normal / pneumonia)."""
        return tuple(getattr(self.negatives, label))


@dataclass(config=_CONFIG)
class SplitParams(_Section):
    test_size: Number = Field(0.2, gt=0, lt=1, description=(
        "share of each model's images in the test split (by patient)"))
    val_size: Number = Field(0.2, ge=0, lt=1, description=(
        "share of the remaining training patients kept aside to choose the threshold"))
    group_by_patient: StrictBool = Field(True, description=(
        "no patient on both sides of the split (false: the seed's image-level split)"))


@dataclass(config=_CONFIG)
class ModelParams(_Section):
    backbone: Backbone = Field("vgg16", description=(
        "frozen backbone without its top (`smallcnn`: the small CNN of covid_xray/modeling.py, "
        "no ImageNet weights); with weights `xray` the backbone is `pretrain.architecture`"))
    weights: StrictStr = Field("none", description=(
        "`imagenet` (downloaded by Keras), `none` (seeded random), `xray` (trained on Kermany "
        "NORMAL vs PNEUMONIA by the `pretrain` stage) or a weights file path"))
    img_size: Whole = Field(224, ge=32, le=1024, description="input size in pixels")
    pool_size: Whole = Field(4, ge=1, le=32, description=(
        "AveragePooling2D window on the backbone's feature map (at most img_size / 32)"))
    dense_nodes: Whole = Field(64, ge=1, le=65_536, description=(
        "units of the head's hidden Dense layer"))

    @field_validator("backbone", mode="before")
    @classmethod
    def _backbone_case(cls, value: Any) -> Any:
        return _lower(value)

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, value: str, info: ValidationInfo) -> str:
        if value.lower() in ("imagenet", "none", XRAY):
            if value.lower() == "imagenet" and info.data.get("backbone") not in (
                    None, *IMAGENET_BACKBONES):
                raise ValueError(
                    f"is 'imagenet', but there are no ImageNet weights for backbone "
                    f"{info.data['backbone']!r}; use {' or '.join(IMAGENET_BACKBONES)}, or weights "
                    "`none` or `xray`")
            return value.lower()
        path = resolve_path(value, _root(info))
        if not value.strip() or not path.is_file():
            raise ValueError(
                f"is {value!r}: no such file ({path}). Use `imagenet` (needs internet or a "
                "pre-placed file in ~/.keras/models), `none` (random frozen backbone), `xray` "
                "(the pretrain stage's chest X-ray backbone), or the path to a local weights file.")
        return value

    @field_validator("pool_size")
    @classmethod
    def _fits_feature_map(cls, value: int, info: ValidationInfo) -> int:
        img_size = info.data.get("img_size")
        if img_size is not None and value > img_size // 32:
            raise ValueError(
                f"{value} is larger than the backbone's feature map ({img_size // 32} px at "
                f"model.img_size {img_size}); use at most {img_size // 32}")
        return value


@dataclass(config=_CONFIG)
class Preprocessing(_Section):
    """How a decoded image becomes the model input; also the value object the models carry.

    The ``preprocess`` section of params.yaml, and the same class in each model's sidecar, so the
    app and the CLI apply exactly the steps training used (``covid_xray.imaging.model_view``).
    Defined here, not in ``imaging``, so that one class validates it wherever it is read (params,
    sidecars) without every stage importing OpenCV. Frozen and hashable: the prediction service
    groups models by it. The defaults are the seed's recipe (decode -> RGB -> stretch).
    """

    grayscale: StrictBool = Field(False, description=(
        "decode to one grey channel (luma), replicated to the backbone's 3 channels; hides "
        "colour-tinted vs grey storage"))
    equalize: Equalize = Field("none", description=(
        "`none`, `hist` (global histogram equalisation) or `clahe`, on the grey level (the Y of "
        "YCrCb when colour is kept)"))
    clahe_clip: Number = Field(2.0, gt=0, le=100, description=(
        "CLAHE contrast limit (`equalize: clahe`)"))
    clahe_tile: Whole = Field(8, ge=1, le=64, description=(
        "CLAHE tiles per side (`equalize: clahe`)"))
    resize: ResizeMode = Field("stretch", description=(
        "`stretch` to a square (the seed's: aspect ratio shows as distortion), `pad` (keep "
        "aspect, black bars) or `center_crop` (the central square)"))
    crop_border: Number = Field(0.0, ge=0, le=0.4, description=(
        "fraction of each side cut off first (burnt-in borders, markers, text)"))

    @field_validator("equalize", "resize", mode="before")
    @classmethod
    def _choice_case(cls, value: Any) -> Any:
        return _lower(value)

    @property
    def is_default(self) -> bool:
        """The seed's recipe: the model input is decode -> RGB -> stretch, nothing else."""
        return self == Preprocessing()

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain values (sidecars, ``data/features/info.json``)."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """The recipe in one line, for model cards and logs."""
        steps = ["decode->RGB"]
        if self.crop_border:
            steps.append(f"crop_border({self.crop_border:g} per side)")
        if self.grayscale:
            steps.append("grey(luma)")
        if self.equalize == "hist":
            steps.append("equalize(hist" + ("" if self.grayscale else ", on Y") + ")")
        elif self.equalize == "clahe":
            steps.append(f"equalize(clahe clip {self.clahe_clip:g}, {self.clahe_tile}x"
                         f"{self.clahe_tile} tiles" + ("" if self.grayscale else ", on Y") + ")")
        steps.append({"stretch": "resize(img_size",  # the seed's words: old sidecars say this
                      "pad": "resize(keep aspect, pad with black to img_size",
                      "center_crop": "resize(central square to img_size"}[self.resize]
                     + ", INTER_AREA when shrinking)")
        if self.grayscale:
            steps.append("replicate to 3 channels")
        steps.append("float32/255")
        return "->".join(steps)


def parse_preprocessing(raw: Any, source: str) -> Preprocessing:
    """Validate preprocessing settings read from a file (a model sidecar, a feature store).

    None or an empty mapping (files written before the settings existed) means the defaults,
    the only recipe there was. Raises :class:`ParamsError`, one line per problem, each starting
    with ``source`` and naming the ``preprocess.<key>``.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: `preprocess` must be a mapping of settings, got {raw!r}")
    try:
        return _PREPROCESSING_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise ParamsError("\n".join(
            f"{source}: {_problem({**e, 'loc': ('preprocess', *e['loc'])})}"
            for e in exc.errors())) from None


@dataclass(config=_CONFIG)
class FeaturizeParams(_Section):
    augment_copies: Whole = Field(2, ge=0, le=64, description=(
        "rotated copies per training image, featurized once"))
    batch_size: Whole = Field(16, ge=1, le=4096, description="images per backbone batch")
    engine: FeaturizeEngine = Field("local", description=(
        "`local` (one process) or `ray` (Ray Data: decoding tasks and backbone actors on a Ray "
        "cluster; same features, bit for bit)"))
    ray_address: StrictStr = Field("", description=(
        "Ray cluster to connect to (`auto`, `ray://host:10001`, `host:6379`); empty: the "
        "RAY_ADDRESS environment variable, else an embedded Ray on this machine"))
    workers: Whole = Field(1, ge=1, le=4096, description=(
        "backbone actors (engine `ray`): each holds the model once"))
    cpus_per_worker: Number = Field(1.0, gt=0, le=1024, description=(
        "logical CPUs Ray reserves per actor (engine `ray`); the node's core count gives each "
        "actor a whole node"))
    gpus_per_worker: Number = Field(0.0, ge=0, le=64, description=(
        "GPUs per actor (engine `ray`; fractions share a GPU); 0: CPU actors"))

    @field_validator("engine", mode="before")
    @classmethod
    def _engine_case(cls, value: Any) -> Any:
        return _lower(value)


@dataclass(config=_CONFIG)
class TrainParams(_Section):
    seed: Whole = Field(42, ge=0, description="weight initialisation and shuffling")
    init_lr: Number = Field(1e-3, gt=0, le=10, description="Adam learning rate (the seed's)")
    epochs: Whole = Field(10, ge=1, le=10_000, description="training epochs (the seed's)")
    batch_size: Whole = Field(8, ge=1, le=65_536, description="batch size (the seed's)")
    dropout: Number = Field(0.5, ge=0, lt=1, description="dropout before the softmax layer")
    rotation_deg: Number = Field(15.0, ge=0, le=180, description=(
        "rotation range of the augmentation copies in degrees"))


@dataclass(config=_CONFIG)
class ThresholdParams(_Section):
    rule: ThresholdRule = Field("youden", description=(
        "`youden`, `target_sensitivity` or `argmax` (0.5, the seed's)"))
    sensitivity: Number = Field(0.95, gt=0, le=1, description="target for `target_sensitivity`")

    @field_validator("rule", mode="before")
    @classmethod
    def _rule_case(cls, value: Any) -> Any:
        return _lower(value)


@dataclass(config=_CONFIG)
class ValidateParams(_Section):
    gradcam_images: Whole = Field(3, ge=0, le=1000, description=(
        "examples per set in each model's Grad-CAM grid (its columns; 0: no grid)"))
    bootstrap: Whole = Field(1000, ge=0, le=1_000_000, description=(
        "bootstrap resamples for the 95% confidence intervals"))
    external: dict[str, str] = Field(default_factory=dict, description=(
        "external labelled sets, name: folder with covid/ normal/ pneumonia/ subfolders (none by "
        "default; params.yaml lists the demo's, demo_external: data/raw/external)"))

    @field_validator("external", mode="before")
    @classmethod
    def _external_shape(cls, value: Any) -> dict[str, str]:
        """Only the shape: the folders are checked by the stages that read them (the demo's only
        exists after acquire)."""
        value = value or {}
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in value.items()):
            raise ValueError(f"must map a set name to a folder path (with covid/, normal/ or "
                             f"pneumonia/ subfolders), got {value!r}")
        return {name: folder.strip() for name, folder in value.items()}


@dataclass(config=_CONFIG)
class AuditParams(_Section):
    fail_on_leak: StrictBool = Field(True, description=(
        "stop the pipeline when sets that must be disjoint share patients or images"))
    phash_max_distance: Whole = Field(4, ge=0, le=64, description=(
        "perceptual-hash Hamming distance counted as a near-duplicate candidate"))


@dataclass(config=_CONFIG)
class ProbeParams(_Section):
    auc_threshold: Number = Field(0.8, ge=0.5, le=1, description=(
        "shortcut-probe AUC above which the stage warns (classes separable without the disease)"))
    folds: Whole = Field(5, ge=2, le=50, description="shortcut-probe cross-validation folds")


@dataclass(config=_CONFIG)
class CrossSourceParams(_Section):
    min_images: Whole = Field(10, ge=1, le=1_000_000, description=(
        "cross-source validation: an origin with at least this many images of a model's set is "
        "a fold of its own; smaller origins are held out together as one fold"))


@dataclass(config=_CONFIG)
class PretrainParams(_Section):
    architecture: Backbone = Field("smallcnn", description=(
        "network the `pretrain` stage trains on Kermany NORMAL vs PNEUMONIA, and the "
        "classifiers' frozen backbone when model.weights is `xray` (unused otherwise)"))
    init: PretrainInit = Field("none", description=(
        "starting weights: `none` (seeded random) or `imagenet` (then adapted to chest X-rays: "
        "needs internet or the cached Keras file)"))
    img_size: Whole = Field(128, ge=32, le=1024, description=(
        "input size of the pretraining in pixels"))
    epochs: Whole = Field(15, ge=1, le=10_000, description="pretraining epochs")
    init_lr: Number = Field(1e-3, gt=0, le=10, description="Adam learning rate")
    batch_size: Whole = Field(32, ge=1, le=65_536, description="batch size")
    rotation_deg: Number = Field(10.0, ge=0, le=180, description=(
        "random rotation range in degrees, drawn per image and epoch"))
    flip: StrictBool = Field(False, description=(
        "random left-right flips (off: a mirrored chest puts the heart on the wrong side)"))
    max_per_class: Whole = Field(1000, ge=0, le=1_000_000, description=(
        "cap on NORMAL and on PNEUMONIA images (0: all allowed images); bounds the cost"))
    val_size: Number = Field(0.1, ge=0, lt=1, description=(
        "share of the pretraining patients kept aside for the per-epoch eval curves"))
    seed: Whole = Field(42, ge=0, description="image draw, weight initialisation, shuffling")

    @field_validator("architecture", "init", mode="before")
    @classmethod
    def _case(cls, value: Any) -> Any:
        return _lower(value)

    @field_validator("init")
    @classmethod
    def _imagenet_exists(cls, value: str, info: ValidationInfo) -> str:
        architecture = info.data.get("architecture")
        if value == "imagenet" and architecture not in (None, *IMAGENET_BACKBONES):
            raise ValueError(
                f"is 'imagenet', but there are no ImageNet weights for architecture "
                f"{architecture!r}; use init `none`, or architecture "
                f"{' or '.join(IMAGENET_BACKBONES)}")
        return value


@dataclass(config=_CONFIG)
class Params:
    """Every section of params.yaml, in its order."""

    base: BaseParams = Field(default_factory=BaseParams)
    data: DataParams = Field(default_factory=DataParams)
    select: SelectParams = Field(default_factory=SelectParams)
    copy: CopyParams = Field(default_factory=CopyParams)
    split: SplitParams = Field(default_factory=SplitParams)
    model: ModelParams = Field(default_factory=ModelParams)
    preprocess: Preprocessing = Field(default_factory=Preprocessing)
    featurize: FeaturizeParams = Field(default_factory=FeaturizeParams)
    train: TrainParams = Field(default_factory=TrainParams)
    threshold: ThresholdParams = Field(default_factory=ThresholdParams)
    validate: ValidateParams = Field(default_factory=ValidateParams)
    audit: AuditParams = Field(default_factory=AuditParams)
    probe: ProbeParams = Field(default_factory=ProbeParams)
    cross_source: CrossSourceParams = Field(default_factory=CrossSourceParams)
    pretrain: PretrainParams = Field(default_factory=PretrainParams)

    @property
    def seed(self) -> int:
        """``base.seed``: the data-side seed."""
        return self.base.seed

    @model_validator(mode="after")
    def _training_never_external(self, info: ValidationInfo) -> Params:
        """A folder trained on can never also be an external test set (same folder or one
        inside the other). Same pictures under other paths: copy_images leaves them out and the
        audit checks."""
        root = _root(info)
        for name, folder in self.copy.folders.items():
            mine = resolve_path(folder, root).resolve()
            for other, external in self.validate.external.items():
                theirs = resolve_path(external, root).resolve()
                if mine == theirs or mine in theirs.parents or theirs in mine.parents:
                    raise ValueError(
                        f"`copy.folders.{name}` ({folder}) and `validate.external.{other}` "
                        f"({external}) are the same folder or one holds the other: a set used "
                        "for training can never be an external test set; remove one of them")
        return self

    @property
    def uses_pretrain(self) -> bool:
        """``model.weights: xray``: featurize uses the ``pretrain`` stage's backbone."""
        return self.model.weights == XRAY

    @property
    def backbone(self) -> str:
        """The classifiers' backbone architecture: ``pretrain.architecture`` when the weights
        are ``xray`` (the network the pretrain trained), else ``model.backbone``."""
        return self.pretrain.architecture if self.uses_pretrain else self.model.backbone


_ADAPTER = TypeAdapter(Params)
_PREPROCESSING_ADAPTER = TypeAdapter(Preprocessing)

# Error messages: pydantic's error types -> "what is allowed" in the project's words.
_EXPECTED = {
    "int_type": "a whole number", "int_from_float": "a whole number",
    "int_parsing": "a whole number", "float_type": "a number", "float_parsing": "a number",
    "finite_number": "a finite number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "a string", "dict_type": "a mapping",
    "dataclass_type": "a section of `key: value` lines",
}
_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _field(loc: Sequence[str]) -> FieldInfo | None:
    """The field at a dotted location (``("train", "dropout")``), or None."""
    owner: Any = Params
    info: FieldInfo | None = None
    for part in loc:
        fields = getattr(owner, "__pydantic_fields__", None)
        if not fields or part not in fields:
            return None
        info = fields[part]
        owner = info.annotation
    return info


def _num(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


def _allowed_range(info: FieldInfo | None) -> str:
    """``in [0, 1)`` for a number, ``at least 1 and at most 64`` for a whole number."""
    bounds = {name: getattr(m, name) for m in (info.metadata if info else [])
              for name in ("ge", "gt", "le", "lt") if hasattr(m, name)}
    low = next(((n, bounds[n]) for n in ("ge", "gt") if n in bounds), None)
    high = next(((n, bounds[n]) for n in ("le", "lt") if n in bounds), None)
    if info is not None and info.annotation is float and low and high:
        return (f"in {'[' if low[0] == 'ge' else '('}{_num(low[1])}, "
                f"{_num(high[1])}{']' if high[0] == 'le' else ')'}")
    words = {"ge": "at least", "gt": "greater than", "le": "at most", "lt": "less than"}
    return " and ".join(f"{words[b[0]]} {_num(b[1])}" for b in (low, high) if b) or "in range"


def _unknown(loc: Sequence[str]) -> str:
    """``unknown key `train.droput`; did you mean `train.dropout`?`` (difflib on that section)."""
    *section, name = loc
    info = _field(section)
    owner = info.annotation if info else Params if not section else None
    valid = list(getattr(owner, "__pydantic_fields__", {}))
    prefix = "".join(f"{part}." for part in section)
    what = "key" if section else "section"
    match = difflib.get_close_matches(name, valid, n=1)
    hint = (f"did you mean `{prefix}{match[0]}`?" if match
            else f"valid {what}s: {', '.join(prefix + key for key in valid)}")
    return f"unknown {what} `{prefix}{name}`; {hint}"


def _problem(error: Mapping[str, Any]) -> str:
    """One pydantic error as one line naming the dotted key, the value and what is allowed."""
    loc = [str(part) for part in error["loc"]]
    kind, value = error["type"], error.get("input")
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return _unknown(loc)
    if kind == "value_error":
        text = str(error.get("ctx", {}).get("error", error["msg"]))
    elif kind in _EXPECTED:
        text = f"must be {_EXPECTED[kind]}, got {value!r}"
    elif kind in _RANGE_ERRORS:
        text = f"must be {_allowed_range(_field(loc))}, got {value!r}"
    elif kind == "literal_error":
        text = f"must be one of {error.get('ctx', {}).get('expected')}; got {value!r}"
    else:
        text = f"{error['msg'][:1].lower()}{error['msg'][1:]}, got {value!r}"
    return f"`{'.'.join(loc)}` {text}" if loc else text


def parse_params(raw: Any, source: str = "params.yaml", root: Path | None = None) -> Params:
    """Validate a raw params mapping; ``root`` resolves relative paths (weights, local source).

    Raises :class:`ParamsError` with one line per problem, each starting with ``source``.
    """
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return _ADAPTER.validate_python(raw, context={"root": root or Path.cwd()})
    except ValidationError as exc:
        raise ParamsError("\n".join(f"{source}: {_problem(e)}" for e in exc.errors())) from None


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


# ---------------------------------------------------------------------------------------------
# Documentation generated from the classes above (the README's parameter table)


def parameters(owner: Any = Params, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """``(dotted key, default, description)`` of every key, in params.yaml order."""
    for name, info in owner.__pydantic_fields__.items():
        if dataclasses.is_dataclass(info.annotation):
            yield from parameters(info.annotation, f"{prefix}{name}.")
        else:
            yield (f"{prefix}{name}", info.get_default(call_default_factory=True),
                   info.description or "")


def _show(value: Any) -> str:
    """A default as it reads in params.yaml."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return f"[{', '.join(map(str, value))}]"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "{}"
    return str(value)


TABLE_START = "<!-- params table: generated by `python -m covid_xray.params README.md` -->"
TABLE_END = "<!-- end of params table -->"


def _allowed(key: str) -> str:
    """What a key accepts, from its type and constraints."""
    info = _field(key.split("."))
    assert info is not None
    kind = info.annotation
    if get_origin(kind) is Literal:
        return ", ".join(get_args(kind))
    if kind is bool:
        return "true, false"
    if kind is int:
        return f"whole number {_allowed_range(info)}".replace(" in range", "")
    if kind is float:
        return f"number {_allowed_range(info)}"
    if get_origin(kind) is tuple:
        return "list of text"
    if get_origin(kind) is dict:
        return "mapping name: folder"
    return "text"


def markdown_table() -> str:
    """The README's parameter table: one row per key, from the classes above."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    rows += [f"| `{key}` | {_show(default)} | {_allowed(key)} | {text.replace('|', '/')} |"
             for key, default, text in parameters()]
    return "\n".join(rows)


def readme_with_table(readme: str) -> str:
    """``readme`` with the text between the table markers replaced by :func:`markdown_table`."""
    before, start, rest = readme.partition(TABLE_START)
    _, end, after = rest.partition(TABLE_END)
    if not start or not end:
        raise ParamsError(f"README: markers {TABLE_START!r} and {TABLE_END!r} not found")
    return f"{before}{TABLE_START}\n{markdown_table()}\n{TABLE_END}{after}"


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m covid_xray.params [README.md]``: print the table, or rewrite it in the README."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        print(markdown_table())
        return
    readme = Path(args[0])
    write_text(readme, readme_with_table(readme.read_text(encoding="utf-8")))


if __name__ == "__main__":
    main()
