"""The model builder and the saved format: round trip, the model/sidecar binding, offline
ImageNet, weights files."""

from __future__ import annotations

import importlib
import json
import shutil
import socket
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from covid_xray.errors import PipelineError
from covid_xray.io import sha256_file
from covid_xray.modeling import (
    Classifier,
    ModelInfo,
    ModelLoadError,
    assemble_classifier,
    build_backbone,
    build_head,
    pooled_features,
    pretrained_backbone,
    save_classifier,
)
from covid_xray.ood import fit_ood_stats


def _tiny_info(backbone_name: str = "vgg16", dim: int = 512, **changes) -> ModelInfo:
    features = np.random.default_rng(0).random((8, dim))
    info = ModelInfo(model_name="covid_normal", class_names=["covid", "normal"],
                     positive_class="covid", img_size=32, backbone=backbone_name,
                     weights="none", threshold=0.3, ood=fit_ood_stats(features, seed=0))
    return replace(info, **changes)


def _tiny_classifier(tmp_path: Path, backbone_name: str = "vgg16", seed: int = 1,
                     **changes) -> Path:
    backbone = build_backbone(backbone_name, 32, "none", seed=seed)
    shape = tuple(backbone.output_shape[1:])
    head = build_head(shape, pool_size=1, dense_nodes=4, dropout=0.5,
                      mean=np.zeros(shape[-1]), variance=np.ones(shape[-1]))
    model = assemble_classifier(backbone, head, "covid_normal")
    path = tmp_path / "covid_normal.keras"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(model, _tiny_info(backbone_name, int(np.prod(shape)), **changes), path)
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


def test_smallcnn_is_a_backbone_like_the_others(tmp_path: Path) -> None:
    """The pretrain's small CNN: frozen, 1/32 feature map, saved and served like VGG16, with a
    last conv map for Grad-CAM; no ImageNet weights to ask for."""
    from covid_xray.gradcam import gradcam_heatmap

    backbone = build_backbone("smallcnn", 64, "none", seed=1)
    assert backbone.output_shape == (None, 2, 2, 256) and not backbone.trainable_weights
    loaded = Classifier.load(_tiny_classifier(tmp_path, "smallcnn"))
    assert loaded.info.backbone == "smallcnn"
    image = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    assert gradcam_heatmap(loaded, image).shape == (32, 32)
    with pytest.raises(PipelineError, match="no ImageNet weights for the smallcnn"):
        build_backbone("smallcnn", 32, "imagenet", seed=0)


def test_pretrained_weights_load_at_another_input_size(tmp_path: Path) -> None:
    """The pretrain trains at pretrain.img_size; featurize runs the same weights at
    model.img_size (convolutions have no size), and a mismatched file names itself."""
    source = build_backbone("smallcnn", 64, "none", seed=3)
    weights = tmp_path / "backbone.weights.h5"
    source.save_weights(weights)
    at_32 = pretrained_backbone("smallcnn", 32, weights, seed=99)
    assert at_32.input_shape == (None, 32, 32, 3)
    assert all(np.array_equal(a, b) for a, b in zip(at_32.get_weights(), source.get_weights(),
                                                    strict=True))
    with pytest.raises(PipelineError, match=r"backbone\.weights\.h5: cannot load into a vgg16"):
        pretrained_backbone("vgg16", 32, weights, seed=0)


def test_local_weights_file_is_loaded(tmp_path: Path) -> None:
    source = build_backbone("vgg16", 32, "none", seed=3)
    weights = tmp_path / "backbone.weights.h5"
    source.save_weights(weights)
    loaded = build_backbone("vgg16", 32, str(weights), seed=99)
    assert np.array_equal(loaded.get_weights()[0], source.get_weights()[0])


def test_imagenet_offline_fails_fast_with_instructions(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """No cached weights and no route to the download host: one clear error, no download.

    The network is cut for this test only (a refused connection, as offline), so the error path
    runs whatever the machine's access; ImageNet weights are never downloaded by the suite.
    """
    def offline(*args: object, **kwargs: object) -> socket.socket:
        raise OSError("network unreachable (test)")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no cached weights file here
    monkeypatch.setattr(socket, "create_connection", offline)
    with pytest.raises(PipelineError) as caught:
        build_backbone("vgg16", 32, "imagenet", seed=0)
    message = str(caught.value)
    assert "model.weights=imagenet" in message
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in message  # what to pre-place
    assert "model.weights=none" in message  # or run offline with a random backbone
    assert not (tmp_path / "models").exists()  # nothing half-downloaded


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


# -- the model file and its sidecar are one pair ---------------------------------------------------


def test_sidecar_records_the_model_files_sha256(tmp_path: Path) -> None:
    path = _tiny_classifier(tmp_path)
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["model_sha256"] == sha256_file(path)
    assert Classifier.load(path).sha256 == info["model_sha256"]


def test_a_model_beside_another_runs_sidecar_is_refused_naming_both(tmp_path: Path) -> None:
    first = _tiny_classifier(tmp_path / "a", seed=1, threshold=0.3)
    second = _tiny_classifier(tmp_path / "b", seed=2, threshold=0.5)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(first, mixed / first.name)
    shutil.copy(second.with_suffix(".json"), mixed / "covid_normal.json")
    with pytest.raises(ModelLoadError) as caught:
        Classifier.load(mixed / "covid_normal.keras")
    message = str(caught.value)
    assert str(mixed / "covid_normal.keras") in message
    assert str(mixed / "covid_normal.json") in message
    assert "dvc repro train@covid_normal" in message and "together" in message
    assert "\n" not in message  # one line


def test_a_sidecar_without_the_hash_is_refused(tmp_path: Path) -> None:
    """Sidecars written before the binding existed cannot show they belong to the model."""
    path = _tiny_classifier(tmp_path)
    sidecar = path.with_suffix(".json")
    old = json.loads(sidecar.read_text())
    del old["model_sha256"]
    sidecar.write_text(json.dumps(old))
    with pytest.raises(ModelLoadError, match=r"covid_normal\.json: has no model_sha256.*"
                                             r"dvc repro train@covid_normal"):
        Classifier.load(path)


def test_saving_requires_the_out_of_distribution_statistics(tmp_path: Path) -> None:
    """A classifier without the OOD statistics would give a verdict on any picture."""
    backbone = build_backbone("vgg16", 32, "none", seed=1)
    shape = tuple(backbone.output_shape[1:])
    head = build_head(shape, pool_size=1, dense_nodes=4, dropout=0.5,
                      mean=np.zeros(shape[-1]), variance=np.ones(shape[-1]))
    model = assemble_classifier(backbone, head, "covid_normal")
    with pytest.raises(ValueError, match="out-of-distribution"):
        save_classifier(model, _tiny_info(ood={}), tmp_path / "covid_normal.keras")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the model


def test_training_cannot_run_without_the_ood_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken install (the package's own ood module missing) fails loudly at import; it used to
    save models without the out-of-distribution check and only log a warning."""
    monkeypatch.setitem(sys.modules, "covid_xray.ood", None)  # as if the module were missing
    monkeypatch.delitem(sys.modules, "covid_xray.training", raising=False)
    with pytest.raises(ImportError, match=r"covid_xray\.ood"):
        importlib.import_module("covid_xray.training")
