"""The offline demo data set: a deterministic synthetic miniature of both public datasets.

Every later stage must meet on demo data exactly what it meets on the real files, so the demo
writes the two real layouts with their quirks:

- ``covid-chestxray-dataset/``: ``metadata.csv`` in the current ieee8023 schema (hierarchical
  ``finding`` such as ``Pneumonia/Viral/COVID-19``, some with trailing spaces, a trailing comma that
  adds an unnamed empty column), X-rays in ``images/`` and CT in ``volumes/``. Rows to filter out
  (CT, lateral, AP and AP Supine views, other findings), 1-3 images per patient, dates in the
  file's mixed formats (``2020``, ``Mar 4, 2020``, ``March 10, 2020``, ``2/29/2020``,
  ``January 12``, empty) with about 14% of the selectable COVID PA X-rays dated March 2020 or
  later, and a few rows whose image file is missing. Like the real file, it also holds the
  collection's own non-COVID PA X-rays (``No Finding`` and other pneumonias,
  ``collection_negatives`` patients, from the same sites as the COVID images), and every row's
  ``url`` names one of a few sites (:data:`DEMO_SITES`): the origins cross-source validation
  holds out.
- ``chest_xray/{train,test}/{NORMAL,PNEUMONIA}/`` with Kermany's file names
  (``IM-0115-0001.jpeg``, ``NORMAL2-IM-0500-0001.jpeg``, ``person1000_bacteria_2931.jpeg``), several
  images for some pneumonia patients, train and test from different patients.
- ``external/{covid,normal}/``: a small set from "another hospital" (a different acquisition style:
  exposure, gamma, blur, noise, framing), for the external-validation path.

Images are chest-like grey radiographs (body, two darker lung fields, ribs, spine, heart shadow,
diaphragm, clavicles) whose class shows only in the lungs: COVID-19 = bilateral, peripheral,
lower-zone ground-glass haze; PNEUMONIA = unilateral dense lobar consolidation; NORMAL = clear.
Sizes, exposure and intensity statistics are drawn from the SAME distributions for every class, so
trivial per-image statistics cannot tell the classes apart; ``plant_artifact`` deliberately
breaks that by burning a source marker and a light frame into every COVID image (what the
shortcut probe must catch). Randomness comes from per-item seeds derived from ``seed``: the
same seed gives byte-identical files, whatever the order of generation.
"""

from __future__ import annotations

import csv
import gzip
import os
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from covid_xray.params import DemoParams

GENERATOR_VERSION = 2
"""Bumped whenever the generator's output changes for the same seed (2: site urls and the
collection's negatives added; every image of version 1 is unchanged)."""
STREAM_VERSION = 1
"""Part of every random stream's seed: bumping it changes every image."""

METADATA_COLUMNS: tuple[str, ...] = (
    "patientid", "offset", "sex", "age", "finding", "RT_PCR_positive", "survival", "intubated",
    "intubation_present", "went_icu", "in_icu", "needed_supplemental_O2", "extubated",
    "temperature", "pO2_saturation", "leukocyte_count", "neutrophil_count", "lymphocyte_count",
    "view", "modality", "date", "location", "folder", "filename", "doi", "url", "license",
    "clinical_notes", "other_notes",
)
"""The current ieee8023 header; every row (and the header) ends with a trailing comma."""

COVID_FINDING = "Pneumonia/Viral/COVID-19"
OTHER_FINDINGS: tuple[tuple[str, str], ...] = (
    # (finding as written in metadata.csv, what the image shows)
    ("Pneumonia/Bacterial/Streptococcus", "pneumonia"),
    ("Pneumonia/Bacterial/Legionella", "pneumonia"),
    ("Pneumonia/Viral/SARS", "covid"),
    ("Pneumonia/Fungal/Pneumocystis", "covid"),
    ("Pneumonia", "pneumonia"),
    ("No Finding", "normal"),
    ("todo", "normal"),
    ("Unknown", "pneumonia"),
)
COLLECTION_NEGATIVE_FINDINGS: tuple[tuple[str, str], ...] = (
    # the collection's own negatives (data.demo.collection_negatives patients), in turn
    ("No Finding", "normal"),
    ("Pneumonia/Bacterial/Streptococcus", "pneumonia"),
    ("No Finding", "normal"),
    ("Pneumonia/Bacterial/Klebsiella", "pneumonia"),
    ("No Finding", "normal"),
    ("Pneumonia", "pneumonia"),
    ("No Finding", "normal"),
    ("Pneumonia/Fungal/Pneumocystis", "covid"),  # looks like COVID-19: a hard negative
)
NEGATIVE_NOTES = ("Consolidation in one lobe, compared with the prior film.",
                  "No acute cardiopulmonary abnormality.")
DEMO_SITES: tuple[str, ...] = ("radiology-cases.example.org", "case-reports.example.org",
                               "society.example.org", "journal-a.example.org",
                               "journal-b.example.org")
"""Where the demo's rows were "published" (``url``), by patient id: the origins."""

WORK_SIDE = 128
"""Longest side at which anatomy and disease are drawn before scaling to the output size."""

HELDOUT_SHARE = 0.14
"""Share of COVID patients whose X-rays are all dated March 2020 or later (the seed's hold-out)."""

_STREAM_PLAN, _STREAM_COVID, _STREAM_KERMANY, _STREAM_EXTERNAL = 1, 2, 3, 4
_STREAM_NEGATIVES, _STREAM_FOLDER = 5, 6


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """An independent generator per item, so output does not depend on generation order."""
    return np.random.default_rng(np.random.SeedSequence([seed, STREAM_VERSION, *keys]))


# --------------------------------------------------------------------------------------------
# Image synthesis
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Anatomy:
    """A patient's chest, in fractions of the image width (x) and height (y)."""

    cx: float
    body_hw: float
    body_hh: float
    body_cy: float
    lung_dx: float
    lung_hw: float
    lung_hh: float
    lung_cy: float
    heart_dx: float
    heart_cy: float
    heart_ax: float
    heart_ay: float
    rib_spacing: float
    rib_curve: float
    tissue: float
    lung_air: float

    @staticmethod
    def draw(rng: np.random.Generator) -> Anatomy:
        return Anatomy(
            cx=0.5 + rng.normal(0, 0.015), body_hw=rng.uniform(0.40, 0.47),
            body_hh=rng.uniform(0.58, 0.68), body_cy=rng.uniform(0.56, 0.62),
            lung_dx=rng.uniform(0.16, 0.2), lung_hw=rng.uniform(0.12, 0.16),
            lung_hh=rng.uniform(0.25, 0.31), lung_cy=rng.uniform(0.42, 0.48),
            heart_dx=rng.uniform(0.05, 0.09), heart_cy=rng.uniform(0.57, 0.62),
            heart_ax=rng.uniform(0.12, 0.16), heart_ay=rng.uniform(0.1, 0.13),
            rib_spacing=rng.uniform(0.07, 0.09), rib_curve=rng.uniform(1.6, 2.6),
            tissue=rng.uniform(0.5, 0.62), lung_air=rng.uniform(0.3, 0.4),
        )


@dataclass(frozen=True)
class Style:
    """How an acquisition site turns anatomy into pixels (class-independent)."""

    gamma: tuple[float, float] = (0.8, 1.25)
    mean: tuple[float, float] = (0.40, 0.56)
    std: tuple[float, float] = (0.16, 0.23)
    noise: tuple[float, float] = (0.006, 0.022)
    blur: tuple[float, float] = (0.0, 0.0015)
    zoom: tuple[float, float] = (0.94, 1.06)
    background: tuple[float, float] = (0.0, 0.1)
    collimation: float = 0.0
    offset_y: float = 0.0


TRAIN_STYLE = Style()
FOLDER_STYLE = Style(gamma=(1.1, 1.5), mean=(0.46, 0.58), std=(0.14, 0.2), noise=(0.012, 0.03),
                     blur=(0.001, 0.003), zoom=(1.02, 1.12), background=(0.03, 0.12))
"""A third site (:func:`generate_folder`: labelled folders of adult negatives)."""
EXTERNAL_STYLE = Style(gamma=(1.6, 2.1), mean=(0.52, 0.62), std=(0.13, 0.18), noise=(0.03, 0.045),
                       blur=(0.004, 0.007), zoom=(1.22, 1.36), background=(0.08, 0.16),
                       collimation=0.06, offset_y=0.06)
"""Another hospital: harder exposure curve, brighter, softer, noisier, tightly collimated."""


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), sigma) if sigma > 0.3 else image


def _ellipse(canvas: np.ndarray, cx: float, cy: float, ax: float, ay: float,
             value: float = 1.0, angle: float = 0.0) -> None:
    """Filled ellipse with sub-pixel placement (cv2 fixed-point ``shift``)."""
    cv2.ellipse(canvas, (round(cx * 16), round(cy * 16)),
                (max(1, round(ax * 16)), max(1, round(ay * 16))), angle, 0, 360, value, -1,
                cv2.LINE_8, 4)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency texture in [0, 1]: a few random cells upsampled smoothly."""
    grid = rng.random((cells, cells)).astype(np.float32)
    return np.clip(cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


def image_size(rng: np.random.Generator, max_side: int) -> tuple[int, int]:
    """(height, width): long side in [max_side/2, max_side], aspect 0.8-1.3, for every class."""
    long_side = rng.uniform(0.5, 1.0) * max_side
    aspect = rng.uniform(0.8, 1.3)
    if aspect >= 1.0:
        width, height = long_side, long_side / aspect
    else:
        width, height = long_side * aspect, long_side
    return max(16, round(height)), max(16, round(width))


def render_chest(rng: np.random.Generator, height: int, width: int, anatomy: Anatomy,
                 pattern: str, severity: float, style: Style = TRAIN_STYLE,
                 artifact: bool = False) -> np.ndarray:
    """Render a frontal (PA/AP) chest radiograph as ``(height, width)`` uint8.

    ``pattern`` is ``normal``, ``covid`` (bilateral peripheral lower-zone ground-glass haze) or
    ``pneumonia`` (unilateral dense lobar consolidation); ``severity`` in [0, 1] scales it.
    """
    # Anatomy is smooth: draw it at <= WORK_SIDE px (fast), add exposure and noise at full size.
    scale = min(1.0, WORK_SIDE / max(height, width))
    h, w = max(8, round(height * scale)), max(8, round(width * scale))
    a = anatomy
    zoom = rng.uniform(*style.zoom)
    shift_x, shift_y = rng.normal(0, 0.015, size=2)
    shift_y += style.offset_y

    def px(fx: float) -> float:
        return (0.5 + (fx - 0.5) * zoom + shift_x) * w

    def py(fy: float) -> float:
        return (0.5 + (fy - 0.5) * zoom + shift_y) * h

    def sx(fx: float) -> float:
        return fx * zoom * w

    def sy(fy: float) -> float:
        return fy * zoom * h

    side = min(h, w)
    cx = px(a.cx)

    # Body: torso, shoulders.
    body = np.zeros((h, w), np.float32)
    _ellipse(body, cx, py(a.body_cy), sx(a.body_hw), sy(a.body_hh))
    _ellipse(body, cx, py(a.lung_cy - a.lung_hh * 1.05), sx(a.body_hw * 1.12), sy(0.11))
    body = _blur(body, 0.03 * side)

    # Lungs, cut at the bottom by the diaphragm domes.
    lungs = np.zeros((h, w), np.float32)
    domes = []
    for s in (-1, 1):
        lx = px(a.cx + s * a.lung_dx)
        _ellipse(lungs, lx, py(a.lung_cy), sx(a.lung_hw), sy(a.lung_hh), angle=s * 4.0)
        dome_top = a.lung_cy + a.lung_hh * rng.uniform(0.62, 0.78)
        domes.append((lx, dome_top))
    for lx, dome_top in domes:
        _ellipse(lungs, lx, py(dome_top + 0.2), sx(a.lung_hw * 1.5), sy(0.2), value=0.0)
    lungs = _blur(lungs, 0.018 * side)

    density = body * a.tissue + rng.uniform(*style.background)
    density -= lungs * body * a.lung_air

    # Mediastinum, spine, heart, clavicles, ribs, hilar vessels: identical for every class.
    mid = np.zeros((h, w), np.float32)
    cv2.rectangle(mid, (round(cx - sx(0.05)), round(py(0.1))), (round(cx + sx(0.05)), h), 0.6, -1)
    cv2.rectangle(mid, (round(cx - sx(0.02)), 0), (round(cx + sx(0.02)), h), 0.5, -1)
    heart = np.zeros((h, w), np.float32)
    _ellipse(heart, px(a.cx + a.heart_dx), py(a.heart_cy), sx(a.heart_ax), sy(a.heart_ay),
             angle=-25.0)
    density += _blur(mid, 0.015 * side) * 0.2 + _blur(heart, 0.035 * side) * 0.28
    bones = np.zeros((h, w), np.float32)
    thick = max(1, round(0.018 * side))
    for s in (-1, 1):
        start = (round(cx + s * sx(0.04)), round(py(a.lung_cy - a.lung_hh * 0.85)))
        end = (round(cx + s * sx(a.lung_dx + a.lung_hw * 1.2)),
               round(py(a.lung_cy - a.lung_hh * 1.02)))
        cv2.line(bones, start, end, 1.0, thick, cv2.LINE_8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rel_x = (xx - cx) / (zoom * w)
    phase = (yy / (zoom * h) + a.rib_curve * rel_x * rel_x - 0.25 * np.abs(rel_x)) / a.rib_spacing
    ribs = np.cos(2 * np.pi * phase)
    ribs *= ribs
    ribs *= ribs
    ribs *= ribs
    density += _blur(bones, 0.006 * side) * 0.12 + ribs * 0.06 * _blur(lungs, 0.04 * side)
    vessels = _smooth_noise(rng, h, w, 9)
    density += lungs * 0.05 * vessels

    # Disease, inside the lungs only.
    if pattern == "covid" and severity > 0:
        haze = np.zeros((h, w), np.float32)
        for s in (-1, 1):
            lx = a.cx + s * a.lung_dx
            weight = severity * rng.uniform(0.75, 1.0)
            _ellipse(haze, px(lx + s * a.lung_hw * 0.45), py(a.lung_cy + a.lung_hh * 0.38),
                     sx(a.lung_hw * 0.62), sy(a.lung_hh * 0.5), value=weight)
        haze = _blur(haze, 0.05 * side)
        mottle = 0.55 + 0.45 * _smooth_noise(rng, h, w, 14)
        density += haze * mottle * lungs * 0.26
    elif pattern == "pneumonia" and severity > 0:
        s = 1 if rng.random() < 0.5 else -1
        lobe = rng.choice(["lower", "upper", "middle"], p=[0.55, 0.25, 0.2])
        lx = a.cx + s * a.lung_dx
        offset = {"lower": 0.42, "upper": -0.4, "middle": 0.08}[str(lobe)]
        consolidation = np.zeros((h, w), np.float32)
        _ellipse(consolidation, px(lx + s * rng.uniform(-0.2, 0.2) * a.lung_hw),
                 py(a.lung_cy + offset * a.lung_hh), sx(a.lung_hw * rng.uniform(0.7, 0.95)),
                 sy(a.lung_hh * rng.uniform(0.3, 0.42)), value=severity)
        consolidation = _blur(consolidation, 0.015 * side)
        texture = 0.8 + 0.2 * _smooth_noise(rng, h, w, 10)
        bronchi = np.zeros((h, w), np.float32)
        for _ in range(3):
            x0 = px(lx - s * a.lung_hw * 0.3)
            y0 = py(a.lung_cy + offset * a.lung_hh)
            angle = rng.uniform(0, 2 * np.pi)
            length = sx(a.lung_hw) * rng.uniform(0.3, 0.6)
            cv2.line(bronchi, (round(x0), round(y0)),
                     (round(x0 + length * np.cos(angle)), round(y0 + length * np.sin(angle))),
                     1.0, max(1, round(0.006 * side)))
        density += consolidation * lungs * (texture * 0.5 - _blur(bronchi, 1.0) * 0.12)

    # Heel effect and a small rotation, then the exposure curve.
    gradient = 1.0 + rng.uniform(-0.08, 0.08) * (xx / w - 0.5) + rng.uniform(-0.06, 0.06) * (
        yy / h - 0.5)
    density = np.clip(density * gradient, 0.0, None)
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-3, 3), 1.0)
    density = cv2.warpAffine(density, matrix, (w, h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)
    density = _blur(density, rng.uniform(*style.blur) * side)
    if (h, w) != (height, width):
        density = cv2.resize(density, (width, height), interpolation=cv2.INTER_CUBIC)
    h, w = height, width
    image = np.power(np.clip(density, 0.0, None) / max(float(density.max()), 1e-6),
                     rng.uniform(*style.gamma))
    image = (image - image.mean()) / max(float(image.std()), 1e-6)
    image = image * rng.uniform(*style.std) + rng.uniform(*style.mean)
    if style.collimation > 0:
        margin_x = round(w * style.collimation * rng.uniform(0.6, 1.4))
        margin_y = round(h * style.collimation * rng.uniform(0.6, 1.4))
        image[:margin_y], image[h - margin_y:] = 0.03, 0.03
        image[:, :margin_x], image[:, w - margin_x:] = 0.03, 0.03
    if artifact:
        plant_source_marker(image, rng)
    image += rng.standard_normal(size=image.shape, dtype=np.float32) * rng.uniform(*style.noise)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def plant_source_marker(image: np.ndarray, rng: np.random.Generator) -> None:
    """Burn a bright corner label block and a light frame into ``image`` (float, in place).

    This is the kind of source artefact (a hospital's burnt-in marker, a scanned page's margin)
    that lets a model recognise where an image came from instead of what it shows.
    """
    h, w = image.shape
    frame = max(2, round(0.03 * min(h, w)))
    image[:frame, :], image[-frame:, :] = 0.9, 0.9
    image[:, :frame], image[:, -frame:] = 0.9, 0.9
    x0, y0 = frame + round(0.02 * w), frame + round(0.02 * h)
    bw, bh = max(6, round(0.2 * w)), max(4, round(0.08 * h))
    image[y0:y0 + bh, x0:x0 + bw] = 0.98
    step = max(2, bw // 6)
    for k in range(5):  # dark "letters" in the label
        lx = x0 + step // 2 + k * step
        image[y0 + bh // 4:y0 + 3 * bh // 4, lx:lx + max(1, step // 2)] = rng.uniform(0.1, 0.3)


def render_lateral(rng: np.random.Generator, height: int, width: int, anatomy: Anatomy,
                   style: Style = TRAIN_STYLE) -> np.ndarray:
    """A lateral (L) chest view: one lung field, spine at the back, heart in front."""
    h, w = height, width
    side = min(h, w)
    body = np.zeros((h, w), np.float32)
    _ellipse(body, w * 0.5, h * 0.58, w * 0.36, h * 0.62)
    lung = np.zeros((h, w), np.float32)
    _ellipse(lung, w * 0.52, h * anatomy.lung_cy, w * 0.25, h * anatomy.lung_hh, angle=-8)
    _ellipse(lung, w * 0.55, h * (anatomy.lung_cy + 0.42), w * 0.4, h * 0.18, value=0.0)
    spine = np.zeros((h, w), np.float32)
    cv2.rectangle(spine, (round(w * 0.74), 0), (round(w * 0.82), h), 1.0, -1)
    heart = np.zeros((h, w), np.float32)
    _ellipse(heart, w * 0.38, h * 0.62, w * 0.14, h * 0.13)
    density = _blur(body, 0.03 * side) * anatomy.tissue + rng.uniform(*style.background)
    density += _blur(spine, 0.01 * side) * 0.2 + _blur(heart, 0.02 * side) * 0.2
    density -= _blur(lung, 0.02 * side) * anatomy.lung_air
    return _expose(rng, np.clip(density, 0.0, None), style)


def render_ct_slice(rng: np.random.Generator, size: int, pattern: str,
                    severity: float) -> np.ndarray:
    """An axial CT slice: body outline, two dark lungs, vertebra, heart; GGO patches if covid."""
    h = w = size
    side = size
    body = np.zeros((h, w), np.float32)
    _ellipse(body, w * 0.5, h * 0.52, w * 0.44, h * 0.32)
    lungs = np.zeros((h, w), np.float32)
    for s in (-1, 1):
        _ellipse(lungs, w * (0.5 + s * 0.2), h * 0.5, w * 0.15, h * 0.22)
    organs = np.zeros((h, w), np.float32)
    _ellipse(organs, w * 0.5, h * 0.78, w * 0.05, h * 0.05)
    _ellipse(organs, w * 0.53, h * 0.42, w * 0.1, h * 0.09)
    density = body * 0.55 - lungs * 0.5 + organs * 0.35
    if pattern == "covid":
        patches = np.zeros((h, w), np.float32)
        for _ in range(4):
            s = rng.choice([-1, 1])
            _ellipse(patches, w * (0.5 + s * rng.uniform(0.27, 0.33)), h * rng.uniform(0.4, 0.65),
                     w * 0.05, h * 0.07, value=severity)
        density += _blur(patches, 0.03 * side) * lungs * 0.35
    density = _blur(np.clip(density, 0.0, None), 0.006 * side)
    return _expose(rng, density, TRAIN_STYLE)


def _expose(rng: np.random.Generator, density: np.ndarray, style: Style) -> np.ndarray:
    image = np.power(density / max(float(density.max()), 1e-6), rng.uniform(*style.gamma))
    image = (image - image.mean()) / max(float(image.std()), 1e-6)
    image = image * rng.uniform(*style.std) + rng.uniform(*style.mean)
    image = image + rng.normal(0.0, rng.uniform(*style.noise), size=image.shape).astype(np.float32)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_image(gray: np.ndarray, fmt: str, rgb: bool, quality: int = 90) -> bytes:
    """Encode a grey image as ``jpeg`` or ``png``, 1-channel or RGB-encoded grey (deterministic)."""
    pixels = cv2.merge([gray, gray, gray]) if rgb else gray
    if fmt == "png":
        ok, buffer = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        ok, buffer = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV only fails on invalid input
        raise RuntimeError(f"could not encode a {fmt} image")
    return buffer.tobytes()


def nifti_volume(rng: np.random.Generator, size: int = 24, slices: int = 6) -> bytes:
    """A tiny gzipped NIfTI-1 CT volume (int16, Hounsfield-like), as the dataset's ``volumes/``."""
    volume = np.stack([render_ct_slice(rng, size, "covid", 0.6) for _ in range(slices)], axis=-1)
    data = (volume.astype(np.int16) * 8 - 1000).transpose(2, 1, 0).astype("<i2").tobytes()
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, size, size, slices, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, 4, 16)  # datatype int16, bitpix
    struct.pack_into("<8f", header, 76, 1.0, 0.8, 0.8, 5.0, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", header, 108, 352.0)  # vox_offset
    header[344:348] = b"n+1\x00"
    return gzip.compress(bytes(header) + b"\x00" * 4 + data, mtime=0)


# --------------------------------------------------------------------------------------------
# The COVID collection: metadata plan
# --------------------------------------------------------------------------------------------

@dataclass
class CovidRow:
    """One metadata.csv row plus what to draw for it."""

    values: dict[str, str]
    pattern: str  # covid | pneumonia | normal
    kind: str  # frontal | lateral | ct_slice | ct_volume
    severity: float
    fmt: str
    rgb: bool
    missing: bool = False
    heldout: bool = False  # dated March 2020 or later
    size: tuple[int, int] = (0, 0)
    anatomy_key: int = 0


_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
_LOCATIONS = (
    "Wuhan Jinyintan Hospital, Wuhan, Hubei Province, China", "Brescia, Italy",
    "Hospital Universitario Severo Ochoa, Madrid, Spain", "Seattle, United States",
    "Changhua Christian Hospital, Changhua City, Taiwan ", "Toronto, Ontario, Canada",
    "Padova, Italy", "South Korea", "United Kingdom", "",
)
_LICENSES = ("CC BY-NC-SA", "CC BY-NC-SA 4.0", "CC BY 4.0", "Apache 2.0", "")
_NOTES = (
    "Bilateral peripheral ground-glass opacities, predominantly in the lower zones.",
    "Patchy, bilateral opacities; \"crazy paving\" on CT. Heart size normal.",
    "Subtle haziness at both lung bases, more on the right, compared with the prior film.",
    "Chest radiograph shows ill-defined opacities in the periphery of both lower lobes.",
    "",
)


def format_date(day: date, style: str) -> str:
    """The date formats found in the real metadata.csv."""
    if style == "long":
        return f"{_MONTHS[day.month - 1]} {day.day}, {day.year}"
    if style == "short":
        return f"{_MONTHS[day.month - 1][:3]} {day.day}, {day.year}"
    if style == "us":
        return f"{day.month}/{day.day}/{day.year}"
    if style == "noyear":
        return f"{_MONTHS[day.month - 1]} {day.day}"
    if style == "year":
        return str(day.year)
    return ""


def _covid_filename(rng: np.random.Generator, style: str, patient: int, image: int, fmt: str,
                    view: str) -> str:
    ext = ".png" if fmt == "png" else (".jpeg" if rng.random() < 0.5 else ".jpg")
    letter = "abcdefgh"[image]
    if style == "uuid":
        parts = [8, 4, 4, 4, 12]
        return "-".join("".join(f"{v:X}" for v in rng.integers(0, 16, n)) for n in parts) + ext
    if style == "radiopaedia":
        return "".join(f"{v:x}" for v in rng.integers(0, 16, 30)) + "_jumbo" + ext
    if style == "eurorad":
        return f"{16000 + patient * 7}_{image + 1}_1{ext}"
    if style == "springer":
        return f"{patient % 900 + 11}_2020_{1000 + patient * 3}_Fig{image + 1}_HTML-{letter}{ext}"
    if style == "nejm":
        return f"nejmoa{2000000 + patient * 13}_f{image + 1}-{view.replace(' ', '')}{ext}"
    return f"covid-19-pneumonia-{patient}-{view.replace(' ', '')}-day{image * 3}{ext}"


def _row_values(patient: int, offset: str, finding: str, view: str, modality: str,
                day_text: str, folder: str, filename: str, rng: np.random.Generator,
                demographics: tuple[str, str, str]) -> dict[str, str]:
    sex, age, location = demographics
    yes_no = ("Y", "N", "")
    values = dict.fromkeys(METADATA_COLUMNS, "")
    values.update({
        "patientid": str(patient), "offset": offset, "sex": sex, "age": age, "finding": finding,
        "RT_PCR_positive": "Y" if "COVID" in finding else "",
        "survival": str(rng.choice(yes_no)), "intubated": str(rng.choice(yes_no)),
        "went_icu": str(rng.choice(yes_no)),
        "temperature": f"{rng.uniform(36.5, 39.8):.1f}" if rng.random() < 0.3 else "",
        "pO2_saturation": str(int(rng.integers(82, 99))) if rng.random() < 0.2 else "",
        "view": view, "modality": modality, "date": day_text, "location": location,
        "folder": folder, "filename": filename,
        "doi": f"10.{int(rng.integers(1000, 9999))}/demo.{patient}" if rng.random() < 0.6 else "",
        "url": f"https://{DEMO_SITES[patient % len(DEMO_SITES)]}/case/{patient}",
        "license": str(rng.choice(_LICENSES)), "clinical_notes": str(rng.choice(_NOTES)),
        "other_notes": "Synthetic demo case (covid-xray)" if rng.random() < 0.3 else "",
    })
    return values


def plan_covid_rows(params: DemoParams, seed: int) -> list[CovidRow]:
    """Decide every metadata row (deterministically) before any pixel is drawn."""
    rng = _rng(seed, _STREAM_PLAN)
    n_covid = params.covid_patients
    n_other = max(2, round(n_covid * 0.2))
    ids = rng.permutation(np.arange(2, 2 + (n_covid + n_other) * 3))[: n_covid + n_other]
    n_late = max(1, round(n_covid * HELDOUT_SHARE))
    late = set(rng.choice(n_covid, size=n_late, replace=False).tolist())
    name_styles = ("uuid", "radiopaedia", "eurorad", "springer", "nejm", "plain")
    rows: list[CovidRow] = []
    used: set[str] = set()

    def unique_name(style: str, patient: int, image: int, fmt: str, view: str) -> str:
        name = _covid_filename(rng, style, patient, image, fmt, view)
        stem, suffix = name.split(".", 1)
        attempt = 1
        while name in used:
            attempt += 1
            name = f"{stem}-{attempt}.{suffix}"
        used.add(name)
        return name

    for index in range(n_covid + n_other):
        patient = int(ids[index])
        is_covid = index < n_covid
        if is_covid:
            finding, pattern = COVID_FINDING, "covid"
        else:
            finding, pattern = OTHER_FINDINGS[index % len(OTHER_FINDINGS)]
        sex = str(rng.choice(["M", "F", ""], p=[0.5, 0.35, 0.15]))
        age = str(int(rng.integers(22, 90))) if rng.random() < 0.8 else ""
        demographics = (sex, age, str(rng.choice(_LOCATIONS)))
        if is_covid and index in late:
            start = date(2020, 3, 1) + timedelta(days=int(rng.integers(0, 50)))
            date_style = str(rng.choice(["long", "short", "us"]))
        else:
            start = date(2019, 12, 20) + timedelta(days=int(rng.integers(0, 50)))
            date_style = str(rng.choice(["long", "short", "us", "year", "empty", "noyear"],
                                        p=[0.25, 0.15, 0.15, 0.3, 0.1, 0.05]))
            if not is_covid and rng.random() < 0.5:
                start = date(int(rng.choice([2004, 2015, 2017, 2019])), 5, 10)
        name_style = str(rng.choice(name_styles))
        severity_base = rng.uniform(0.15, 1.0)
        n_images = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
        offsets = sorted(int(o) for o in rng.choice(np.arange(0, 10), n_images, replace=False))
        key = int(rng.integers(0, 2**31))
        for image, offset in enumerate(offsets):
            day = start + timedelta(days=offset)
            if not (is_covid and index in late) and day >= date(2020, 3, 1):
                day = date(2020, 2, 29) - timedelta(days=n_images - image)
            views = ["PA"]
            if rng.random() < 0.2:
                views.append("L")
            if rng.random() < 0.12:
                views.append(str(rng.choice(["AP", "AP Supine"])))
            if not is_covid and rng.random() < 0.5:
                views[0] = str(rng.choice(["PA", "AP", "AP Supine"]))
            for view in views:
                fmt = "png" if rng.random() < 0.18 else "jpeg"
                rgb = bool(rng.random() < 0.3)
                name = unique_name(name_style, patient, image, fmt, view)
                severity = float(np.clip(severity_base * rng.uniform(0.75, 1.25), 0.1, 1.0))
                rows.append(CovidRow(
                    values=_row_values(patient, str(offset), finding, view, "X-ray",
                                       format_date(day, date_style), "images", name, rng,
                                       demographics),
                    pattern=pattern, kind="lateral" if view == "L" else "frontal",
                    severity=severity, fmt=fmt, rgb=rgb, heldout=day >= date(2020, 3, 1),
                    anatomy_key=key))
        if rng.random() < 0.15:  # CT: a slice image and/or a volume
            for k, kind in enumerate(["ct_slice", "ct_volume"][: int(rng.integers(1, 3))]):
                if kind == "ct_volume":
                    name, folder, fmt = f"demo_ct_{patient:04d}.nii.gz", "volumes", "nii"
                else:
                    name = unique_name(name_style, patient, 5 + k, "jpeg", "CT")
                    folder, fmt = "images", "jpeg"
                used.add(name)
                rows.append(CovidRow(
                    values=_row_values(patient, str(offsets[0]), finding,
                                       str(rng.choice(["Axial", "Coronal"])), "CT",
                                       format_date(start, date_style), folder, name, rng,
                                       demographics),
                    pattern=pattern, kind=kind, severity=severity_base, fmt=fmt, rgb=False,
                    anatomy_key=key))

    # Trailing spaces on some COVID findings (as in the real file).
    for row in rows:
        if row.values["finding"] == COVID_FINDING and rng.random() < 0.1:
            row.values["finding"] = COVID_FINDING + " "
    # A few rows whose image was never downloaded: COVID PA X-rays dated before March 2020.
    candidates = [i for i, r in enumerate(rows)
                  if r.pattern == "covid" and r.kind == "frontal" and r.values["view"] == "PA"
                  and r.values["finding"].startswith(COVID_FINDING) and not r.heldout]
    n_missing = max(1, round(n_covid / 25))
    for i in rng.choice(candidates, size=min(n_missing, len(candidates)), replace=False):
        rows[int(i)].missing = True
    # Image sizes, drawn from the one distribution all classes share.
    for row in rows:
        row.size = image_size(rng, params.max_side)
    first_id = 2 + (n_covid + n_other) * 3  # beyond every id drawn above
    return rows + plan_collection_negatives(params, seed, first_id)


def plan_collection_negatives(params: DemoParams, seed: int, first_id: int) -> list[CovidRow]:
    """The collection's own non-COVID PA X-rays: ``params.collection_negatives`` patients with
    1-3 images, findings in turn from :data:`COLLECTION_NEGATIVE_FINDINGS`, dated 2004-2019
    (about one patient in seven in March-April 2020: held out), from the COVID images' sites.

    A stream of their own, appended after every other row: the rest of the demo is unchanged.
    """
    rng = _rng(seed, _STREAM_NEGATIVES)
    rows: list[CovidRow] = []
    ids = first_id + rng.permutation(params.collection_negatives * 3)[
        : params.collection_negatives]
    for index, patient in enumerate(int(i) for i in ids):
        finding, pattern = COLLECTION_NEGATIVE_FINDINGS[index % len(COLLECTION_NEGATIVE_FINDINGS)]
        late = rng.random() < 1 / 7
        start = (date(2020, 3, 1) + timedelta(days=int(rng.integers(0, 50))) if late
                 else date(int(rng.integers(2004, 2020)), int(rng.integers(1, 13)), 10))
        date_style = "long" if late else str(rng.choice(["long", "year", "us"]))
        demographics = (str(rng.choice(["M", "F"])), str(int(rng.integers(22, 90))),
                        str(rng.choice(_LOCATIONS)))
        severity_base = rng.uniform(0.15, 1.0) if pattern != "normal" else 0.0
        key = int(rng.integers(0, 2**31))
        for image in range(int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))):
            fmt = "png" if rng.random() < 0.18 else "jpeg"
            name = f"demo-negative-{patient}-{image + 1}.{'png' if fmt == 'png' else 'jpeg'}"
            values = _row_values(patient, str(image * 2), finding, "PA", "X-ray",
                                 format_date(start + timedelta(days=image * 2), date_style),
                                 "images", name, rng, demographics)
            values["clinical_notes"] = NEGATIVE_NOTES[finding == "No Finding"]
            rows.append(CovidRow(
                values=values,
                pattern=pattern, kind="frontal",
                severity=float(np.clip(severity_base * rng.uniform(0.75, 1.25), 0.0, 1.0)),
                fmt=fmt, rgb=bool(rng.random() < 0.3), heldout=late, anatomy_key=key,
                size=image_size(rng, params.max_side)))
    return rows


def _write_metadata(path: Path, rows: list[CovidRow]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow([*METADATA_COLUMNS, ""])
        for row in rows:
            writer.writerow([*(row.values[c] for c in METADATA_COLUMNS), ""])


# --------------------------------------------------------------------------------------------
# Kermany's chest_xray and the external set
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KermanyImage:
    split: str
    label: str  # NORMAL | PNEUMONIA
    filename: str
    patient: str
    kind: str  # normal | bacteria | virus
    anatomy_key: int


def plan_kermany(params: DemoParams, seed: int) -> list[KermanyImage]:
    """Names and patients for chest_xray/{train,test}/{NORMAL,PNEUMONIA}; splits share none."""
    rng = _rng(seed, _STREAM_KERMANY)
    counts = {"train": params.kermany_train, "test": params.kermany_test}
    images: list[KermanyImage] = []
    total = params.kermany_train + params.kermany_test
    normal_ids = rng.permutation(np.arange(100, 100 + total * 3))
    person_ids = rng.permutation(np.arange(1, 1 + total * 3))
    next_normal, next_person = 0, 0
    image_counter = int(rng.integers(1, 50))
    for split in ("train", "test"):
        left = counts[split]
        while left > 0:  # NORMAL: mostly one image per patient
            n = min(left, 2 if rng.random() < 0.1 else 1)
            pid = int(normal_ids[next_normal])
            next_normal += 1
            prefix = "NORMAL2-IM" if rng.random() < 0.4 else "IM"
            key = int(rng.integers(0, 2**31))
            for k in range(n):
                name = (f"{prefix}-{pid:04d}-0001.jpeg" if n == 1
                        else f"{prefix}-{pid:04d}-0001-{k + 1:04d}.jpeg")
                images.append(KermanyImage(split, "NORMAL", name, f"{prefix}-{pid:04d}",
                                           "normal", key))
            left -= n
        left = counts[split]
        while left > 0:  # PNEUMONIA: 1-3 images per patient
            n = min(left, int(rng.choice([1, 2, 3], p=[0.6, 0.28, 0.12])))
            pid = int(person_ids[next_person])
            next_person += 1
            kind = "bacteria" if rng.random() < 0.65 else "virus"
            key = int(rng.integers(0, 2**31))
            for _ in range(n):
                image_counter += int(rng.integers(1, 4))
                images.append(KermanyImage(split, "PNEUMONIA",
                                           f"person{pid}_{kind}_{image_counter}.jpeg",
                                           f"person{pid}", kind, key))
            left -= n
    return images


# --------------------------------------------------------------------------------------------
# The whole data set
# --------------------------------------------------------------------------------------------

def _anatomy(seed: int, key: int) -> Anatomy:
    return Anatomy.draw(_rng(seed, 9, key))


def _covid_pixels(row: CovidRow, seed: int, index: int, artifact: bool) -> bytes:
    rng = _rng(seed, _STREAM_COVID, index)
    h, w = row.size
    if row.kind == "ct_volume":
        return nifti_volume(rng)
    if row.kind == "ct_slice":
        gray = render_ct_slice(rng, min(h, w), row.pattern, row.severity)
    elif row.kind == "lateral":
        gray = render_lateral(rng, h, w, _anatomy(seed, row.anatomy_key))
    else:
        gray = render_chest(rng, h, w, _anatomy(seed, row.anatomy_key), row.pattern,
                            row.severity, artifact=artifact)
    return encode_image(gray, row.fmt, row.rgb, int(rng.integers(80, 96)))


def _kermany_pixels(item: KermanyImage, seed: int, index: int, max_side: int) -> bytes:
    rng = _rng(seed, _STREAM_KERMANY, 1, index)
    h, w = image_size(rng, max_side)
    if item.label == "NORMAL":
        pattern, severity = "normal", 0.0
    else:
        pattern = "pneumonia"
        severity = rng.uniform(0.25, 1.0) if item.kind == "bacteria" else rng.uniform(0.15, 0.8)
    gray = render_chest(rng, h, w, _anatomy(seed + 1, item.anatomy_key), pattern, severity)
    return encode_image(gray, "jpeg", bool(rng.random() < 0.15), int(rng.integers(80, 96)))


def _external_pixels(label: str, seed: int, index: int, max_side: int) -> tuple[bytes, str]:
    rng = _rng(seed, _STREAM_EXTERNAL, 1 if label == "covid" else 2, index)
    h, w = image_size(rng, max_side)
    anatomy = Anatomy.draw(rng)
    severity = rng.uniform(0.15, 1.0) if label == "covid" else 0.0
    gray = render_chest(rng, h, w, anatomy, label, severity, style=EXTERNAL_STYLE)
    fmt = "png" if rng.random() < 0.3 else "jpeg"
    return encode_image(gray, fmt, bool(rng.random() < 0.3), int(rng.integers(75, 90))), fmt


def external_count(params: DemoParams) -> int:
    """Images per class in the demo external set (20 at the default 70 COVID patients)."""
    return max(4, round(params.covid_patients * 2 / 7))


def _write(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


def _jobs(target: Path, params: DemoParams, seed: int, rows: list[CovidRow],
          kermany: list[KermanyImage]) -> Iterator[tuple[Path, Any]]:
    covid_root = target / "covid-chestxray-dataset"
    for index, row in enumerate(rows):
        if not row.missing:
            path = covid_root / row.values["folder"] / row.values["filename"]
            yield path, (_covid_pixels, row, seed, index,
                         params.plant_artifact and row.pattern == "covid"
                         and row.values["finding"].startswith(COVID_FINDING))
    for index, item in enumerate(kermany):
        yield (target / "chest_xray" / item.split / item.label / item.filename,
               (_kermany_pixels, item, seed, index, params.max_side))


def generate_demo(target: Path, params: DemoParams, seed: int, progress: bool = True) -> dict:
    """Write the demo data set into ``target`` (an empty folder) and return its counts.

    Deterministic: the same ``params`` and ``seed`` give byte-identical files.
    """
    target = Path(target)
    rows = plan_covid_rows(params, seed)
    kermany = plan_kermany(params, seed)
    covid_root = target / "covid-chestxray-dataset"
    (covid_root / "images").mkdir(parents=True, exist_ok=True)
    (covid_root / "volumes").mkdir(parents=True, exist_ok=True)
    _write_metadata(covid_root / "metadata.csv", rows)
    for split in ("train", "test"):
        for label in ("NORMAL", "PNEUMONIA"):
            (target / "chest_xray" / split / label).mkdir(parents=True, exist_ok=True)

    jobs = list(_jobs(target, params, seed, rows, kermany))
    n_external = external_count(params)
    def run(job: tuple[Path, Any]) -> None:
        path, (func, *args) = job
        _write(path, func(*args))

    # Each image has its own seed, so threads (OpenCV and NumPy release the GIL) change nothing.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for _ in tqdm(pool.map(run, jobs), total=len(jobs), desc="demo images", unit="img",
                      disable=not progress, leave=False):
            pass
    external_files: dict[str, int] = {}
    for label in ("covid", "normal"):
        for index in range(n_external):
            payload, fmt = _external_pixels(label, seed, index, params.max_side)
            uid = 20200400000000 + index * 7919 + (0 if label == "covid" else 3_000_000)
            ext = ".png" if fmt == "png" else ".jpg"
            _write(target / "external" / label / f"CR.1.2.840.113564.{uid}.1003000225002{ext}",
                   payload)
        external_files[label] = n_external

    return demo_counts(rows, kermany, external_files, params)


def demo_counts(rows: list[CovidRow], kermany: list[KermanyImage],
                external: dict[str, int], params: DemoParams) -> dict:
    """What the demo wrote, for SOURCE.json and the stage log."""
    def is_selectable(row: CovidRow) -> bool:
        v = row.values
        return (v["finding"].strip().endswith("COVID-19") and v["view"] == "PA"
                and v["modality"] == "X-ray")

    selectable = [r for r in rows if is_selectable(r)]
    kermany_counts: dict[str, dict[str, int]] = {}
    for item in kermany:
        split = kermany_counts.setdefault(item.split, {"NORMAL": 0, "PNEUMONIA": 0})
        split[item.label] += 1
    covid_images = sum(1 for r in rows if not r.missing and r.values["folder"] == "images")
    return {
        "covid_rows": len(rows),
        "metadata_patients": len({r.values["patientid"] for r in rows}),
        "covid_images": covid_images,
        "covid_volumes": sum(1 for r in rows if not r.missing and r.values["folder"] == "volumes"),
        "covid_missing_files": sum(1 for r in rows if r.missing),
        "covid_pa_xray_rows": len(selectable),
        "covid_pa_xray_from_2020_03": sum(1 for r in selectable if r.heldout),
        "collection_negative_rows": sum(1 for r in rows
                                        if r.values["filename"].startswith("demo-negative-")),
        "kermany": kermany_counts,
        "kermany_images": len(kermany),
        "external": external,
        "images": covid_images + len(kermany) + sum(external.values()),
        "plant_artifact": params.plant_artifact,
        "generator_version": GENERATOR_VERSION,
    }


def generate_folder(target: Path, counts: dict[str, int], seed: int, max_side: int = 320) -> dict:
    """A labelled folder of negatives from a third site (``<target>/<label>/site3-<k>.png``):
    what ``copy.folders`` reads (tests and benchmarks on the demo; real adult sets take its
    place). ``counts``: images per label (``normal``, ``pneumonia``); one patient per image."""
    for offset, (label, count) in enumerate(sorted(counts.items())):
        for index in range(count):
            rng = _rng(seed, _STREAM_FOLDER, offset, index)
            h, w = image_size(rng, max_side)
            severity = rng.uniform(0.25, 1.0) if label == "pneumonia" else 0.0
            gray = render_chest(rng, h, w, Anatomy.draw(rng), label, severity,
                                style=FOLDER_STYLE)
            _write(Path(target) / label / f"site3-{index:04d}.png", encode_image(gray, "png",
                                                                                 False))
    return dict(counts)
