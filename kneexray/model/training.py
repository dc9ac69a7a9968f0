"""Training either model: k-fold cross-validated, seeded, logged with DVCLive, saved atomically.

Each fold model trains on k-1 folds of train+validation and predicts the fold it did not see. The
folds train in lockstep, one epoch at a time, so after every epoch the pooled out-of-fold
predictions score that epoch on every training image. The epoch kept is the best on that score
(never one before `train.min_epochs`); the fold models at that epoch are averaged into one model.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
from dvclive import Live
from sklearn.utils.class_weight import compute_class_weight

from kneexray import __version__
from kneexray.atomic import atomic_path
from kneexray.data.splitting import assign_folds
from kneexray.model.card import model_card
from kneexray.model.devices import (
    choose_strategy,
    configure_devices,
    describe_strategy,
    infer,
    is_chief,
    seed_everything,
    shard_by_data,
    work_around_keras_multi_worker,
)
from kneexray.model.inputs import build_augmenter, label_indices, load_images, make_dataset, read_split
from kneexray.model.layers import CaffePreprocess, GreyToRGB
from kneexray.model.networks import (
    average_models,
    build_cnn,
    build_head,
    build_resnet,
    recompute_batchnorm,
    resnet_base,
    unfreeze_top,
)
from kneexray.model.probe import choose_weight, fit_fold_probes, with_probes
from kneexray.model.selection import EpochSelector, no_skill, prediction_shares, score, weighted_log_loss
from kneexray.params import CnnParams, Params, ResnetParams, TrainParams

log = logging.getLogger(__name__)

MODEL_KINDS = ("cnn", "resnet")


@dataclass
class TrainResult:
    model: keras.Model
    metadata: dict
    epochs_run: int


def class_weights(labels: np.ndarray, mode: str) -> dict[int, float] | None:
    if mode == "none":
        return None
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    return {int(c): float(w) for c, w in zip(present, weights)}


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


def _log_priors(labels: np.ndarray, n_classes: int) -> list[float]:
    counts = np.bincount(labels, minlength=n_classes) + 1.0  # +1: a class absent from a fold stays finite
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
    cfg: CnnParams | ResnetParams,
    train_cfg: TrainParams,
    n_classes: int,
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
    epochs, n_folds = cfg.epochs, len(folds.held)
    ragged_ok = strategy.num_replicas_in_sync == 1
    mode = train_cfg.class_weights
    models, datasets, weights = [], [], []
    for f in range(n_folds):
        idx = folds.fit[f]
        if extra_fit is None:  # the fold's rows of the one shared array: no copy per fold
            x_fit, y_fit, labels, rows = x, y[idx], y, idx
        else:
            x_fit, y_fit = np.concatenate([x[idx], extra_fit[0][idx]]), np.concatenate([y[idx], extra_fit[1][idx]])
            labels, rows = y_fit, None
        steps = len(y_fit) // batch if not ragged_ok else -(-len(y_fit) // batch)
        datasets.append(
            shard_by_data(
                make_dataset(
                    x_fit,
                    labels,
                    rows=rows,
                    batch_size=batch,
                    shuffle_seed=train_cfg.seed + f,
                    augmenter=augmenter,
                    drop_remainder=not ragged_ok,
                    n_classes=n_classes,
                )
            )
        )
        weights.append(class_weights(y_fit, mode))
        with strategy.scope():
            model = build(None if mode == "balanced" else _log_priors(y_fit, n_classes))
            model.compile(
                optimizer=keras.optimizers.Adam(
                    _lr_schedule(cfg.learning_rate, max(1, steps), epochs, train_cfg.warmup_epochs)
                ),
                loss=keras.losses.CategoricalCrossentropy(label_smoothing=train_cfg.label_smoothing),
                metrics=["accuracy"],
                jit_compile=train_cfg.jit_compile,
            )
        models.append(model)
    selector = EpochSelector(train_cfg.select_on, train_cfg.min_epochs, train_cfg.patience)
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
    oof = np.zeros((len(y), n_classes), dtype=np.float32)
    n_fit = sum(len(d) for d in folds.fit) * (2 if extra_fit is not None else 1)
    epoch = start - 1
    for epoch in range(start, epochs):
        seconds, train_loss, train_acc = 0.0, [], []
        for f, model in enumerate(models):
            work_around_keras_multi_worker(model, datasets[f])
            started = time.perf_counter()
            history = model.fit(
                datasets[f], epochs=epoch + 1, initial_epoch=epoch, shuffle=False, class_weight=weights[f], verbose=0
            )  # tf.data shuffles
            seconds += time.perf_counter() - started
            train_loss.append(history.history["loss"][-1])
            train_acc.append(history.history["accuracy"][-1])
            recompute_batchnorm(model, x, rows=folds.fit[f])
            oof[folds.held[f]] = infer(model, x[folds.held[f]], batch)
        y_held, p_held = y[held_all], oof[held_all]
        value = score(train_cfg.select_on, y_held, p_held)
        improved = selector.update(epoch, value)
        if improved:
            best_weights, best_oof = [_snapshot(m) for m in models], oof.copy()
        log.info("epoch %d: %.2f s, %.1f train images/s", epoch + 1, seconds, n_fit / seconds)
        log.info(
            "epoch %d/%d: train loss %.3f, out-of-fold %s %.3f%s",
            epoch + 1,
            epochs,
            np.mean(train_loss),
            train_cfg.select_on,
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
                train_cfg.select_on,
                train_cfg.patience,
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
        "select_on": train_cfg.select_on,
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


def _rounded(metrics: dict) -> dict:
    return {k: round(v, 6) for k, v in metrics.items()}


def _log_epoch(live: Live, train_loss: float, train_acc: float, y: np.ndarray, proba: np.ndarray) -> None:
    live.log_metric("train/loss", float(train_loss))
    live.log_metric("train/accuracy", float(train_acc))
    for name, value in _oof_metrics(y, proba).items():
        live.log_metric(f"eval/{name}", value)
    live.next_step()


def _features(base: keras.Model, x: np.ndarray, batch: int, *, mirrored: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The frozen base's pooled features of each image (and of its mirror image): computed once, so
    the k heads and all their epochs cost what one pass of the base costs. One extractor for both
    passes: its predict function is traced once."""
    extractor = keras.Sequential([GreyToRGB(), CaffePreprocess(), base])
    return infer(extractor, x, batch), (infer(extractor, x[:, :, ::-1], batch) if mirrored else None)


def train(
    kind: str,
    params: Params,
    *,
    split_dir: str | Path,
    data_root: str | Path,
    live_dir: str | Path,
    backup_dir: str | Path | None = None,
) -> TrainResult:
    """Train `kind` ('cnn' or 'resnet') on split_dir/train.csv + val.csv, cross-validated."""
    # The decoded images live in a memory-mapped file here, removed when training ends.
    with tempfile.TemporaryDirectory(prefix="kneexray-images-", ignore_cleanup_errors=True) as scratch:
        return _train(
            kind,
            params,
            split_dir=split_dir,
            data_root=data_root,
            live_dir=live_dir,
            backup_dir=backup_dir,
            images_file=Path(scratch) / "images.npy",
        )


def _train(
    kind: str,
    params: Params,
    *,
    split_dir: str | Path,
    data_root: str | Path,
    live_dir: str | Path,
    backup_dir: str | Path | None,
    images_file: Path,
) -> TrainResult:
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind: {kind!r} is not one of {', '.join(MODEL_KINDS)}")
    cfg, train_cfg, classes = params.model(kind), params.train, params.dataset.classes
    size = cfg.image_size
    configure_devices(train_cfg)
    seed_everything(train_cfg.seed)
    # Before TensorFlow initialises its devices: MultiWorkerMirroredStrategy must set up collective ops first.
    strategy = choose_strategy(train_cfg.strategy)
    chief = is_chief(strategy)
    log.info("strategy %s", describe_strategy(strategy))
    split_dir = Path(split_dir)
    val_rows = read_split(split_dir / "val.csv", classes)
    rows = pd.concat([read_split(split_dir / "train.csv", classes), val_rows], ignore_index=True)
    if "group" not in rows:
        rows["group"] = np.arange(len(rows))
    folds = Folds.make(rows, len(val_rows), train_cfg.folds, train_cfg.seed)
    fit = params.image.fit
    x = load_images(rows["path"], size, fit=fit, root=data_root, desc="train images", spill_to=images_file)
    y = label_indices(rows["label"], classes)
    # image.batch_size is per replica: the global batch grows with the replicas (across all workers),
    # and the learning rate is left as configured (not scaled with the global batch).
    batch = params.image.batch_size * strategy.num_replicas_in_sync
    log.info(
        "%s: %d train+validation images in %d fold(s) (held out %s), global batch %d",
        kind,
        len(y),
        len(folds.held),
        [len(h) for h in folds.held],
        batch,
    )

    live = (
        Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None, resume=bool(train_cfg.resume))
        if chief
        else None
    )
    backup = _Backup(backup_dir if train_cfg.resume else None)
    if backup.folder is not None and not chief:  # each worker backs up its own state
        backup.folder = Path(f"{backup_dir}.{strategy.cluster_resolver.task_type}{strategy.cluster_resolver.task_id}")
    try:
        if kind == "cnn":
            weights_source = "none (trained from scratch)"

            def build(bias):
                return build_cnn(
                    size,
                    len(classes),
                    filters=cfg.filters,
                    dense_units=cfg.dense_units,
                    dropout=cfg.dropout,
                    output_bias=bias,
                )

            members, oof, held, info = fit_folds(
                build,
                x,
                y,
                folds,
                cfg=cfg,
                train_cfg=train_cfg,
                n_classes=len(classes),
                batch=batch,
                augmenter=build_augmenter(params.augment, train_cfg.seed),
                strategy=strategy,
                live=live,
                backup=backup,
            )
            with strategy.scope():
                model = average_models(members, "cnn")
        else:
            rcfg = params.resnet
            with strategy.scope():
                base, weights_source = resnet_base(
                    size, weights=rcfg.weights, weights_path=rcfg.weights_path, required=rcfg.weights_required
                )
            # Mirrored copies are the one augmentation that survives caching features.
            features, flipped = _features(base, x, batch, mirrored=params.augment.horizontal_flip)
            mirrored = (flipped, y) if flipped is not None else None

            def build(bias):
                return build_head(
                    features.shape[1], len(classes), dense_units=cfg.dense_units, dropout=cfg.dropout, output_bias=bias
                )

            heads, oof, held, info = fit_folds(
                build,
                features,
                y,
                folds,
                cfg=cfg,
                train_cfg=train_cfg,
                n_classes=len(classes),
                batch=batch,
                augmenter=None,
                strategy=strategy,
                live=live,
                backup=backup,
                extra_fit=mirrored,
            )
            with strategy.scope():
                model = build_resnet(size, base=base, head=average_models(heads, "heads", input_name="features"))
            if rcfg.fine_tune_layers > 0 and rcfg.fine_tune_epochs > 0:
                info["epochs_run"] += _fine_tune(model, x, y, folds, rcfg, train_cfg, batch, strategy)
    finally:
        if live is not None:
            live.end()
    backup.remove()

    parts: dict[str, Any] = {}
    if train_cfg.linear_probe:
        probes, probe_oof = fit_fold_probes(
            train_cfg.linear_probe, x, y, folds.fit, folds.held, len(classes), seed=train_cfg.seed
        )
        weight, weights_scored = choose_weight(train_cfg.select_on, y[held], oof[held], probe_oof[held])
        parts = {
            "network_weight": weight,
            "network_out_of_fold": _rounded(_oof_metrics(y[held], oof[held])),
            "probe_out_of_fold": _rounded(_oof_metrics(y[held], probe_oof[held])),
            f"out_of_fold_{train_cfg.select_on}_by_network_weight": weights_scored,
        }
        log.info(
            "%s: out-of-fold %s %.3f, linear probe %.3f: network weight %.1f in the saved model",
            kind,
            train_cfg.select_on,
            parts["network_out_of_fold"][train_cfg.select_on],
            parts["probe_out_of_fold"][train_cfg.select_on],
            weight,
        )
        with strategy.scope():
            model = with_probes(model, probes, weight)
        oof = weight * oof + (1 - weight) * probe_oof
    oof_metrics = _oof_metrics(y[held], oof[held])
    shares = prediction_shares(infer(model, x, batch), classes)
    collapsed = no_skill(shares, train_cfg.no_skill_share)
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
        "classes": list(classes),
        "image_size": size,
        "image_fit": fit,
        "input": "greyscale uint8 pixels fitted to image_size x image_size (image_fit), fed as float32 in [0, 255]",
        "preprocessing": "in-model: Rescaling(1/255)" if kind == "cnn" else "in-model: ResNet50 caffe preprocess_input",
        "weights_source": weights_source,
        "epochs_run": info["epochs_run"],
        "selected_epoch": info["selected_epoch"],
        "folds": info["folds"],
        "ensemble": (f"mean of {info['folds']} fold models" if info["folds"] > 1 else "one model")
        + (
            f", weighted {parts['network_weight']:.1f} against the linear probes' mean"
            if parts and parts["network_weight"] < 1
            else ""
        ),
        "out_of_fold": _rounded(oof_metrics),
        **({"linear_probe": {"size": train_cfg.linear_probe, **parts}} if parts else {}),
        "train_prediction_shares": {k: round(v, 6) for k, v in shares.items()},
        "no_skill": collapsed is not None,
        "train_images": int(len(y)),
        "kneexray_version": __version__,
        **model_card(kind, params, data_root),
    }
    return TrainResult(model=model, metadata=metadata, epochs_run=info["epochs_run"])


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


def _fine_tune(
    model: keras.Model, x, y, folds: Folds, cfg: ResnetParams, train_cfg: TrainParams, batch: int, strategy
) -> int:
    """Unfreeze the top of the base and train the whole model on the images (one fold only: the
    fold ensemble shares one base). Early stopping on the held-out fold's loss, best weights kept."""
    fit_idx, held_idx = folds.fit[0], folds.held[0]
    with strategy.scope():
        unfrozen = unfreeze_top(model, cfg.fine_tune_layers)
        model.compile(
            optimizer=keras.optimizers.Adam(cfg.fine_tune_learning_rate),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=train_cfg.label_smoothing),
            metrics=["accuracy"],
            jit_compile=train_cfg.jit_compile,
        )
    log.info("fine-tuning the top %d layers of the base for %d epochs", unfrozen, cfg.fine_tune_epochs)
    ragged_ok, n_classes = strategy.num_replicas_in_sync == 1, model.output_shape[-1]
    train_ds = make_dataset(
        x[fit_idx],
        y[fit_idx],
        batch_size=batch,
        shuffle_seed=train_cfg.seed,
        drop_remainder=not ragged_ok,
        n_classes=n_classes,
    )
    val_ds = make_dataset(x[held_idx], y[held_idx], batch_size=batch, drop_remainder=not ragged_ok, n_classes=n_classes)
    work_around_keras_multi_worker(model, train_ds)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=train_cfg.patience, restore_best_weights=True)
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=cfg.fine_tune_epochs,
        shuffle=False,
        class_weight=class_weights(y[fit_idx], train_cfg.class_weights),
        callbacks=[stop],
        verbose=0,
    )
    return len(history.epoch)
