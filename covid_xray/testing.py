"""Stand-in models and images for tests and benchmarks: not used by the pipeline or the server.

The service must be testable without running the pipeline (minutes), so these build small real
classifiers in the pipeline's saved format from the synthetic demo images (plus the real X-ray
sample when present). They live here, not in ``predict``, so the serving code holds no test
scaffolding; the end-to-end test that serves pipeline-trained models lives in ``tests/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from covid_xray import imaging, ood
from covid_xray.config import MODEL_NAMES, NEGATIVE_CLASS, POSITIVE_CLASS
from covid_xray.modeling import (
    ModelInfo,
    assemble_classifier,
    build_backbone,
    build_head,
    pooled_features,
    save_classifier,
)
from covid_xray.params import Preprocessing

SMOKE_CLASSES: dict[str, tuple[str, str]] = {name: (POSITIVE_CLASS, NEGATIVE_CLASS[name])
                                             for name in MODEL_NAMES}


def demo_images_by_class(per_class: int = 12, max_side: int = 160,
                         seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Synthetic chest images from the project's demo generator, as uint8 RGB per class."""
    import tempfile

    from covid_xray.demo import generate_demo
    from covid_xray.params import DemoParams

    params = DemoParams(covid_patients=max(6, per_class), kermany_train=max(4, per_class),
                        kermany_test=2, max_side=max_side)  # the smallest data.demo allows
    with tempfile.TemporaryDirectory(prefix="covid-xray-demo-") as tmp:
        root = Path(tmp)
        generate_demo(root, params, seed=seed, progress=False)
        return {**_covid_pa_images(root / "covid-chestxray-dataset", per_class),
                **_kermany_images(root / "chest_xray" / "train", per_class)}


def sample_images_by_class(sample_dir: Path | str,
                           per_class: int = 100) -> dict[str, list[np.ndarray]]:
    """The real X-ray sample (``xray-sample`` layout): COVID PA X-rays and Kermany train images."""
    sample_dir = Path(sample_dir)
    return {**_covid_pa_images(sample_dir / "covid-chestxray-dataset", per_class),
            **_kermany_images(sample_dir / "chest_xray" / "train", per_class)}


def _covid_pa_images(dataset: Path, limit: int) -> dict[str, list[np.ndarray]]:
    import pandas as pd

    table = pd.read_csv(dataset / "metadata.csv", dtype=str).fillna("")
    finding = table["finding"].str.strip().str.split("/").str[-1].str.strip().str.lower()
    keep = table[(finding == "covid-19") & (table["view"].str.strip() == "PA")
                 & (table["modality"].str.strip() == "X-ray")]
    folder = keep["folder"] if "folder" in keep else pd.Series("images", index=keep.index)
    paths = [dataset / f / name for f, name in zip(folder, keep["filename"], strict=True)]
    return {POSITIVE_CLASS: [imaging.load_image(p) for p in paths if p.is_file()][:limit]}


def _kermany_images(split_dir: Path, limit: int) -> dict[str, list[np.ndarray]]:
    return {label.lower(): [imaging.load_image(p) for p in sorted((split_dir / label).iterdir())
                            if p.is_file()][:limit]
            for label in ("NORMAL", "PNEUMONIA")}


def ensure_smoke_models(models_dir: Path | str, sample_dir: Path | str | None = None,
                        img_size: int = 32, pool_size: int = 1) -> Path:
    """``build_smoke_models`` on demo images (+ the real sample when given), unless already there.

    Tests of several files share one build per session this way (the folder is the cache).
    """
    models_dir = Path(models_dir)
    if all((models_dir / f"{name}{ext}").is_file() for name in MODEL_NAMES
           for ext in (".keras", ".json")):
        return models_dir
    images = demo_images_by_class()
    source = ("demo", "synthetic demo images (stand-in test models)")
    if sample_dir is not None:
        for label, extra in sample_images_by_class(sample_dir).items():
            images[label] = [*images[label], *extra]
        source = (f"local:{Path(sample_dir).name}", "synthetic demo images plus the real X-ray "
                  f"sample {Path(sample_dir).name}/ (stand-in test models)")
    return build_smoke_models(models_dir, images, img_size=img_size, pool_size=pool_size,
                              training_source=source)


def build_smoke_models(models_dir: Path | str, images_by_class: dict[str, Sequence[np.ndarray]],
                       img_size: int = 32, pool_size: int = 1, dense_nodes: int = 8,
                       epochs: int = 10, seed: int = 0,
                       preprocessing: Preprocessing = imaging.DEFAULT_PREPROCESSING,
                       training_source: tuple[str, str] = ("demo", "synthetic demo images")
                       ) -> Path:
    """Write real (small) classifiers in the pipeline's saved format, without the pipeline.

    One random frozen VGG16 backbone (``weights=none``, shared by both models as after one
    featurize run); each head briefly fitted on its two classes of ``images_by_class`` (uint8
    RGB; keys ``covid``, ``normal``, ``pneumonia``); OOD statistics fitted on the same images,
    as the train stage does; ``training_source`` is the sidecar's ``(training_source,
    training_data)``. The verdicts mean nothing medically; the files exercise every code
    path of the service exactly as the pipeline's models do. ``preprocessing`` is applied to the
    images and recorded in the sidecars, as featurize and train do.
    """
    from covid_xray.tf_runtime import keras
    from covid_xray.training import LOSS

    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    backbone = build_backbone("vgg16", img_size, "none", seed=seed)
    maps: dict[str, np.ndarray] = {}
    for label, images in images_by_class.items():
        batch = np.stack([imaging.prepare_rgb(image, img_size, preprocessing)
                          for image in images])
        maps[label] = np.asarray(backbone.predict(batch, batch_size=16, verbose=0))
    for offset, (name, (positive, negative)) in enumerate(SMOKE_CLASSES.items()):
        feature_maps = np.concatenate([maps[positive], maps[negative]])
        y = np.array([1] * len(maps[positive]) + [0] * len(maps[negative]), dtype=np.float32)
        features = pooled_features(feature_maps, pool_size)
        keras.utils.set_random_seed(seed + 1 + offset)
        head = build_head(feature_maps.shape[1:], pool_size, dense_nodes, 0.5,
                          features.mean(axis=0), features.var(axis=0))
        head.compile(optimizer=keras.optimizers.Adam(3e-3), loss=LOSS)
        head.fit(feature_maps, np.stack([y, 1 - y], axis=1), epochs=epochs, batch_size=16,
                 verbose=0)
        info = ModelInfo(model_name=name, class_names=[positive, negative],
                         positive_class=POSITIVE_CLASS, img_size=img_size,
                         preprocess=preprocessing, backbone="vgg16",
                         weights="none", threshold=0.5, revision="smoke-test",
                         params={"pool_size": pool_size, "dense_nodes": dense_nodes,
                                 "epochs": epochs, "seed": seed},
                         ood=ood.fit_ood_stats(features, seed=seed),
                         training_source=training_source[0], training_data=training_source[1])
        save_classifier(assemble_classifier(backbone, head, name), info,
                        models_dir / f"{name}.keras")
    return models_dir
