"""Grad-CAM (Selvaraju et al., 2017): which regions of a radiograph drove a prediction.

The heatmap weights the last convolutional block's feature maps by the mean gradient of the class
score over each map. Both kneexray models are plain chains of layers; the ResNet one holds its
convolutions inside the nested "resnet50" model, which Keras 3 can't cut into from outside, so the
forward pass is replayed layer by layer with that base split at the target layer.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import keras
import matplotlib
import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure
from PIL import Image

from kneexray.atomic import write_bytes
from kneexray.errors import InputError
from kneexray.model.layers import LinearProbe

log = logging.getLogger(__name__)

# Layers that finish a conv block: Grad-CAM explains its rectified output, as in the paper.
_BLOCK_TAIL = (keras.layers.BatchNormalization, keras.layers.Add, keras.layers.Activation, keras.layers.ReLU)


def _block_output(layers: Sequence[keras.layers.Layer]) -> keras.layers.Layer | None:
    """The last Conv2D followed through its BatchNorm / residual add / ReLU, e.g. conv5_block3_out."""
    convs = [i for i, layer in enumerate(layers) if isinstance(layer, keras.layers.Conv2D)]
    if not convs:
        return None
    i = convs[-1]
    while i + 1 < len(layers) and isinstance(layers[i + 1], _BLOCK_TAIL):
        i += 1
    return layers[i]


def _find_target(chain: list[keras.layers.Layer], name: str) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    """(the layer of the chain whose call yields the features, the target layer: itself or inside it)."""
    for layer in reversed(chain):
        if isinstance(layer, keras.Model) and (target := _block_output(layer.layers)) is not None:
            return layer, target
        if isinstance(layer, keras.layers.Conv2D):
            target = _block_output(chain)
            return target, target
    raise InputError(f"{name}: no Conv2D layer to explain")


class GradCam:
    """Grad-CAM heatmaps for one model; build once, call on batches."""

    def __init__(self, model: keras.Model):
        self.size = int(model.input_shape[1])
        self._model = model
        self._chain = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
        # A fold ensemble (members averaged): each member's heatmap for the ensemble's class, averaged.
        self._members: list[GradCam] | None = None
        self.target_name: str = ""
        if any(isinstance(layer, LinearProbe) for layer in self._chain):
            # Blended with linear probes: the heatmap is the network's, for the blend's class.
            self._members = [next(GradCam(layer) for layer in self._chain if isinstance(layer, keras.Model))]
            self.target_name = self._members[0].target_name
            return
        if isinstance(self._chain[-1], keras.layers.Average):
            self._members = [GradCam(layer) for layer in self._chain if isinstance(layer, keras.Model)]
            self.target_name = self._members[0].target_name
            return
        self._holder, target = _find_target(self._chain, model.name)
        self.target_name = target.name
        self._feature_model = None
        if self._holder is not target:  # inside a nested model: cut that model at the target
            self._feature_model = keras.Model(self._holder.inputs, [target.output, self._holder.output])
        # The class score before the softmax, as in the paper: a confident softmax has vanishing gradients.
        self._logits = None
        last = self._chain[-1]
        if isinstance(last, keras.layers.Dense) and last.activation is keras.activations.softmax:
            self._logits = keras.layers.Dense.from_config({**last.get_config(), "activation": "linear"})
            self._logits.build(last.kernel.shape[:1])
            self._logits.set_weights(last.get_weights())
        if target.output.shape[1] * target.output.shape[2] == 1:
            log.warning("Grad-CAM: %s is 1x1 at %d px; its heatmaps can't localise anything", target.name, self.size)
        log.debug("Grad-CAM on %s", self.target_name)

    def _forward(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        features = None
        for layer in self._chain:
            if layer is self._holder and self._feature_model is not None:
                features, x = self._feature_model(x, training=False)
            elif layer is self._chain[-1] and self._logits is not None:
                x = self._logits(x)
            else:
                x = layer(x, training=False)
                if layer is self._holder:
                    features = x
        return features, x

    def __call__(self, images: np.ndarray, class_indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """(N, size, size) uint8 images -> (N, size, size) heatmaps in [0, 1]; default class: the predicted one."""
        if self._members is not None:
            if class_indices is None:
                x = np.asarray(images, dtype=np.float32).reshape(-1, self.size, self.size, 1)
                class_indices = list(np.asarray(self._model(x, training=False)).argmax(axis=1))
            cams = np.mean([member(images, class_indices) for member in self._members], axis=0)
            peak = cams.max(axis=(1, 2), keepdims=True)
            return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0)
        x = tf.convert_to_tensor(np.asarray(images, dtype=np.float32).reshape(-1, self.size, self.size, 1))
        with tf.GradientTape() as tape:
            tape.watch(x)  # a frozen base has no trainable variables, so nothing else would be recorded
            features, scores = self._forward(x)
            chosen = tf.argmax(scores, axis=1) if class_indices is None else tf.constant(class_indices, tf.int64)
            score = tf.gather(scores, chosen, axis=1, batch_dims=1)
        grads = tf.cast(tape.gradient(score, features), tf.float32)
        features = tf.cast(features, tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cams = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1, keepdims=True))
        cams = tf.image.resize(cams, (self.size, self.size), method="bilinear")[..., 0].numpy()
        peak = cams.max(axis=(1, 2), keepdims=True)
        return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0)


def gradcam(model: keras.Model, image: np.ndarray, class_index: int | None = None) -> np.ndarray:
    """Heatmap in [0, 1] with the (size, size) image's shape; default class: the predicted one."""
    return GradCam(model)(image[None], None if class_index is None else [class_index])[0]


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> Image.Image:
    """The grey image under a jet-coloured heatmap."""
    colours = matplotlib.colormaps["jet"](heatmap)[..., :3] * 255
    grey = np.repeat(np.asarray(image, dtype=np.float64)[..., None], 3, axis=-1)
    return Image.fromarray(np.round((1 - alpha) * grey + alpha * colours).astype(np.uint8), mode="RGB")


def save_explanation(
    original_path: str | Path, image: np.ndarray, heatmap: np.ndarray, out_dir: str | Path, *, name: str | None = None
) -> Path:
    """Write out_dir/<stem>_gradcam.png: the image as the model saw it, beside the overlay.

    No PNG text or time chunks, so the same input gives the same bytes. `name` replaces the stem
    when two inputs share one.
    """
    original = np.repeat(image[..., None], 3, axis=-1)
    side_by_side = np.concatenate([original, np.asarray(overlay(image, heatmap))], axis=1)
    buffer = io.BytesIO()
    Image.fromarray(side_by_side, mode="RGB").save(buffer, format="PNG")
    path = Path(out_dir) / f"{name or Path(original_path).stem}_gradcam.png"
    write_bytes(path, buffer.getvalue())
    return path


def pick_examples(
    labels: Sequence[int] | np.ndarray, predictions: Sequence[int] | np.ndarray, per_class: int = 2
) -> list[int]:
    """Indices of up to `per_class` correct and `per_class` wrong predictions for each true class."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    picked: list[int] = []
    for cls in np.unique(labels):
        for correct in (True, False):
            hits = np.flatnonzero((labels == cls) & ((predictions == cls) == correct))
            picked.extend(int(i) for i in hits[:per_class])
    return picked


def gradcam_grid(
    model: keras.Model,
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    predictions: Sequence[int] | np.ndarray,
    titles: Sequence[str] | None = None,
    *,
    classes: Sequence[str],
    ncols: int = 4,
) -> Figure:
    """Overlays of the predicted class's heatmap; titles green where the prediction is right, red where wrong."""
    heatmaps = GradCam(model)(images, predictions)
    if titles is None:
        titles = [f"true {classes[y]}\npredicted {classes[p]}" for y, p in zip(labels, predictions)]
    nrows = max(1, -(-len(images) // ncols))
    fig = Figure(figsize=(2.2 * ncols, 2.5 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, heatmap, y, p, title in zip(axes.flat, images, heatmaps, labels, predictions, titles):
        ax.imshow(overlay(image, heatmap))
        ax.set_title(title, fontsize=8, color="tab:green" if y == p else "tab:red")
    return fig
