"""External validation: another dataset, minus copies of training images, scored like the test split."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from kneexray import DEFAULT_CLASSES
from kneexray.data.curation import curate
from kneexray.data.extraction import FINGERPRINTS_FILE, IMAGES_DIR, INDEX_FILE
from kneexray.data.phantom import render_knee
from kneexray.evaluate.scoring import evaluate_models
from kneexray.model.files import save_model
from kneexray.model.networks import build_cnn
from kneexray.params import validate


def _class_folders(root, seed: int, per_class: int):
    for label in DEFAULT_CLASSES:
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            render_knee(np.random.default_rng([seed, DEFAULT_CLASSES.index(label), i]), label, size=96).save(
                root / label / f"{i}.jpg"
            )
    return {label: root / label for label in DEFAULT_CLASSES}


@pytest.fixture
def pipeline_outputs(tmp_path, tiny):
    """What extract, split and train leave behind, in miniature."""
    data = tmp_path / "data" / "extracted"
    curated = curate(
        {"dataset": _class_folders(tmp_path / "raw", 1, 6)},
        data / IMAGES_DIR,
        max_pixels=10**8,
        min_side=32,
        near_duplicate_distance=0.006,
        keep_conflicts=False,
    )
    curated.index["path"] = IMAGES_DIR + "/" + curated.index["path"]
    curated.index.to_csv(data / INDEX_FILE, index=False)
    np.save(data / FINGERPRINTS_FILE, curated.fingerprints)
    split = tmp_path / "data" / "split"
    split.mkdir(parents=True)
    index = curated.index
    index.iloc[::3].to_csv(split / "test.csv", index=False)
    index.drop(index.index[::3]).to_csv(split / "train.csv", index=False)
    index.iloc[:0].to_csv(split / "val.csv", index=False)
    model = tmp_path / "cnn.keras"
    save_model(
        build_cnn(32, 3, filters=[4, 8], dense_units=4, dropout=0.1),
        {
            "model": "cnn",
            "classes": list(DEFAULT_CLASSES),
            "image_size": 32,
            "weights_source": "none (trained from scratch)",
        },
        model,
    )
    return tmp_path, data, split, model, index


def test_external_set_is_scored_without_copies_of_training_images(pipeline_outputs, tiny):
    root, data, split, model, index = pipeline_outputs
    external = root / "external"
    _class_folders(external, 2, 3)
    train_image = index.drop(index.index[::3]).iloc[0]
    shutil.copy(data / train_image["path"], external / train_image["label"] / "copy_of_training.jpg")

    params = {**tiny, "evaluate": {**tiny["evaluate"], "external_path": str(external)}}
    summary = evaluate_models(
        {"cnn": str(model)},
        test_csv=split / "test.csv",
        data_root=data,
        out_dir=root / "reports" / "eval",
        metrics_path=root / "reports" / "metrics.json",
        params=validate(params),
    )
    assert summary["external_data"]["copies_of_training_images_removed"] == 1
    assert summary["external_data"]["n"] == 9 and summary["external_data"]["per_class"] == {
        c: 3 for c in DEFAULT_CLASSES
    }
    external_scores = summary["cnn"]["external"]
    assert 0 <= external_scores["accuracy"] <= 1 and "ci95" in external_scores
    predictions = pd.read_csv(root / "reports" / "eval" / "cnn_external" / "predictions.csv")
    assert len(predictions) == 9 and "copy_of_training.jpg" not in " ".join(predictions["path"])
    assert not list((root / "data").glob(".external-*"))  # scratch space removed


def test_missing_external_path_is_a_clear_error(pipeline_outputs, tiny):
    root, data, split, model, _ = pipeline_outputs
    params = {**tiny, "evaluate": {**tiny["evaluate"], "external_path": str(root / "nowhere")}}
    with pytest.raises(FileNotFoundError, match="evaluate.external_path"):
        evaluate_models(
            {"cnn": str(model)},
            test_csv=split / "test.csv",
            data_root=data,
            out_dir=root / "reports" / "eval",
            metrics_path=root / "m.json",
            params=validate(params),
        )
