"""Training either model: seeded, deterministic, early-stopped, logged with DVCLive, saved atomically."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from dvclive import Live
from dvclive.keras import DVCLiveCallback
from sklearn.utils.class_weight import compute_class_weight

from kneexray import CLASSES, __version__
from kneexray.atomic import atomic_path, stable_zip_entry
from kneexray.inputs import build_augmenter, label_indices, load_images, make_dataset, read_split
from kneexray.models import build_cnn, build_resnet, resnet_base, unfreeze_top

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


def keras_verbosity() -> int:
    """Progress bars on a terminal only; one line per epoch in logs and CI."""
    return 1 if sys.stdout.isatty() else 2


class _LiveCallback(DVCLiveCallback):
    """DVCLive's Keras callback, with the epoch as the step (right after a resume too), and the
    Live run ended once, after every training phase."""

    def on_epoch_end(self, epoch, logs=None):
        self.live.step = epoch
        super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        pass


class _EpochTimer(keras.callbacks.Callback):
    """Logs each epoch's training time and throughput (validation excluded): the figure that
    bench/gpu_check.py reads, and what a user watches when choosing batch size or precision."""

    def __init__(self, train_images: int):
        super().__init__()
        self.train_images = train_images
        self.started = self.stopped = None

    def on_epoch_begin(self, epoch, logs=None):
        self.started, self.stopped = time.perf_counter(), None

    def on_test_begin(self, logs=None):  # validation starts: training for this epoch is over
        if self.started is not None and self.stopped is None:
            self.stopped = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = (self.stopped or time.perf_counter()) - self.started
        log.info("epoch %d: %.2f s, %.1f train images/s", epoch, seconds, self.train_images / seconds)


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
    with model.distribute_strategy.scope():
        model._symbolic_build(data_batch=dataset.element_spec)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    if not getattr(model, "_kneexray_rank1_logs", False):  # fine-tuning fits the same model again
        for name in ("train_step", "test_step"):
            setattr(model, name, _with_rank1_logs(getattr(model, name)))
        model._kneexray_rank1_logs = True


def _with_rank1_logs(step):
    def wrapped(data):
        return keras.tree.map_structure(lambda v: tf.reshape(v, [1]) if v.shape.rank == 0 else v, step(data))
    return wrapped


def _fit(model, train_ds, val_ds, *, epochs, initial_epoch, weights, callbacks) -> int:
    _work_around_keras_multi_worker(model, train_ds)
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, initial_epoch=initial_epoch, shuffle=False,
                        class_weight=weights, callbacks=callbacks, verbose=keras_verbosity())  # tf.data shuffles
    # history.epoch holds the real epoch numbers, also when BackupAndRestore skipped finished ones
    return history.epoch[-1] + 1 if history.epoch else initial_epoch


def train(kind: str, params: dict, *, split_dir: str | Path, data_root: str | Path, live_dir: str | Path,
          backup_dir: str | Path | None = None) -> TrainResult:
    """Train `kind` ('cnn' or 'resnet') on split_dir/train.csv, early-stopping on val.csv."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind: {kind!r} is not one of {', '.join(MODEL_KINDS)}")
    cfg, train_cfg, size = params[kind], params["train"], params["image"]["size"]
    configure_devices(train_cfg)
    seed_everything(train_cfg["seed"])
    # Before TensorFlow initialises its devices: MultiWorkerMirroredStrategy must set up collective ops first.
    strategy = choose_strategy(train_cfg["strategy"])
    chief = is_chief(strategy)
    log.info("strategy %s", describe_strategy(strategy))
    split_dir = Path(split_dir)
    train_rows, val_rows = read_split(split_dir / "train.csv"), read_split(split_dir / "val.csv")
    x_train = load_images(train_rows["path"], size, root=data_root, desc="train images")
    x_val = load_images(val_rows["path"], size, root=data_root, desc="val images")
    y_train, y_val = label_indices(train_rows["label"]), label_indices(val_rows["label"])

    # image.batch_size is per replica: the global batch grows with the replicas (across all workers),
    # and the learning rate is left as configured (not scaled with the global batch).
    batch = params["image"]["batch_size"] * strategy.num_replicas_in_sync
    augmenter = build_augmenter(params["augment"], train_cfg["seed"])
    # Several replicas need equal shares of every batch: Keras 3 fails on a ragged last batch there.
    ragged_ok = strategy.num_replicas_in_sync == 1
    train_ds = shard_by_data(make_dataset(x_train, y_train, batch_size=batch, shuffle_seed=train_cfg["seed"],
                                          augmenter=augmenter, drop_remainder=not ragged_ok))
    val_ds = shard_by_data(make_dataset(x_val, y_val, batch_size=batch, drop_remainder=not ragged_ok))
    weights = class_weights(y_train, train_cfg["class_weights"])
    log.info("%s: %d train / %d val images, class weights %s, global batch %d", kind, len(y_train), len(y_val),
             weights, batch)

    weights_source = "none (trained from scratch)"
    with strategy.scope():
        if kind == "cnn":
            model = build_cnn(size, filters=cfg["filters"], dense_units=cfg["dense_units"], dropout=cfg["dropout"])
        else:
            base, weights_source = resnet_base(size, weights=cfg["weights"], weights_path=cfg["weights_path"],
                                               required=cfg["weights_required"])
            model = build_resnet(size, base=base, dense_units=cfg["dense_units"], dropout=cfg["dropout"])
        model.compile(optimizer=keras.optimizers.Adam(cfg["learning_rate"]), loss="categorical_crossentropy",
                      metrics=["accuracy"], jit_compile=train_cfg["jit_compile"])

    def early_stopping():  # validation metrics are reduced over all replicas: every worker stops at the same epoch
        return keras.callbacks.EarlyStopping(monitor="val_loss", patience=train_cfg["patience"],
                                             restore_best_weights=True)

    before, after = [], [_EpochTimer(len(y_train))]
    if train_cfg["resume"] and backup_dir is not None:
        if not chief:  # each worker backs up its own state; on a shared disk they must not share one folder
            backup_dir = f"{backup_dir}.{strategy.cluster_resolver.task_type}{strategy.cluster_resolver.task_id}"
        before.append(keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=True))
    # Metrics are logged by the chief only: the other workers would write the same numbers over them.
    live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None) if chief else None
    if live is not None:
        after.append(_LiveCallback(live=live))
    try:
        epochs_run = _fit(model, train_ds, val_ds, epochs=cfg["epochs"], initial_epoch=0, weights=weights,
                          callbacks=[*before, early_stopping(), *after])
        if kind == "resnet" and cfg["fine_tune_layers"] > 0 and cfg["fine_tune_epochs"] > 0:
            with strategy.scope():
                unfrozen = unfreeze_top(model, cfg["fine_tune_layers"])
                model.compile(optimizer=keras.optimizers.Adam(cfg["fine_tune_learning_rate"]),
                              loss="categorical_crossentropy", metrics=["accuracy"],
                              jit_compile=train_cfg["jit_compile"])
            log.info("fine-tuning the top %d layers of the base for %d epochs", unfrozen, cfg["fine_tune_epochs"])
            epochs_run = _fit(model, train_ds, val_ds, epochs=epochs_run + cfg["fine_tune_epochs"],
                              initial_epoch=epochs_run, weights=weights, callbacks=[*before, early_stopping(), *after])
    finally:
        if live is not None:
            live.end()

    metadata = {
        "model": kind,
        "classes": list(CLASSES),
        "image_size": size,
        "input": "greyscale uint8 pixels, resized to image_size x image_size, fed as float32 in [0, 255]",
        "preprocessing": "in-model: Rescaling(1/255)" if kind == "cnn" else "in-model: ResNet50 caffe preprocess_input",
        "weights_source": weights_source,
        "epochs_run": epochs_run,
        "train_images": int(len(y_train)),
        "kneexray_version": __version__,
    }
    return TrainResult(model=model, metadata=metadata, epochs_run=epochs_run)


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
            return {key: numbers.setdefault(value, len(numbers)) if key == "shared_object_id" else walk(value)
                    for key, value in node.items()}
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
    """The metadata a kneexray model carries; a clear error for other .keras files."""
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read(META_ENTRY))
    except KeyError:
        raise ValueError(f"{path}: a Keras model without kneexray metadata (classes, image size); "
                         "train it with this pipeline") from None
    except zipfile.BadZipFile:
        raise ValueError(f"{path}: not a .keras model file") from None


def load_model(path: str | Path) -> tuple[keras.Model, dict]:
    metadata = read_metadata(path)
    import kneexray.layers  # noqa: F401  registers the custom layers for deserialisation

    return keras.saving.load_model(path), metadata
