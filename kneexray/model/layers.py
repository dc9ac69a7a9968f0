"""Preprocessing that lives inside the saved models, so inference can't use the wrong one."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kneexray")
class GreyToRGB(keras.layers.Layer):
    """(H, W, 1) grey to (H, W, 3): ImageNet models expect three channels."""

    def call(self, inputs):
        return ops.repeat(inputs, 3, axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3)


@keras.saving.register_keras_serializable(package="kneexray")
class CaffePreprocess(keras.layers.Layer):
    """ResNet50's own `preprocess_input` ("caffe": BGR, ImageNet means subtracted, no scaling).

    Written as a layer rather than a Lambda so the .keras file loads in Keras' safe mode.
    """

    MEANS_BGR = (103.939, 116.779, 123.68)

    def call(self, inputs):
        bgr = ops.flip(inputs, axis=-1)
        return bgr - ops.convert_to_tensor(self.MEANS_BGR, dtype=inputs.dtype)


@keras.saving.register_keras_serializable(package="kneexray")
class RandomScaleBrightness(keras.layers.Layer):
    """Multiply each image by a factor drawn from [low, high], like Keras 2's brightness_range.

    keras.layers.RandomBrightness adds an offset instead; the original notebook scaled.
    """

    def __init__(self, low: float, high: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.low, self.high, self.seed = float(low), float(high), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=True):
        if not training or self.low == self.high == 1.0:
            return inputs
        batch = ops.shape(inputs)[0]
        factor = keras.random.uniform((batch, 1, 1, 1), self.low, self.high, seed=self.seed_generator)
        return ops.clip(inputs * factor, 0.0, 255.0)

    def get_config(self):
        return {**super().get_config(), "low": self.low, "high": self.high, "seed": self.seed}


@keras.saving.register_keras_serializable(package="kneexray")
class LinearProbe(keras.layers.Layer):
    """Class logits of a logistic regression on `size` x `size` greyscale thumbnails of the input.

    Its weights are fitted by scikit-learn (`kneexray.model.probe`) and never trained by gradient
    descent; the CNN adds its own logits to these, so it starts from the linear probe.
    """

    def __init__(self, size: int, n_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.size, self.n_classes = int(size), int(n_classes)
        self.resize = keras.layers.Resizing(self.size, self.size, interpolation="area", dtype="float32")

    def build(self, input_shape):
        features = self.size * self.size * int(input_shape[-1])
        self.kernel = self.add_weight(
            name="kernel", shape=(features, self.n_classes), initializer="zeros", trainable=False
        )
        self.bias = self.add_weight(name="bias", shape=(self.n_classes,), initializer="zeros", trainable=False)

    def thumbnails(self, images):
        """(N, size * size) values in [0, 1]: what the logistic regression sees."""
        x = self.resize(ops.cast(images, "float32") / 255.0)
        return ops.reshape(x, (ops.shape(x)[0], -1))

    def call(self, inputs):
        return ops.matmul(self.thumbnails(inputs), ops.cast(self.kernel, "float32")) + ops.cast(self.bias, "float32")

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.n_classes)

    def get_config(self):
        return {**super().get_config(), "size": self.size, "n_classes": self.n_classes}
