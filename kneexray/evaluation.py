"""The evaluate stage's work: predict the test split with each model and write what DVC reads."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from kneexray import CLASSES
from kneexray.atomic import atomic_path, write_json
from kneexray.inputs import label_indices, load_images, make_dataset, read_split
from kneexray.metrics import evaluate_predictions

log = logging.getLogger(__name__)

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_auc", "ece")


def predict_proba(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    return model.predict(make_dataset(images, None, batch_size=batch_size), verbose=0)


def headline(result: dict, metadata: dict) -> dict:
    """The small, diffable figures for reports/metrics.json."""
    out = {name: result[name] for name in HEADLINE}
    out["ci95"] = result["ci95"]
    out["recall"] = {c: result["per_class"][c]["recall"] for c in CLASSES}
    out["weights_source"] = metadata["weights_source"]
    out["pretrained"] = int(metadata["weights_source"] not in ("random", "none (trained from scratch)"))
    return out


def write_model_reports(out_dir: Path, rows: pd.DataFrame, y_true, proba, result: dict) -> None:
    """Predictions (DVC confusion template), ROC per class, reliability, classification report."""
    predictions = pd.DataFrame({
        "path": rows["path"],
        "actual": [CLASSES[i] for i in y_true],
        "predicted": [CLASSES[i] for i in proba.argmax(axis=1)],
        **{f"p_{c}": np.round(proba[:, i], 6) for i, c in enumerate(CLASSES)},
    })
    with atomic_path(out_dir) as tmp:
        (tmp / "roc").mkdir(parents=True)
        predictions.to_csv(tmp / "predictions.csv", index=False)
        for cls in CLASSES:  # one file per class, so DVC draws one line per class
            pd.DataFrame(result["roc"].get(cls, []), columns=["fpr", "tpr"]).to_csv(tmp / "roc" / f"{cls}.csv", index=False)
        pd.DataFrame(result["reliability"], columns=["bin", "bin_low", "bin_high", "confidence", "accuracy", "count"]) \
            .to_csv(tmp / "calibration.csv", index=False)
        (tmp / "classification_report.txt").write_text(result["classification_report"])
        details = {k: v for k, v in result.items() if k not in ("roc", "classification_report")}
        write_json(tmp / "details.json", details)


def prepare_external(path: str | Path, extract_cfg: dict, train_prints: np.ndarray, scratch: Path) -> tuple[pd.DataFrame, Path, dict]:
    """An external test set, curated like the main data, minus (near-)copies of training images.

    Returns its rows (path, label), the folder the paths are relative to, and what was removed.
    """
    from kneexray.archive import ExtractLimits, extract_nested, find_class_dirs
    from kneexray.curation import curate
    from kneexray.fingerprint import cross_distance

    source = Path(path).expanduser()
    if source.is_file():
        limits = ExtractLimits(max_depth=extract_cfg["max_depth"], max_total_bytes=extract_cfg["max_total_mb"] * 2**20,
                               max_ratio=float(extract_cfg["max_ratio"]))
        extract_nested(source, scratch / "unpacked", limits)
        source = scratch / "unpacked"
    elif not source.is_dir():
        raise FileNotFoundError(f"evaluate.external_path: {path} does not exist (a ZIP or a folder laid out by class)")
    curated = curate(find_class_dirs(source, CLASSES), scratch / "images", max_pixels=extract_cfg["max_pixels"],
                     min_side=extract_cfg["min_side"], near_duplicate_distance=extract_cfg["near_duplicate_distance"],
                     keep_conflicts=False)
    copies = cross_distance(curated.fingerprints, train_prints).min(axis=1, initial=np.inf) \
        <= extract_cfg["near_duplicate_distance"]
    rows = curated.index.loc[~copies, ["path", "label"]].reset_index(drop=True)
    audit = {"files_seen": curated.audit["files_seen"], "unreadable": curated.audit["unreadable"],
             "label_conflicts": curated.audit["label_conflicts"],
             "copies_of_training_images_removed": int(copies.sum()), "n": int(len(rows)),
             "per_class": {c: int((rows["label"] == c).sum()) for c in CLASSES}}
    if copies.any():
        log.warning("external set: %d image(s) are (near-)copies of training images and were removed", copies.sum())
    return rows, scratch / "images", audit


def _training_fingerprints(test_csv: Path, data_root: Path) -> np.ndarray:
    """Fingerprints of the images the models learned from (train and validation splits)."""
    from kneexray.extraction import FINGERPRINTS_FILE, INDEX_FILE

    index = pd.read_csv(data_root / INDEX_FILE)
    seen = set(pd.concat([read_split(test_csv.with_name(f"{s}.csv"))["path"] for s in ("train", "val")]))
    return np.load(data_root / FINGERPRINTS_FILE)[index["path"].isin(seen).to_numpy()]


def _evaluate_set(model, metadata, rows: pd.DataFrame, root: Path, params: dict, cache: dict, out_dir: Path) -> dict:
    cfg = params["evaluate"]
    size = metadata["image_size"]
    if size not in cache:
        cache[size] = load_images(rows["path"], size, root=root, desc="images")
    y_true = label_indices(rows["label"])
    proba = predict_proba(model, cache[size], params["image"]["batch_size"])
    result = evaluate_predictions(y_true, proba, resamples=cfg["bootstrap_resamples"], seed=cfg["seed"],
                                  bins=cfg["calibration_bins"])
    write_model_reports(out_dir, rows, y_true, proba, result)
    return result


def evaluate_models(models: dict[str, str], *, test_csv: str | Path, data_root: str | Path, out_dir: str | Path,
                    metrics_path: str | Path, params: dict) -> dict:
    """Each model on the test split and, with evaluate.external_path, on an external set."""
    from kneexray.training import load_model

    test_csv, data_root, out_dir = Path(test_csv), Path(data_root), Path(out_dir)
    rows = read_split(test_csv)
    summary = {"data": {"source": params["dataset"]["source"], "n_test": int(len(rows)),
                        "test_per_class": {c: int((rows["label"] == c).sum()) for c in CLASSES}}}
    sets = {"test": (rows, data_root)}
    scratch = Path(tempfile.mkdtemp(prefix=".external-", dir=data_root.parent))
    try:
        if params["evaluate"]["external_path"]:
            ext_rows, ext_root, summary["external_data"] = prepare_external(
                params["evaluate"]["external_path"], params["extract"],
                _training_fingerprints(test_csv, data_root), scratch)
            sets["external"] = (ext_rows, ext_root)
        caches: dict[str, dict] = {name: {} for name in sets}
        for name, path in models.items():
            model, metadata = load_model(path)
            for set_name, (set_rows, root) in sets.items():
                target = out_dir / name if set_name == "test" else out_dir / f"{name}_{set_name}"
                result = _evaluate_set(model, metadata, set_rows, root, params, caches[set_name], target)
                entry = headline(result, metadata)
                if set_name == "test":
                    summary[name] = entry
                else:
                    summary[name][set_name] = {k: v for k, v in entry.items() if k not in ("weights_source", "pretrained")}
                log.info("%s on %s: accuracy %.3f, macro-F1 %.3f [%.3f, %.3f], weights %s", name, set_name,
                         result["accuracy"], result["macro_f1"], result["ci95"]["macro_f1"]["low"],
                         result["ci95"]["macro_f1"]["high"], metadata["weights_source"])
            if metadata["weights_source"] == "random":
                log.warning("%s ran WITHOUT ImageNet weights (random features): its metrics are not transfer learning",
                            name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_json(metrics_path, summary)
    return summary
