"""The evaluate stage's work: predict the test split with each model and write what DVC reads."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kneexray.atomic import atomic_path, write_json, write_text
from kneexray.errors import InputError, MissingInputError
from kneexray.evaluate import baselines
from kneexray.evaluate.metrics import MetricsError, chance_summary, evaluate_predictions, paired_difference
from kneexray.layout import CLINICAL_FILE, FINGERPRINTS_FILE, INDEX_FILE
from kneexray.model.inputs import label_indices, load_images, make_dataset, read_split
from kneexray.params import EvaluateParams, ExtractParams, Params

log = logging.getLogger(__name__)

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_auc", "ece")


def predict_proba(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    return model.predict(make_dataset(images, None, batch_size=batch_size), verbose=0)


def _probe_lines(metadata: dict) -> list[str]:
    probe = metadata.get("linear_probe")
    if probe is None:
        return []
    network, alone = probe["network_out_of_fold"]["macro_f1"], probe["probe_out_of_fold"]["macro_f1"]
    return [
        f"- Blended with a logistic regression on {probe['size']} px thumbnails (the linear probe): network "
        f"weight {probe['network_weight']:.1f}, chosen out of fold; out-of-fold macro-F1 of the network alone "
        f"{network:.3f}, of the probe alone {alone:.3f}."
    ]


def headline(result: dict, metadata: dict | None = None) -> dict:
    """The small, diffable figures for reports/metrics.json."""
    out = {name: result[name] for name in HEADLINE}
    out["ci95"] = result["ci95"]
    out["recall"] = {c: values["recall"] for c, values in result["per_class"].items()}
    if metadata is not None:
        out["weights_source"] = metadata["weights_source"]
        out["pretrained"] = int(metadata["weights_source"] not in ("random", "none (trained from scratch)"))
        # how the model was chosen, and whether it learned anything (older models lack these)
        for key in ("no_skill", "selected_epoch", "folds", "out_of_fold"):
            if key in metadata:
                out[key] = metadata[key]
        if "linear_probe" in metadata:  # the network's share beside the thumbnail probe, and each part alone
            probe = metadata["linear_probe"]
            out["linear_probe"] = {
                "network_weight": probe["network_weight"],
                "network_out_of_fold_macro_f1": probe["network_out_of_fold"]["macro_f1"],
                "probe_out_of_fold_macro_f1": probe["probe_out_of_fold"]["macro_f1"],
            }
    return out


def _clinical_rows(rows: pd.DataFrame, data_root: Path) -> pd.DataFrame | None:
    """Age, sex and weight of each image's patient (file stem = Patient Id), or None without a table."""
    table_path = data_root / CLINICAL_FILE
    if not table_path.is_file():
        return None
    table = pd.read_csv(table_path, dtype={"patient_id": str}).set_index("patient_id")
    index = pd.read_csv(data_root / INDEX_FILE).set_index("path")
    stems = rows["path"].map(lambda p: Path(index.loc[p, "source"]).stem if p in index.index else "")
    clinical = table.reindex(stems.to_numpy()).reset_index(drop=True)
    if clinical[["age", "weight"]].isna().all(axis=None):
        return None
    # an image without a patient row gets the typical patient (the median), not a dropped row
    for column in ("age", "weight"):
        clinical[column] = clinical[column].fillna(table[column].median())
    clinical["sex"] = clinical["sex"].fillna("")
    return clinical


def score_baselines(
    train_rows: pd.DataFrame, test_rows: pd.DataFrame, data_root: Path, cfg: EvaluateParams, classes: tuple[str, ...]
) -> tuple[dict, dict]:
    """Each baseline's headline metrics on the test images, and its predicted classes (for the
    paired comparison). Chance is a distribution over random draws, so it has no single prediction."""
    y_train, y_test = label_indices(train_rows["label"], classes), label_indices(test_rows["label"], classes)
    resamples, seed, k = cfg.bootstrap_resamples, cfg.seed, len(classes)

    def scored(proba):
        return evaluate_predictions(y_test, proba, classes, resamples=resamples, seed=seed, bins=cfg.calibration_bins)

    draws = baselines.chance_draws(y_train, len(y_test), resamples, seed, k)
    results = {"chance": chance_summary(y_test, draws, k)}
    probas = {"majority": baselines.majority_proba(y_train, len(y_test), k)}
    size = cfg.thumbnail_size
    probas["thumbnail_logistic"] = baselines.thumbnail_logistic(
        load_images(train_rows["path"], size, root=data_root, desc="thumbnails"),
        y_train,
        load_images(test_rows["path"], size, root=data_root, desc="thumbnails"),
        k,
        seed=seed,
    )
    clinical_train, clinical_test = _clinical_rows(train_rows, data_root), _clinical_rows(test_rows, data_root)
    if clinical_train is not None and clinical_test is not None:
        if classes == baselines.OST_CLASSES:  # the rule's risk levels are these three classes
            probas["clinical_ost"] = baselines.ost_proba(clinical_test)
        probas["clinical_logistic"] = baselines.clinical_logistic(clinical_train, y_train, clinical_test, k, seed=seed)
    for name, proba in probas.items():
        results[name] = headline(scored(proba))
        log.info("baseline %s: macro-F1 %s", name, results[name]["macro_f1"])
    return results, {name: proba.argmax(axis=1) for name, proba in probas.items()}


def best_baseline(results: dict) -> str:
    """The strongest baseline with predictions of its own, by test macro-F1."""
    return max((name for name in results if name != "chance"), key=lambda name: results[name]["macro_f1"])


def write_model_reports(
    out_dir: Path, rows: pd.DataFrame, y_true, proba, result: dict, classes: tuple[str, ...]
) -> None:
    """Predictions (DVC confusion template), ROC per class, reliability, classification report."""
    predictions = pd.DataFrame(
        {
            "path": rows["path"],
            **({"origin": rows["origin"]} if "origin" in rows else {}),
            "actual": [classes[i] for i in y_true],
            "predicted": [classes[i] for i in proba.argmax(axis=1)],
            **{f"p_{c}": np.round(proba[:, i], 6) for i, c in enumerate(classes)},
        }
    )
    with atomic_path(out_dir) as tmp:
        (tmp / "roc").mkdir(parents=True)
        predictions.to_csv(tmp / "predictions.csv", index=False)
        for cls in classes:  # one file per class, so DVC draws one line per class
            pd.DataFrame(result["roc"].get(cls, []), columns=["fpr", "tpr"]).to_csv(
                tmp / "roc" / f"{cls}.csv", index=False
            )
        pd.DataFrame(
            result["reliability"], columns=["bin", "bin_low", "bin_high", "confidence", "accuracy", "count"]
        ).to_csv(tmp / "calibration.csv", index=False)
        (tmp / "classification_report.txt").write_text(result["classification_report"])
        details = {k: v for k, v in result.items() if k not in ("roc", "classification_report")}
        write_json(tmp / "details.json", details)


def prepare_external(
    path: str | Path, extract_cfg: ExtractParams, classes: tuple[str, ...], train_prints: np.ndarray, scratch: Path
) -> tuple[pd.DataFrame, Path, dict]:
    """An external test set, curated like the main data, minus (near-)copies of training images.

    Returns its rows (path, label), the folder the paths are relative to, and what was removed.
    """
    from kneexray.data.archive import ExtractLimits, extract_nested, find_class_dirs
    from kneexray.data.curation import curate
    from kneexray.data.fingerprint import near_any

    source = Path(path).expanduser()
    if source.is_file():
        limits = ExtractLimits(
            max_depth=extract_cfg.max_depth,
            max_total_bytes=extract_cfg.max_total_mb * 2**20,
            max_ratio=float(extract_cfg.max_ratio),
        )
        extract_nested(source, scratch / "unpacked", limits)
        source = scratch / "unpacked"
    elif not source.is_dir():
        raise MissingInputError(f"evaluate.external_path: {path} does not exist (a ZIP or a folder laid out by class)")
    curated = curate(
        {"external": find_class_dirs(source, classes)},
        scratch / "images",
        max_pixels=extract_cfg.max_pixels,
        min_side=extract_cfg.min_side,
        near_duplicate_distance=extract_cfg.near_duplicate_distance,
        keep_conflicts=False,
    )
    copies = near_any(curated.fingerprints, train_prints, extract_cfg.near_duplicate_distance)
    rows = curated.index.loc[~copies, ["path", "label"]].reset_index(drop=True)
    audit = {
        "files_seen": curated.audit["files_seen"],
        "unreadable": curated.audit["unreadable"],
        "label_conflicts": curated.audit["label_conflicts"],
        "copies_of_training_images_removed": int(copies.sum()),
        "n": int(len(rows)),
        "per_class": {c: int((rows["label"] == c).sum()) for c in classes},
    }
    if copies.any():
        log.warning("external set: %d image(s) are (near-)copies of training images and were removed", copies.sum())
    return rows, scratch / "images", audit


def _training_fingerprints(test_csv: Path, data_root: Path, classes: tuple[str, ...]) -> np.ndarray:
    """Fingerprints of the images the models learned from (train and validation splits)."""
    index = pd.read_csv(data_root / INDEX_FILE)
    seen = set(pd.concat([read_split(test_csv.with_name(f"{s}.csv"), classes)["path"] for s in ("train", "val")]))
    return np.load(data_root / FINGERPRINTS_FILE)[index["path"].isin(seen).to_numpy()]


def _evaluate_set(model, metadata, rows: pd.DataFrame, root: Path, params: Params, cache: dict, out_dir: Path) -> dict:
    cfg, classes = params.evaluate, params.dataset.classes
    key = size, fit = metadata["image_size"], metadata.get("image_fit", "squash")
    if key not in cache:
        cache[key] = load_images(rows["path"], size, fit=fit, root=root, desc="images")
    y_true = label_indices(rows["label"], classes)
    proba = predict_proba(model, cache[key], params.image.batch_size)
    result = evaluate_predictions(
        y_true, proba, classes, resamples=cfg.bootstrap_resamples, seed=cfg.seed, bins=cfg.calibration_bins
    )
    write_model_reports(out_dir, rows, y_true, proba, result, classes)
    result["predicted"], result["predicted_proba"] = proba.argmax(axis=1), proba
    return result


def _with_origin(rows: pd.DataFrame, data_root: Path) -> pd.DataFrame:
    """The test rows with each image's source (`origin`) when the data holds several sources."""
    index = pd.read_csv(data_root / INDEX_FILE, usecols=lambda c: c in ("path", "origin"))
    if "origin" not in index or index["origin"].nunique() < 2:
        return rows
    return rows.assign(origin=rows["path"].map(index.set_index("path")["origin"]))


def _per_source(rows: pd.DataFrame, proba: np.ndarray, params: Params) -> dict[str, dict]:
    """Headline metrics on each source's test images: a model that works on one hospital only
    shows here, not in the overall figure."""
    cfg, classes = params.evaluate, params.dataset.classes
    out = {}
    for origin in sorted(rows["origin"].unique()):
        mask = (rows["origin"] == origin).to_numpy()
        y = label_indices(rows["label"][mask], classes)
        try:
            result = evaluate_predictions(
                y, proba[mask], classes, resamples=cfg.bootstrap_resamples, seed=cfg.seed, bins=cfg.calibration_bins
            )
        except MetricsError as err:  # one class only among this source's test images
            out[origin] = {"n_test": int(mask.sum()), "note": str(err)}
            continue
        out[origin] = {"n_test": int(mask.sum()), **{k: result[k] for k in ("accuracy", "macro_f1", "macro_auc")}}
        out[origin]["ci95"] = {k: result["ci95"][k] for k in ("accuracy", "macro_f1", "macro_auc")}
    return out


def evaluate_models(
    models: dict[str, str],
    *,
    test_csv: str | Path,
    data_root: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path,
    params: Params,
) -> dict:
    """Each model on the test split and, with evaluate.external_path, on an external set."""
    from kneexray.model.files import load_model

    test_csv, data_root, out_dir = Path(test_csv), Path(data_root), Path(out_dir)
    classes = params.dataset.classes
    rows = _with_origin(read_split(test_csv, classes), data_root)
    summary: dict[str, Any] = {
        "classes": list(classes),
        "data": {
            "source": params.dataset.source,
            "n_test": int(len(rows)),
            "test_per_class": {c: int((rows["label"] == c).sum()) for c in classes},
        },
    }
    if "origin" in rows:
        summary["data"]["test_per_source"] = rows["origin"].value_counts().sort_index().to_dict()
    sets = {"test": (rows, data_root)}
    train_rows = pd.concat(
        [read_split(test_csv.with_name(f"{s}.csv"), classes) for s in ("train", "val")], ignore_index=True
    )
    summary["baselines"], baseline_predictions = score_baselines(train_rows, rows, data_root, params.evaluate, classes)
    best = best_baseline(summary["baselines"])
    y_test = label_indices(rows["label"], classes)
    cards: dict[str, dict] = {}
    scratch = Path(tempfile.mkdtemp(prefix=".external-", dir=data_root.parent))
    try:
        if params.evaluate.external_path:
            ext_rows, ext_root, summary["external_data"] = prepare_external(
                params.evaluate.external_path,
                params.extract,
                classes,
                _training_fingerprints(test_csv, data_root, classes),
                scratch,
            )
            sets["external"] = (ext_rows, ext_root)
        caches: dict[str, dict] = {name: {} for name in sets}
        for name, path in models.items():
            model, metadata = load_model(path)
            if tuple(metadata["classes"]) != classes:
                raise InputError(
                    f"{path}: the model's classes ({', '.join(metadata['classes'])}) are not "
                    f"dataset.classes ({', '.join(classes)}); retrain it"
                )
            cards[name] = metadata
            for set_name, (set_rows, root) in sets.items():
                target = out_dir / name if set_name == "test" else out_dir / f"{name}_{set_name}"
                result = _evaluate_set(model, metadata, set_rows, root, params, caches[set_name], target)
                entry = headline(result, metadata)
                if set_name == "test" and "origin" in set_rows:
                    entry["per_source"] = _per_source(set_rows, result["predicted_proba"], params)
                if set_name == "test":
                    entry["vs_best_baseline"] = {
                        "baseline": best,
                        **paired_difference(
                            y_test,
                            result["predicted"],
                            baseline_predictions[best],
                            len(classes),
                            resamples=params.evaluate.bootstrap_resamples,
                            seed=params.evaluate.seed,
                        ),
                    }
                    summary[name] = entry
                else:
                    summary[name][set_name] = {
                        k: v for k, v in entry.items() if k not in ("weights_source", "pretrained")
                    }
                log.info(
                    "%s on %s: accuracy %.3f, macro-F1 %.3f [%.3f, %.3f], weights %s",
                    name,
                    set_name,
                    result["accuracy"],
                    result["macro_f1"],
                    result["ci95"]["macro_f1"]["low"],
                    result["ci95"]["macro_f1"]["high"],
                    metadata["weights_source"],
                )
            if metadata.get("no_skill"):
                log.error("%s is a NO-SKILL model: it gives nearly every training image one class", name)
            if metadata["weights_source"] == "random":
                log.warning(
                    "%s ran WITHOUT ImageNet weights (random features): its metrics are not transfer learning", name
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for name, metadata in cards.items():  # beside the model's other test reports
        write_text(out_dir / name / "model_card.md", model_card(name, metadata, summary))
    write_json(metrics_path, summary)
    return summary


def model_card(name: str, metadata: dict, summary: dict) -> str:
    """A model card: what the model is for, what made it, and how it did on held-out test images."""
    entry, data = summary[name], metadata.get("data", {})

    def ci(metric: str) -> str:
        low, high = entry["ci95"][metric]["low"], entry["ci95"][metric]["high"]
        return f"{entry[metric]:.3f}" + ("" if low is None else f" [{low:.3f}, {high:.3f}]")

    versus = entry["vs_best_baseline"]
    lines = [
        f"# Model card: {name}",
        "",
        f"**Intended use.** {metadata.get('intended_use', 'not stated')}",
        "",
        f"- Trained on: `{data.get('source', 'unknown')}` data (extract index sha256 `{data.get('index_sha256')}`); "
        f"{metadata.get('train_images', '?')} training images, {metadata.get('folds', 1)}-fold ensemble, "
        f"epoch {metadata.get('selected_epoch', '?')} of {metadata.get('epochs_run', '?')} kept.",
        f"- Code: kneexray {metadata.get('kneexray_version')}, modules sha256 `{metadata.get('code_sha256')}`; "
        f"weights: {metadata['weights_source']}.",
        f"- Out-of-fold macro-F1 (training images, each scored by a model that did not see it): "
        f"{metadata.get('out_of_fold', {}).get('macro_f1', float('nan')):.3f}.",
        *_probe_lines(metadata),
        f"- No-skill alarm: {'**YES**: it gives nearly every image one class' if metadata.get('no_skill') else 'no'}.",
        "",
        f"Test set: {summary['data']['n_test']} images. Brackets: 95% bootstrap CIs.",
        "",
        "| accuracy | balanced accuracy | macro-F1 | macro AUC |",
        "|---|---|---|---|",
        f"| {ci('accuracy')} | {entry['balanced_accuracy']:.3f} | {ci('macro_f1')} | {ci('macro_auc')} |",
        "",
        f"Macro-F1 minus the best baseline's ({versus['baseline']}): {versus['macro_f1_difference']:+.3f} "
        f"[{versus['low']:+.3f}, {versus['high']:+.3f}]; chance scores about "
        f"{summary['baselines']['chance']['macro_f1']:.3f}.",
        "",
        "Settings it was trained with (params.yaml): `" + json.dumps(metadata.get("params", {}), sort_keys=True) + "`",
    ]
    if data.get("source") == "phantom":
        lines += ["", "**Trained on the synthetic phantom: its outputs on real radiographs mean nothing.**"]
    return "\n".join(lines) + "\n"
