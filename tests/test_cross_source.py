"""Cross-source validation on a feature cache whose sources and disease signal are planted: it
must see through a source shortcut that the internal test split rewards, and credit a real
signal; folds without one class are skipped with the reason."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covid_xray.cross_source import (
    OTHER_FOLD,
    cross_validate,
    plan_folds,
    rows_with_origin,
    summary_metrics,
)
from covid_xray.errors import PipelineError
from covid_xray.features import FeatureStore
from covid_xray.params import parse_params

CHANNELS = 8
SITES = ("site-a.org", "site-b.org", "site-c.org")


def _params(tmp_path: Path):
    return parse_params({"model": {"img_size": 32, "pool_size": 1, "dense_nodes": 16},
                         "train": {"epochs": 30, "batch_size": 8, "init_lr": 0.01},
                         "validate": {"bootstrap": 100}, "cross_source": {"min_images": 10}},
                        root=tmp_path)


def planted_store(folder: Path, disease_signal: float, seed: int = 0
                  ) -> tuple[FeatureStore, pd.DataFrame]:
    """Three sites with COVID and same-site negatives (16 + 8 images each) and Kermany with 48
    negatives. Feature 0 says "Kermany" (the source cue: every Kermany image is a negative);
    feature 1 carries ``disease_signal`` for COVID; the rest is noise."""
    rng = np.random.default_rng(seed)
    records: list[tuple[str, str, str]] = []
    for site in SITES:
        records += [(site, "covid", f"{site}/c{k}") for k in range(16)]
        records += [(site, "normal", f"{site}/n{k}") for k in range(8)]
    records += [("kermany", "normal", f"kermany/n{k}") for k in range(48)]
    features = rng.normal(size=(len(records), 1, 1, CHANNELS)).astype(np.float32)
    rows = []
    for i, (origin, label, name) in enumerate(records):
        features[i, 0, 0, 0] += 3.0 * (origin == "kermany")
        features[i, 0, 0, 1] += disease_signal * (label == "covid")
        sha = hashlib.sha256(name.encode()).hexdigest()
        split = ("test", "val", "train", "train", "train")[i % 5]
        rows.append({"path": f"covid_normal/{label}/{name}.png", "label": label,
                     "patient_id": name, "sha256": sha, "split": split,
                     "patient_group": name, "origin": origin})
    folder.mkdir(parents=True)
    np.save(folder / "features.npy", features)
    table = pd.DataFrame(rows)
    pd.DataFrame({"row": np.arange(len(rows)), "sha256": table["sha256"], "path": table["path"],
                  "copy": 0, "angle": 0.0}).to_csv(folder / "index.csv", index=False)
    (folder / "info.json").write_text(json.dumps({"backbone": "vgg16", "weights": "none",
                                                  "img_size": 32}))
    (folder / "backbone.weights.h5").write_bytes(b"")
    return FeatureStore.open(folder), table


def test_folds_are_origins_with_enough_images_and_one_of_the_rest() -> None:
    origins = pd.Series(["a"] * 12 + ["b"] * 10 + ["c"] * 3 + ["d"] * 2 + ["kermany"] * 40)
    assert plan_folds(origins, 10) == {"a": ["a"], "b": ["b"], "kermany": ["kermany"],
                                       OTHER_FOLD: ["c", "d"]}
    assert plan_folds(origins, 1) == {o: [o] for o in ("a", "b", "c", "d", "kermany")}


def test_origins_come_from_the_manifest_of_that_model() -> None:
    split = pd.DataFrame({"path": ["m/covid/x.png", "m/normal/y.png"], "label": ["covid", "normal"],
                          "sha256": ["1", "2"], "split": ["train", "test"],
                          "patient_group": ["p1", "p2"]})
    manifest = pd.DataFrame({"path": ["m/covid/x.png", "m/normal/y.png", "heldout/covid/x.png"],
                             "set": ["covid_normal", "covid_normal", "heldout"],
                             "origin": ["site-a.org", "", "site-b.org"]})
    rows = rows_with_origin(split, manifest, "covid_normal")
    assert list(rows["origin"]) == ["site-a.org", "unknown"]
    with pytest.raises(PipelineError, match=r"1 rows are not in the manifest's covid_pneumonia "
                                            r"set \(e.g. m/covid/x.png\)"):
        rows_with_origin(split.head(1), manifest, "covid_pneumonia")
    with pytest.raises(PipelineError, match=r"no origin column .* re-run `dvc repro copy_images`"):
        rows_with_origin(split, manifest.drop(columns="origin"), "covid_normal")


def test_a_source_shortcut_is_exposed_and_a_real_signal_is_credited(tmp_path: Path) -> None:
    """No disease signal at all: the internal-style fit separates Kermany negatives by their
    source cue, but models that never saw a site score its COVID and negative images alike.
    With a real signal the same folds credit it."""
    params = _params(tmp_path)
    store, rows = planted_store(tmp_path / "shortcut", disease_signal=0.0)
    folds, pooled = cross_validate(store, rows, params, "covid_normal")
    by_fold = {f.fold: f for f in folds}
    assert set(by_fold) == {*SITES, "kermany"}
    for site in SITES:
        fold = by_fold[site]
        assert fold.metrics["n"] == 24 and fold.metrics["n_covid"] == 16
        # trained on the train split of every other origin only: 2 sites + Kermany
        assert fold.trained_on == int(((rows["origin"] != site) & (rows["split"] == "train"))
                                      .sum())
        assert set(fold.scores["origin"]) == {site}
        assert set(fold.scores["split"]) == {"train", "val", "test"}  # all of the site
    kermany = by_fold["kermany"]
    assert kermany.metrics["roc_auc"] is None and kermany.metrics["n_covid"] == 0
    assert kermany.metrics["specificity"] is not None
    shortcut = summary_metrics(folds, pooled)
    assert shortcut["within_origin_folds"] == 3 and shortcut["images_scored"] == len(rows)
    assert shortcut["within_origin_auc_median"] < 0.75

    store, rows = planted_store(tmp_path / "signal", disease_signal=3.0)
    folds, pooled = cross_validate(store, rows, params, "covid_normal")
    signal = summary_metrics(folds, pooled)
    assert signal["within_origin_auc_median"] > 0.9
    assert signal["pooled_roc_auc"] > 0.8
    assert signal["pooled_roc_auc_ci_low"] <= signal["pooled_roc_auc"] <= signal[
        "pooled_roc_auc_ci_high"]
    assert signal["within_origin_auc_median"] > shortcut["within_origin_auc_median"] + 0.2


def test_a_fold_holding_every_negative_is_skipped_with_the_reason(tmp_path: Path) -> None:
    """The seed's setup: every negative from Kermany. Holding it out leaves nothing to learn the
    negative class from; no out-of-source negative is scored, so the pooled AUC is undefined."""
    store, rows = planted_store(tmp_path / "seed", disease_signal=3.0)
    seed_like = rows[(rows["origin"] == "kermany") | (rows["label"] == "covid")]
    folds, pooled = cross_validate(store, seed_like, _params(tmp_path), "covid_normal")
    kermany = next(f for f in folds if f.fold == "kermany")
    assert kermany.skipped == ("without kermany the training folds have no normal images "
                               "(kermany holds all of them)")
    assert kermany.scores is None and kermany.metrics["n_negative"] == 48
    summary = summary_metrics(folds, pooled)
    assert summary["folds_skipped"] == 1 and summary["pooled_roc_auc"] is None
    assert summary["within_origin_folds"] == 0 and summary["images_scored"] == 48
    for fold in folds:
        if fold.fold != "kermany":  # COVID-only sites: sensitivity at the training threshold
            assert fold.metrics["sensitivity"] is not None and fold.metrics["roc_auc"] is None
