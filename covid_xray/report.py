"""The run report (``reports/report.md``), a model card beside each model and
``metrics/data.json``.

The report and cards are generated from the same run's output files (the detailed ones:
``reports/<stage>/details.json`` hold every figure, ``metrics/*.json`` only the few tracked by
DVC), so they can never disagree with ``dvc metrics show``; both say plainly what the numbers do
NOT show (tiny test sets, source shortcuts, paediatric vs adult images). ``metrics/data.json`` is
the data stages at a glance for ``dvc metrics show`` / ``dvc exp show``: their own files hold
every count and are plain outputs (tracked, they were ~100 columns).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from covid_xray.config import MODEL_NAMES, NEGATIVE_CLASS, POSITIVE_CLASS, Paths
from covid_xray.errors import PipelineError
from covid_xray.io import atomic_path, write_json, write_text

DISCLAIMER = ("**Educational and research use only: not a diagnostic device.** Do not use these "
              "models to diagnose, treat or triage anyone.")
METRICS: tuple[str, ...] = ("roc_auc", "sensitivity", "specificity", "accuracy", "precision", "f1")
TITLES = {"covid_normal": "Model 1: COVID-19 vs normal",
          "covid_pneumonia": "Model 2: COVID-19 vs pneumonia"}
REFERENCE = ("DeGrave, Janizek & Lee, *AI for radiographic COVID-19 detection selects shortcuts "
             "over signal*, Nature Machine Intelligence 3, 610-619 (2021)")


@dataclass
class RunMetrics:
    """Every metrics file of one run (empty dict where a stage did not write one)."""

    selection: dict[str, Any]
    copy_images: dict[str, Any]
    split: dict[str, Any]
    audit: dict[str, Any]
    probe: dict[str, Any]
    evaluate: dict[str, Any]
    validate: dict[str, Any]
    models: dict[str, dict[str, Any]]
    source: dict[str, Any]
    cross_source: dict[str, Any] = field(default_factory=dict)
    cross_source_folds: list[dict[str, Any]] = field(default_factory=list)
    """reports/cross_source/folds.csv as records ("" where a metric is undefined)."""

    @classmethod
    def load(cls, paths: Paths) -> RunMetrics:
        """The detailed files of evaluate, validate and probe, and the data stages' counts."""
        def read(path: Path, required: bool = True) -> dict[str, Any]:
            if not path.is_file():
                if required:
                    raise PipelineError(f"{path}: missing; run the stage that writes it "
                                        "(`dvc repro`) before the report")
                return {}
            return json.loads(path.read_text(encoding="utf-8"))

        m = paths.metrics
        return cls(
            selection=read(m / "selection.json"), copy_images=read(m / "copy_images.json"),
            split=read(m / "split.json"), audit=read(m / "audit.json"),
            probe=read(paths.details("probe")), evaluate=read(paths.details("evaluate")),
            validate=read(paths.details("validate")),
            models={name: read(paths.models / f"{name}.json") for name in MODEL_NAMES},
            source=read(paths.raw / "SOURCE.json", required=False),
            cross_source=read(m / "cross_source.json", required=False),
            cross_source_folds=_records(paths.reports / "cross_source" / "folds.csv"))


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table; ``n/a`` for undefined (e.g. sensitivity without COVID images)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def with_ci(metrics: dict[str, Any], name: str) -> str:
    """``0.912 [0.85, 0.97]`` from ``{name: v, name_ci_low: lo, name_ci_high: hi}``."""
    value = metrics.get(name)
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    ci = None if low is None or high is None else (low, high)
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.3f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def results_rows(run: RunMetrics, model: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, metrics) for the internal test split, the held-out union and each external set."""
    rows = [("internal test split", run.evaluate.get(model, {}))]
    validate = run.validate.get(model, {})
    if validate:
        rows.append(("held-out sets (union)", validate.get("heldout", {})))
        rows += [(f"external: {name}", metrics)
                 for name, metrics in sorted(validate.get("external", {}).items())]
    return rows


def results_table(run: RunMetrics, model: str) -> str:
    header = ["set", "images (covid/other)", *METRICS]
    rows = [[label, f"{m.get('n', 0)} ({m.get('n_covid', 0)}/{m.get('n_negative', 0)})",
             *(with_ci(m, name) for name in METRICS)] for label, m in results_rows(run, model)]
    return table(header, rows)


def heldout_table(run: RunMetrics, model: str) -> str:
    sets = run.validate.get(model, {}).get("sets", {})
    rows = [[name, s.get("n"), s.get("flagged_positive"), fmt(s.get("mean_score")),
             fmt(s.get("median_score"))] for name, s in sorted(sets.items())]
    return table(["set", "images", "flagged COVID", "mean score", "median score"], rows)


def probe_lines(run: RunMetrics) -> list[str]:
    """Plain-language verdict of the shortcut probe, one bullet per model: the files' AUCs beside
    the model inputs' (a harmonisation that works lowers the second)."""
    lines = []
    for model in MODEL_NAMES:
        p = run.probe.get(model)
        if not p:
            continue
        raw, seen = p.get("raw", {}), p.get("model_input", {})
        verdict = ("**FIRED: image statistics of the model's input alone separate the classes; "
                   "the model may be learning the data source, not disease**" if p.get("fired")
                   else "below the threshold for image statistics of the model's input")
        extra = (" An untrained network with random weights also separates them "
                 f"(AUC {fmt(seen.get('backbone_auc'))}), so the classes differ in ways a "
                 "network sees without any training." if p.get("random_fired") else "")
        lines.append(
            f"- {TITLES[model]}: image-statistics AUC {fmt(raw.get('stats_auc'))} on the files, "
            f"{fmt(seen.get('stats_auc'))} on the model's input; untrained-backbone AUC "
            f"{fmt(raw.get('backbone_auc'))} / {fmt(seen.get('backbone_auc'))} (threshold "
            f"{fmt(p.get('threshold'), 2)}): {verdict}.{extra} Most telling statistics: "
            f"{', '.join(p.get('top_raw_features', [])[:3]) or 'n/a'} (files), "
            f"{', '.join(p.get('top_model_input_features', [])[:3]) or 'n/a'} (model input).")
    preprocessing = next((d.get("preprocessing") for d in run.probe.values()
                          if d.get("preprocessing")), None)
    if lines and preprocessing:
        lines.append(f"- Model input: `{preprocessing}` (`preprocess` in params.yaml), at "
                     f"{next(iter(run.probe.values())).get('model_img_size')} px.")
    return lines


def audit_lines(run: RunMetrics) -> list[str]:
    a = run.audit
    if not a:
        return ["- The leakage audit did not run."]
    leaks = a.get("leaks", {})
    status = "passed: no leaks" if a.get("passed") else "**FAILED**"
    return [f"- {status} across {a.get('groups')} groups of images ({a.get('pairs_checked')} "
            f"pairs of groups, {a.get('files')} files).",
            f"- shared patients: {leaks.get('patient', 0)}, identical files: "
            f"{leaks.get('identical', 0)}, near-duplicates: {leaks.get('near_duplicate', 0)} "
            f"(pHash distance <= {a.get('phash_max_distance')}, confirmed by thumbnail "
            f"correlation >= {a.get('min_correlation')})."]


def data_lines(run: RunMetrics) -> list[str]:
    s, c = run.selection, run.copy_images
    source = run.source.get("source", "unknown")
    note = (" (synthetic demo data: numbers only exercise the pipeline)" if source == "demo"
            else "")
    images = c.get("images", {})
    lines = [f"- Source: `{source}`{note}.",
             f"- Metadata: {s.get('rows_in')} rows in; {s.get('rows_selected')} COVID-19 PA X-ray "
             f"images for training and {s.get('rows_heldout')} held out (dated from "
             f"{s.get('heldout_from')}); {s.get('dropped_total')} rows dropped "
             f"({', '.join(f'{k} {v}' for k, v in sorted(s.get('dropped', {}).items()) if v)}); "
             f"{s.get('missing_files', 0)} listed image files missing; "
             f"{s.get('undatable', 0)} undatable rows kept in training."]
    for model in MODEL_NAMES:
        counts = images.get(model, {})
        per_split = run.split.get(model, {}).get("images", {})
        splits = "; ".join(f"{name} {sum(v.values())}" for name, v in per_split.items())
        lines.append(f"- {TITLES[model]}: {counts.get(POSITIVE_CLASS, 0)} COVID + "
                     f"{counts.get(NEGATIVE_CLASS[model], 0)} {NEGATIVE_CLASS[model]} images "
                     f"({splits}), patients on both sides of the split: "
                     f"{run.split.get(model, {}).get('patient_overlap', 'n/a')}.")
    skipped = c.get("skipped", {}).get("total", 0) if isinstance(c.get("skipped"), dict) else 0
    lines += negative_source_lines(c)
    lines.append(f"- Unreadable or duplicate files skipped (listed in data/datasets/skipped.csv): "
                 f"{skipped}.")
    lines += disjoint_lines(c)
    unscored = run.validate.get("skipped_images", 0)
    if unscored:
        lines.append(f"- Held-out or external images without cached features, left out of "
                     f"validation (listed in reports/validate/skipped.csv): {unscored}.")
    return lines


def negative_source_lines(copy_images: dict[str, Any]) -> list[str]:
    """Where the negatives came from (``copy.negatives``): images per source, per training set
    and held-out class."""
    sources = copy_images.get("negative_sources")
    if not isinstance(sources, dict) or not sources:
        return []
    parts = [f"{key}: " + ", ".join(f"{name} {n}" for name, n in counts.items())
             for key, counts in sources.items()]
    return [f"- Negatives by source (`copy.negatives`; `covid_collection`: the COVID collection's "
            f"own non-COVID X-rays, from the same papers and websites): {'; '.join(parts)}."]


NEGATIVE_SOURCE_NAMES = {
    "kermany": "Kermany et al. chest_xray (paediatric, one hospital)",
    "covid_collection": "the ieee8023 collection's own non-COVID X-rays (same papers and websites "
                        "as its COVID images)"}


def negative_sources_text(run: RunMetrics, model: str) -> str:
    """Where a model's negatives came from, with counts (Kermany only in the seed's setup)."""
    counts = run.copy_images.get("negative_sources", {}).get(model) or {"kermany": None}
    return "; ".join(f"{NEGATIVE_SOURCE_NAMES.get(name, f'folder `{name}`')}"
                     + ("" if n is None else f" ({n})") for name, n in counts.items())


def _cell(row: dict[str, Any], name: str) -> str:
    value = row.get(name, "")
    if value in ("", None):
        return "n/a"
    low, high = row.get(f"{name}_ci_low", ""), row.get(f"{name}_ci_high", "")
    ci = f" [{float(low):.2f}, {float(high):.2f}]" if low not in ("", None) and high not in (
        "", None) else ""
    return f"{float(value):.3f}{ci}"


def cross_source_lines(run: RunMetrics) -> list[str]:
    """The cross-source section: per model every held-out origin and the pooled AUC."""
    if not run.cross_source:
        return ["- Cross-source validation did not run."]
    out = ["Each model retrained (same recipe, cached features) without one origin of the "
           "training collections at a time (a website or journal of the COVID collection, "
           "`kermany`, a `copy.folders` set) and scored on that origin only: no external set is "
           "read. An origin holding both COVID and negative images gives a *within-origin* ROC "
           "AUC, with no source cue to exploit; an origin with one class gives the sensitivity "
           "or specificity at the threshold chosen on the other origins. The pooled AUC scores "
           "every image with a model that never saw its origin. A fold is skipped when the "
           "other origins hold no image of one class (single-source negatives cannot be "
           "checked this way).", ""]
    for model in MODEL_NAMES:
        summary = run.cross_source.get(model)
        if not summary:
            continue
        rows = [[r["fold"], f"{r['n']} ({r['n_covid']}/{r['n_negative']})",
                 r["trained_on"] or "-", _cell(r, "roc_auc"), _cell(r, "sensitivity"),
                 _cell(r, "specificity"), r["skipped"] or ""]
                for r in run.cross_source_folds if r["model"] == model]
        pooled = summary.get("pooled_roc_auc")
        pooled_text = ("n/a (the scored images hold one class only)" if pooled is None else
                       with_ci({"roc_auc": pooled,
                                "roc_auc_ci_low": summary.get("pooled_roc_auc_ci_low"),
                                "roc_auc_ci_high": summary.get("pooled_roc_auc_ci_high")},
                               "roc_auc"))
        out += [f"### {TITLES[model]}", "",
                table(["held-out origin", "images (covid/neg)", "trained on", "roc_auc",
                       "sensitivity", "specificity", "skipped"], rows), "",
                f"Pooled out-of-source ROC AUC: {pooled_text} on "
                f"{summary.get('images_scored', 0)} images; median within-origin AUC "
                f"{fmt(summary.get('within_origin_auc_median'))} over "
                f"{summary.get('within_origin_folds', 0)} origins with both classes.", ""]
    return out


def disjoint_lines(copy_images: dict[str, Any]) -> list[str]:
    """What copy_images did to keep sets disjoint: training images left out (per reason) and
    patient groups merged because their patients share a picture."""
    excluded = copy_images.get("excluded")
    groups = copy_images.get("patient_groups")
    if not isinstance(excluded, dict) or not isinstance(groups, dict):
        return []
    reasons = sorted(((n, r) for r, n in excluded.items() if r != "total" and n),
                     key=lambda item: (-item[0], item[1]))
    detail = f" ({', '.join(f'{n} {r}' for n, r in reasons)})" if reasons else ""
    return [f"- Left out of training to keep sets disjoint (listed in "
            f"data/datasets/excluded.csv): {excluded.get('total', 0)}{detail}.",
            f"- Patient groups: {groups.get('merged', 0)} merged "
            f"{groups.get('patients_in_merged', 0)} patient ids that share a picture "
            f"({groups.get('images_regrouped', 0)} manifest rows regrouped); the split keeps "
            "each group on one side."]


def data_summary(run: RunMetrics) -> dict[str, Any]:
    """``metrics/data.json``: what the data stages produced, in the few numbers worth comparing
    across experiments (their own files, plain outputs, hold every count)."""
    skipped = run.copy_images.get("skipped", {})
    excluded = run.copy_images.get("excluded", {})
    return {
        "covid_rows": {"selected": run.selection.get("rows_selected"),
                       "heldout": run.selection.get("rows_heldout")},
        "images": {"total": run.copy_images.get("images_total"),
                   "skipped": skipped.get("total") if isinstance(skipped, dict) else None,
                   "excluded": excluded.get("total") if isinstance(excluded, dict) else None},
        "split_patient_overlap": sum(run.split.get(model, {}).get("patient_overlap", 0)
                                     for model in MODEL_NAMES),
        "audit": {"passed": run.audit.get("passed"),
                  "leaks": run.audit.get("leaks", {}).get("total")},
    }


def _save_figure(figure: plt.Figure, target: Path) -> None:
    with atomic_path(target, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)


def draw_figures(paths: Paths, folder: Path) -> list[str]:
    """ROC curves, confusion matrices and score distributions as PNGs (GitHub shows them)."""
    names: list[str] = []
    figure, axis = plt.subplots(figsize=(5, 4.5))
    for model in MODEL_NAMES:
        roc = paths.plots / "evaluate" / f"{model}_roc.csv"
        if roc.is_file():
            frame = pd.read_csv(roc)
            axis.plot(frame["fpr"], frame["tpr"], label=TITLES[model])
    axis.plot([0, 1], [0, 1], "k:", linewidth=1, label="chance")
    axis.set(xlabel="false positive rate", ylabel="sensitivity", title="ROC, internal test split")
    axis.legend(loc="lower right", fontsize=8)
    _save_figure(figure, folder / "roc.png")
    names.append("roc.png")

    for model in MODEL_NAMES:
        confusion = paths.plots / "evaluate" / f"{model}_confusion.csv"
        if confusion.is_file():
            frame = pd.read_csv(confusion)
            labels = [POSITIVE_CLASS, NEGATIVE_CLASS[model]]
            counts = pd.crosstab(frame["actual"], frame["predicted"]).reindex(
                index=labels, columns=labels, fill_value=0)
            figure, axis = plt.subplots(figsize=(3.6, 3.2))
            axis.imshow(counts.to_numpy(), cmap="Blues")
            for (i, j), value in pd.DataFrame(counts.to_numpy()).stack().items():
                axis.text(j, i, str(value), ha="center", va="center")
            axis.set(xticks=[0, 1], yticks=[0, 1], xticklabels=labels, yticklabels=labels,
                     xlabel="predicted", ylabel="actual", title=f"{model} (test)")
            _save_figure(figure, folder / f"{model}_confusion.png")
            names.append(f"{model}_confusion.png")
        scores = paths.plots / "validate" / f"{model}_scores.csv"
        if scores.is_file():
            frame = pd.read_csv(scores)
            sets = sorted(frame["set"].unique())
            figure, axis = plt.subplots(figsize=(6, 0.45 * len(sets) + 1.2))
            axis.boxplot([frame.loc[frame["set"] == s, "score"] for s in sets], vert=False)
            axis.set_yticks(range(1, len(sets) + 1), sets, fontsize=8)
            axis.set(xlim=(0, 1), xlabel="COVID score", title=f"{model}: scores per set")
            _save_figure(figure, folder / f"{model}_scores.png")
            names.append(f"{model}_scores.png")
    return names


def gradcam_gallery(paths: Paths, model: str, relative_to: Path) -> list[str]:
    """The model's Grad-CAM grid (validate's plots/gradcam/<model>.png), linked, not copied."""
    grid = paths.plots / "gradcam" / f"{model}.png"
    if not grid.is_file():
        return ["No Grad-CAM examples (`validate.gradcam_images` is 0)."]
    return [f"![{model} Grad-CAM]({Path(os.path.relpath(grid, relative_to)).as_posix()})"]


def render_report(run: RunMetrics, paths: Paths, figures: Sequence[str]) -> str:
    out = ["# covid-xray run report", "", DISCLAIMER, "",
           "Generated by `dvc repro` (stage `report`) from this run's metrics files; numbers in "
           "square brackets are bootstrap 95% confidence intervals. The test sets are small, so "
           "the intervals are wide: read them before the point estimates.", ""]
    fired = [m for m in MODEL_NAMES if run.probe.get(m, {}).get("fired")]
    if fired:
        out += [f"> **Warning: shortcut probe fired for {', '.join(fired)}.** Simple image "
                "statistics separate the classes, so high scores below may reflect where the "
                f"images came from rather than COVID-19 ({REFERENCE}).", ""]
    out += ["## Data", "", *data_lines(run), ""]
    out += ["## Results: internal test vs held-out vs external", ""]
    for model in MODEL_NAMES:
        info = run.models.get(model, {})
        out += [f"### {TITLES[model]}", "",
                f"Operating threshold {fmt(info.get('threshold'), 4)} (rule "
                f"`{run.evaluate.get(model, {}).get('threshold_rule', 'n/a')}`, chosen on the "
                "validation carve-out of the training patients; the seed used 0.5).", "",
                results_table(run, model), "", "Held-out sets, as the seed reported them:", "",
                heldout_table(run, model), ""]
    out += ["## Cross-source validation", "", *cross_source_lines(run)]
    out += ["## Leakage audit", "", *audit_lines(run), ""]
    out += ["## Shortcut probe", "",
            "Can the classes be told apart without looking at disease? Cross-validated ROC AUC "
            "of a linear classifier on trivial image statistics (size, format, bit depth, "
            "intensity, border) and on features of an untrained backbone, measured on the files "
            "and on the model's input (after `preprocess`). The files' numbers describe the "
            "collections; the model input's are what the model can exploit.", "",
            *probe_lines(run), ""]
    out += ["## Plots", ""] + [f"![{name}](figures/{name})" for name in figures] + [""]
    out += ["## Grad-CAM gallery", "",
            "Where each model looked (red = most influence on the COVID score): a row per set, "
            "each tile captioned with its set, true label, score and verdict.", ""]
    for model in MODEL_NAMES:
        out += [f"### {TITLES[model]}", "", *gradcam_gallery(paths, model, paths.reports), ""]
    out += ["## Limitations", "", *LIMITATIONS, ""]
    return "\n".join(out)


LIMITATIONS = [
    "- The public COVID-19 images are adults' X-rays collected from papers and websites; the "
    "Kermany NORMAL and PNEUMONIA images are children's (aged 1-5) from one hospital in "
    "Guangzhou. Age, hospital, scanner and file history all differ between the classes, and "
    "a model can exploit any of them (" + REFERENCE + ").",
    "- Test and held-out sets are tens of images: confidence intervals are wide, and a perfect "
    "score on them is weak evidence.",
    "- External sets are the closest thing here to new hospitals; expect lower numbers there.",
    "- With `model.weights: none` (the offline default) the backbone is random and frozen: "
    "results are far below what ImageNet weights give.",
]


def pretrain_lines(pretrain: dict[str, Any] | None) -> list[str]:
    """How an ``xray`` backbone was trained (the sidecar's ``params.pretrain``), for the card."""
    if not pretrain:
        return []
    settings, images = pretrain["params"], pretrain["images"]
    test, at_size = pretrain["kermany_test"], pretrain["kermany_test_at_model_size"]
    return [
        f"- Backbone pretrained by this pipeline's `pretrain` stage: {pretrain['architecture']} "
        f"from `{settings['init']}` weights, trained end to end on {pretrain['task']} "
        f"({images['train']['normal']} NORMAL + {images['train']['pneumonia']} PNEUMONIA "
        f"images, {images['val']['normal'] + images['val']['pneumonia']} more for its eval "
        f"curves), {settings['epochs']} epochs at {settings['img_size']} px, seed "
        f"{settings['seed']}; {images['left_out']['total']} Kermany training images of "
        "held-out, Kermany-test, val or test patients left out.",
        f"- Pretrain check on Kermany's test folder (NORMAL vs PNEUMONIA, {test['n']} images): "
        f"ROC AUC {fmt(test['roc_auc'])} [{fmt(test['roc_auc_ci_low'])}, "
        f"{fmt(test['roc_auc_ci_high'])}]; {fmt(at_size['roc_auc'])} at this model's input "
        f"size ({at_size['img_size']} px). It has seen children's X-rays from one hospital, "
        "never COVID-19.",
    ]


def render_model_card(run: RunMetrics, model: str) -> str:
    info = run.models.get(model, {})
    params = info.get("params", {})
    negative = NEGATIVE_CLASS[model]
    probe = run.probe.get(model, {})
    out = [f"# Model card: {model} ({TITLES[model]})", "", DISCLAIMER, "",
           "## Model details", "",
           f"- File: `models/{model}.keras` (complete Keras model: frozen "
           f"{info.get('backbone')} backbone + trained head), sidecar `models/{model}.json`.",
           f"- Backbone weights: `{info.get('weights')}`; input {info.get('img_size')} x "
           f"{info.get('img_size')} RGB scaled to [0, 1] ({info.get('preprocessing')}).",
           *pretrain_lines(params.get("pretrain")),
           f"- Classes (output order): {', '.join(info.get('class_names', []))}; positive class "
           f"`{info.get('positive_class')}`.",
           f"- Operating threshold on the COVID probability: {fmt(info.get('threshold'), 4)}.",
           f"- Trained at revision `{info.get('revision')}` with "
           + ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if not isinstance(v, dict))
           + ".", "",
           "## Intended use", "",
           "Education and research on reproducible medical-imaging pipelines and on dataset "
           "bias. **Not** for clinical use, screening, triage or any decision about a person. "
           f"It only ever answers 'COVID-19 or {negative}?' and has never seen other conditions.",
           "",
           "## Training data and its known biases", "",
           f"- COVID-19 images: ieee8023 COVID-19 image data collection (PA X-rays); {negative} "
           f"images, balanced to the COVID count: {negative_sources_text(run, model)}.",
           f"- Source of this run: `{run.source.get('source', 'unknown')}`.",
           "- The two classes come from different populations and sources: the model may learn "
           "age, hospital or file format instead of disease.", "",
           "## Metrics", "", results_table(run, model), "",
           "Shortcut probe (files / model input): image-statistics AUC "
           f"{fmt(probe.get('raw', {}).get('stats_auc'))} / "
           f"{fmt(probe.get('model_input', {}).get('stats_auc'))}, untrained-backbone AUC "
           f"{fmt(probe.get('raw', {}).get('backbone_auc'))} / "
           f"{fmt(probe.get('model_input', {}).get('backbone_auc'))}"
           + (" (**fired**)." if probe.get("fired") else "."), "",
           "## Limitations", "", *LIMITATIONS, ""]
    return "\n".join(out)


def build_report(paths: Paths) -> dict[str, Any]:
    """Write reports/report.md, reports/figures/*.png, models/<model>.card.md and
    metrics/data.json."""
    run = RunMetrics.load(paths)
    write_json(paths.metrics / "data.json", data_summary(run))
    figures_dir = paths.reports / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    for stale in figures_dir.glob("*.png"):
        stale.unlink()
    figures = draw_figures(paths, figures_dir)
    write_text(paths.reports / "report.md", render_report(run, paths, figures))
    for model in MODEL_NAMES:
        write_text(paths.models / f"{model}.card.md", render_model_card(run, model))
    return {"figures": len(figures), "probe_fired": [m for m in MODEL_NAMES
                                                     if run.probe.get(m, {}).get("fired")]}
