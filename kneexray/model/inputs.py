"""The input pipeline: decode each radiograph once, keep small grey arrays, feed tf.data.

Real radiographs are JPEGs of up to 2660 px; decoding them every epoch would dominate training
time on a CPU. They are decoded once (at reduced JPEG scale), resized to `image.size` and kept as
uint8 (the real data: 239 x 224 x 224 bytes = 12 MB); training keeps them in a memory-mapped file,
so a large set need not fit in memory, and batches gather rows by number.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm import tqdm

from kneexray.data.images import load_grey_array
from kneexray.errors import InputError
from kneexray.model.layers import RandomScaleBrightness
from kneexray.params import AugmentParams

log = logging.getLogger(__name__)


def read_split(csv_path: str | Path, classes: Sequence[str]) -> pd.DataFrame:
    """A split list: one row per image with at least `path` and `label` columns, labels of `classes`."""
    frame = pd.read_csv(csv_path)
    missing = {"path", "label"} - set(frame.columns)
    if missing:
        raise InputError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}")
    unknown = set(frame["label"].astype(str)) - set(classes)
    if unknown:
        raise InputError(f"{csv_path}: unknown label(s) {', '.join(sorted(unknown))}; expected {', '.join(classes)}")
    return frame


def load_images(
    paths,
    size: int,
    *,
    fit: str = "squash",
    root: str | Path = ".",
    workers: int = 2,
    desc: str = "decode",
    spill_to: str | Path | None = None,
) -> np.ndarray:
    """(N, size, size, 1) uint8; PIL releases the GIL while decoding, so threads help.

    With `spill_to` (a .npy path) the array is a memory map of that file: the operating system
    keeps in memory what is being read and can drop the rest (20,000 images at 224 px are 1 GB)."""
    root = Path(root)
    paths = [root / p for p in paths]
    shape = (len(paths), size, size, 1)
    if spill_to is None:
        out = np.empty(shape, dtype=np.uint8)
    else:
        out = np.lib.format.open_memmap(spill_to, mode="w+", dtype=np.uint8, shape=shape)

    def one(i: int) -> None:
        out[i, :, :, 0] = load_grey_array(paths[i], size, fit=fit)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(
            tqdm(
                pool.map(one, range(len(paths))),
                total=len(paths),
                desc=desc,
                disable=not sys.stderr.isatty(),
                leave=False,
            )
        )
    return out


def label_indices(labels, classes: Sequence[str]) -> np.ndarray:
    """Each label's position in `classes` (the model's output order)."""
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[label] for label in labels], dtype=np.int64)


def build_augmenter(augment: AugmentParams, seed: int) -> tf.keras.Sequential | None:
    """Keras preprocessing layers for training batches only (validation/test are never augmented)."""
    import keras

    # float32 whatever the mixed-precision policy: pixel values up to 255 lose steps in bfloat16/float16,
    # and the augmentation runs in tf.data on the CPU, outside the model.
    f32 = {"dtype": "float32"}
    layers = []
    if augment.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed, **f32))
    if augment.rotation_deg > 0:
        layers.append(
            keras.layers.RandomRotation(augment.rotation_deg / 360.0, fill_mode="constant", seed=seed + 1, **f32)
        )
    if augment.shift > 0:
        layers.append(
            keras.layers.RandomTranslation(augment.shift, augment.shift, fill_mode="constant", seed=seed + 2, **f32)
        )
    if augment.zoom > 0:
        layers.append(keras.layers.RandomZoom(augment.zoom, fill_mode="constant", seed=seed + 3, **f32))
    low, high = augment.brightness
    if (low, high) != (1.0, 1.0):
        layers.append(RandomScaleBrightness(low, high, seed=seed + 4, **f32))
    return keras.Sequential(layers, name="augment") if layers else None


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray | None,
    *,
    batch_size: int,
    shuffle_seed: int | None = None,
    augmenter=None,
    drop_remainder: bool = False,
    n_classes: int = 0,
    rows: np.ndarray | None = None,
) -> tf.data.Dataset:
    """Batches of float32 images in [0, 255] (and labels one-hot over `n_classes`); preprocessing is in the model.

    The dataset holds row numbers, not pixels: each batch is gathered from `images` (the rows
    `rows` picks, all by default) as it is needed. Every fold shares the one array, and the
    shuffle buffer holds numbers, so memory does not grow with folds or with a copy per dataset.
    """
    order = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64)
    features = tf.data.Dataset.from_tensor_slices(order)
    if labels is not None:
        if n_classes < 2:
            raise ValueError(f"make_dataset: labels need n_classes >= 2, got {n_classes}")
        one_hot = tf.one_hot(np.asarray(labels)[order], n_classes)
        ds = tf.data.Dataset.zip(features, tf.data.Dataset.from_tensor_slices(one_hot))
    else:
        ds = features
    if shuffle_seed is not None:
        ds = ds.shuffle(len(order), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    dtype, shape = tf.as_dtype(images.dtype), (None, *images.shape[1:])

    def to_float(i, *rest):
        x = tf.numpy_function(lambda j: images[j], [i], dtype, stateful=False)
        x = tf.cast(tf.ensure_shape(x, shape), tf.float32)
        if augmenter is not None:
            x = augmenter(x, training=True)
        return (x, *rest) if rest else x

    # Sequential map: the augmenter's random state must advance in one order for reproducible runs.
    return ds.map(to_float).prefetch(tf.data.AUTOTUNE)
