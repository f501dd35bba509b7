"""Shortcut probe on a real data folder, for several ``preprocess`` settings: does a
harmonisation hide the source from what the model sees?

For each setting, the probe stage's own functions (``covid_xray.probe``) measure COVID PA X-rays
(``select_covid`` with the default ``select`` params, held-out months included) against Kermany
NORMAL images (train and test): cross-validated AUC, grouped by patient, of a linear classifier on
trivial statistics and on an untrained backbone's features, on the files (``raw``: the same in
every row) and on the model's input (``model_input``: ``imaging.model_view`` with the setting at
``--img-size``; the backbone at the probe's own size, min(img_size, 64)). Lower model-input AUCs
mean the setting hides more of what separates the sources. External sets are never read.

    nice python benchmarks/bench_probe_preprocessing.py --source /path/to/folder --img-size 96

``--source`` holds ``covid-chestxray-dataset/`` and ``chest_xray/`` (a ``data.source`` folder).
Settings are ``key=value`` lists of ``preprocess`` keys (``--setting grayscale=true,equalize=
clahe``); the default list compares the seed's recipe with each harmonisation and a combination.
Prints one table; it is not a test.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import yaml

from covid_xray.datasets import kermany_patient_id
from covid_xray.metadata import select_covid
from covid_xray.params import Preprocessing, SelectParams, parse_preprocessing
from covid_xray.probe import (
    describe_files,
    probe_img_size,
    probe_model,
    probe_random_features,
    unique_records,
)

DEFAULT_SETTINGS = (
    "",  # the seed's recipe
    "grayscale=true",
    "grayscale=true,equalize=hist",
    "grayscale=true,equalize=clahe",
    "crop_border=0.05",
    "crop_border=0.1",
    "resize=pad",
    "resize=center_crop",
    "grayscale=true,equalize=clahe,resize=pad,crop_border=0.05",
    "grayscale=true,equalize=clahe,resize=center_crop,crop_border=0.1",
)


def parse_setting(text: str) -> Preprocessing:
    """``grayscale=true,equalize=clahe`` -> Preprocessing (values read as YAML, as ``-S`` does)."""
    raw = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        raw[key.strip()] = yaml.safe_load(value)
    return parse_preprocessing(raw, f"--setting {text!r}")


def images(source: Path) -> tuple[list[Path], list[str], list[str]]:
    """COVID PA X-rays (training and held-out months) and Kermany NORMAL images, with patients."""
    dataset = source / "covid-chestxray-dataset"
    selection = select_covid(dataset / "metadata.csv", SelectParams())
    covid = [*selection.selected.itertuples(), *selection.heldout.itertuples()]
    normals = sorted((source / "chest_xray").glob("*/NORMAL/*"))
    files = [dataset / r.image_path for r in covid] + normals
    labels = ["covid"] * len(covid) + ["normal"] * len(normals)
    patients = [r.patient_id for r in covid] + [kermany_patient_id(p.name) for p in normals]
    return files, labels, patients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--setting", action="append", help="preprocess settings (repeatable)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    settings = [(text or "seed (defaults)", parse_setting(text))
                for text in (args.setting or DEFAULT_SETTINGS)]
    files, labels, patients = images(args.source)
    size = probe_img_size(args.img_size)
    print(f"{labels.count('covid')} COVID PA X-rays vs {labels.count('normal')} Kermany NORMAL; "
          f"model input {args.img_size} px, untrained {args.backbone} at {size} px; load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| setting | files: statistics | files: untrained backbone | model input: statistics "
          "| model input: untrained backbone | strongest model-input statistics | s |")
    print("|---|---|---|---|---|---|---|")
    for name, prep in settings:
        started = time.perf_counter()
        records, skipped = describe_files(files, size, progress=False, preprocessing=prep,
                                          model_size=args.img_size)
        features = probe_random_features(unique_records(records), args.backbone, args.seed,
                                         progress=False)
        result = probe_model("covid_normal", files, labels, patients, records, features,
                             positive="covid", negative="normal", threshold=0.8, folds=5,
                             seed=args.seed, backbone=args.backbone, img_size=size,
                             model_img_size=args.img_size, preprocessing=prep)
        m = result.metrics()
        top = ", ".join(f"{n} ({c:+.1f})" for n, c in result.model_input.top_trivial[:3])
        print(f"| `{name}` | {m['raw']['stats_auc']:.3f} | {m['raw']['backbone_auc']:.3f} | "
              f"{m['model_input']['stats_auc']:.3f} | {m['model_input']['backbone_auc']:.3f} | "
              f"{top} | {time.perf_counter() - started:.0f} |", flush=True)
        if skipped:
            print(f"  ({len(skipped)} undecodable files skipped, e.g. {skipped[0][1]})")


if __name__ == "__main__":
    main()
