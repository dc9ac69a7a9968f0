"""Where and how training runs: seeds, threads, GPUs and mixed precision, distribution strategies,
and a workaround for Keras' multi-worker training."""

from __future__ import annotations

import logging
import os

import keras
import numpy as np
import tensorflow as tf

from kneexray.params import TrainParams

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Same seed, same machine, same numbers: Python, NumPy and TF seeds plus deterministic ops."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def configure_devices(train_cfg: TrainParams) -> None:
    """Threads, GPU memory growth and mixed precision, before any model is built."""
    if train_cfg.threads:
        # several queued experiments share the cores instead of each grabbing them all
        try:
            tf.config.threading.set_intra_op_parallelism_threads(train_cfg.threads)
            tf.config.threading.set_inter_op_parallelism_threads(train_cfg.threads)
            log.info("limited to %d TensorFlow thread(s) per pool (train.threads)", train_cfg.threads)
        except RuntimeError:  # TensorFlow already started in this process (tests); stages start fresh
            log.warning("train.threads ignored: TensorFlow was already initialised in this process")
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:  # experiments sharing a GPU must not each reserve all of its memory
        tf.config.experimental.set_memory_growth(gpu, True)
    policy = train_cfg.mixed_precision
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


def work_around_keras_multi_worker(model: keras.Model, dataset: tf.data.Dataset) -> None:
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
    # float32 a few thousand images at a time: the whole set at once is 4x its uint8 size
    chunk = max(batch_size, 2048)
    return np.concatenate(
        [
            model.predict(np.asarray(x[i : i + chunk], dtype=np.float32), batch_size=batch_size, verbose=0)
            for i in range(0, len(x), chunk)
        ]
    )
