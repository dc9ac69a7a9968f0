"""Training either model: k-fold cross-validated, seeded, logged with DVCLive, saved atomically.

Each fold model trains on k-1 folds of train+validation and predicts the fold it did not see. The
folds train in lockstep, one epoch at a time, so after every epoch the pooled out-of-fold
predictions score that epoch on every training image. The epoch kept is the best on that score
(never one before `train.min_epochs`); the fold models at that epoch are averaged into one model.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from dvclive import Live
from sklearn.utils.class_weight import compute_class_weight

from kneexray import CLASSES, __version__
from kneexray.atomic import atomic_path, stable_zip_entry
from kneexray.errors import InputError
from kneexray.images import FITS
from kneexray.inputs import build_augmenter, label_indices, load_images, make_dataset, read_split
from kneexray.layers import CaffePreprocess, GreyToRGB
from kneexray.models import (
    average_models,
    build_cnn,
    build_head,
    build_resnet,
    recompute_batchnorm,
    resnet_base,
    unfreeze_top,
)
from kneexray.selection import EpochSelector, no_skill, prediction_shares, score, weighted_log_loss
from kneexray.splitting import assign_folds

log = logging.getLogger(__name__)

MODEL_KINDS = ("cnn", "resnet")
META_ENTRY = "kneexray.json"  # extra member in the .keras zip: what inference needs to know


@dataclass
class TrainResult:
    model: keras.Model
    metadata: dict
    epochs_run: int


def seed_everything(seed: int) -> None:
    """Same seed, same machine, same numbers: Python, NumPy and TF seeds plus deterministic ops."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def configure_devices(train_cfg: dict) -> None:
    """Threads, GPU memory growth and mixed precision, before any model is built."""
    if train_cfg["threads"]:
        # several queued experiments share the cores instead of each grabbing them all
        try:
            tf.config.threading.set_intra_op_parallelism_threads(train_cfg["threads"])
            tf.config.threading.set_inter_op_parallelism_threads(train_cfg["threads"])
            log.info("limited to %d TensorFlow thread(s) per pool (train.threads)", train_cfg["threads"])
        except RuntimeError:  # TensorFlow already started in this process (tests); stages start fresh
            log.warning("train.threads ignored: TensorFlow was already initialised in this process")
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:  # experiments sharing a GPU must not each reserve all of its memory
        tf.config.experimental.set_memory_growth(gpu, True)
    policy = train_cfg["mixed_precision"]
    if policy == "auto":
        policy = "mixed_float16" if gpus else "float32"
    keras.mixed_precision.set_global_policy(policy)


def choose_strategy(name: str) -> tf.distribute.Strategy:
    """'auto': MultiWorkerMirroredStrategy when TF_CONFIG is set, MirroredStrategy over all GPUs when
    there are several, else the default strategy. 'mirrored' on a machine without GPUs mirrors over
    the logical CPU devices (how the tests exercise it)."""
    if name == "multi_worker" or (name == "auto" and os.environ.get("TF_CONFIG")):
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")  # initialises TensorFlow: too late for collective ops above
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    return tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Keras's multi-worker convention: the 'chief' task, or worker 0 when the cluster names no chief,
    writes the outputs; the other workers only train. Without a cluster every process is the chief."""
    resolver = getattr(strategy or tf.distribute.get_strategy(), "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().jobs


def describe_strategy(strategy: tf.distribute.Strategy) -> str:
    """One log line's worth: the strategy class, its replicas and, in a cluster, which task this is."""
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)  # class: CollectiveAllReduceStrategy
    name = "MultiWorkerMirroredStrategy" if multi_worker else type(strategy).__name__
    text = f"{name}, {strategy.num_replicas_in_sync} replica(s) in sync"
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is not None and resolver.task_type:
        spec = resolver.cluster_spec()
        workers = sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs)
        role = "chief" if is_chief(strategy) else "not the chief"
        text += f", task {resolver.task_type}:{resolver.task_id} of {workers} workers ({role})"
    return text


def shard_by_data(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Multi-worker input sharding by elements. Every worker builds the same in-memory dataset (same
    seed, so same order) and keeps only its replicas' shares of each global batch. The default (AUTO)
    first tries FILE sharding, which has no files to split here (from_tensor_slices) and falls back
    with a warning; OFF would feed every worker the same examples. No effect on one machine."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def class_weights(labels: np.ndarray, mode: str) -> dict[int, float] | None:
    if mode == "none":
        return None
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    return {int(c): float(w) for c, w in zip(present, weights)}


def _work_around_keras_multi_worker(model: keras.Model, dataset: tf.data.Dataset) -> None:
    """Two bugs of Keras 3's TensorFlow trainer (3.15 included) under MultiWorkerMirroredStrategy
    (keras-team/keras#20585), worked around here so that fit() runs; no effect on other strategies:
    - fit() and evaluate() learn the input shapes by all-reducing the first distributed batch, a nest
      the strategy cannot reduce. Build the model, loss, metrics and optimizer from the dataset's
      element spec instead (shapes are all that needs) and skip that step.
    - every step's logs are averaged over the workers with a reduce along axis 0, which fails on the
      scalar loss and metrics. Give them that axis: [value], averaged into the scalar Keras expects."""
    if not isinstance(model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    if getattr(model, "_kneexray_rank1_logs", False):  # done once per model (fine-tuning fits it again)
        return
    with model.distribute_strategy.scope():
        model._symbolic_build(data_batch=dataset.element_spec)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    for name in ("train_step", "test_step"):
        setattr(model, name, _with_rank1_logs(getattr(model, name)))
    model._kneexray_rank1_logs = True


def _with_rank1_logs(step):
    def wrapped(data):
        return keras.tree.map_structure(lambda v: tf.reshape(v, [1]) if v.shape.rank == 0 else v, step(data))

    return wrapped


def infer(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Model outputs in inference mode: compiled predict(), or under a multi-worker strategy (whose
    predict() would try to distribute) eager calls batch by batch. Eager calls of the ResNet50 base
    took the train_resnet stage to 6 GiB of memory."""
    if len(x) == 0:
        return np.zeros((0, *model.output_shape[1:]), dtype=np.float32)
    if isinstance(model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return np.concatenate(
            [
                np.asarray(model(tf.cast(x[i : i + batch_size], tf.float32), training=False))
                for i in range(0, len(x), batch_size)
            ]
        )
    return model.predict(np.asarray(x, dtype=np.float32), batch_size=batch_size, verbose=0)


@dataclass
class Folds:
    """Who trains and who is held out in each fold: `held[f]` and `fit[f]` index train+validation."""

    held: list[np.ndarray]
    fit: list[np.ndarray]

    @classmethod
    def make(cls, rows: pd.DataFrame, n_val: int, folds: int, seed: int) -> Folds:
        if folds == 1:  # the split's own validation images (the last n_val rows) are the held-out fold
            n = len(rows)
            return cls(held=[np.arange(n - n_val, n)], fit=[np.arange(n - n_val)])
        fold = assign_folds(rows, folds, seed)
        return cls(
            held=[np.flatnonzero(fold == f) for f in range(folds)],
            fit=[np.flatnonzero(fold != f) for f in range(folds)],
        )


def _lr_schedule(learning_rate: float, steps_per_epoch: int, epochs: int, warmup_epochs: int):
    """Linear warm-up, then cosine decay to zero by the last epoch: large early steps on a few
    hundred images are what made validation accuracy jump 0.93 -> 0.38 -> 0.79 between epochs."""
    warmup = min(warmup_epochs, max(0, epochs - 1)) * steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(
        learning_rate * 0.1 if warmup else learning_rate,
        decay_steps=max(1, epochs * steps_per_epoch - warmup),
        warmup_target=learning_rate if warmup else None,
        warmup_steps=warmup,
    )


def _log_priors(labels: np.ndarray) -> list[float]:
    counts = np.bincount(labels, minlength=len(CLASSES)) + 1.0  # +1: a class absent from a fold stays finite
    return list(np.log(counts / counts.sum()))


def _snapshot(model: keras.Model) -> list[np.ndarray]:
    return [w.copy() for w in model.get_weights()]


class _Backup:
    """train.resume: after every epoch the fold models (with their optimizers), the best epoch's
    weights and the selection history are written to `folder`; a rerun continues from there."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder is not None else None

    def load(self, models: list[keras.Model]) -> dict | None:
        if self.folder is None or not (self.folder / "state.json").is_file():
            return None
        state = json.loads((self.folder / "state.json").read_text())
        for f, model in enumerate(models):
            restored = keras.saving.load_model(self.folder / f"fold{f}.keras")
            model.set_weights(restored.get_weights())
            model.optimizer.build(model.trainable_variables)
            for mine, saved in zip(model.optimizer.variables, restored.optimizer.variables):
                mine.assign(saved)
        best = np.load(self.folder / "best.npz")
        state["best_weights"] = (
            [[best[f"f{f}_{i}"] for i in range(state["weights_per_fold"])] for f in range(len(models))]
            if state["best_epoch"] is not None
            else None
        )
        state["best_oof"] = best["oof"] if "oof" in best else None
        log.info("resuming from %s: %d epoch(s) already done", self.folder, state["epochs_done"])
        return state

    def save(self, models, epochs_done: int, selector: EpochSelector, best_weights, best_oof) -> None:
        if self.folder is None:
            return
        with atomic_path(self.folder) as tmp:
            tmp.mkdir()
            for f, model in enumerate(models):
                model.save(tmp / f"fold{f}.keras")
            arrays = {f"f{f}_{i}": w for f, ws in enumerate(best_weights or []) for i, w in enumerate(ws)}
            if best_oof is not None:
                arrays["oof"] = best_oof
            np.savez(tmp / "best.npz", **arrays)
            (tmp / "state.json").write_text(
                json.dumps(
                    {
                        "epochs_done": epochs_done,
                        "best_epoch": selector.best_epoch,
                        "best_score": selector.best_score,
                        "history": selector.history,
                        "weights_per_fold": len(models[0].get_weights()),
                    }
                )
            )

    def remove(self) -> None:
        if self.folder is not None:
            import shutil

            shutil.rmtree(self.folder, ignore_errors=True)


def fit_folds(
    build,
    x: np.ndarray,
    y: np.ndarray,
    folds: Folds,
    *,
    cfg: dict,
    train_cfg: dict,
    batch: int,
    augmenter,
    strategy,
    live: Live | None,
    backup: _Backup,
    extra_fit: tuple[np.ndarray, np.ndarray] | None = None,
):
    """Train one model per fold in lockstep and keep each at the epoch with the best pooled
    out-of-fold score. `build(output_bias)` returns a compiled-ready model; `extra_fit` holds
    training-only copies (e.g. mirrored features) indexed like x. Returns (members, oof, info)."""
    epochs, n_folds = cfg["epochs"], len(folds.held)
    ragged_ok = strategy.num_replicas_in_sync == 1
    mode = train_cfg["class_weights"]
    models, datasets, weights = [], [], []
    for f in range(n_folds):
        idx = folds.fit[f]
        x_fit, y_fit = x[idx], y[idx]
        if extra_fit is not None:
            x_fit, y_fit = np.concatenate([x_fit, extra_fit[0][idx]]), np.concatenate([y_fit, extra_fit[1][idx]])
        steps = len(y_fit) // batch if not ragged_ok else -(-len(y_fit) // batch)
        datasets.append(
            shard_by_data(
                make_dataset(
                    x_fit,
                    y_fit,
                    batch_size=batch,
                    shuffle_seed=train_cfg["seed"] + f,
                    augmenter=augmenter,
                    drop_remainder=not ragged_ok,
                )
            )
        )
        weights.append(class_weights(y_fit, mode))
        with strategy.scope():
            model = build(None if mode == "balanced" else _log_priors(y_fit))
            model.compile(
                optimizer=keras.optimizers.Adam(
                    _lr_schedule(cfg["learning_rate"], max(1, steps), epochs, train_cfg["warmup_epochs"])
                ),
                loss=keras.losses.CategoricalCrossentropy(label_smoothing=train_cfg["label_smoothing"]),
                metrics=["accuracy"],
                jit_compile=train_cfg["jit_compile"],
            )
        models.append(model)
    selector = EpochSelector(train_cfg["select_on"], train_cfg["min_epochs"], train_cfg["patience"])
    best_weights, best_oof, start = None, None, 0
    state = backup.load(models)
    if state is not None:
        start, best_weights, best_oof = state["epochs_done"], state["best_weights"], state["best_oof"]
        selector.best_epoch, selector.best_score, selector.history = (
            state["best_epoch"],
            state["best_score"],
            state["history"],
        )
    held_all = np.concatenate(folds.held)
    oof = np.zeros((len(y), len(CLASSES)), dtype=np.float32)
    n_fit = sum(len(d) for d in folds.fit) * (2 if extra_fit is not None else 1)
    epoch = start - 1
    for epoch in range(start, epochs):
        seconds, train_loss, train_acc = 0.0, [], []
        for f, model in enumerate(models):
            _work_around_keras_multi_worker(model, datasets[f])
            started = time.perf_counter()
            history = model.fit(
                datasets[f], epochs=epoch + 1, initial_epoch=epoch, shuffle=False, class_weight=weights[f], verbose=0
            )  # tf.data shuffles
            seconds += time.perf_counter() - started
            train_loss.append(history.history["loss"][-1])
            train_acc.append(history.history["accuracy"][-1])
            recompute_batchnorm(model, x[folds.fit[f]])
            oof[folds.held[f]] = infer(model, x[folds.held[f]], batch)
        y_held, p_held = y[held_all], oof[held_all]
        value = score(train_cfg["select_on"], y_held, p_held)
        improved = selector.update(epoch, value)
        if improved:
            best_weights, best_oof = [_snapshot(m) for m in models], oof.copy()
        log.info("epoch %d: %.2f s, %.1f train images/s", epoch + 1, seconds, n_fit / seconds)
        log.info(
            "epoch %d/%d: train loss %.3f, out-of-fold %s %.3f%s",
            epoch + 1,
            epochs,
            np.mean(train_loss),
            train_cfg["select_on"],
            value,
            " (best so far)" if improved else "",
        )
        backup.save(models, epoch + 1, selector, best_weights, best_oof)  # first: a logged epoch is a saved one
        if live is not None:
            _log_epoch(live, np.mean(train_loss), np.mean(train_acc), y_held, p_held)
        if selector.should_stop(epoch):
            log.info(
                "early stop after epoch %d: no better out-of-fold %s for %d epochs",
                epoch + 1,
                train_cfg["select_on"],
                train_cfg["patience"],
            )
            break
    if best_weights is None:  # fewer epochs than min_epochs: keep the last
        selector.best_epoch, best_weights, best_oof = epoch, [_snapshot(m) for m in models], oof.copy()
    for model, w in zip(models, best_weights):
        model.set_weights(w)
    assert selector.best_epoch is not None  # set above when no epoch qualified
    info = {
        "epochs_run": epoch + 1,
        "selected_epoch": selector.best_epoch + 1,
        "folds": n_folds,
        "select_on": train_cfg["select_on"],
        "history": selector.history,
    }
    return models, best_oof, held_all, info


def _oof_metrics(y: np.ndarray, proba: np.ndarray) -> dict:
    return {
        "accuracy": float((proba.argmax(axis=1) == y).mean()),
        "macro_f1": score("macro_f1", y, proba),
        "balanced_accuracy": score("balanced_accuracy", y, proba),
        "loss": weighted_log_loss(y, proba),
    }


def _log_epoch(live: Live, train_loss: float, train_acc: float, y: np.ndarray, proba: np.ndarray) -> None:
    live.log_metric("train/loss", float(train_loss))
    live.log_metric("train/accuracy", float(train_acc))
    for name, value in _oof_metrics(y, proba).items():
        live.log_metric(f"eval/{name}", value)
    live.next_step()


def _features(base: keras.Model, x: np.ndarray, batch: int) -> np.ndarray:
    """The frozen base's pooled features of each image: computed once, so the k heads and all their
    epochs cost what one pass of the base costs."""
    extractor = keras.Sequential([GreyToRGB(), CaffePreprocess(), base])
    return infer(extractor, x, batch)


def train(
    kind: str,
    params: dict,
    *,
    split_dir: str | Path,
    data_root: str | Path,
    live_dir: str | Path,
    backup_dir: str | Path | None = None,
) -> TrainResult:
    """Train `kind` ('cnn' or 'resnet') on split_dir/train.csv + val.csv, cross-validated."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind: {kind!r} is not one of {', '.join(MODEL_KINDS)}")
    cfg, train_cfg = params[kind], params["train"]
    size = cfg["image_size"]
    configure_devices(train_cfg)
    seed_everything(train_cfg["seed"])
    # Before TensorFlow initialises its devices: MultiWorkerMirroredStrategy must set up collective ops first.
    strategy = choose_strategy(train_cfg["strategy"])
    chief = is_chief(strategy)
    log.info("strategy %s", describe_strategy(strategy))
    split_dir = Path(split_dir)
    val_rows = read_split(split_dir / "val.csv")
    rows = pd.concat([read_split(split_dir / "train.csv"), val_rows], ignore_index=True)
    if "group" not in rows:
        rows["group"] = np.arange(len(rows))
    folds = Folds.make(rows, len(val_rows), train_cfg["folds"], train_cfg["seed"])
    fit = params["image"]["fit"]
    x = load_images(rows["path"], size, fit=fit, root=data_root, desc="train images")
    y = label_indices(rows["label"])
    # image.batch_size is per replica: the global batch grows with the replicas (across all workers),
    # and the learning rate is left as configured (not scaled with the global batch).
    batch = params["image"]["batch_size"] * strategy.num_replicas_in_sync
    log.info(
        "%s: %d train+validation images in %d fold(s) (held out %s), global batch %d",
        kind,
        len(y),
        len(folds.held),
        [len(h) for h in folds.held],
        batch,
    )

    live = (
        Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None, resume=bool(train_cfg["resume"]))
        if chief
        else None
    )
    backup = _Backup(backup_dir if train_cfg["resume"] else None)
    if backup.folder is not None and not chief:  # each worker backs up its own state
        backup.folder = Path(f"{backup_dir}.{strategy.cluster_resolver.task_type}{strategy.cluster_resolver.task_id}")
    try:
        if kind == "cnn":
            weights_source = "none (trained from scratch)"

            def build(bias):
                return build_cnn(
                    size,
                    filters=cfg["filters"],
                    dense_units=cfg["dense_units"],
                    dropout=cfg["dropout"],
                    output_bias=bias,
                )

            members, oof, held, info = fit_folds(
                build,
                x,
                y,
                folds,
                cfg=cfg,
                train_cfg=train_cfg,
                batch=batch,
                augmenter=build_augmenter(params["augment"], train_cfg["seed"]),
                strategy=strategy,
                live=live,
                backup=backup,
            )
            with strategy.scope():
                model = average_models(members, "cnn")
        else:
            with strategy.scope():
                base, weights_source = resnet_base(
                    size, weights=cfg["weights"], weights_path=cfg["weights_path"], required=cfg["weights_required"]
                )
            features = _features(base, x, batch)
            # Mirrored copies are the one augmentation that survives caching features.
            mirrored = (_features(base, x[:, :, ::-1], batch), y) if params["augment"]["horizontal_flip"] else None

            def build(bias):
                return build_head(
                    features.shape[1], dense_units=cfg["dense_units"], dropout=cfg["dropout"], output_bias=bias
                )

            heads, oof, held, info = fit_folds(
                build,
                features,
                y,
                folds,
                cfg=cfg,
                train_cfg=train_cfg,
                batch=batch,
                augmenter=None,
                strategy=strategy,
                live=live,
                backup=backup,
                extra_fit=mirrored,
            )
            with strategy.scope():
                model = build_resnet(size, base=base, head=average_models(heads, "heads", input_name="features"))
            if cfg["fine_tune_layers"] > 0 and cfg["fine_tune_epochs"] > 0:
                info["epochs_run"] += _fine_tune(model, x, y, folds, cfg, train_cfg, batch, strategy)
    finally:
        if live is not None:
            live.end()
    backup.remove()

    oof_metrics = _oof_metrics(y[held], oof[held])
    shares = prediction_shares(infer(model, x, batch))
    collapsed = no_skill(shares, train_cfg["no_skill_share"])
    if collapsed:
        log.error(
            "NO SKILL: the %s model gives %.0f%% of its own training images the class %r; its test "
            "metrics will be no better than chance",
            kind,
            100 * shares[collapsed],
            collapsed,
        )
    if live is not None:  # the summary describes the saved model: the selected epoch, not the last one
        _write_summary(live, info, oof_metrics, collapsed)
    metadata = {
        "model": kind,
        "classes": list(CLASSES),
        "image_size": size,
        "image_fit": fit,
        "input": "greyscale uint8 pixels fitted to image_size x image_size (image_fit), fed as float32 in [0, 255]",
        "preprocessing": "in-model: Rescaling(1/255)" if kind == "cnn" else "in-model: ResNet50 caffe preprocess_input",
        "weights_source": weights_source,
        "epochs_run": info["epochs_run"],
        "selected_epoch": info["selected_epoch"],
        "folds": info["folds"],
        "ensemble": f"mean of {info['folds']} fold models" if info["folds"] > 1 else "one model",
        "out_of_fold": {k: round(v, 6) for k, v in oof_metrics.items()},
        "train_prediction_shares": {k: round(v, 6) for k, v in shares.items()},
        "no_skill": collapsed is not None,
        "train_images": int(len(y)),
        "kneexray_version": __version__,
        **model_card(kind, params, data_root),
    }
    return TrainResult(model=model, metadata=metadata, epochs_run=info["epochs_run"])


INTENDED_USE = (
    "Research and teaching: a demonstration of a reproducible pipeline. Not a medical device; "
    "not validated for diagnosis. Its out-of-fold figures describe the data it was trained on only."
)


def code_digest() -> str:
    """sha256 over the kneexray modules this process has imported: the train stage's code deps.

    Not the git commit: a clone that reruns `dvc repro` at a later commit must write the same bytes
    (and dvc.lock must not change) when the code it ran is the same.
    """
    import hashlib
    import sys

    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    files = {Path(f).resolve() for m in list(sys.modules.values()) if (f := getattr(m, "__file__", None))}
    for path in sorted(f for f in files if f.is_relative_to(package) and f.suffix == ".py"):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def model_card(kind: str, params: dict, data_root: str | Path) -> dict:
    """What a reader of the model file needs to judge it: which data (source and the hash of the
    extract stage's index, which lists every image's sha256), which code, which settings."""
    import hashlib

    from kneexray.layout import INDEX_FILE

    index = Path(data_root) / INDEX_FILE
    augment = params["augment"] if kind == "cnn" else {"horizontal_flip": params["augment"]["horizontal_flip"]}
    return {
        "data": {
            "source": params["dataset"]["source"],
            "index_sha256": hashlib.sha256(index.read_bytes()).hexdigest() if index.is_file() else None,
        },
        "code_sha256": code_digest(),
        "params": {
            kind: params[kind],
            "augment": augment,
            "image": params["image"],
            "train": {k: v for k, v in params["train"].items() if k not in ("threads", "resume")},
        },
        "intended_use": INTENDED_USE,
    }


def _write_summary(live: Live, info: dict, oof_metrics: dict, collapsed: str | None) -> None:
    live.summary = {
        "step": info["selected_epoch"] - 1,
        "selected_epoch": info["selected_epoch"],
        "epochs_run": info["epochs_run"],
        "folds": info["folds"],
        "no_skill": int(collapsed is not None),
        "out_of_fold": oof_metrics,
    }
    live.step = info["selected_epoch"] - 1  # make_summary writes the step too
    live.make_summary()


def _fine_tune(model: keras.Model, x, y, folds: Folds, cfg: dict, train_cfg: dict, batch: int, strategy) -> int:
    """Unfreeze the top of the base and train the whole model on the images (one fold only: the
    fold ensemble shares one base). Early stopping on the held-out fold's loss, best weights kept."""
    fit_idx, held_idx = folds.fit[0], folds.held[0]
    with strategy.scope():
        unfrozen = unfreeze_top(model, cfg["fine_tune_layers"])
        model.compile(
            optimizer=keras.optimizers.Adam(cfg["fine_tune_learning_rate"]),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=train_cfg["label_smoothing"]),
            metrics=["accuracy"],
            jit_compile=train_cfg["jit_compile"],
        )
    log.info("fine-tuning the top %d layers of the base for %d epochs", unfrozen, cfg["fine_tune_epochs"])
    ragged_ok = strategy.num_replicas_in_sync == 1
    train_ds = make_dataset(
        x[fit_idx], y[fit_idx], batch_size=batch, shuffle_seed=train_cfg["seed"], drop_remainder=not ragged_ok
    )
    val_ds = make_dataset(x[held_idx], y[held_idx], batch_size=batch, drop_remainder=not ragged_ok)
    _work_around_keras_multi_worker(model, train_ds)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=train_cfg["patience"], restore_best_weights=True)
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=cfg["fine_tune_epochs"],
        shuffle=False,
        class_weight=class_weights(y[fit_idx], train_cfg["class_weights"]),
        callbacks=[stop],
        verbose=0,
    )
    return len(history.epoch)


def save_model(model: keras.Model, metadata: dict, path: str | Path) -> None:
    """Write the .keras file with our metadata inside it, atomically.

    In multi-worker training only the chief writes `path`. The other workers save too, as Keras
    advises (saving may read distributed variables, which every worker must join), but into a
    temporary folder that is deleted at once."""
    if is_chief(model.distribute_strategy):
        with atomic_path(path, suffix=".keras") as tmp:
            _write_model(model, metadata, tmp)
        return
    with tempfile.TemporaryDirectory(prefix="kneexray-worker-") as scratch:
        _write_model(model, metadata, Path(scratch) / "model.keras")
    log.info("not the chief: %s is left to the chief to write", path)


def _renumber_shared_objects(config):
    """Keras names objects shared between layers (the dtype policy) by their Python id(), which
    changes with every process; only equality matters on loading, so number them 0, 1, ... instead."""
    numbers: dict[int, int] = {}

    def walk(node):
        if isinstance(node, dict):
            return {
                key: numbers.setdefault(value, len(numbers)) if key == "shared_object_id" else walk(value)
                for key, value in node.items()
            }
        if isinstance(node, list):
            return [walk(value) for value in node]
        return node

    return walk(config)


def _write_model(model: keras.Model, metadata: dict, path: Path) -> None:
    """model.save, then the archive rewritten byte-stable: Keras stamps the save date into
    metadata.json and the clock time onto the weights entry, so identical weights would get a new
    md5 in dvc.lock on every `dvc repro -f`."""
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            if info.filename == "metadata.json":
                keras_meta = json.loads(data)
                keras_meta.pop("date_saved", None)
                data = json.dumps(keras_meta).encode()
            elif info.filename == "config.json":
                data = json.dumps(_renumber_shared_objects(json.loads(data))).encode()
            archive.writestr(stable_zip_entry(info.filename, info.compress_type), data)
        archive.writestr(stable_zip_entry(META_ENTRY), json.dumps(metadata, indent=2, sort_keys=True))


def read_metadata(path: str | Path) -> dict:
    """The metadata a kneexray model carries, checked; a clear error for other .keras files."""
    try:
        with zipfile.ZipFile(path) as archive:
            metadata = json.loads(archive.read(META_ENTRY))
    except json.JSONDecodeError:
        raise InputError(f"{path}: its kneexray metadata is not JSON") from None
    except KeyError:
        raise InputError(
            f"{path}: a Keras model without kneexray metadata (classes, image size); train it with this pipeline"
        ) from None
    except zipfile.BadZipFile:
        raise InputError(f"{path}: not a .keras model file") from None
    _check_metadata(path, metadata)
    return metadata


def _check_metadata(path: str | Path, metadata: object) -> None:
    """What inference relies on: a mapping with class names and an image size it can use."""
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: its kneexray metadata is not a mapping")
    classes, size = metadata.get("classes"), metadata.get("image_size")
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise InputError(f"{path}: its kneexray metadata has no list of class names")
    if isinstance(size, bool) or not isinstance(size, int) or not 32 <= size <= 1024:
        raise InputError(f"{path}: its kneexray metadata has no image size in [32, 1024] (got {size!r})")
    if metadata.get("image_fit", "squash") not in FITS:
        raise InputError(f"{path}: its kneexray metadata has an unknown image_fit {metadata['image_fit']!r}")


def load_model(path: str | Path) -> tuple[keras.Model, dict]:
    metadata = read_metadata(path)
    import kneexray.layers  # noqa: F401  registers the custom layers for deserialisation

    try:  # safe mode: a config that names arbitrary code (a Lambda, builtins.exec) is refused
        return keras.saving.load_model(path, safe_mode=True), metadata
    except (ValueError, TypeError) as err:
        raise InputError(f"{path}: Keras refused to load it ({' '.join(str(err).split())[:300]})") from None
