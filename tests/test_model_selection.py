"""Model selection that cannot pick a no-skill epoch: k-fold CV in lockstep, the epoch chosen on
pooled out-of-fold macro-F1, the fold ensemble saved as one model, and a no-skill alarm."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from kneexray import DEFAULT_CLASSES
from kneexray.data.phantom import render_knee
from kneexray.data.splitting import assign_folds
from kneexray.evaluate.baselines import majority_proba
from kneexray.evaluate.scoring import predict_proba
from kneexray.model.devices import infer
from kneexray.model.files import load_model, save_model
from kneexray.model.inputs import label_indices, load_images
from kneexray.model.probe import network_of
from kneexray.model.selection import EpochSelector, no_skill, prediction_shares, score
from kneexray.model.training import Folds, train
from kneexray.params import validate
from kneexray.predict import predict_files

pytestmark = pytest.mark.slow  # not in make test-fast


def test_selector_never_keeps_an_epoch_before_min_epochs_and_stops_after_patience():
    selector = EpochSelector("macro_f1", min_epochs=3, patience=2)
    assert not selector.update(0, 0.9)  # epoch 1 is best by far, but too early to keep
    assert not selector.update(1, 0.8)
    assert selector.update(2, 0.5) and selector.best_epoch == 2
    assert selector.update(3, 0.6)
    assert not selector.update(4, 0.6)  # a tie is no improvement
    assert not selector.should_stop(4)
    assert not selector.update(5, 0.55) and selector.should_stop(5)
    assert selector.best_epoch == 3 and selector.history == [0.9, 0.8, 0.5, 0.6, 0.6, 0.55]


def test_no_skill_fires_on_a_constant_model_and_not_on_a_varied_one():
    constant = np.tile([0.2, 0.7, 0.1], (50, 1))
    assert no_skill(prediction_shares(constant, DEFAULT_CLASSES), 0.95) == "osteopenia"
    varied = np.eye(3)[np.arange(50) % 3]
    assert no_skill(prediction_shares(varied, DEFAULT_CLASSES), 0.95) is None
    # a constant predictor scores at most one class's F1 / 3: macro-F1 can't pick it over a real model
    y = np.arange(30) % 3
    assert score("macro_f1", y, np.tile([0, 1, 0], (30, 1))) < score("macro_f1", y, np.eye(3)[y])


def test_folds_keep_groups_together_and_stratify():
    frame = pd.DataFrame({"label": [DEFAULT_CLASSES[i % 3] for i in range(60)], "group": [i // 2 for i in range(60)]})
    fold = assign_folds(frame, 5, seed=0)
    assert set(fold) == set(range(5))
    assert all(len(set(fold[frame["group"] == g])) == 1 for g in frame["group"].unique())  # copies stay together
    for f in range(5):
        counts = frame.loc[fold == f, "label"].value_counts()
        assert counts.max() - counts.min() <= 2  # stratified


def _phantom_split(root: Path, n: int, size: int) -> Path:
    rows = []
    for i in range(n):
        label = DEFAULT_CLASSES[i % 3]
        path = Path("images") / label / f"{i}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        render_knee(np.random.default_rng([1, i]), label, size=size, difficulty=0.0).save(root / path)
        rows.append({"path": path.as_posix(), "label": label, "group": i})
    frame = pd.DataFrame(rows)
    test = frame.index % 5 == 0
    frame[test].to_csv(root / "test.csv", index=False)
    frame[~test].iloc[:-9].to_csv(root / "train.csv", index=False)
    frame[~test].iloc[-9:].to_csv(root / "val.csv", index=False)
    return root


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return _phantom_split(tmp_path_factory.mktemp("phantom"), 120, 64)


def _params(tiny, **train):
    return {
        **tiny,
        "cnn": {**tiny["cnn"], "image_size": 48, "filters": [16, 32, 64], "dense_units": 16, "epochs": 10},
        "train": {**tiny["train"], "folds": 3, "min_epochs": 3, "patience": 10, **train},
    }


def test_cnn_beats_the_majority_baseline_on_a_learnable_phantom_and_predict_agrees(tiny, phantom, tmp_path):
    params = _params(tiny)
    result = train("cnn", validate(params), split_dir=phantom, data_root=phantom, live_dir=tmp_path / "live")
    test = pd.read_csv(phantom / "test.csv")
    y = label_indices(test["label"], DEFAULT_CLASSES)
    proba = infer(result.model, load_images(test["path"], 48, root=phantom), 8)
    model_f1 = score("macro_f1", y, proba)
    majority_f1 = score(
        "macro_f1",
        y,
        majority_proba(label_indices(pd.read_csv(phantom / "train.csv")["label"], DEFAULT_CLASSES), len(y), 3),
    )
    assert model_f1 >= majority_f1 + 0.4, (model_f1, majority_f1)
    meta = result.metadata
    assert meta["folds"] == 3 and meta["no_skill"] is False and meta["selected_epoch"] >= 3
    assert meta["out_of_fold"]["macro_f1"] > 0.6
    # the DVCLive summary describes the saved model: the selected epoch, not the last one
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert summary["selected_epoch"] == meta["selected_epoch"] and summary["step"] == meta["selected_epoch"] - 1

    # the three fold models are one .keras file that predict loads like any other model
    path = tmp_path / "cnn.keras"
    save_model(result.model, meta, path)
    model, _ = load_model(path)
    ensemble = network_of(model) or model  # blended with the linear probes, or the network alone
    assert isinstance(ensemble.layers[-1], keras.layers.Average) and len(ensemble.layers) == 3 + 2
    # the saved model is at least as good out of fold as each of its parts
    probe = meta["linear_probe"]
    best_part = max(probe["network_out_of_fold"]["macro_f1"], probe["probe_out_of_fold"]["macro_f1"])
    assert meta["out_of_fold"]["macro_f1"] >= best_part
    files = [phantom / p for p in test["path"]]
    rows = predict_files(path, files, batch_size=8)
    by_path = {Path(r["path"]).resolve(): r["predicted"] for r in rows}
    evaluated = predict_proba(model, load_images(files, 48), batch_size=8).argmax(axis=1)
    assert [by_path[f.resolve()] for f in files] == [DEFAULT_CLASSES[i] for i in evaluated]


def test_early_stopping_triggers_and_the_kept_weights_are_the_selected_epochs(tiny, phantom, tmp_path):
    # a learning rate this high overfits within a few epochs: the out-of-fold score stops improving
    params = _params(tiny, patience=1, min_epochs=1)
    params["cnn"].update(epochs=25, learning_rate=0.02)
    result = train("cnn", validate(params), split_dir=phantom, data_root=phantom, live_dir=tmp_path / "live")
    meta = result.metadata
    assert meta["epochs_run"] < 25 and meta["epochs_run"] == meta["selected_epoch"] + 1
    # re-score every fold model on the fold it did not train on: the pooled score is the one logged
    # for the selected epoch, so these are that epoch's weights
    rows = pd.concat([pd.read_csv(phantom / "train.csv"), pd.read_csv(phantom / "val.csv")], ignore_index=True)
    x, y = load_images(rows["path"], 48, root=phantom), label_indices(rows["label"], DEFAULT_CLASSES)
    folds = Folds.make(rows, 9, 3, params["train"]["seed"])
    network = network_of(result.model) or result.model
    members = [layer for layer in network.layers if isinstance(layer, keras.Model)]
    oof = np.zeros((len(y), 3))
    for member, held in zip(members, folds.held):
        oof[held] = infer(member, x[held], 8)
    history = pd.read_csv(tmp_path / "live" / "plots" / "metrics" / "eval" / "macro_f1.tsv", sep="\t")
    assert score("macro_f1", y, oof) == pytest.approx(history["macro_f1"][meta["selected_epoch"] - 1], abs=1e-6)
    assert score("macro_f1", y, oof) == pytest.approx(max(history["macro_f1"]), abs=1e-6)


def test_a_collapsed_model_is_flagged_in_its_metadata(tiny, phantom, tmp_path, caplog):
    # no learning at all (learning rate ~0) and all classes but one dropped from the output bias
    params = _params(tiny, class_weights="none", min_epochs=1)
    params["cnn"].update(epochs=1, learning_rate=1e-9)
    imbalanced = _phantom_split(tmp_path / "data", 60, 32)
    rows = pd.read_csv(imbalanced / "train.csv")
    rows["label"] = "osteopenia"  # one class only: the prior puts everything there
    rows.iloc[:3, rows.columns.get_loc("label")] = ["normal", "osteoporosis", "normal"]
    rows.to_csv(imbalanced / "train.csv", index=False)
    val = pd.read_csv(imbalanced / "val.csv")
    val["label"] = "osteopenia"
    val.to_csv(imbalanced / "val.csv", index=False)
    params["train"].update(folds=1, linear_probe=0)  # the network alone
    result = train("cnn", validate(params), split_dir=imbalanced, data_root=imbalanced, live_dir=tmp_path / "live")
    assert result.metadata["no_skill"] is True
    assert result.metadata["train_prediction_shares"]["osteopenia"] >= 0.95
    assert "NO SKILL" in caplog.text


def test_the_model_card_says_what_data_code_and_settings_made_the_model(tiny, phantom, tmp_path):
    import subprocess
    import sys

    from kneexray.model.card import INTENDED_USE

    params = {**tiny, "train": {**tiny["train"], "folds": 1}}  # any trained model carries its card
    result = train("cnn", validate(params), split_dir=phantom, data_root=phantom, live_dir=tmp_path / "live")
    card = result.metadata
    assert card["data"]["source"] == "phantom" and card["intended_use"] == INTENDED_USE
    assert card["params"]["cnn"]["learning_rate"] == params["cnn"]["learning_rate"]
    assert "threads" not in card["params"]["train"]  # how it ran, not what it is
    path = tmp_path / "cnn.keras"
    save_model(result.model, card, path)
    image = phantom / pd.read_csv(phantom / "test.csv")["path"][0]
    out = subprocess.run(
        [sys.executable, "-m", "kneexray", "predict", str(image), "--model", str(path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    assert "trained on the synthetic knee phantom" in out.stderr  # said before it classifies anything
