"""The baselines every run is compared with, and the paired comparison."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kneexray.data.patients import clinical_table
from kneexray.evaluate import baselines
from kneexray.evaluate.metrics import chance_summary, paired_difference


def test_chance_macro_f1_is_about_a_third_whatever_the_imbalance():
    y_train = np.array([0] * 15 + [1] * 64 + [2] * 21)
    y_test = np.array([0] * 30 + [1] * 128 + [2] * 42)
    result = chance_summary(y_test, baselines.chance_draws(y_train, len(y_test), 2000, seed=0, k=3), 3)
    assert abs(result["macro_f1"] - 1 / 3) < 0.02  # not the majority class's 0.26
    assert result["ci95"]["macro_f1"]["low"] < result["macro_f1"] < result["ci95"]["macro_f1"]["high"]
    assert result["macro_auc"] == 0.5


def test_thumbnail_logistic_learns_what_the_pixels_show_and_majority_does_not():
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    x = (rng.normal(100, 20, (90, 8, 8, 1)) + 40 * y[:, None, None, None]).clip(0, 255).astype(np.uint8)
    proba = baselines.thumbnail_logistic(x[:60], y[:60], x[60:], 3)
    assert (proba.argmax(axis=1) == y[60:]).mean() > 0.8
    assert np.allclose(proba.sum(axis=1), 1)
    assert (baselines.majority_proba(np.array([1, 1, 0]), 4, 3).argmax(axis=1) == 1).all()


def test_ost_rule_and_the_clinical_regression(tmp_path):
    table = pd.DataFrame({"age": [30, 60, 80], "weight": [80, 50, 45], "sex": ["F", "M", "F"]})
    # OST: +10 (low risk), -2 (moderate), -7 (high risk)
    assert list(baselines.ost_proba(table).argmax(axis=1)) == [0, 1, 2]
    rng = np.random.default_rng(1)
    age = rng.uniform(30, 85, 120)
    train = pd.DataFrame({"age": age, "weight": rng.uniform(45, 90, 120), "sex": rng.choice(["F", "M"], 120)})
    y = np.digitize(age, [50, 68])  # older, more osteoporosis: age alone separates the classes
    proba = baselines.clinical_logistic(train[:90], y[:90], train[90:], 3)
    assert (proba.argmax(axis=1) == y[90:]).mean() > 0.7
    # the patient table gives age, sex and weight, never the T-score (it is the label)
    pd.DataFrame(
        {
            "Patient Id": ["N1"],
            "Age": [50],
            "Gender": ["F"],
            "Weight": [60],
            "T-score Value": [-0.5],
            "Diagnosis": ["normal"],
        }
    ).to_csv(tmp_path / "patients.csv", index=False)
    clinical = clinical_table(tmp_path)
    assert list(clinical.columns) == ["patient_id", "age", "sex", "weight"] and clinical["age"].iloc[0] == 50


def test_paired_difference_sees_a_real_gap_and_no_gap():
    y = np.arange(60) % 3
    good, bad = y.copy(), np.zeros(60, dtype=int)
    gap = paired_difference(y, good, bad, 3, resamples=500, seed=0)
    assert gap["macro_f1_difference"] > 0.5 and gap["low"] > 0.3
    same = paired_difference(y, good, good, 3, resamples=500, seed=0)
    assert same == {"macro_f1_difference": 0.0, "low": 0.0, "high": 0.0}


def test_logistic_baselines_work_with_two_classes():
    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    x = (rng.normal(size=(60, 8, 8, 1)) * 20 + 100 + 60 * y[:, None, None, None]).clip(0, 255).astype(np.uint8)
    proba = baselines.thumbnail_logistic(x[:40], y[:40], x[40:], 2)
    assert proba.shape == (20, 2) and (proba.argmax(axis=1) == y[40:]).mean() >= 0.9
