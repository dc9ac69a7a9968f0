"""Training both models for real on a tiny phantom: metadata, weights sources, determinism."""

from __future__ import annotations

import os
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from kneexray import DEFAULT_CLASSES
from kneexray.data.phantom import render_knee
from kneexray.model.card import code_digest
from kneexray.model.files import load_model, read_metadata, save_model
from kneexray.model.networks import RESNET_BASE_NAME, WeightsUnavailable, build_cnn, forward_flops, resnet_base
from kneexray.model.probe import network_of
from kneexray.model.training import train
from kneexray.params import validate


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory) -> Path:
    """Phantom JPEGs and train/val CSVs, the layout the split stage writes."""
    root = tmp_path_factory.mktemp("data")
    rows = []
    for i in range(36):
        label = DEFAULT_CLASSES[i % 3]
        path = Path("images") / label / f"{i}.jpg"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        render_knee(np.random.default_rng([0, i]), label, size=64, difficulty=0.0).save(root / path)
        rows.append({"path": path.as_posix(), "label": label, "group": i})
    frame = pd.DataFrame(rows)
    frame.iloc[:27].to_csv(root / "train.csv", index=False)
    frame.iloc[27:].to_csv(root / "val.csv", index=False)
    return root


def _train(kind, params, root, tmp_path):
    return train(kind, validate(params), split_dir=root, data_root=root, live_dir=tmp_path / f"live_{kind}")


@pytest.mark.slow
def test_cnn_trains_saves_metadata_and_reloads(tiny, tiny_split, tmp_path):
    result = _train("cnn", tiny, tiny_split, tmp_path)
    assert 1 <= result.epochs_run <= tiny["cnn"]["epochs"]
    path = tmp_path / "cnn.keras"
    save_model(result.model, result.metadata, path)
    model, meta = load_model(path)
    assert meta["classes"] == list(DEFAULT_CLASSES) and meta["image_size"] == 32 and meta["image_fit"] == "squash"
    # the code is named by what it is, not by the commit it happened to run at (a clone's repro writes the same bytes)
    assert meta["code_sha256"] == code_digest() and "code_commit" not in meta
    assert meta["weights_source"].startswith("none")
    x = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 1)).astype("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), result.model.predict(x, verbose=0), atol=1e-6)
    assert (tmp_path / "live_cnn" / "plots" / "metrics" / "eval" / "loss.tsv").is_file()
    assert not list(tmp_path.glob(".cnn.keras*"))  # no temporary file left beside the model

    # saving the same model again, a few seconds later, gives the same bytes (a stable md5 in dvc.lock)
    time.sleep(2.1)  # the zip clock has 2-second steps
    save_model(result.model, result.metadata, tmp_path / "again.keras")
    assert (tmp_path / "again.keras").read_bytes() == path.read_bytes()


def test_code_digest_covers_the_imported_package_modules(monkeypatch):
    import sys
    import types

    before = code_digest()
    assert len(before) == 64 and code_digest() == before
    # a module of the package that the stage never imported does not count; one it imported does
    extra = types.ModuleType("kneexray._digest_probe")
    extra.__file__ = str(Path(__file__).resolve().parents[1] / "kneexray" / "layout.py")
    monkeypatch.delitem(sys.modules, "kneexray.layout", raising=False)
    without = code_digest()
    monkeypatch.setitem(sys.modules, "kneexray._digest_probe", extra)
    assert code_digest() != without


@pytest.mark.slow
def test_training_is_deterministic(tiny, tiny_split, tmp_path):
    first = _train("cnn", tiny, tiny_split, tmp_path / "a").model.get_weights()
    second = _train("cnn", tiny, tiny_split, tmp_path / "b").model.get_weights()
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def _make_weights(tmp_path) -> str:
    base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    path = tmp_path / "base.weights.h5"
    base.save_weights(path)
    return str(path)


def test_missing_imagenet_weights_fall_back_loudly_or_fail_when_required(caplog):
    cached = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    if list(cached.glob("resnet50*notop*.h5")):
        pytest.skip("ImageNet weights are cached on this machine")
    _, source = resnet_base(32, weights="imagenet")
    assert source == "random"
    assert "RANDOM weights" in caplog.text
    with pytest.raises(WeightsUnavailable, match="weights_required"):
        resnet_base(32, weights="imagenet", required=True)


def test_model_without_metadata_is_refused_clearly(tmp_path):
    path = tmp_path / "plain.keras"
    build_cnn(32, 3, filters=[4], dense_units=4, dropout=0.1).save(path)
    with pytest.raises(ValueError, match="without kneexray metadata"):
        read_metadata(path)
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a .keras model"):
        read_metadata(tmp_path / "junk.keras")


def test_cnn_is_cheap_compared_with_the_original_head():
    model = build_cnn(224, 3, filters=[16, 32, 64, 128, 256], dense_units=128, dropout=0.3)
    assert model.count_params() < 1_000_000  # the original's Flatten->Dense(256) head alone had 25.7 M
    # conv1 at stride 2: 112*112*16 outputs x 9 taps x 1 channel x 2
    assert (
        forward_flops(build_cnn(224, 3, filters=[16], dense_units=1, dropout=0))
        == 2 * 112 * 112 * 16 * 9 + 2 * 16 + 2 * 3
    )


@pytest.mark.slow
def test_resnet_loads_a_local_weights_file_and_fine_tuning_unfreezes_the_top_layers(tiny, tiny_split, tmp_path):
    _make_weights(tmp_path)
    resnet = {
        **tiny["resnet"],
        "weights": "file",
        "weights_path": str(tmp_path / "base.weights.h5"),
        "fine_tune_layers": 8,
        "fine_tune_epochs": 1,
    }  # the top 8 hold conv5_block3_3_conv
    params = {**tiny, "resnet": resnet, "train": {**tiny["train"], "patience": 5, "folds": 1}}  # one shared base
    result = _train("resnet", params, tiny_split, tmp_path)
    assert result.epochs_run == tiny["resnet"]["epochs"] + 1
    assert result.metadata["weights_source"] == "file:base.weights.h5"  # the local weights file was loaded
    base = (network_of(result.model) or result.model).get_layer(RESNET_BASE_NAME)
    reference, _ = resnet_base(32, weights="file", weights_path=str(tmp_path / "base.weights.h5"))
    top_conv = [layer for layer in base.layers if isinstance(layer, keras.layers.Conv2D)][-1]
    assert not np.array_equal(top_conv.get_weights()[0], reference.get_layer(top_conv.name).get_weights()[0])
    # below the top 8 the base stayed frozen throughout: the loaded weights, untouched
    for layer, loaded in zip(base.layers[:-8], reference.layers[:-8]):
        for a, b in zip(layer.get_weights(), loaded.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


MIRRORED_SCRIPT = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from kneexray.model.devices import choose_strategy
from kneexray.model.training import train
from kneexray.params import validate
params = validate(json.loads(sys.argv[1]))
strategy = choose_strategy("mirrored")
result = train("cnn", params, split_dir=sys.argv[2], data_root=sys.argv[2], live_dir=sys.argv[3])
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "epochs": result.epochs_run}))
"""


@pytest.mark.slow
def test_mirrored_strategy_trains_on_two_logical_cpus(tiny, tiny_split, tmp_path):
    import json
    import subprocess
    import sys

    # per-replica batch 4: the 9 validation images still make one full batch of 2 x 4
    params = {**tiny, "train": {**tiny["train"], "strategy": "mirrored"}, "image": {**tiny["image"], "batch_size": 4}}
    out = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, json.dumps(params), str(tiny_split), str(tmp_path / "live")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"replicas": 2, "epochs": tiny["cnn"]["epochs"]}
