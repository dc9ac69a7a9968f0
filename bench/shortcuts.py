"""Shortcut checks: could a model's score come from image size or colour mode instead of bone?

In the real data, size and colour mode correlate with the label. Two checks make that visible:
a classifier that sees only those (trained on the same training split), and each model's score
within the largest group of test images that share one size and mode, where the shortcut
carries no information.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import f1_score

from kneexray import DEFAULT_CLASSES


def _features(frame: pd.DataFrame) -> np.ndarray:
    return np.column_stack(
        [frame["width"], frame["height"], frame["width"] / frame["height"], (frame["mode"] != "L").astype(int)]
    )


def metadata_only_macro_f1(index: pd.DataFrame, train_paths, test_paths, seed: int = 0) -> float:
    """Macro-F1 on the test split of a classifier that sees only width, height, aspect and mode."""
    by_path = index.set_index("path")
    train, test = by_path.loc[list(train_paths)], by_path.loc[list(test_paths)]
    clf = RandomForestClassifier(n_estimators=200, random_state=seed, class_weight="balanced")
    clf.fit(_features(train), train["label"])
    return float(
        f1_score(
            test["label"], clf.predict(_features(test)), labels=list(DEFAULT_CLASSES), average="macro", zero_division=0
        )
    )


def largest_stratum_scores(index: pd.DataFrame, predictions: pd.DataFrame) -> dict:
    """Accuracy and macro-F1 of `predictions` (path, actual, predicted) within the largest test
    group of one (width, height, mode)."""
    merged = predictions.merge(index[["path", "width", "height", "mode"]], on="path")
    sizes = merged.groupby(["width", "height", "mode"]).size().sort_values(ascending=False)
    (width, height, mode), n = sizes.index[0], int(sizes.iloc[0])
    group = merged[(merged["width"] == width) & (merged["height"] == height) & (merged["mode"] == mode)]
    return {
        "stratum": f"{width}x{height} {mode}",
        "n": n,
        "per_class": {c: int((group["actual"] == c).sum()) for c in DEFAULT_CLASSES},
        "accuracy": float((group["actual"] == group["predicted"]).mean()),
        "macro_f1": float(
            f1_score(
                group["actual"], group["predicted"], labels=list(DEFAULT_CLASSES), average="macro", zero_division=0
            )
        ),
    }
