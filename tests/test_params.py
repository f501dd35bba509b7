"""params.yaml validation: bad values stop before any work, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from covid_xray.errors import ParamsError
from covid_xray.params import load_params, parse_params


def test_repository_params_are_valid_and_match_the_seed(repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml")
    assert params.data.source == "demo"
    assert params.model.weights == "none"
    assert params.model.backbone == "vgg16"
    assert (params.train.init_lr, params.train.epochs, params.train.batch_size) == (1e-3, 10, 8)
    assert (params.train.dropout, params.train.rotation_deg) == (0.5, 15.0)
    assert (params.model.img_size, params.model.pool_size, params.model.dense_nodes) == (224, 4, 64)
    assert params.split.test_size == 0.2


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"train": {"dropout": 1.5}}, "train.dropout"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"epochs": "ten"}}, "train.epochs"),
        ({"train": {"init_lr": 0}}, "train.init_lr"),
        ({"model": {"backbone": "resnet9000"}}, "model.backbone"),
        ({"model": {"weights": "missing/weights.h5"}}, "model.weights"),
        ({"model": {"img_size": 224, "pool_size": 8}}, "model.pool_size"),
        ({"split": {"test_size": 1.0}}, "split.test_size"),
        ({"select": {"heldout_from": "March 2020"}}, "select.heldout_from"),
        ({"data": {"source": "no/such/folder"}}, "data.source"),
        ({"threshold": {"rule": "vibes"}}, "threshold.rule"),
        ({"validate": {"external": ["a"]}}, "validate.external"),
        ({"select": {"views": []}}, "select.views"),
    ],
)
def test_bad_values_name_the_key(raw: dict, key: str, tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=f"`{key}`"):
        parse_params(raw, root=tmp_path)


def test_weights_path_is_resolved_against_the_params_folder(tmp_path: Path) -> None:
    (tmp_path / "w.h5").write_bytes(b"x")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": {"weights": "w.h5"}}))
    assert load_params(tmp_path / "params.yaml").model.weights == "w.h5"


def test_missing_and_invalid_files_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
