"""Test-set metrics a reviewer of a small medical-imaging study would ask for, with uncertainty.

With about 48 test images a bare accuracy misleads, so the headline figures carry seeded
bootstrap 95% confidence intervals, and calibration is reported beside discrimination.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from kneexray.errors import KneexrayError


class MetricsError(KneexrayError, ValueError):
    """The predictions can't support the asked-for metric (e.g. one class only)."""


def _check(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> None:
    if len(y_true) == 0:
        raise MetricsError("no test images: nothing to evaluate")
    if proba.shape != (len(y_true), len(classes)):
        raise MetricsError(f"probabilities have shape {proba.shape}, expected ({len(y_true)}, {len(classes)})")


def percentile_ci(values, level: float = 0.95) -> dict[str, float | None]:
    """The central `level` range of bootstrap (or random-draw) values; None bounds when there are none."""
    if len(values) == 0:
        return {"low": None, "high": None}
    tail = (1 - level) / 2 * 100
    return {"low": float(np.percentile(values, tail)), "high": float(np.percentile(values, 100 - tail))}


def macro_auc(y_true: np.ndarray, proba: np.ndarray) -> float | None:
    """One-vs-rest ROC AUC averaged over the classes present; None with fewer than two classes."""
    present = [c for c in range(proba.shape[1]) if (y_true == c).any()]
    if len(present) < 2:
        return None
    aucs = [roc_auc_score(y_true == c, proba[:, c]) for c in present]
    return float(np.mean(aucs))


def per_class_auc(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict[str, float | None]:
    out = {}
    for c, name in enumerate(classes):
        positives = (y_true == c).sum()
        out[name] = float(roc_auc_score(y_true == c, proba[:, c])) if 0 < positives < len(y_true) else None
    return out


def _macro_f1_counts(confusion: np.ndarray) -> np.ndarray:
    """Macro-F1 from (..., k, k) confusion counts; a class never predicted nor present scores 0."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    denom = confusion.sum(axis=-1) + confusion.sum(axis=-2)  # 2TP + FP + FN
    f1 = np.divide(2 * tp, denom, out=np.zeros(tp.shape), where=denom > 0)
    return f1.mean(axis=-1)


def _auc_rank(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """One-vs-rest ROC AUC via the rank-sum statistic (ties averaged), as roc_auc_score gives."""
    from scipy.stats import rankdata

    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_ci(
    y_true: np.ndarray, proba: np.ndarray, *, resamples: int, seed: int, level: float = 0.95
) -> dict[str, dict[str, float | None]]:
    """Percentile bootstrap over test images for accuracy, macro-F1 and macro AUC.

    Counts are computed with NumPy rather than sklearn calls per resample: a thousand resamples
    take well under a second instead of tens of seconds.
    """
    rng = np.random.default_rng(seed)
    y_pred = proba.argmax(axis=1)
    n, k = len(y_true), proba.shape[1]
    idx = rng.integers(0, n, (resamples, n))
    t, p = y_true[idx], y_pred[idx]
    cells = t * k + p
    confusion = np.stack([np.bincount(row, minlength=k * k) for row in cells]).reshape(resamples, k, k)
    stats = {"accuracy": list((t == p).mean(axis=1)), "macro_f1": list(_macro_f1_counts(confusion)), "macro_auc": []}
    for row in idx:
        aucs = [a for c in range(k) if (a := _auc_rank(y_true[row] == c, proba[row, c])) is not None]
        if len(aucs) >= 2:
            stats["macro_auc"].append(float(np.mean(aucs)))
    return {name: percentile_ci(v, level) for name, v in stats.items()}


def calibration(y_true: np.ndarray, proba: np.ndarray, bins: int) -> tuple[float, list[dict]]:
    """Expected calibration error of the top-class confidence, and the reliability-diagram rows."""
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            conf, acc = float(confidence[members].mean()), float(correct[members].mean())
            ece += members.mean() * abs(acc - conf)
            rows.append(
                {
                    "bin": b,
                    "bin_low": float(edges[b]),
                    "bin_high": float(edges[b + 1]),
                    "confidence": conf,
                    "accuracy": acc,
                    "count": int(members.sum()),
                }
            )
    return float(ece), rows


def roc_points(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict[str, list[dict]]:
    """Per-class one-vs-rest ROC curves (fpr, tpr) for classes with positives and negatives."""
    curves = {}
    for c, name in enumerate(classes):
        positives = (y_true == c).sum()
        if 0 < positives < len(y_true):
            fpr, tpr, _ = roc_curve(y_true == c, proba[:, c])
            curves[name] = [{"fpr": float(f), "tpr": float(t)} for f, t in zip(fpr, tpr)]
    return curves


def evaluate_predictions(
    y_true, proba, classes: Sequence[str], *, resamples: int = 1000, seed: int = 0, bins: int = 10
) -> dict:
    """All test metrics for one model (`proba`'s columns are `classes`). Raises MetricsError when
    only one class is present."""
    y_true, proba = np.asarray(y_true, dtype=int), np.asarray(proba, dtype=float)
    _check(y_true, proba, classes)
    present = np.unique(y_true)
    if len(present) < 2:
        raise MetricsError(
            f"the test set holds only class {classes[present[0]]!r}: per-class and AUC metrics "
            "are undefined; use a larger test split"
        )
    y_pred = proba.argmax(axis=1)
    labels = list(range(len(classes)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
        weighted = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
        macro = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        report = classification_report(
            y_true, y_pred, labels=labels, target_names=list(classes), zero_division=0, digits=3
        )
    ece, reliability = calibration(y_true, proba, bins)
    return {
        "n_test": int(len(y_true)),
        "test_per_class": {name: int(s) for name, s in zip(classes, support)},
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_precision": float(macro[0]),
        "macro_recall": float(macro[1]),
        "macro_f1": float(macro[2]),
        "weighted_precision": float(weighted[0]),
        "weighted_recall": float(weighted[1]),
        "weighted_f1": float(weighted[2]),
        "macro_auc": macro_auc(y_true, proba),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "per_class_auc": per_class_auc(y_true, proba, classes),
        "ci95": bootstrap_ci(y_true, proba, resamples=resamples, seed=seed),
        "ece": ece,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "classification_report": report,
        "reliability": reliability,
        "roc": roc_points(y_true, proba, classes),
    }


def paired_difference(
    y_true: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    n_classes: int,
    *,
    resamples: int,
    seed: int,
    level: float = 0.95,
) -> dict:
    """Macro-F1 of A minus B on the same bootstrap resamples of the test images (a paired CI:
    both are scored on each resample, so the shared luck of the test set cancels)."""
    rng = np.random.default_rng(seed)
    n, k = len(y_true), n_classes
    idx = rng.integers(0, n, (resamples, n))

    def f1s(pred):
        cells = y_true[idx] * k + pred[idx]
        confusion = np.stack([np.bincount(row, minlength=k * k) for row in cells]).reshape(resamples, k, k)
        return _macro_f1_counts(confusion)

    full = _macro_f1_counts(np.bincount(y_true * k + pred_a, minlength=k * k).reshape(k, k)) - _macro_f1_counts(
        np.bincount(y_true * k + pred_b, minlength=k * k).reshape(k, k)
    )
    return {"macro_f1_difference": float(full), **percentile_ci(f1s(pred_a) - f1s(pred_b), level)}


def chance_summary(y_true: np.ndarray, draws: np.ndarray, n_classes: int, level: float = 0.95) -> dict:
    """Accuracy and macro-F1 of predictions drawn at random (rows of `draws`): mean and the central
    `level` range over the draws."""
    k = n_classes
    cells = y_true[None, :] * k + draws
    confusion = np.stack([np.bincount(row, minlength=k * k) for row in cells]).reshape(len(draws), k, k)
    stats = {"accuracy": (draws == y_true[None, :]).mean(axis=1), "macro_f1": _macro_f1_counts(confusion)}
    out: dict = {name: float(v.mean()) for name, v in stats.items()}
    out["macro_auc"] = 0.5
    out["ci95"] = {name: percentile_ci(v, level) for name, v in stats.items()}
    return out
