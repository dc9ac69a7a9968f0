"""The original notebook's method, re-implemented in Keras 3, as the baseline our pipeline is measured against.

    python -m bench.baseline_notebook --train-list train.csv --test-list test.csv [--out JSON]
    python -m bench.baseline_notebook --data DIR [--limit 30 --epochs-cnn 1 ...]

Writes bench/results/baseline_notebook.json (or --out). Details: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from bench import ROOT
from kneexray import DEFAULT_CLASSES

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")  # what image_dataset_from_directory reads
RESNET_CACHE_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
NOTEBOOK = {
    "validation_split": 0.1,
    "batch_size": 32,
    "rotation_deg": 15,
    "shift": 0.1,
    "zoom": 0.1,
    "shear_deg": 0.1,
    "brightness": (0.8, 1.2),
    "cnn": {"filters": (32, 64, 128), "dense": (256, 128), "learning_rate": 1e-3, "epochs": 20},
    "resnet": {"dense": (256, 128), "learning_rate": 1e-4, "epochs": 15},
}
MODEL_NAMES = ("cnn", "resnet")


# ---------------------------------------------------------------------------------------------
# Pure helpers (no Keras)


def list_class_folder(folder: str | Path) -> list[tuple[Path, str]]:
    """(path, label) for every image under folder/<class>/, sorted."""
    folder = Path(folder)
    items = []
    for label in DEFAULT_CLASSES:
        for path in sorted((folder / label).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                items.append((path, label))
    return items


def stratified_subset(items: list[tuple[Path, str]], n: int, seed: int) -> list[tuple[Path, str]]:
    """About n items with the class proportions kept (largest remainder, at least one per class
    present), chosen with a seeded RNG; returned in their original order."""
    if n >= len(items):
        return list(items)
    rng = np.random.default_rng(seed)
    by_class = {c: [i for i, (_, label) in enumerate(items) if label == c] for c in DEFAULT_CLASSES}
    present = [c for c in DEFAULT_CLASSES if by_class[c]]
    exact = {c: n * len(by_class[c]) / len(items) for c in present}
    take = {c: max(1, math.floor(exact[c])) for c in present}
    for c in sorted(present, key=lambda c: exact[c] - math.floor(exact[c]), reverse=True):
        if sum(take.values()) >= n:
            break
        take[c] += 1
    chosen = sorted(i for c in present for i in rng.choice(by_class[c], min(take[c], len(by_class[c])), replace=False))
    return [items[i] for i in chosen]


def stratified_split(items: list[tuple[Path, str]], test_ratio: float, seed: int):
    """The notebook's train/test split: stratified, seeded."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        items, test_size=test_ratio, random_state=seed, stratify=[label for _, label in items]
    )
    return train, test


def copy_into_class_folders(items: list[tuple[Path, str]], folder: str | Path) -> list[Path]:
    """Copy each (path, label) to folder/<label>/<file name>, as the notebook did; every class folder
    is created, even an empty one. Returns the copies in the order of `items` (a clashing name gets
    a ~2, ~3... suffix)."""
    folder = Path(folder)
    for label in DEFAULT_CLASSES:
        (folder / label).mkdir(parents=True, exist_ok=True)
    copies, used = [], set()
    for path, label in items:
        if label not in DEFAULT_CLASSES:
            raise ValueError(f"{path}: unknown label {label!r}; expected one of {', '.join(DEFAULT_CLASSES)}")
        path = Path(path)
        name, k = path.name, 1
        while (label, name.lower()) in used:
            k += 1
            name = f"{path.stem}~{k}{path.suffix}"
        used.add((label, name.lower()))
        target = folder / label / name
        shutil.copyfile(path, target)
        copies.append(target)
    return copies


@contextmanager
def notebook_folders(train_items, test_items, parent: str | Path | None = None):
    """Temporary train/<class>/ and test/<class>/ copies; yields (train_dir, test_dir, test copies
    in the order of test_items); always removed afterwards."""
    scratch = Path(tempfile.mkdtemp(prefix="kneexray-notebook-", dir=parent))
    try:
        copy_into_class_folders(train_items, scratch / "train")
        test_copies = copy_into_class_folders(test_items, scratch / "test")
        yield scratch / "train", scratch / "test", test_copies
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def notebook_metrics(y_true, proba) -> dict:
    """What the notebook printed: test accuracy and classification_report's weighted averages."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    y_true, y_pred = np.asarray(y_true), np.asarray(proba).argmax(axis=1)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(DEFAULT_CLASSES))), average="weighted", zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "weighted_precision": float(precision),
        "weighted_recall": float(recall),
        "weighted_f1": float(f1),
    }


def bootstrap_recall_ci(y_true, proba, cls: int, *, resamples: int, seed: int, level: float = 0.95) -> dict:
    """Percentile bootstrap CI of one class's recall; the same resamples as metrics.bootstrap_ci
    (same seed, same draws), resamples without that class skipped."""
    y_true, y_pred = np.asarray(y_true), np.asarray(proba).argmax(axis=1)
    rng = np.random.default_rng(seed)
    n, values = len(y_true), []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        positives = y_true[idx] == cls
        if positives.any():
            values.append(float((y_pred[idx][positives] == cls).mean()))
    if not values:
        return {"low": None, "high": None}
    tail = (1 - level) / 2 * 100
    return {"low": float(np.percentile(values, tail)), "high": float(np.percentile(values, 100 - tail))}


def paired_delta_ci(y_true, proba_a, proba_b, *, resamples: int, seed: int, level: float = 0.95) -> dict:
    """Macro-F1 of a minus b on the same test images: point value and paired percentile bootstrap CI."""
    from sklearn.metrics import f1_score

    y_true = np.asarray(y_true)
    pred_a, pred_b = np.asarray(proba_a).argmax(axis=1), np.asarray(proba_b).argmax(axis=1)
    labels = list(range(len(DEFAULT_CLASSES)))

    def f1(t, p):
        return f1_score(t, p, labels=labels, average="macro", zero_division=0)

    rng = np.random.default_rng(seed)
    n, deltas = len(y_true), []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        deltas.append(f1(y_true[idx], pred_a[idx]) - f1(y_true[idx], pred_b[idx]))
    tail = (1 - level) / 2 * 100
    return {
        "delta": float(f1(y_true, pred_a) - f1(y_true, pred_b)),
        "low": float(np.percentile(deltas, tail)),
        "high": float(np.percentile(deltas, 100 - tail)),
    }


HEADLINE_KEYS = (
    "n_test",
    "test_per_class",
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "weighted_precision",
    "weighted_recall",
    "weighted_f1",
    "macro_auc",
    "per_class",
    "ci95",
    "ece",
    "confusion_matrix",
)


def our_metrics(y_true, proba, *, resamples: int = 1000, seed: int = 0) -> dict:
    """kneexray.evaluate.metrics.evaluate_predictions (headline part) plus the osteoporosis recall and its CI."""
    from kneexray.evaluate.metrics import evaluate_predictions

    result = evaluate_predictions(y_true, proba, DEFAULT_CLASSES, resamples=resamples, seed=seed)
    out = {k: result[k] for k in HEADLINE_KEYS}
    cls = DEFAULT_CLASSES.index("osteoporosis")
    out["osteoporosis_recall"] = result["per_class"]["osteoporosis"]["recall"]
    out["ci95"] = {
        **out["ci95"],
        "osteoporosis_recall": bootstrap_recall_ci(y_true, proba, cls, resamples=resamples, seed=seed),
    }
    return out


def read_list(csv_path: str | Path) -> list[tuple[Path, str]]:
    frame = pd.read_csv(csv_path)
    missing = {"path", "label"} - set(frame.columns)
    if missing:
        raise SystemExit(f"error: {csv_path}: missing column(s) {', '.join(sorted(missing))}")
    items = [(Path(p), str(label)) for p, label in zip(frame["path"], frame["label"])]
    for path, label in items:
        if label not in DEFAULT_CLASSES:
            raise SystemExit(f"error: {csv_path}: unknown label {label!r}")
        if not path.is_file():
            raise SystemExit(f"error: {csv_path}: {path} does not exist")
    return items


# ---------------------------------------------------------------------------------------------
# Keras parts


def shear_factor(degrees: float) -> float:
    """Keras 2's shear_range is an angle in degrees; RandomShear takes the shear factor tan(angle)."""
    return math.tan(math.radians(degrees))


def build_augmenter(seed: int):
    """ImageDataGenerator's random transforms as Keras 3 layers, on pixels in [0, 255]."""
    import keras

    from kneexray.model.layers import RandomScaleBrightness  # x * U(low, high), clipped to [0, 255], like PIL's

    layers = [
        keras.layers.RandomRotation(NOTEBOOK["rotation_deg"] / 360.0, fill_mode="nearest", seed=seed),
        keras.layers.RandomTranslation(NOTEBOOK["shift"], NOTEBOOK["shift"], fill_mode="nearest", seed=seed + 1),
    ]
    if hasattr(keras.layers, "RandomShear"):  # Keras >= 3.8
        layers.append(
            keras.layers.RandomShear(
                x_factor=shear_factor(NOTEBOOK["shear_deg"]), y_factor=0.0, fill_mode="nearest", seed=seed + 2
            )
        )
    layers += [
        keras.layers.RandomZoom(NOTEBOOK["zoom"], NOTEBOOK["zoom"], fill_mode="nearest", seed=seed + 3),
        keras.layers.RandomFlip("horizontal", seed=seed + 4),
        RandomScaleBrightness(*NOTEBOOK["brightness"], seed=seed + 5),
    ]
    return keras.Sequential(layers, name="notebook_augment")


def build_cnn(size: int):
    """The notebook's CNN (26.0 M parameters at 224 px, 25.7 M of them in Flatten -> Dense 256)."""
    import keras

    cfg = NOTEBOOK["cnn"]
    inputs = keras.Input((size, size, 3))
    x = inputs
    for n in cfg["filters"]:
        for _ in range(2):
            x = keras.layers.Conv2D(n, 3, padding="same", activation="relu")(x)
            x = keras.layers.BatchNormalization()(x)
        x = keras.layers.MaxPooling2D(2)(x)
        x = keras.layers.Dropout(0.25)(x)
    x = keras.layers.Flatten()(x)
    return _head_and_compile(inputs, x, cfg, "notebook_cnn")


def _head_and_compile(inputs, x, cfg: dict, name: str):
    """The notebook's head for both models: [Dense relu + BN + Dropout 0.5] per width, softmax, Adam."""
    import keras

    for units in cfg["dense"]:
        x = keras.layers.Dense(units, activation="relu")(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.Dropout(0.5)(x)
    outputs = keras.layers.Dense(len(DEFAULT_CLASSES), activation="softmax")(x)
    model = keras.Model(inputs, outputs, name=name)
    model.compile(
        optimizer=keras.optimizers.Adam(cfg["learning_rate"]), loss="categorical_crossentropy", metrics=["accuracy"]
    )
    return model


def resnet_weights_cached() -> Path | None:
    """The ImageNet ResNet50 (no top) file in the Keras cache, if there is one."""
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    path = home / "models" / RESNET_CACHE_FILE
    return path if path.is_file() else None


def build_resnet(size: int):
    """The notebook's frozen ResNet50 + dense head; returns (model, weights source)."""
    import keras

    cfg = NOTEBOOK["resnet"]
    cached = resnet_weights_cached()
    base = keras.applications.ResNet50(
        include_top=False, weights="imagenet" if cached else None, input_shape=(size, size, 3)
    )
    source = "imagenet" if cached else "random"
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    x = base(inputs)  # fed 1/255-scaled pixels, as the notebook did
    x = keras.layers.GlobalAveragePooling2D()(x)
    return _head_and_compile(inputs, x, cfg, "notebook_resnet50"), source


def _from_directory(folder: Path, size: int, **kwargs):
    import keras

    return keras.utils.image_dataset_from_directory(
        folder,
        labels="inferred",
        label_mode="categorical",
        class_names=list(DEFAULT_CLASSES),
        color_mode="rgb",
        batch_size=NOTEBOOK["batch_size"],
        image_size=(size, size),
        interpolation="nearest",
        **kwargs,
    )


def notebook_datasets(train_dir: Path, size: int, seed: int):
    """Training and validation datasets as the notebook's generators made them (both augmented),
    and the balanced class weights of the training subset."""
    import tensorflow as tf
    from sklearn.utils.class_weight import compute_class_weight

    from kneexray.model.inputs import label_indices  # imports TensorFlow: here, not at module level

    train_raw, val_raw = _from_directory(
        train_dir, size, validation_split=NOTEBOOK["validation_split"], subset="both", seed=seed, shuffle=True
    )
    train_labels = label_indices([Path(p).parent.name for p in train_raw.file_paths], DEFAULT_CLASSES)
    present = np.unique(train_labels)
    weights = compute_class_weight("balanced", classes=present, y=train_labels)
    class_weight = {int(c): float(w) for c, w in zip(present, weights)}
    augmenter = build_augmenter(seed)

    def augment(x, y):  # "nearest" resizing keeps uint8 pixels: cast, transform, then rescale
        return augmenter(tf.cast(x, tf.float32), training=True) / 255.0, y

    train_ds = train_raw.map(augment)
    val_ds = val_raw.map(augment)  # the notebook's bug: validation drawn from the augmenting generator
    counts = {"train": len(train_raw.file_paths), "val": len(val_raw.file_paths)}
    return train_ds, val_ds, class_weight, counts


def make_test_dataset(test_dir: Path, size: int):
    """Test images, only rescaled, in a fixed order; and that order (file paths)."""
    import tensorflow as tf

    raw = _from_directory(test_dir, size, shuffle=False)
    return raw.map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y)), [Path(p) for p in raw.file_paths]


def run_baseline(
    train_items,
    test_items,
    *,
    size: int = 224,
    epochs: dict[str, int] | None = None,
    seed: int = 42,
    resamples: int = 1000,
    bootstrap_seed: int = 0,
    models=MODEL_NAMES,
    scratch_parent=None,
) -> dict:
    """Train and test the notebook's models; metrics and probabilities in the order of test_items."""
    import keras

    from kneexray.model.inputs import label_indices

    epochs = {**{m: NOTEBOOK[m]["epochs"] for m in MODEL_NAMES}, **(epochs or {})}
    y_test = label_indices([label for _, label in test_items], DEFAULT_CLASSES)
    out = {
        "n_train_given": len(train_items),
        "n_test": len(test_items),
        "test": [{"path": str(p), "label": label} for p, label in test_items],
        "models": {},
    }
    started = time.perf_counter()
    with notebook_folders(train_items, test_items, scratch_parent) as (train_dir, test_dir, test_copies):
        out["copy_s"] = round(time.perf_counter() - started, 2)
        for name in models:
            keras.utils.set_random_seed(seed)
            t0 = time.perf_counter()
            train_ds, val_ds, class_weight, counts = notebook_datasets(train_dir, size, seed)
            if name == "cnn":
                model, source = build_cnn(size), "none (trained from scratch)"
            else:
                model, source = build_resnet(size)
            print(
                f"baseline {name}: {counts['train']} train / {counts['val']} val images, class weights "
                f"{class_weight}, weights {source}, {model.count_params():,} parameters",
                flush=True,
            )
            history = model.fit(
                train_ds, validation_data=val_ds, epochs=epochs[name], class_weight=class_weight, verbose=2
            )
            train_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            test_ds, order = make_test_dataset(test_dir, size)
            proba_sorted = model.predict(test_ds, verbose=0)
            predict_s = time.perf_counter() - t1
            position = {path.resolve(): i for i, path in enumerate(order)}
            proba = np.stack([proba_sorted[position[copy.resolve()]] for copy in test_copies])
            out["models"][name] = {
                "weights_source": source,
                "parameters": int(model.count_params()),
                "epochs_run": len(history.epoch),
                "max_epochs": epochs[name],
                "train_images": counts["train"],
                "val_images": counts["val"],
                "class_weight": class_weight,
                "train_s": round(train_s, 2),
                "predict_s": round(predict_s, 2),
                "history": {k: [round(float(v), 5) for v in vals] for k, vals in history.history.items()},
                "notebook_metrics": notebook_metrics(y_test, proba),
                "metrics": our_metrics(y_test, proba, resamples=resamples, seed=bootstrap_seed),
                "probabilities": np.round(proba, 6).tolist(),
            }
            keras.backend.clear_session()
    out["total_s"] = round(time.perf_counter() - started, 2)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a class-folder dataset (normal/, osteopenia/, osteoporosis/): split 80/20 here")
    source.add_argument("--train-list", help="CSV (path,label) of the training images (train + validation)")
    parser.add_argument("--test-list", help="CSV (path,label) of the test images (with --train-list)")
    parser.add_argument("--test-ratio", type=float, default=0.2, help="with --data (default 0.2)")
    parser.add_argument("--epochs-cnn", type=int, default=NOTEBOOK["cnn"]["epochs"])
    parser.add_argument("--epochs-resnet", type=int, default=NOTEBOOK["resnet"]["epochs"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--limit",
        type=int,
        help="smoke tests: with --data, N images in all; with lists, N training "
        "images and about N/4 test images (stratified, seeded)",
    )
    parser.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated: cnn,resnet")
    parser.add_argument("--seed", type=int, default=42, help="split, validation split, augmentation and weights seed")
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "baseline_notebook.json"))
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if set(models) - set(MODEL_NAMES):
        parser.error(f"--models: choose from {', '.join(MODEL_NAMES)}")

    if args.data:
        items = list_class_folder(args.data)
        if not items:
            sys.exit(f"error: {args.data} holds no images under {'/, '.join(DEFAULT_CLASSES)}/")
        if args.limit:
            items = stratified_subset(items, args.limit, args.seed)
        train_items, test_items = stratified_split(items, args.test_ratio, args.seed)
    else:
        if not args.test_list:
            parser.error("--train-list needs --test-list")
        train_items, test_items = read_list(args.train_list), read_list(args.test_list)
        if args.limit:
            train_items = stratified_subset(train_items, args.limit, args.seed)
            test_items = stratified_subset(test_items, max(3, round(args.limit / 4)), args.seed)

    result = run_baseline(
        train_items,
        test_items,
        size=args.image_size,
        seed=args.seed,
        resamples=args.resamples,
        bootstrap_seed=args.bootstrap_seed,
        models=models,
        epochs={"cnn": args.epochs_cnn, "resnet": args.epochs_resnet},
    )
    result["settings"] = {
        "image_size": args.image_size,
        "seed": args.seed,
        "limit": args.limit,
        "epochs": {"cnn": args.epochs_cnn, "resnet": args.epochs_resnet},
        "resamples": args.resamples,
        "bootstrap_seed": args.bootstrap_seed,
        "notebook": NOTEBOOK,
        "random_shear_layer": hasattr(__import__("keras").layers, "RandomShear"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for name, m in result["models"].items():
        ci = m["metrics"]["ci95"]
        print(
            f"baseline {name} ({m['weights_source']}, {m['epochs_run']} epochs, {m['train_s']:.0f} s): "
            f"accuracy {m['metrics']['accuracy']:.3f}, macro-F1 {m['metrics']['macro_f1']:.3f} "
            f"[{ci['macro_f1']['low']:.3f}, {ci['macro_f1']['high']:.3f}], osteoporosis recall "
            f"{m['metrics']['osteoporosis_recall']:.3f}; notebook: {m['notebook_metrics']}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
