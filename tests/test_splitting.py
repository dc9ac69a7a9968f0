"""Stratified, seeded, group-aware splits and the leakage check that guards them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kneexray import DEFAULT_CLASSES
from kneexray.data.fingerprint import CROP_FRACTIONS, group_near_duplicates, pairwise_distance
from kneexray.data.splitting import (
    SPLITS,
    LeakageError,
    SplitError,
    check_leakage,
    leaking_pairs,
    split_counts,
    split_index,
)

THRESHOLD = 0.006


def make_index(counts: dict[str, int], group_size: int = 1, seed: int = 0) -> pd.DataFrame:
    """An index with `counts` images per class; consecutive images of a class share a group."""
    rows = []
    group = 0
    for label, n in counts.items():
        for k in range(n):
            if k and k % group_size == 0:
                group += 1
            rows.append({"path": f"images/{label}/{label[:2]}{k:03d}.jpg", "label": label, "group": group})
        group += 1
    frame = pd.DataFrame(rows)
    return frame.sample(frac=1, random_state=seed).reset_index(drop=True)  # the order must not matter


COUNTS = {"normal": 30, "osteopenia": 120, "osteoporosis": 40}


def test_split_is_a_partition_with_the_asked_proportions() -> None:
    index = make_index(COUNTS)
    splits = split_index(index, DEFAULT_CLASSES, test_ratio=0.2, val_ratio=0.1, seed=42)
    assert list(splits) == list(SPLITS)
    paths = [p for part in splits.values() for p in part["path"]]
    assert sorted(paths) == sorted(index["path"])  # every image once, none twice
    n = len(index)
    assert len(splits["test"]) == pytest.approx(0.2 * n, abs=2)
    assert len(splits["val"]) == pytest.approx(0.1 * 0.8 * n, abs=2)
    for name, part in splits.items():
        assert list(part.columns) == list(index.columns)
        assert part["path"].is_monotonic_increasing, name  # sorted, index reset
        assert list(part.index) == list(range(len(part)))


def test_split_is_stratified() -> None:
    splits = split_index(make_index(COUNTS), DEFAULT_CLASSES, test_ratio=0.2, val_ratio=0.1, seed=42)
    counts = split_counts(splits, DEFAULT_CLASSES)
    assert counts["test"] == {"normal": 6, "osteopenia": 24, "osteoporosis": 8}
    for name in SPLITS:
        assert all(counts[name][c] > 0 for c in DEFAULT_CLASSES), (name, counts[name])
        share = counts[name]["osteopenia"] / sum(counts[name].values())
        assert share == pytest.approx(120 / 190, abs=0.05), (name, counts[name])
    assert sum(counts[name][c] for name in SPLITS for c in DEFAULT_CLASSES) == sum(COUNTS.values())


def test_split_is_deterministic_for_a_seed() -> None:
    index = make_index(COUNTS, group_size=2)
    first = split_index(index, DEFAULT_CLASSES, test_ratio=0.2, val_ratio=0.1, seed=7)
    again = split_index(index.copy(), DEFAULT_CLASSES, test_ratio=0.2, val_ratio=0.1, seed=7)
    other = split_index(index, DEFAULT_CLASSES, test_ratio=0.2, val_ratio=0.1, seed=8)
    for name in SPLITS:
        pd.testing.assert_frame_equal(first[name], again[name])
    assert set(first["test"]["path"]) != set(other["test"]["path"])


def test_split_does_not_modify_its_input() -> None:
    index = make_index(COUNTS, group_size=3)
    before = index.copy()
    split_index(index, DEFAULT_CLASSES, test_ratio=0.2, val_ratio=0.1, seed=0, group_near_duplicates=False)
    pd.testing.assert_frame_equal(index, before)


@pytest.mark.parametrize("group_size", [2, 3, 5])
def test_groups_never_straddle_splits(group_size: int) -> None:
    index = make_index(COUNTS, group_size=group_size)
    for seed in range(3):
        splits = split_index(index, DEFAULT_CLASSES, test_ratio=0.2, val_ratio=0.1, seed=seed)
        where = {}
        for name, part in splits.items():
            for group in part["group"]:
                assert where.setdefault(group, name) == name, f"group {group} in {where[group]} and {name}"
        assert all(len(splits[n]) for n in SPLITS)


def test_without_grouping_copies_can_straddle() -> None:
    # the same index split per image: with big groups, some group ends up in two splits
    index = make_index(COUNTS, group_size=5)
    splits = split_index(index, DEFAULT_CLASSES, test_ratio=0.2, val_ratio=0.1, seed=0, group_near_duplicates=False)
    original = dict(zip(index["path"], index["group"]))
    homes: dict[int, set[str]] = {}
    for name, part in splits.items():
        for path in part["path"]:
            homes.setdefault(original[path], set()).add(name)
    assert any(len(h) > 1 for h in homes.values())


def test_class_too_small_for_the_test_split() -> None:
    index = make_index({"normal": 3, "osteopenia": 50, "osteoporosis": 20})
    with pytest.raises(SplitError, match=r"test split: .*need at least 5 images each\): normal=3") as err:
        split_index(index, DEFAULT_CLASSES, test_ratio=0.2, val_ratio=0.1, seed=0)
    message = str(err.value)
    too_small, counts = message.split("; counts: ")
    assert "osteopenia" not in too_small and "osteoporosis" not in too_small  # only normal is named
    assert counts == "{'normal': 3, 'osteopenia': 50, 'osteoporosis': 20}"  # all counts are shown


def test_class_missing_entirely() -> None:
    index = make_index({"normal": 20, "osteopenia": 50})
    with pytest.raises(SplitError, match=r"osteoporosis=0"):
        split_index(index, DEFAULT_CLASSES, test_ratio=0.2, val_ratio=0.1, seed=0)


def test_class_too_small_for_the_validation_split() -> None:
    # 6 osteoporosis images survive the 5-fold test split, but 10 folds for validation need 10
    index = make_index({"normal": 30, "osteopenia": 50, "osteoporosis": 6})
    with pytest.raises(SplitError, match=r"validation split: .*need at least 10 images each\): osteoporosis=\d"):
        split_index(index, DEFAULT_CLASSES, test_ratio=0.2, val_ratio=0.1, seed=0)


# ---- leakage ------------------------------------------------------------------------------------


def random_prints(n: int, seed: int = 0) -> np.ndarray:
    """Unrelated fingerprints (unit vectors, zero mean), one per image."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 64))
    base -= base.mean(axis=1, keepdims=True)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    return np.repeat(base[:, None, :], len(CROP_FRACTIONS), axis=1).astype(np.float32)


@pytest.fixture
def planted() -> tuple[pd.DataFrame, np.ndarray, tuple[str, str]]:
    """24 images per class, all distinct except one osteopenia pair with equal fingerprints."""
    counts = {"normal": 24, "osteopenia": 24, "osteoporosis": 24}
    index = make_index(counts).sort_values("path").reset_index(drop=True)
    prints = random_prints(len(index))
    a, b = index.index[index["label"] == "osteopenia"][[3, 17]]
    prints[b] = prints[a]
    index["group"] = group_near_duplicates(prints, THRESHOLD)
    return index, prints, (index.loc[a, "path"], index.loc[b, "path"])


def home(splits: dict[str, pd.DataFrame], path: str) -> str:
    (name,) = [n for n, part in splits.items() if path in set(part["path"])]
    return name


def test_the_planted_pair_is_one_group(planted) -> None:
    index, _, (a, b) = planted
    groups = dict(zip(index["path"], index["group"]))
    assert groups[a] == groups[b]
    assert index["group"].nunique() == len(index) - 1


def test_leakage_is_caught_without_grouping_and_avoided_with_it(planted) -> None:
    index, prints, (a, b) = planted
    straddling = []
    for seed in range(20):
        ungrouped = split_index(
            index, DEFAULT_CLASSES, test_ratio=0.25, val_ratio=0.25, seed=seed, group_near_duplicates=False
        )
        if home(ungrouped, a) != home(ungrouped, b):
            straddling.append(seed)
            with pytest.raises(LeakageError, match=r"leakage: 1 pair\(s\)") as err:
                check_leakage(ungrouped, index, prints, THRESHOLD)
            assert a in str(err.value) and b in str(err.value)
            assert "group_near_duplicates: true" in str(err.value)
            pairs = leaking_pairs(ungrouped, pairwise_distance(prints), index, THRESHOLD)
            assert [(p, q) for p, q, _ in pairs] == [(a, b)] and pairs[0][2] <= 1e-6
        grouped = split_index(
            index, DEFAULT_CLASSES, test_ratio=0.25, val_ratio=0.25, seed=seed, group_near_duplicates=True
        )
        assert home(grouped, a) == home(grouped, b)
        check_leakage(grouped, index, prints, THRESHOLD)  # no error
    assert straddling, "no seed put the planted pair in different splits without grouping"


def test_leakage_error_is_a_split_error() -> None:
    assert issubclass(LeakageError, SplitError)


def test_leaking_pairs_ignores_pairs_in_one_split_and_unknown_paths() -> None:
    index = pd.DataFrame({"path": ["a", "b", "c", "d"], "label": ["normal"] * 4, "group": [0, 1, 2, 3]})
    dist = np.array([[0, 0.001, 0.5, 0.001], [0.001, 0, 0.5, 0.5], [0.5, 0.5, 0, 0.004], [0.001, 0.5, 0.004, 0]])
    splits = {
        "train": pd.DataFrame({"path": ["a", "b"]}),
        "val": pd.DataFrame({"path": ["c"]}),
        "test": pd.DataFrame({"path": []}),
    }
    # a~b share train; a~d and c~d involve d, which is in no split; nothing leaks
    assert leaking_pairs(splits, dist, index, THRESHOLD) == []
    splits["test"] = pd.DataFrame({"path": ["d"]})
    assert leaking_pairs(splits, dist, index, THRESHOLD) == [("a", "d", 0.001), ("c", "d", 0.004)]
    assert leaking_pairs(splits, dist, index, 0.002) == [("a", "d", 0.001)]


def test_blocked_comparisons_find_the_same_pairs_as_the_full_matrix(monkeypatch) -> None:
    from kneexray.data import fingerprint as fp

    rng = np.random.default_rng(3)
    base = rng.normal(size=(40, len(CROP_FRACTIONS), 64))
    base[10] = base[3] + rng.normal(scale=0.01, size=base[3].shape)  # near copies
    base[25] = base[3]
    base[30] = base[7] + rng.normal(scale=0.02, size=base[7].shape)
    prints = (base / np.linalg.norm(base, axis=2, keepdims=True)).astype(np.float32)
    dense = pairwise_distance(prints)
    threshold = float(np.sort(dense[np.triu_indices(40, 1)])[5])  # the six closest pairs
    expected = sorted((int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(dense <= threshold, k=1))))
    monkeypatch.setattr(fp, "BLOCK_BYTES", 3 * 40 * len(CROP_FRACTIONS) * 8 * 2)  # blocks of 3 rows
    assert sorted((i, j) for i, j, _ in fp.close_pairs(prints, None, threshold)) == expected
    np.testing.assert_array_equal(
        fp.near_any(prints[:7], prints[7:], threshold), dense[:7, 7:].min(axis=1) <= threshold
    )
    assert not fp.near_any(prints[:2], prints[:0], threshold).any()
    groups = group_near_duplicates(prints, threshold)
    assert groups[3] == groups[10] == groups[25] and groups[7] == groups[30] and groups[3] != groups[7]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_tree_search_misses_no_close_pair(monkeypatch, seed) -> None:
    """Near-duplicate thresholds are small, so close_pairs searches a k-d tree of projected
    fingerprints; it must find exactly the pairs that comparing all of them finds."""
    from kneexray.data import fingerprint as fp

    rng = np.random.default_rng(seed)
    base = rng.normal(size=(300, len(CROP_FRACTIONS), 256))
    for k in range(40):  # copies at graded distances, some through a crop only
        i, j = rng.choice(300, 2, replace=False)
        base[j] = base[i] + rng.normal(scale=rng.uniform(0.002, 0.3), size=base[i].shape)
        if k % 4 == 0:
            base[j, 0] = base[i, rng.integers(1, len(CROP_FRACTIONS))] + rng.normal(scale=0.01, size=256)
    base[7] = 0  # a flat image: zero fingerprints
    prints = (base / np.maximum(np.linalg.norm(base, axis=2, keepdims=True), 1e-12)).astype(np.float32)
    dense = pairwise_distance(prints)
    monkeypatch.setattr(fp, "_all_pairs", lambda *a: pytest.fail("compared all pairs"))
    for threshold in (0.0, 0.001, 0.006, 0.02, 0.05):
        expected = sorted((int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(dense <= threshold, k=1))))
        found = fp.close_pairs(prints, None, threshold)
        assert sorted((i, j) for i, j, _ in found) == expected, threshold
        assert all(abs(d - dense[i, j]) < 1e-9 for i, j, d in found)
        cross = fp.close_pairs(prints[:120], prints[120:], threshold)  # two sets: (row of a, row of b)
        want = sorted((int(i), int(j)) for i, j in zip(*np.nonzero(dense[:120, 120:] <= threshold)))
        assert sorted((i, j) for i, j, _ in cross) == want, threshold
    assert len(expected) >= 10  # the test plants pairs the search has to find
