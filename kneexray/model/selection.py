"""Choosing the epoch to keep, and telling a model with no skill from one that learned.

The epoch is chosen on out-of-fold predictions pooled over all folds (every training image is
scored once, by the fold model that did not train on it), on a metric that a constant predictor
cannot win: macro-F1 or balanced accuracy. A near-uniform model at epoch 1 has the lowest
unweighted validation loss on an imbalanced set, which is how early stopping on `val_loss` used to
pick a model that gives every image the same class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score

SELECTION_METRICS = ("macro_f1", "balanced_accuracy")


def score(metric: str, y_true: np.ndarray, proba: np.ndarray) -> float:
    y_pred = np.asarray(proba).argmax(axis=1)
    if metric == "macro_f1":
        return float(f1_score(y_true, y_pred, labels=list(range(np.shape(proba)[1])), average="macro", zero_division=0))
    if metric == "balanced_accuracy":
        return float(balanced_accuracy_score(y_true, y_pred))
    raise ValueError(f"selection metric: {metric!r} is not one of {', '.join(SELECTION_METRICS)}")


def weighted_log_loss(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Cross-entropy with each class weighted as in balanced training: every class counts equally."""
    p = np.clip(np.asarray(proba, dtype=np.float64)[np.arange(len(y_true)), y_true], 1e-7, 1.0)
    classes, counts = np.unique(y_true, return_counts=True)
    weight = dict(zip(classes, len(y_true) / (len(classes) * counts)))
    w = np.array([weight[c] for c in y_true])
    return float(-(w * np.log(p)).sum() / w.sum())


@dataclass
class EpochSelector:
    """Keeps the best epoch on `metric`, never one before `min_epochs`; says when to stop:
    `patience` epochs after the best one without improvement (counted from min_epochs on)."""

    metric: str
    min_epochs: int
    patience: int
    best_epoch: int | None = None  # 0-based
    best_score: float = -np.inf
    history: list[float] = field(default_factory=list)

    def update(self, epoch: int, value: float) -> bool:
        """Record `epoch`'s score; True when it is the new best (its weights are worth keeping)."""
        self.history.append(value)
        if epoch + 1 < self.min_epochs or value <= self.best_score:
            return False
        self.best_epoch, self.best_score = epoch, value
        return True

    def should_stop(self, epoch: int) -> bool:
        if epoch + 1 < self.min_epochs or self.best_epoch is None:
            return False
        return epoch - self.best_epoch >= self.patience


def prediction_shares(proba: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Share of images given each of `classes` (the columns of `proba`)."""
    counts = np.bincount(np.asarray(proba).argmax(axis=1), minlength=len(classes))
    return {c: float(n / max(1, counts.sum())) for c, n in zip(classes, counts)}


def no_skill(shares: dict[str, float], threshold: float) -> str | None:
    """The class a model gives (nearly) every image, or None when its decisions vary."""
    top = max(shares, key=lambda c: shares[c])
    return top if shares[top] >= threshold else None
