"""Training throughput of both models on this machine, and the share of its compute limit.

    python -m bench.train_throughput [--size 224] [--batch 32] [--steps 6] [--repeats 3]

Prints JSON. Details: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import keras  # noqa: E402  (after the log level is set)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench import ROOT  # noqa: E402
from kneexray.model.networks import build_cnn, build_head, build_resnet, forward_flops, resnet_base  # noqa: E402
from kneexray.params import load  # noqa: E402


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    tf.matmul(a, b).numpy()  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        tf.matmul(a, b).numpy()
        rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def fit_images_per_second(model: keras.Model, size: int, batch: int, steps: int, repeats: int) -> float:
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy")
    x = np.random.default_rng(0).integers(0, 255, (batch * steps, size, size, 1)).astype("float32")
    y = keras.utils.to_categorical(np.arange(len(x)) % 3, 3)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).cache().prefetch(2)
    model.fit(ds, epochs=1, verbose=0)  # warm-up: tracing and kernel selection
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.fit(ds, epochs=1, verbose=0)
        rates.append(len(x) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()  # as in the pipeline
    limit = matmul_gflops()

    params = load(ROOT / "params.yaml")  # the models as the pipeline builds them
    k = len(params.dataset.classes)
    cnn = build_cnn(
        args.size, k, filters=params.cnn.filters, dense_units=params.cnn.dense_units, dropout=params.cnn.dropout
    )
    base, weights = resnet_base(args.size, weights="imagenet")
    head = build_head(base.output_shape[-1], k, dense_units=params.resnet.dense_units, dropout=params.resnet.dropout)
    resnet = build_resnet(args.size, base=base, head=head)
    head_flops = forward_flops(resnet) - forward_flops(base)
    results = {
        "cnn_parameters": cnn.count_params(),
        "cnn_forward_gflops": round(forward_flops(cnn) / 1e9, 3),
        "resnet_parameters": resnet.count_params(),
        "resnet_forward_gflops": round(forward_flops(resnet) / 1e9, 3),
        "matmul_gflops": round(limit, 1),
        "image_size": args.size,
        "batch": args.batch,
        "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__,
        "resnet_weights": weights,
    }
    for name, model, train_flops in (
        ("cnn", cnn, 3 * forward_flops(cnn)),
        ("resnet_frozen", resnet, forward_flops(base) + 3 * head_flops),
    ):
        rate = fit_images_per_second(model, args.size, args.batch, args.steps, args.repeats)
        results[name] = {
            "images_per_s": round(rate, 1),
            "train_gflops_per_image": round(train_flops / 1e9, 3),
            "achieved_gflops": round(rate * train_flops / 1e9, 1),
            "fraction_of_matmul_limit": round(rate * train_flops / 1e9 / limit, 3),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
