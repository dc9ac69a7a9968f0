"""The evaluate stage's work: predict the test split with each model and write what DVC reads."""

from __future__ import annotations

import logging
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


def evaluate_models(models: dict[str, str], *, test_csv: str | Path, data_root: str | Path, out_dir: str | Path,
                    metrics_path: str | Path, params: dict) -> dict:
    from kneexray.training import load_model

    cfg = params["evaluate"]
    rows = read_split(test_csv)
    y_true = label_indices(rows["label"])
    images_by_size: dict[int, np.ndarray] = {}
    summary = {"data": {"source": params["dataset"]["source"], "n_test": int(len(rows)),
                        "test_per_class": {c: int((rows["label"] == c).sum()) for c in CLASSES}}}
    for name, path in models.items():
        model, metadata = load_model(path)
        size = metadata["image_size"]
        if size not in images_by_size:
            images_by_size[size] = load_images(rows["path"], size, root=data_root, desc="test images")
        proba = predict_proba(model, images_by_size[size], params["image"]["batch_size"])
        result = evaluate_predictions(y_true, proba, resamples=cfg["bootstrap_resamples"], seed=cfg["seed"],
                                      bins=cfg["calibration_bins"])
        write_model_reports(Path(out_dir) / name, rows, y_true, proba, result)
        summary[name] = headline(result, metadata)
        log.info("%s: accuracy %.3f, macro-F1 %.3f [%.3f, %.3f], weights %s", name, result["accuracy"],
                 result["macro_f1"], result["ci95"]["macro_f1"]["low"], result["ci95"]["macro_f1"]["high"],
                 metadata["weights_source"])
        if metadata["weights_source"] == "random":
            log.warning("%s ran WITHOUT ImageNet weights (random features): its metrics are not transfer learning", name)
    write_json(metrics_path, summary)
    return summary
