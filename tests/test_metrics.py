"""Test-set metrics against values worked out by hand, and the bootstrap intervals around them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from kneexray import DEFAULT_CLASSES
from kneexray.evaluate.metrics import (
    MetricsError,
    bootstrap_ci,
    calibration,
    evaluate_predictions,
    macro_auc,
    per_class_auc,
    roc_points,
)

# classes: 0 normal, 1 osteopenia, 2 osteoporosis
FAST = dict(resamples=20, seed=0)


def one_hot_proba(pred: list[int], confidence: float = 0.8) -> np.ndarray:
    """Probabilities whose argmax is `pred`, top class at `confidence`, the rest split evenly."""
    proba = np.full((len(pred), 3), (1 - confidence) / 2)
    proba[np.arange(len(pred)), pred] = confidence
    return proba


# y_true 0 0 1 1 1 2 2 2
# y_pred 0 1 1 1 0 1 1 1      osteoporosis (2) is never predicted
#
# normal:       TP 1 (#0), FP 1 (#4), FN 1 (#1)      P = 1/2, R = 1/2, F1 = 1/2
# osteopenia:   TP 2 (#2, #3), FP 4 (#1, #5, #6, #7) P = 2/6, R = 2/3, F1 = 2*(1/3)(2/3)/(1/3+2/3) = 4/9
# osteoporosis: TP 0, never predicted                P = 0 (zero_division), R = 0, F1 = 0
# accuracy = 3/8; macro F1 = (1/2 + 4/9 + 0)/3 = 17/54; macro P = (1/2 + 1/3 + 0)/3 = 5/18
# macro R = balanced accuracy = (1/2 + 2/3 + 0)/3 = 7/18
# weighted F1 = (2*1/2 + 3*4/9 + 3*0)/8 = (1 + 4/3)/8 = 7/24
Y_TRUE = [0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 1, 1, 1, 0, 1, 1, 1]


@pytest.mark.filterwarnings("error")  # the never-predicted class must not leak sklearn warnings
def test_hand_computed_metrics_with_a_class_never_predicted() -> None:
    m = evaluate_predictions(Y_TRUE, one_hot_proba(Y_PRED), DEFAULT_CLASSES, bins=2, **FAST)
    assert m["n_test"] == 8
    assert m["test_per_class"] == {"normal": 2, "osteopenia": 3, "osteoporosis": 3}
    assert m["accuracy"] == pytest.approx(3 / 8)
    assert m["macro_f1"] == pytest.approx(17 / 54)
    assert m["macro_precision"] == pytest.approx(5 / 18)
    assert m["macro_recall"] == pytest.approx(7 / 18)
    assert m["balanced_accuracy"] == pytest.approx(7 / 18)
    assert m["weighted_f1"] == pytest.approx(7 / 24)
    pc = m["per_class"]
    assert pc["normal"] == pytest.approx({"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2})
    assert pc["osteopenia"] == pytest.approx({"precision": 1 / 3, "recall": 2 / 3, "f1": 4 / 9, "support": 3})
    assert pc["osteoporosis"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3}
    assert m["confusion_matrix"] == [[1, 1, 0], [1, 2, 0], [0, 3, 0]]
    # every top-class confidence is 0.8, in the upper of 2 bins, where 3 of 8 are right
    assert m["ece"] == pytest.approx(abs(0.8 - 3 / 8))
    assert "osteoporosis" in m["classification_report"]
    for value in (m["accuracy"], m["macro_f1"], m["macro_auc"], m["ece"]):
        assert not math.isnan(value)


def test_macro_f1_counts_the_never_predicted_class() -> None:
    # if the unpredicted class were dropped, macro F1 would be (1/2 + 4/9)/2 = 17/36
    m = evaluate_predictions(Y_TRUE, one_hot_proba(Y_PRED), DEFAULT_CLASSES, **FAST)
    assert m["macro_f1"] == pytest.approx(17 / 54)
    assert m["macro_f1"] != pytest.approx(17 / 36)


def test_perfect_predictions() -> None:
    y = [0, 1, 2, 0, 1, 2]
    m = evaluate_predictions(y, one_hot_proba(y, confidence=0.9), DEFAULT_CLASSES, bins=10, **FAST)
    assert m["accuracy"] == m["macro_f1"] == m["balanced_accuracy"] == 1.0
    assert m["macro_auc"] == 1.0
    assert m["per_class_auc"] == {"normal": 1.0, "osteopenia": 1.0, "osteoporosis": 1.0}
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert m["ece"] == pytest.approx(0.1)  # right every time at 90 % confidence
    assert m["ci95"]["accuracy"] == {"low": 1.0, "high": 1.0}


@pytest.mark.parametrize("label, name", [(0, "normal"), (1, "osteopenia"), (2, "osteoporosis")])
def test_single_class_test_set_is_refused_clearly(label: int, name: str) -> None:
    y = [label] * 5
    with pytest.raises(MetricsError, match=rf"only class '{name}'.*undefined.*larger test split"):
        evaluate_predictions(y, one_hot_proba([0, 1, 2, 0, 1]), DEFAULT_CLASSES, **FAST)


def test_empty_and_misshapen_inputs_are_refused() -> None:
    with pytest.raises(MetricsError, match="no test images"):
        evaluate_predictions([], np.zeros((0, 3)), DEFAULT_CLASSES, **FAST)
    with pytest.raises(MetricsError, match=r"shape \(4, 2\), expected \(4, 3\)"):
        evaluate_predictions([0, 1, 0, 1], np.full((4, 2), 0.5), DEFAULT_CLASSES, **FAST)


def test_macro_auc_equals_sklearn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 60)
    logits = rng.normal(size=(60, 3)) + 1.5 * np.eye(3)[y]  # informative, not perfect
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = roc_auc_score(y, proba, multi_class="ovr", average="macro")
    assert 0.6 < expected < 0.99
    assert macro_auc(y, proba) == pytest.approx(expected)
    assert evaluate_predictions(y, proba, DEFAULT_CLASSES, **FAST)["macro_auc"] == pytest.approx(expected)
    per_class = per_class_auc(y, proba, DEFAULT_CLASSES)
    assert list(per_class.values()) == pytest.approx([roc_auc_score(y == c, proba[:, c]) for c in range(3)])


def test_macro_auc_by_hand_with_a_class_absent() -> None:
    # only normal (0) and osteopenia (1) present; osteoporosis has no positives and is left out
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.5, 0.4, 0.1], [0.1, 0.8, 0.1]])
    # normal scores: positives .7 .4, negatives .5 .1 -> pairs won: (.7>.5, .7>.1, .4>.1) = 3 of 4
    # osteopenia scores: positives .4 .8, negatives .2 .5 -> (.4>.2, .8>.2, .8>.5) = 3 of 4
    assert macro_auc(y, proba) == pytest.approx(0.75)
    assert per_class_auc(y, proba, DEFAULT_CLASSES) == {"normal": 0.75, "osteopenia": 0.75, "osteoporosis": None}
    assert set(roc_points(y, proba, DEFAULT_CLASSES)) == {"normal", "osteopenia"}
    assert macro_auc(np.array([1, 1]), proba[:2]) is None


def test_ece_hand_computed_with_two_bins() -> None:
    y = np.array([0, 0, 0, 2])
    proba = np.array(
        [
            [0.90, 0.05, 0.05],  # conf .90, right  -> upper bin
            [0.20, 0.70, 0.10],  # conf .70, wrong  -> upper bin
            [0.40, 0.35, 0.25],  # conf .40, right  -> lower bin
            [0.30, 0.45, 0.25],
        ]
    )  # conf .45, wrong -> lower bin
    # lower bin: confidence (.40 + .45)/2 = .425, accuracy 1/2 -> |gap| .075, weight 2/4
    # upper bin: confidence (.90 + .70)/2 = .80,  accuracy 1/2 -> |gap| .30,  weight 2/4
    # ECE = .5 * .075 + .5 * .30 = .1875
    ece, rows = calibration(y, proba, bins=2)
    assert ece == pytest.approx(0.1875)
    expected = [
        {"bin": 0, "bin_low": 0.0, "bin_high": 0.5, "confidence": 0.425, "accuracy": 0.5, "count": 2},
        {"bin": 1, "bin_low": 0.5, "bin_high": 1.0, "confidence": 0.8, "accuracy": 0.5, "count": 2},
    ]
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        assert row == pytest.approx(want)


def test_ece_leaves_out_empty_bins_and_keeps_confidence_one_in_the_last() -> None:
    y = np.array([0, 1])
    proba = np.array([[1.0, 0.0, 0.0], [0.0, 0.95, 0.05]])
    ece, rows = calibration(y, proba, bins=10)
    assert [r["bin"] for r in rows] == [9]
    assert rows[0]["count"] == 2
    assert ece == pytest.approx(0.025)  # right both times at a mean confidence of .975


def noisy_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n predictions, about 70 % right, all classes present."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    logits = rng.normal(size=(n, 3)) + 1.2 * np.eye(3)[y]
    return y, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def width(ci: dict) -> float:
    return ci["high"] - ci["low"]


def test_bootstrap_ci_contains_the_estimate_and_narrows_with_more_data() -> None:
    y, proba = noisy_set(30, seed=1)
    point = evaluate_predictions(y, proba, DEFAULT_CLASSES, resamples=10, seed=0)
    small = bootstrap_ci(y, proba, resamples=120, seed=0)
    big = bootstrap_ci(np.tile(y, 4), np.tile(proba, (4, 1)), resamples=120, seed=0)
    for name in ("accuracy", "macro_f1", "macro_auc"):
        assert small[name]["low"] <= point[name] <= small[name]["high"], name
        assert big[name]["low"] <= point[name] <= big[name]["high"], name  # same point estimate at 4x
        assert 0 < width(small[name]) and 0 < width(big[name])
        # the standard error falls as 1/sqrt(n): 4x the data, about half the width
        assert width(big[name]) < 0.75 * width(small[name]), (name, small[name], big[name])


def test_bootstrap_ci_is_deterministic_for_a_seed() -> None:
    y, proba = noisy_set(24, seed=2)
    first = bootstrap_ci(y, proba, resamples=25, seed=5)
    assert first == bootstrap_ci(y, proba, resamples=25, seed=5)
    assert first != bootstrap_ci(y, proba, resamples=25, seed=6)
    m1 = evaluate_predictions(y, proba, DEFAULT_CLASSES, resamples=25, seed=5)
    assert m1["ci95"] == first


def test_bootstrap_ci_with_resamples_missing_classes() -> None:
    # 4 images: many resamples hold one class only; AUC is then skipped, not NaN
    y = np.array([0, 1, 1, 2])
    proba = one_hot_proba([0, 1, 2, 2])
    ci = bootstrap_ci(y, proba, resamples=40, seed=0)
    for name in ("accuracy", "macro_f1", "macro_auc"):
        assert 0 <= ci[name]["low"] <= ci[name]["high"] <= 1
        assert not any(math.isnan(v) for v in ci[name].values())
