"""The shortcut checks detect a size/mode shortcut where there is one, and none where there isn't."""

import numpy as np
import pandas as pd

from bench.shortcuts import largest_stratum_scores, metadata_only_macro_f1
from kneexray import DEFAULT_CLASSES


def _index(n: int, leak: bool, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = [DEFAULT_CLASSES[i % 3] for i in range(n)]
    if leak:  # each class has its own image size, like a dataset assembled from three sources
        width = [1000 + 500 * DEFAULT_CLASSES.index(lab) for lab in labels]
    else:
        width = rng.choice([1000, 1500, 2000], n).tolist()
    return pd.DataFrame(
        {"path": [f"img{i}.jpg" for i in range(n)], "label": labels, "width": width, "height": 1200, "mode": "L"}
    )


def test_metadata_only_classifier_finds_a_size_shortcut():
    index = _index(90, leak=True)
    assert metadata_only_macro_f1(index, index["path"][:60], index["path"][60:]) == 1.0


def test_metadata_only_classifier_is_near_chance_without_one():
    index = _index(300, leak=False)
    assert metadata_only_macro_f1(index, index["path"][:200], index["path"][200:]) < 0.5


def test_largest_stratum_scores_only_that_stratum():
    index = pd.DataFrame(
        {
            "path": list("abcdef"),
            "width": [10, 10, 10, 10, 20, 20],
            "height": 5,
            "mode": ["L"] * 4 + ["RGB"] * 2,
            "label": ["normal"] * 6,
        }
    )
    predictions = pd.DataFrame(
        {
            "path": list("abcdef"),
            "actual": ["normal", "osteopenia", "osteoporosis", "normal", "normal", "normal"],
            "predicted": ["normal", "osteopenia", "normal", "normal", "osteopenia", "osteopenia"],
        }
    )
    scores = largest_stratum_scores(index, predictions)
    assert scores["stratum"] == "10x5 L" and scores["n"] == 4
    assert scores["accuracy"] == 0.75  # a, b, d right; c wrong; e and f are outside the stratum
