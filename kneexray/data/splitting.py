"""Stratified train/validation/test lists where copies of one radiograph never straddle splits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from kneexray.errors import KneexrayError

SPLITS = ("train", "val", "test")


class SplitError(KneexrayError, ValueError):
    """The data can't be split as asked (a class too small, say)."""


def _hold_out(
    frame: pd.DataFrame, classes: Sequence[str], ratio: float, seed: int, what: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One fold of a StratifiedGroupKFold with about 1/ratio folds: stratified by label, whole groups."""
    folds = max(2, round(1 / ratio))
    counts = frame["label"].value_counts()
    too_small = {c: int(counts.get(c, 0)) for c in classes if counts.get(c, 0) < folds}
    if too_small:
        raise SplitError(
            f"{what}: class(es) too small to split at ratio {ratio:g} (need at least {folds} images each): "
            + ", ".join(f"{c}={n}" for c, n in too_small.items())
            + f"; counts: {dict((c, int(counts.get(c, 0))) for c in classes)}"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    rest_idx, held_idx = next(splitter.split(frame, frame["label"], groups=frame["group"]))
    return frame.iloc[rest_idx], frame.iloc[held_idx]


def split_index(
    index: pd.DataFrame,
    classes: Sequence[str],
    *,
    test_ratio: float,
    val_ratio: float,
    seed: int,
    group_near_duplicates: bool = True,
    test_source: str = "",
) -> dict[str, pd.DataFrame]:
    """Test first, then validation from what remains, as in the original notebook (20%, then 10%);
    every one of `classes` must have enough images for both.

    With `test_source`, the test set is every image of that source instead (leave-one-source-out),
    and the other sources' copies of its images are left out of training and validation."""
    frame = index.copy()
    if not group_near_duplicates:  # every image its own group: copies may then leak across splits
        frame["group"] = np.arange(len(frame))
    if test_source:
        held = frame["origin"] == test_source if "origin" in frame else np.zeros(len(frame), dtype=bool)
        if not held.any():
            raise SplitError(f"split.test_source: no images of source {test_source!r} in the index")
        test = frame[held]
        rest = frame[~held & ~frame["group"].isin(test["group"])]
    else:
        rest, test = _hold_out(frame, classes, test_ratio, seed, "test split")
    train, val = _hold_out(rest, classes, val_ratio, seed + 1, "validation split")
    return {name: part.sort_values("path").reset_index(drop=True) for name, part in zip(SPLITS, (train, val, test))}


def leaking_pairs(
    splits: dict[str, pd.DataFrame], distance: np.ndarray, index: pd.DataFrame, threshold: float
) -> list[tuple[str, str, float]]:
    """Pairs of (near-)copies, by a full distance matrix, that sit in different splits."""
    close = [(int(i), int(j), float(distance[i, j])) for i, j in zip(*np.nonzero(np.triu(distance <= threshold, k=1)))]
    return _straddling(splits, index, close)


def _straddling(splits: dict[str, pd.DataFrame], index: pd.DataFrame, close: list[tuple[int, int, float]]):
    """The (path, path, distance) of the close pairs (index rows i, j) whose images sit in different splits."""
    where = {path: name for name, part in splits.items() for path in part["path"]}
    paths = index["path"].tolist()
    return [
        (paths[i], paths[j], d)
        for i, j, d in close
        if where.get(paths[i]) and where.get(paths[j]) and where[paths[i]] != where[paths[j]]
    ]


def split_counts(splits: dict[str, pd.DataFrame], classes: Sequence[str]) -> dict[str, dict[str, int]]:
    return {name: {c: int((part["label"] == c).sum()) for c in classes} for name, part in splits.items()}


class LeakageError(SplitError):
    """Copies of one radiograph sit in different splits."""


def check_leakage(
    splits: dict[str, pd.DataFrame], index: pd.DataFrame, fingerprints: np.ndarray, threshold: float
) -> None:
    from kneexray.data.fingerprint import close_pairs

    pairs = _straddling(splits, index, close_pairs(fingerprints, None, threshold))  # blocked: bounded memory
    if pairs:
        shown = "; ".join(f"{a} ~ {b} (distance {d:.4f})" for a, b, d in pairs[:5])
        raise LeakageError(
            f"leakage: {len(pairs)} pair(s) of (near-)copies straddle splits: {shown}"
            + (" ..." if len(pairs) > 5 else "")
            + "; set split.group_near_duplicates: true"
        )


def assign_folds(frame: pd.DataFrame, folds: int, seed: int) -> np.ndarray:
    """Fold number (0..folds-1) of each row: stratified by label, whole groups per fold, so the
    copies and the patient that the split keeps together stay together in cross-validation too."""
    counts = frame["label"].value_counts()
    too_small = {c: int(n) for c, n in counts.items() if n < folds}
    if too_small:
        raise SplitError(
            f"train.folds={folds}: class(es) with fewer images than folds in train+validation: "
            + ", ".join(f"{c}={n}" for c, n in too_small.items())
        )
    out = np.empty(len(frame), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (_, held) in enumerate(splitter.split(frame, frame["label"], groups=frame["group"])):
        out[held] = fold
    return out
