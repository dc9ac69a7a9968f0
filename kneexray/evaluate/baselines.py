"""Simple baselines scored beside the models on the same test images.

A model is worth its cost only where it beats what needs no deep learning: the class frequencies
(chance), the majority class, a logistic regression on small greyscale thumbnails and, where the
patient table has them, age, sex and weight (the OST screening rule and a logistic regression).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import f1_score, make_scorer
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kneexray import DEFAULT_CLASSES

# Each function takes the number of classes, k: class indices run 0..k-1 (params dataset.classes).


def class_priors(y_train: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y_train, minlength=k) / len(y_train)


def chance_draws(y_train: np.ndarray, n_test: int, draws: int, seed: int, k: int) -> np.ndarray:
    """(draws, n_test) class indices drawn at the training class frequencies: what a predictor that
    ignores the image scores is a distribution, not one number."""
    rng = np.random.default_rng(seed)
    return rng.choice(k, size=(draws, n_test), p=class_priors(y_train, k))


def majority_proba(y_train: np.ndarray, n_test: int, k: int) -> np.ndarray:
    """Every image gets the training priors (so the majority class, and an AUC of 0.5)."""
    return np.tile(class_priors(y_train, k), (n_test, 1))


def _logistic(seed: int, y: np.ndarray):
    # Inner CV picks the regularisation; a few hundred images and a thousand pixels overfit otherwise.
    counts = np.bincount(y)
    folds = max(2, min(5, int(counts[counts > 0].min())))
    return make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(
            Cs=[1e-4, 1e-3, 1e-2, 1e-1, 1.0],
            cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
            # the scorer "f1_macro" names; as a string, scikit-learn 1.9 fails on two classes (pos_label twice)
            scoring=make_scorer(f1_score, average="macro"),
            class_weight="balanced",
            max_iter=5000,
        ),
    )


def _proba(model, x: np.ndarray, k: int) -> np.ndarray:
    """Probabilities over all k classes, also when a class was absent from training."""
    out = np.zeros((len(x), k))
    out[:, model.classes_] = model.predict_proba(x)
    return out


def _fit(model, x, y):
    with warnings.catch_warnings():  # scikit-learn 1.9 announces API changes that don't affect this use
        warnings.simplefilter("ignore", FutureWarning)
        # two classes: the macro-F1 scorer passes a pos_label that macro averaging ignores
        warnings.filterwarnings("ignore", "Note that pos_label", UserWarning)
        return model.fit(x, y)


def fit_logistic(x: np.ndarray, y: np.ndarray, seed: int = 0):
    """The balanced logistic regression of the baselines (standardised features), fitted on (x, y)."""
    return _fit(_logistic(seed, y), x, y)


def thumbnail_logistic(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, k: int, seed: int = 0
) -> np.ndarray:
    """Balanced logistic regression on flattened greyscale thumbnails ((N, s, s, 1) uint8)."""
    model = fit_logistic(x_train.reshape(len(x_train), -1) / 255.0, y_train, seed)
    return _proba(model, x_test.reshape(len(x_test), -1) / 255.0, k)


CLINICAL_COLUMNS = ("age", "sex", "weight")
OST_CLASSES = DEFAULT_CLASSES  # the rule's three risk levels: low, moderate, high


def ost_proba(table: pd.DataFrame) -> np.ndarray:
    """The OST screening rule, 0.2 x (weight kg - age): below -4 high risk (osteoporosis), -4 to -1
    moderate (osteopenia), above -1 low (normal), over OST_CLASSES only. One-hot, with the index
    as the ranking score."""
    ost = 0.2 * (table["weight"].to_numpy(float) - table["age"].to_numpy(float))
    decision = np.where(ost < -4, 2, np.where(ost <= -1, 1, 0))
    proba = np.eye(len(OST_CLASSES))[decision] * 0.5
    # a monotone score so AUC ranks by the index itself: low OST, high osteoporosis risk
    risk = 1 / (1 + np.exp(ost / 2))
    proba[:, 2] += 0.5 * risk
    proba[:, 0] += 0.5 * (1 - risk)
    return proba / proba.sum(axis=1, keepdims=True)


def clinical_features(table: pd.DataFrame) -> np.ndarray:
    sex = table["sex"].astype(str).str.strip().str.lower().str[:1].map({"f": 1.0, "m": 0.0}).fillna(0.5)
    return np.column_stack([table["age"].to_numpy(float), sex.to_numpy(float), table["weight"].to_numpy(float)])


def clinical_logistic(
    train: pd.DataFrame, y_train: np.ndarray, test: pd.DataFrame, k: int, seed: int = 0
) -> np.ndarray:
    model = fit_logistic(clinical_features(train), y_train, seed)
    return _proba(model, clinical_features(test), k)
