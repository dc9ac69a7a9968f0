"""The linear probe blended into each model: the thumbnail baseline's logistic regression, folded
into a Keras layer, weighted against the network on out-of-fold predictions."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kneexray.evaluate.baselines import fit_logistic
from kneexray.evaluate.gradcam import GradCam
from kneexray.model.files import load_model, save_model
from kneexray.model.layers import LinearProbe
from kneexray.model.networks import average_models, build_cnn
from kneexray.model.probe import choose_weight, fit_fold_probes, fit_probe, network_of, thumbnails, with_probes
from kneexray.model.selection import score
from kneexray.params import ParamsError, validate
from tests.support import model_metadata


def _images(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes told apart by the brightness of one quadrant: linear in the pixels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(110, 25, (n, size, size, 1))
    x[:, : size // 2, : size // 2] += 35 * y[:, None, None, None]
    return x.clip(0, 255).astype(np.uint8), y


@pytest.mark.parametrize("labels", [[0, 1, 2], [0, 2]], ids=["three classes", "two present of three"])
def test_the_probe_layer_gives_the_fitted_logistic_regressions_probabilities(labels):
    x, y = _images(90)
    keep = np.isin(y, labels)
    x, y = x[keep], y[keep]
    probe = LinearProbe(8, 3)
    probe.build((None, *x.shape[1:]))
    rows = np.arange(len(y))
    fit_probe(probe, x, y, rows, seed=0)
    logits = np.asarray(probe(x.astype("float32")))
    got = np.exp(logits - logits.max(axis=1, keepdims=True))
    got /= got.sum(axis=1, keepdims=True)
    reference = fit_logistic(thumbnails(probe, x, rows), y, seed=0).predict_proba(thumbnails(probe, x, rows))
    assert np.allclose(got[:, labels], reference, atol=1e-4)
    absent = sorted(set(range(3)) - set(labels))
    assert np.all(got[:, absent] < 1e-3)  # a class it never saw is never predicted
    assert (got.argmax(axis=1) == y).mean() > 0.9  # and it learned the pixels


def test_fold_probes_score_only_images_they_did_not_fit():
    x, y = _images(90)
    fit, held = [np.arange(45, 90), np.arange(0, 45)], [np.arange(0, 45), np.arange(45, 90)]
    probes, oof = fit_fold_probes(8, x, y, fit, held, 3, seed=0)
    assert len(probes) == 2 and np.allclose(oof.sum(axis=1), 1, atol=1e-5)
    assert score("macro_f1", y, oof) > 0.8
    # fold 1's out-of-fold rows are what its probe says about them
    logits = np.asarray(probes[0](x[:45].astype("float32")))
    assert np.array_equal(logits.argmax(axis=1), oof[:45].argmax(axis=1))


def test_the_weight_goes_to_whichever_part_is_right_out_of_fold():
    y = np.arange(60) % 3
    right, constant = np.eye(3)[y] * 0.8 + 0.2 / 3, np.tile([0.2, 0.6, 0.2], (60, 1))
    assert choose_weight("macro_f1", y, right, constant)[0] == 1.0
    weight, table = choose_weight("macro_f1", y, constant, right)
    assert weight == 0.0 and table["0.0"] > table["1.0"]
    # each part wrong on a different third: only a mixture gets every image right
    network, probe = right.copy(), right.copy()
    network[y == 0] = [0.1, 0.45, 0.45]
    probe[y == 1] = [0.45, 0.1, 0.45]
    weight, _ = choose_weight("macro_f1", y, network, probe)
    assert 0 < weight < 1
    assert score("macro_f1", y, weight * network + (1 - weight) * probe) == 1.0


def test_a_blended_model_mixes_the_probabilities_saves_loads_and_explains(tmp_path):
    x, y = _images(60)
    fit, held = [np.arange(30, 60), np.arange(0, 30)], [np.arange(0, 30), np.arange(30, 60)]
    probes, _ = fit_fold_probes(8, x, y, fit, held, 3, seed=0)
    network = average_models([build_cnn(32, 3, filters=[4, 8], dense_units=4, dropout=0.1) for _ in range(2)], "cnn")
    images = x.astype("float32")
    p_network = network.predict(images, verbose=0)
    p_probes = [np.asarray(keras.ops.softmax(p(images))) for p in probes]
    model = with_probes(network, probes, 0.3)
    assert model.name == "cnn" and network_of(model) is network
    expected = 0.3 * p_network + 0.7 * np.mean(p_probes, axis=0)
    assert np.allclose(model.predict(images, verbose=0), expected, atol=1e-5)
    save_model(model, model_metadata(32), tmp_path / "m.keras")
    loaded, _ = load_model(tmp_path / "m.keras")
    assert np.allclose(loaded.predict(images, verbose=0), expected, atol=1e-5)
    heatmaps = GradCam(loaded)(x[:2, :, :, 0])
    assert heatmaps.shape == (2, 32, 32) and np.isfinite(heatmaps).all()
    assert with_probes(network, probes, 1.0) is network  # the network alone: nothing to blend


def test_the_probe_must_fit_in_the_models_images(tiny):
    tiny["train"]["linear_probe"] = 64  # tiny images are 32 px
    with pytest.raises(ParamsError, match="train.linear_probe"):
        validate(tiny)
    tiny["train"]["linear_probe"] = 0
    assert validate(tiny).train.linear_probe == 0
