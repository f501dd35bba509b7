"""The model builder and the saved format: round trip, offline ImageNet, weights files."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from covid_xray.errors import PipelineError
from covid_xray.modeling import (
    Classifier,
    ModelInfo,
    ModelLoadError,
    assemble_classifier,
    build_backbone,
    build_head,
    pooled_features,
    save_classifier,
)


def _tiny_classifier(tmp_path: Path, backbone_name: str = "vgg16") -> Path:
    backbone = build_backbone(backbone_name, 32, "none", seed=1)
    shape = tuple(backbone.output_shape[1:])
    head = build_head(shape, pool_size=1, dense_nodes=4, dropout=0.5,
                      mean=np.zeros(shape[-1]), variance=np.ones(shape[-1]))
    model = assemble_classifier(backbone, head, "covid_normal")
    info = ModelInfo(model_name="covid_normal", class_names=["covid", "normal"],
                     positive_class="covid", img_size=32, backbone=backbone_name,
                     weights="none", threshold=0.3)
    path = tmp_path / "covid_normal.keras"
    save_classifier(model, info, path)
    return path


def test_round_trip_keeps_predictions_and_info(tmp_path: Path) -> None:
    path = _tiny_classifier(tmp_path)
    loaded = Classifier.load(path)
    assert loaded.info.class_names == ["covid", "normal"]
    assert loaded.info.positive_index == 0 and loaded.info.threshold == 0.3
    batch = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)
    scores = loaded.covid_scores(batch)
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 1))
    assert np.allclose(Classifier.load(path).covid_scores(batch), scores)
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_random_backbone_is_seeded() -> None:
    first = build_backbone("vgg16", 32, "none", seed=7).get_weights()[0]
    again = build_backbone("vgg16", 32, "none", seed=7).get_weights()[0]
    other = build_backbone("vgg16", 32, "none", seed=8).get_weights()[0]
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_mobilenetv2_is_accepted(tmp_path: Path) -> None:
    assert Classifier.load(_tiny_classifier(tmp_path, "mobilenetv2")).info.backbone == "mobilenetv2"


def test_local_weights_file_is_loaded(tmp_path: Path) -> None:
    source = build_backbone("vgg16", 32, "none", seed=3)
    weights = tmp_path / "backbone.weights.h5"
    source.save_weights(weights)
    loaded = build_backbone("vgg16", 32, str(weights), seed=99)
    assert np.array_equal(loaded.get_weights()[0], source.get_weights()[0])


def test_imagenet_offline_fails_fast_with_instructions(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no cached weights file here
    started = time.monotonic()
    try:
        build_backbone("vgg16", 32, "imagenet", seed=0)
    except PipelineError as exc:
        assert "model.weights" in str(exc) and "none" in str(exc)
        assert time.monotonic() - started < 30
    else:  # a machine with internet downloads the real weights: also fine
        pass


def test_missing_and_broken_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"covid_normal\.keras"):
        Classifier.load(tmp_path / "covid_normal.keras")
    path = _tiny_classifier(tmp_path)
    path.with_suffix(".json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"covid_normal\.json"):
        Classifier.load(path)


def test_pooled_features_match_the_keras_pooling() -> None:
    import keras

    maps = np.random.default_rng(0).random((2, 7, 7, 3)).astype(np.float32)
    for pool in (1, 2, 3, 4, 7):
        layer = keras.layers.AveragePooling2D(pool_size=(pool, pool), padding="same")
        expected = layer(maps).numpy().reshape(2, -1)
        assert np.allclose(pooled_features(maps, pool), expected, atol=1e-6), pool
    # the whole map reaches the head: the bottom-right cell changes the pooled vector
    changed = maps.copy()
    changed[:, 6, 6, :] += 10.0
    assert not np.allclose(pooled_features(changed, 4), pooled_features(maps, 4))
