"""The two classifiers: a small CNN from scratch and ResNet50 transfer learning.

Both take (size, size, 1) float images in [0, 255] and carry their own preprocessing, so a saved
model needs nothing but the pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import keras

from kneexray.errors import KneexrayError, MissingInputError
from kneexray.model.layers import CaffePreprocess, GreyToRGB

log = logging.getLogger(__name__)

RESNET_BASE_NAME = "resnet50"


class WeightsUnavailable(KneexrayError, RuntimeError):
    """ImageNet weights were required but could not be had."""


def _output_layer(n_classes: int, output_bias, name: str = "probabilities") -> keras.layers.Dense:
    """Softmax over the classes; `output_bias` (log class priors) makes the first steps predict the
    priors instead of uniform noise, where training is unweighted."""
    init = "zeros" if output_bias is None else keras.initializers.Constant(list(output_bias))
    return keras.layers.Dense(n_classes, activation="softmax", dtype="float32", bias_initializer=init, name=name)


def build_cnn(
    size: int,
    n_classes: int,
    *,
    filters: Sequence[int],
    dense_units: int,
    dropout: float,
    output_bias=None,
    name: str = "cnn",
) -> keras.Model:
    """Conv blocks [Conv3x3-BN-ReLU, MaxPool], dropout, global pooling and a small dense head.

    Global average pooling instead of the original Flatten -> Dense(256): that single layer held
    25.7 M of its 26.0 M parameters and made the network memorise 190 images.
    BatchNorm, not GroupNorm: GroupNorm normalises each image on its own and so removes the overall
    density of the bone, the very cue of osteoporosis (on the phantom it did not learn at all).
    Training recomputes the BatchNorm statistics on the un-augmented training images
    (`recompute_batchnorm`), which removes the lag that made inference predict one class.
    """
    inputs = keras.Input((size, size, 1), name="image")
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    for i, width in enumerate(filters):
        # The first conv strides by 2: full-resolution feature maps cost most of a CPU's time.
        x = keras.layers.Conv2D(
            width, 3, strides=2 if i == 0 else 1, padding="same", use_bias=False, name=f"conv{i + 1}"
        )(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i + 1}")(x)
        x = keras.layers.Activation("relu", name=f"relu{i + 1}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    # Dropout only after the last block: dropout feeding a BatchNormalization shifts its variance
    # between training and inference.
    x = keras.layers.SpatialDropout2D(dropout / 2, name="drop_features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(dense_units, activation="relu")(x)
    x = keras.layers.Dropout(dropout)(x)
    return keras.Model(inputs, _output_layer(n_classes, output_bias)(x), name=name)


def resnet_base(size: int, *, weights: str, weights_path: str = "", required: bool = False) -> tuple[keras.Model, str]:
    """ResNet50 without top, and where its weights came from.

    'imagenet' takes the Keras cache or a download; offline, it falls back to random weights and
    says so, unless `required`. 'file' loads a local .h5 / .weights.h5 file.
    """
    shape = (size, size, 3)
    if weights == "file":
        base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=shape, pooling="avg")
        path = Path(weights_path)
        if not path.is_file():
            raise MissingInputError(f"resnet.weights_path: {path} does not exist")
        base.load_weights(path)
        source = f"file:{path.name}"
    else:
        try:
            base = keras.applications.ResNet50(include_top=False, weights="imagenet", input_shape=shape, pooling="avg")
            source = "imagenet"
        except Exception as err:  # offline: urllib/URLError, or an unreadable cache file
            if required:
                raise WeightsUnavailable(
                    f"ImageNet weights for ResNet50 are unavailable ({type(err).__name__}: {err}); "
                    "resnet.weights_required is true. Put the file in ~/.keras/models or set resnet.weights=file"
                ) from None
            log.warning("=" * 72)
            log.warning("ResNet50 IMAGENET WEIGHTS UNAVAILABLE (%s): using RANDOM weights.", type(err).__name__)
            log.warning("The 'transfer' model is then a random-feature model; metrics say so.")
            log.warning("=" * 72)
            base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=shape, pooling="avg")
            source = "random"
    base.name = RESNET_BASE_NAME
    return base, source


def build_head(
    features: int, n_classes: int, *, dense_units: int, dropout: float, output_bias=None, name: str = "head"
) -> keras.Model:
    """The transfer model's classifier on the base's pooled features: Dense + Dropout + softmax."""
    inputs = keras.Input((features,), name="features")
    x = keras.layers.Dense(dense_units, activation="relu", name="dense")(inputs)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    return keras.Model(inputs, _output_layer(n_classes, output_bias)(x), name=name)


def build_resnet(size: int, *, base: keras.Model, head: keras.Model) -> keras.Model:
    """Frozen ResNet50 (BatchNorm in inference mode) feeding `head` (one head or a fold ensemble)."""
    base.trainable = False
    inputs = keras.Input((size, size, 1), name="image")
    x = CaffePreprocess(name="resnet_preprocess")(GreyToRGB(name="grey_to_rgb")(inputs))
    x = base(x, training=False)  # BatchNorm stays in inference mode even when unfrozen later
    return keras.Model(inputs, head(x), name="resnet")


def average_models(members: list[keras.Model], name: str, input_name: str = "image") -> keras.Model:
    """One model whose output is the mean of the members' class probabilities (the fold ensemble).
    One member is returned as it is."""
    if len(members) == 1:
        return members[0]
    inputs = keras.Input(tuple(members[0].inputs[0].shape[1:]), name=input_name)
    for i, member in enumerate(members):
        member.name = f"{name}_fold{i + 1}"
    outputs = keras.layers.Average(name="fold_mean", dtype="float32")([member(inputs) for member in members])
    return keras.Model(inputs, outputs, name=name)


def unfreeze_top(model: keras.Model, n_layers: int) -> int:
    """Make the top `n_layers` of the ResNet base trainable (BatchNorm layers stay frozen)."""
    base = model.get_layer(RESNET_BASE_NAME)
    base.trainable = True
    cutoff = len(base.layers) - n_layers
    count = 0
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= cutoff and not isinstance(layer, keras.layers.BatchNormalization)
        count += int(layer.trainable)
    return count


def forward_flops(model: keras.Model) -> int:
    """Multiply-adds x 2 of Conv2D and Dense layers for one image (the dominant cost)."""
    total = 0
    for layer in _flatten(model):
        if isinstance(layer, keras.layers.Conv2D):
            out_h, out_w, out_c = layer.output.shape[1:]
            k_h, k_w = layer.kernel_size
            in_c = layer.input.shape[-1] // layer.groups
            total += 2 * out_h * out_w * out_c * k_h * k_w * in_c
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
    return int(total)


def _flatten(model: keras.Model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _flatten(layer)
        else:
            yield layer


def recompute_batchnorm(model: keras.Model, images, chunk: int = 256, rows=None) -> None:
    """Set every trainable BatchNorm layer's moving mean and variance to its statistics over
    `images` (the un-augmented training images), in training mode with the current weights.

    With a few hundred images an epoch is a handful of batches: the moving averages lag weights
    that move fast, and in inference mode the network then gave every image the same class.
    Equal-weight averaging over chunks (momentum (i-1)/i on chunk i) makes one chunk exact.
    `rows` picks the images to use (all by default), read chunk by chunk."""
    import numpy as np

    rows = np.arange(len(images)) if rows is None else np.asarray(rows)

    layers = [
        layer for layer in _flatten(model) if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]
    if not layers or len(rows) == 0:
        return
    momenta = [layer.momentum for layer in layers]
    try:
        for i, start in enumerate(range(0, len(rows), chunk)):
            for layer in layers:
                layer.momentum = i / (i + 1)
            model(np.asarray(images[rows[start : start + chunk]], dtype="float32"), training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
