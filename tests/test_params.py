"""params.yaml validation: unknown keys and bad values stop before any work, naming the key."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pipeline_helpers import make_repo_copy, run

from covid_xray.errors import ParamsError
from covid_xray.params import (
    TABLE_END,
    TABLE_START,
    Params,
    TrainParams,
    ValidateParams,
    load_params,
    markdown_table,
    parameters,
    parse_params,
    readme_with_table,
)


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
        ({"copy": {"negatives": {"normal": ["nih"]}}}, "copy.negatives"),
        ({"copy": {"negatives": {"pneumonia": []}}}, "copy.negatives.pneumonia"),
        ({"copy": {"negatives": {"normal": ["kermany", "kermany"]}}}, "copy.negatives.normal"),
        ({"copy": {"folders": {"kermany": "x"}}}, "copy.folders"),
        ({"copy": {"folders": {"a b": "x"}}}, "copy.folders"),
        ({"copy": {"folders": ["x"]}}, "copy.folders"),
        ({"model": {"backbone": "smallcnn", "weights": "imagenet"}}, "model.weights"),
        ({"pretrain": {"architecture": "resnet"}}, "pretrain.architecture"),
        ({"pretrain": {"init": "imagenet"}}, "pretrain.init"),  # no ImageNet smallcnn
        ({"pretrain": {"epochs": 0}}, "pretrain.epochs"),
        ({"pretrain": {"val_size": 1.0}}, "pretrain.val_size"),
    ],
)
def test_bad_values_name_the_key(raw: dict, key: str, tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=f"`{key}`"):
        parse_params(raw, root=tmp_path)


def test_negative_sources_name_folders_and_never_an_external_set(tmp_path: Path) -> None:
    params = parse_params({"copy": {"folders": {"adult": "sets/adult"},
                                    "negatives": {"normal": ["covid_collection", "adult"]}}},
                          root=tmp_path)
    assert params.copy.sources("normal") == ("covid_collection", "adult")
    assert params.copy.sources("pneumonia") == ("kermany",)
    with pytest.raises(ParamsError, match=r"unknown source\(s\) nih in `normal`; known: "
                                          r"kermany, covid_collection, adult"):
        parse_params({"copy": {"folders": {"adult": "a"}, "negatives": {"normal": ["nih"]}}},
                     root=tmp_path)
    for external in ("sets/adult", str(tmp_path / "sets" / "adult") + "/", "sets",
                     "sets/adult/normal"):  # the same folder, or one inside the other
        with pytest.raises(ParamsError) as info:
            parse_params({"copy": {"folders": {"adult": "sets/adult"}},
                          "validate": {"external": {"hospital": external}}}, root=tmp_path)
        message = str(info.value)
        assert message.startswith("params.yaml: `copy.folders.adult` (sets/adult) and "
                                  f"`validate.external.hospital` ({external})"), message
        assert "never be an external test set" in message and "\n" not in message
    parse_params({"copy": {"folders": {"adult": "sets/adult"}},  # siblings are fine
                  "validate": {"external": {"hospital": "sets/adult2"}}}, root=tmp_path)


def test_weights_path_is_resolved_against_the_params_folder(tmp_path: Path) -> None:
    (tmp_path / "w.h5").write_bytes(b"x")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": {"weights": "w.h5"}}))
    assert load_params(tmp_path / "params.yaml").model.weights == "w.h5"


def test_xray_weights_use_the_pretrain_architecture(tmp_path: Path) -> None:
    """``model.weights: xray`` selects the pretrain stage's backbone; other weights keep
    ``model.backbone`` and leave the pretrain off."""
    default = parse_params({}, root=tmp_path)
    assert (default.uses_pretrain, default.backbone) == (False, "vgg16")
    xray = parse_params({"model": {"weights": "XRay"}}, root=tmp_path)
    assert (xray.model.weights, xray.uses_pretrain, xray.backbone) == ("xray", True, "smallcnn")
    chexnet = parse_params({"model": {"weights": "xray"},
                            "pretrain": {"architecture": "vgg16", "init": "imagenet"}},
                           root=tmp_path)
    assert chexnet.backbone == "vgg16"
    small = parse_params({"model": {"backbone": "smallcnn"}}, root=tmp_path)
    assert (small.uses_pretrain, small.backbone) == (False, "smallcnn")


def test_missing_and_invalid_files_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


# ---------------------------------------------------------------------------------------------
# Unknown keys and sections are refused (a typo would otherwise run, be recorded, change nothing)


def _params_file_with(repo_root: Path, tmp_path: Path, edit: Callable[[dict], None]) -> Path:
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    edit(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return tmp_path / "params.yaml"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda raw: raw["train"].update(droput=0.3),
         "unknown key `train.droput`; did you mean `train.dropout`?"),
        (lambda raw: raw.update(trian=raw.pop("train")),
         "unknown section `trian`; did you mean `train`?"),
        (lambda raw: raw["data"]["demo"].update(covid_patiens=10),
         "unknown key `data.demo.covid_patiens`; did you mean `data.demo.covid_patients`?"),
        (lambda raw: raw["audit"].update(zzz=1),
         "unknown key `audit.zzz`; valid keys: audit.fail_on_leak, audit.phash_max_distance"),
    ],
    ids=["key", "section", "nested-key", "no-close-match"],
)
def test_unknown_keys_and_sections_are_refused_with_the_closest_valid_one(
        repo_root: Path, tmp_path: Path, edit: Callable[[dict], None], message: str) -> None:
    path = _params_file_with(repo_root, tmp_path, edit)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(info.value) == f"{path}: {message}"


def test_every_problem_is_reported_on_its_own_line(tmp_path: Path) -> None:
    with pytest.raises(ParamsError) as info:
        parse_params({"train": {"droput": 0.3, "epochs": 0}, "model": {"backbone": "resnet"}},
                     root=tmp_path)
    assert sorted(str(info.value).splitlines()) == [
        "params.yaml: `model.backbone` must be one of 'vgg16', 'mobilenetv2' or 'smallcnn'; "
        "got 'resnet'",
        "params.yaml: `train.epochs` must be at least 1 and at most 10,000, got 0",
        "params.yaml: unknown key `train.droput`; did you mean `train.dropout`?",
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"epochs": "10"}}, "`train.epochs` must be a whole number, got '10'"),
        ({"train": {"epochs": 10.0}}, "`train.epochs` must be a whole number, got 10.0"),
        ({"train": {"dropout": True}}, "`train.dropout` must be a number, got True"),
        ({"train": {"dropout": float("nan")}}, "`train.dropout` must be a finite number"),
        ({"train": {"dropout": 1.5}}, "`train.dropout` must be in [0, 1), got 1.5"),
        ({"split": {"group_by_patient": "yes"}},
         "`split.group_by_patient` must be true or false, got 'yes'"),
        ({"train": 5}, "`train` must be a section of `key: value` lines, got 5"),
    ],
)
def test_types_are_strict_and_messages_say_what_is_allowed(raw: dict, message: str,
                                                           tmp_path: Path) -> None:
    with pytest.raises(ParamsError) as info:
        parse_params(raw, root=tmp_path)
    assert message in str(info.value)


def test_empty_sections_take_the_defaults_and_choices_ignore_case(tmp_path: Path) -> None:
    params = parse_params({"train": None, "model": {"backbone": "VGG16"},
                           "threshold": {"rule": "Youden"}, "select": {"views": " AP "},
                           "validate": {"external": None}}, root=tmp_path)
    assert params.train == TrainParams()
    assert (params.model.backbone, params.threshold.rule) == ("vgg16", "youden")
    assert params.select.views == ("AP",)
    assert params.validate.external == {}
    assert params.seed == params.base.seed == 42


# ---------------------------------------------------------------------------------------------
# One source of truth: the classes in covid_xray/params.py


DOCUMENTED_EXCEPTIONS = {"validate.external": {"demo_external": "data/raw/external"}}
"""Keys whose committed value is not the default (README, Parameters): the demo's external set."""


def _lookup(raw: dict, key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        node = node[part]
    return node


def _leaf_keys(raw: dict, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, value in raw.items():
        if isinstance(value, dict) and value and f"{prefix}{name}" not in DOCUMENTED_EXCEPTIONS:
            keys |= _leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_committed_params_yaml_holds_every_key_with_its_default(repo_root: Path) -> None:
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    defaults = {key: default for key, default, _ in parameters()}
    assert _leaf_keys(raw) == set(defaults), "params.yaml must list every key (DVC tracks them)"
    differ = {}
    for key, default in defaults.items():
        expected = DOCUMENTED_EXCEPTIONS.get(key, default)
        value = _lookup(raw, key)
        if (list(expected) if isinstance(expected, tuple) else expected) != value:
            differ[key] = (value, expected)
    assert not differ, f"params.yaml value != default in covid_xray/params.py: {differ}"
    assert dataclasses.asdict(load_params(repo_root / "params.yaml")) == dataclasses.asdict(
        Params(validate=ValidateParams(external=DOCUMENTED_EXCEPTIONS["validate.external"])))


def test_every_key_has_a_description(repo_root: Path) -> None:
    assert [key for key, _, text in parameters() if not text.strip()] == []


def test_readme_parameter_table_is_generated_from_the_classes(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text()
    assert readme_with_table(readme) == readme, (
        "README.md's parameter table is out of date: run `python -m covid_xray.params README.md`")
    table = readme.split(TABLE_START)[1].split(TABLE_END)[0]
    assert ("| `train.dropout` | 0.5 | number in [0, 1) | dropout before the softmax layer |"
            in table)
    assert len(re.findall(r"^\| `", table, flags=re.M)) == len(list(parameters()))


def test_table_script_prints_and_rewrites_the_table(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{TABLE_START}\nstale\n{TABLE_END}\n\nafter\n")
    subprocess.run([sys.executable, "-m", "covid_xray.params", str(readme)], check=True)
    assert readme.read_text() == f"# x\n\n{TABLE_START}\n{markdown_table()}\n{TABLE_END}\n\nafter\n"
    printed = subprocess.run([sys.executable, "-m", "covid_xray.params"], check=True,
                             capture_output=True, text=True).stdout
    assert printed.strip() == markdown_table()


# ---------------------------------------------------------------------------------------------
# The real thing: a typo given to DVC stops the first stage before any work


@pytest.mark.slow
def test_dvc_exp_run_with_a_misspelled_key_fails_before_any_work(repo_root: Path,
                                                                 tmp_path: Path) -> None:
    repo = make_repo_copy(repo_root, tmp_path / "repo", {})
    result = run(["dvc", "exp", "run", "-S", "+train.droput=0.3"], repo, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Running stage 'acquire'" in output
    assert "unknown key `train.droput`; did you mean `train.dropout`?" in output, output
    assert not (repo / "data" / "raw").exists(), "acquire did work before refusing the params"
