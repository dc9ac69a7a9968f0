"""A linear probe beside each model: a logistic regression on small greyscale thumbnails.

On a few hundred real X-rays a logistic regression on 32 x 32 thumbnails has beaten the CNN
(macro-F1 0.78 against 0.67), and no network should be kept that does worse than it. So each fold
also fits the thumbnail baseline's model (in closed form, by scikit-learn, on the fold's
un-augmented training images), and the saved model is a weighted mean of the network's and the
probes' class probabilities. The weight is chosen on the pooled out-of-fold predictions, like the
epoch: 1 keeps the network alone, 0 the probe alone; both parts' own out-of-fold scores are reported.
"""

from __future__ import annotations

import keras
import numpy as np

from kneexray.evaluate.baselines import fit_logistic
from kneexray.model.layers import LinearProbe
from kneexray.model.selection import score, weighted_log_loss

# Logit of a class absent from a fold's training images: that probe never predicts it.
ABSENT_LOGIT = -10.0
NETWORK_WEIGHTS = np.round(np.linspace(0.0, 1.0, 11), 2)


def thumbnails(probe: LinearProbe, images: np.ndarray, rows: np.ndarray, chunk: int = 256) -> np.ndarray:
    """The probe's (len(rows), size^2) features of images[rows], a chunk at a time."""
    out = np.empty((len(rows), probe.size * probe.size * images.shape[-1]), np.float32)
    for start in range(0, len(rows), chunk):
        out[start : start + chunk] = np.asarray(probe.thumbnails(images[rows[start : start + chunk]]))
    return out


def fit_probe(probe: LinearProbe, images: np.ndarray, labels: np.ndarray, rows: np.ndarray, seed: int) -> None:
    """Fit the logistic regression on images[rows] ((N, s, s, 1) pixels in [0, 255]) with
    labels[rows], and set the layer's weights so that its logits are the fitted model's."""
    rows = np.asarray(rows)
    pipeline = fit_logistic(thumbnails(probe, images, rows), labels[rows], seed)
    scaler, logistic = pipeline[0], pipeline[-1]
    coef, intercept = logistic.coef_, logistic.intercept_
    if coef.shape[0] == 1:  # two classes present: scikit-learn keeps one row, the second class's logit
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    kernel = np.zeros((coef.shape[1], probe.n_classes), np.float32)
    bias = np.full(probe.n_classes, ABSENT_LOGIT, np.float32)
    # (x - mean) / scale @ coef.T + intercept, written as x @ kernel + bias
    kernel[:, logistic.classes_] = (coef / scaler.scale_).T
    bias[logistic.classes_] = intercept - (coef * (scaler.mean_ / scaler.scale_)).sum(axis=1)
    probe.set_weights([kernel, bias])


def fit_fold_probes(
    size: int,
    images: np.ndarray,
    labels: np.ndarray,
    fit: list[np.ndarray],
    held: list[np.ndarray],
    n_classes: int,
    seed: int,
) -> tuple[list[LinearProbe], np.ndarray]:
    """One probe per fold, fitted on fit[f], and the pooled out-of-fold probabilities (rows of
    `images` in no held-out fold stay zero)."""
    probes, oof = [], np.zeros((len(labels), n_classes), np.float32)
    for f, (fit_rows, held_rows) in enumerate(zip(fit, held)):
        probe = LinearProbe(size, n_classes, dtype="float32", name=f"linear_probe{f + 1}")
        probe.build((None, *images.shape[1:]))
        fit_probe(probe, images, labels, fit_rows, seed)
        logits = thumbnails(probe, images, held_rows) @ probe.kernel.numpy() + probe.bias.numpy()
        oof[held_rows] = np.asarray(keras.ops.softmax(logits, axis=-1))
        probes.append(probe)
    return probes, oof


def choose_weight(metric: str, y: np.ndarray, network: np.ndarray, probe: np.ndarray) -> tuple[float, dict]:
    """The network's weight in the mean, best on `metric` over the out-of-fold probabilities (ties:
    the lower class-weighted log loss, then the larger network weight); and each weight's score."""
    scored = {}
    for w in NETWORK_WEIGHTS:
        blend = w * network + (1 - w) * probe
        scored[float(w)] = (score(metric, y, blend), -weighted_log_loss(y, blend), float(w))
    best = max(scored.values())[2]
    return best, {f"{w:.1f}": round(v[0], 6) for w, v in scored.items()}


def with_probes(model: keras.Model, probes: list[LinearProbe], weight: float) -> keras.Model:
    """weight x model's probabilities + (1 - weight) x the probes' mean probabilities, as one model
    named like `model` (which is renamed `<name>_network`); `model` itself when weight is 1."""
    if weight >= 1.0:
        return model
    name = model.name
    model.name = f"{name}_network"
    inputs = keras.Input(tuple(model.inputs[0].shape[1:]), name="image")
    probas = [keras.layers.Activation("softmax", dtype="float32", name=f"{p.name}_softmax")(p(inputs)) for p in probes]
    probe = probas[0] if len(probas) == 1 else keras.layers.Average(name="probe_mean", dtype="float32")(probas)
    parts = [
        keras.layers.Rescaling(weight, dtype="float32", name="network_share")(model(inputs)),
        keras.layers.Rescaling(1.0 - weight, dtype="float32", name="probe_share")(probe),
    ]
    return keras.Model(inputs, keras.layers.Add(dtype="float32", name="blend")(parts), name=name)


def network_of(model: keras.Model) -> keras.Model | None:
    """The network inside a model made by `with_probes`, or None for a plain model."""
    if not any(isinstance(layer, LinearProbe) for layer in model.layers):
        return None
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))
