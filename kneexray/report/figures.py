"""PNG figures and a Markdown summary for people who don't use `dvc plots show`.

PNG bytes depend only on the data (no timestamps, fixed software tag), so DVC sees no change
where there is none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from kneexray.atomic import atomic_path, write_text  # noqa: E402
from kneexray.errors import MissingInputError

PNG_METADATA = {"Software": "kneexray"}
MODEL_TITLES = {"cnn": "Custom CNN", "resnet": "ResNet50 transfer"}


def save_png(fig, path: str | Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, metadata=PNG_METADATA, bbox_inches="tight")
    plt.close(fig)


def read_history(live_dir: str | Path) -> pd.DataFrame:
    """Per-epoch metrics from DVCLive's TSV files: columns step, train_<m>, val_<m>."""
    base = Path(live_dir) / "plots" / "metrics"
    frame = None
    for split, prefix in (("train", "train_"), ("eval", "val_")):
        for tsv in sorted((base / split).glob("*.tsv")):
            part = pd.read_csv(tsv, sep="\t")[["step", tsv.stem]].rename(columns={tsv.stem: prefix + tsv.stem})
            frame = part if frame is None else frame.merge(part, on="step", how="outer")
    if frame is None:
        raise MissingInputError(f"{live_dir}: no DVCLive metrics (was the model trained?)")
    return frame.sort_values("step").reset_index(drop=True)


def training_curves(history: pd.DataFrame, title: str):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = history["step"] + 1
    for ax, metric in zip(axes, ("accuracy", "loss")):
        for split, style in (("train", "-o"), ("val", "-s")):
            column = f"{split}_{metric}"
            if column in history:
                ax.plot(epochs, history[column], style, ms=3, label="training" if split == "train" else "validation")
        ax.set(title=f"{title}: {metric}", xlabel="epoch", ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def confusion_heatmap(matrix, title: str, classes: list[str]):
    counts = np.asarray(matrix)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts, dtype=float), where=rows > 0)
    labels = np.array([[f"{n}\n{p:.0%}" for n, p in zip(r_n, r_p)] for r_n, r_p in zip(counts, share)])
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    sns.heatmap(
        share,
        annot=labels,
        fmt="",
        cmap="Blues",
        vmin=0,
        vmax=1,
        cbar_kws={"label": "share of true class"},
        xticklabels=classes,
        yticklabels=classes,
        ax=ax,
    )
    ax.set(title=f"{title}: confusion matrix (test)", xlabel="predicted", ylabel="true")
    fig.tight_layout()
    return fig


def roc_figure(eval_dir: Path, title: str, classes: list[str]):
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    for cls in classes:
        curve = pd.read_csv(eval_dir / "roc" / f"{cls}.csv")
        if len(curve):
            ax.plot(curve["fpr"], curve["tpr"], label=cls)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(title=f"{title}: ROC, one vs rest", xlabel="false positive rate", ylabel="true positive rate")
    ax.legend()
    fig.tight_layout()
    return fig


def reliability_figure(eval_dir: Path, title: str, ece: float):
    table = pd.read_csv(eval_dir / "calibration.csv")
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    ax.plot(table["confidence"], table["accuracy"], "-o", label="model")
    ax.set(
        title=f"{title}: reliability (ECE {ece:.3f})", xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1)
    )
    ax.legend()
    fig.tight_layout()
    return fig


def format_with_ci(entry: dict, name: str, ci_digits: int = 3) -> str:
    """'0.792 [0.667, 0.896]' from a metrics entry with a `ci95` mapping; 'n/a' when undefined."""
    value, ci = entry.get(name), entry.get("ci95", {}).get(name, {})
    if value is None:
        return "n/a"
    if ci.get("low") is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci['low']:.{ci_digits}f}, {ci['high']:.{ci_digits}f}]"


def _patient_line(table: dict) -> str:
    if not table.get("found"):
        return "No patient table in the archive (labels not checked against T-scores)."
    if "label_disagreements" not in table:
        return "A patient table was found but could not be read."
    return (
        f"Patient table: {table['images_matched']} images matched, {table['label_disagreements']} label(s) "
        "disagree with the WHO category of their T-score."
    )


BASELINE_TITLES = {
    "chance": "Chance (random at training class frequencies; range over draws)",
    "majority": "Majority class",
    "thumbnail_logistic": "Logistic regression on greyscale thumbnails",
    "clinical_ost": "OST rule, 0.2 x (weight - age)",
    "clinical_logistic": "Logistic regression on age, sex, weight",
}


def _baseline_lines(metrics: dict, models: list[str]) -> list[str]:
    """The baselines on the same test images, and each model's paired difference to the best one."""
    found = metrics.get("baselines")
    if not found:
        return []
    lines = [
        "",
        "### Baselines on the same test images",
        "",
        "| baseline | accuracy | macro-F1 | macro AUC |",
        "|---|---|---|---|",
    ]
    for name, entry in found.items():
        auc = entry["macro_auc"] if name == "chance" else None
        lines.append(
            f"| {BASELINE_TITLES.get(name, name)} | {format_with_ci(entry, 'accuracy')} | "
            f"{format_with_ci(entry, 'macro_f1')} | {auc if auc is not None else format_with_ci(entry, 'macro_auc')} |"
        )
    lines += [
        "",
        "| model | macro-F1 minus the best baseline's (paired 95% CI) | out-of-fold macro-F1 "
        "| selected epoch | no skill |",
        "|---|---|---|---|---|",
    ]
    for m in models:
        e, d = metrics[m], metrics[m].get("vs_best_baseline")
        if d is None:
            continue
        oof = e.get("out_of_fold", {}).get("macro_f1")
        lines.append(
            f"| {MODEL_TITLES[m]} | {d['macro_f1_difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] vs "
            f"{BASELINE_TITLES.get(d['baseline'], d['baseline'])} | {'n/a' if oof is None else f'{oof:.3f}'} | "
            f"{e.get('selected_epoch', 'n/a')} of {e.get('folds', 1)}-fold CV | "
            f"{'**YES**' if e.get('no_skill') else 'no'} |"
        )
    return lines


def _source_lines(metrics: dict, models: list[str]) -> list[str]:
    """Per-source test metrics, when the data holds several sources."""
    if not any("per_source" in metrics[m] for m in models):
        return []
    lines = [
        "",
        "Per source (test images of each dataset source):",
        "",
        "| model | source | images | macro-F1 | macro AUC |",
    ]
    lines.append("|---|---|---|---|---|")
    for m in models:
        for origin, e in metrics[m].get("per_source", {}).items():
            if "macro_f1" not in e:
                lines.append(f"| {MODEL_TITLES[m]} | {origin} | {e['n_test']} | {e['note']} | |")
                continue
            auc = "n/a" if e["macro_auc"] is None else format_with_ci(e, "macro_auc")
            lines.append(f"| {MODEL_TITLES[m]} | {origin} | {e['n_test']} | {format_with_ci(e, 'macro_f1')} | {auc} |")
    return lines


def summary_markdown(metrics: dict, audit: dict, split: dict, figures: list[str]) -> str:
    data, classes = metrics["data"], metrics["classes"]
    models = [m for m in MODEL_TITLES if m in metrics]
    lines = [
        "# Results",
        "",
        "Generated by the `plot` stage from `reports/metrics.json`; do not edit by hand.",
        f"Dataset source: `{data['source']}`. Test images: {data['n_test']} "
        f"({', '.join(f'{c} {n}' for c, n in data['test_per_class'].items())}). "
        "Brackets: 95% bootstrap confidence intervals over test images.",
        "",
        "| model | weights | accuracy | macro-F1 | macro AUC | balanced acc. | "
        + " | ".join(f"recall {c}" for c in classes)
        + " | ECE |",
        "|---|---|---|---|---|---|" + "---|" * len(classes) + "---|",
    ]
    for m in models:
        e = metrics[m]
        lines.append(
            f"| {MODEL_TITLES[m]} | {e['weights_source']} | {format_with_ci(e, 'accuracy')} | "
            f"{format_with_ci(e, 'macro_f1')} | "
            f"{format_with_ci(e, 'macro_auc')} | {e['balanced_accuracy']:.3f} | "
            + " | ".join(f"{e['recall'][c]:.3f}" for c in classes)
            + f" | {e['ece']:.3f} |"
        )
    lines += _baseline_lines(metrics, models) + _source_lines(metrics, models)
    if any(metrics[m]["weights_source"] == "random" for m in models):
        lines += [
            "",
            "**The ResNet50 ran without ImageNet weights (none could be loaded): its figures are those of "
            "a random-feature model, not of transfer learning.**",
        ]
    lines += [
        "",
        "## Data",
        "",
        f"Files seen {audit['files_seen']}, unreadable {audit['unreadable']}, exact copies removed "
        f"{audit['exact_copy_files_removed']}, near-duplicate groups {audit['near_duplicate_groups']}, "
        f"label conflicts {audit['label_conflicts']} ({'kept' if audit['label_conflicts_kept'] else 'dropped'}). "
        + _patient_line(audit.get("patient_table", {}))
        + " Flagged pairs, for a person to check: [data_audit_pairs.png](data_audit_pairs.png); "
        "file lists: `reports/data_audit_details.json`.",
        "",
        "| split | " + " | ".join(classes) + " |",
        "|---|" + "---|" * len(classes),
    ]
    for name, counts in split["images_per_split"].items():
        lines.append(f"| {name} | " + " | ".join(str(counts[c]) for c in classes) + " |")
    lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def gradcam_figure(
    model_path: str | Path, predictions: pd.DataFrame, data_root: str | Path, title: str, per_class: int = 2
):
    """Grad-CAM overlays for a few test images per class, right and wrong."""
    from kneexray.evaluate.gradcam import gradcam_grid, pick_examples
    from kneexray.model.files import load_model
    from kneexray.model.inputs import label_indices, load_images

    model, metadata = load_model(model_path)
    classes = metadata["classes"]
    labels, predicted = label_indices(predictions["actual"], classes), label_indices(predictions["predicted"], classes)
    chosen = pick_examples(labels, predicted, per_class=per_class)
    images = load_images(
        predictions["path"].iloc[chosen],
        metadata["image_size"],
        fit=metadata.get("image_fit", "squash"),
        root=data_root,
    )
    fig = gradcam_grid(model, images[..., 0], labels[chosen], predicted[chosen], classes=classes, ncols=2 * per_class)
    fig.suptitle(f"{title}: Grad-CAM on test images (green: right, red: wrong)")
    return fig


def make_figures(
    *,
    metrics_path,
    eval_dir,
    live_dirs: dict[str, str],
    audit_path,
    split_report,
    figures_dir,
    summary_path,
    models: dict[str, str] | None = None,
    data_root: str | Path = ".",
) -> list[Path]:
    """All PNGs into figures_dir and the Markdown summary (linking them) to summary_path; with
    `models`, Grad-CAM grids of test images too."""
    metrics = json.loads(Path(metrics_path).read_text())
    out_dir, summary_path = Path(figures_dir), Path(summary_path)
    written = []
    for model, live_dir in live_dirs.items():
        title = MODEL_TITLES[model]
        model_eval = Path(eval_dir) / model
        details = json.loads((model_eval / "details.json").read_text())
        figures = {
            f"{model}_curves.png": training_curves(read_history(live_dir), title),
            f"{model}_confusion.png": confusion_heatmap(details["confusion_matrix"], title, metrics["classes"]),
            f"{model}_roc.png": roc_figure(model_eval, title, metrics["classes"]),
            f"{model}_reliability.png": reliability_figure(model_eval, title, details["ece"]),
        }
        if models and model in models:
            predictions = pd.read_csv(model_eval / "predictions.csv")
            figures[f"{model}_gradcam.png"] = gradcam_figure(models[model], predictions, data_root, title)
        for name, fig in figures.items():
            save_png(fig, out_dir / name)
            written.append(out_dir / name)
    summary = summary_markdown(
        metrics,
        json.loads(Path(audit_path).read_text()),
        json.loads(Path(split_report).read_text()),
        [os.path.relpath(p, summary_path.parent) for p in written],
    )
    write_text(summary_path, summary)
    return written
