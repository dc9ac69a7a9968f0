"""The pure pieces of the notebook-baseline benchmark (bench/baseline_notebook.py, bench/compare_baseline.py).

Nothing is trained here; the benchmark itself runs for tens of minutes and is not a test.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import ROOT
from bench import baseline_notebook as baseline
from bench import compare_baseline as compare
from kneexray import DEFAULT_CLASSES


def test_baseline_cnn_has_the_notebooks_architecture_and_26m_parameters():
    model = baseline.build_cnn(224)
    assert model.count_params() == 26_013_987  # "26.0 M", 25.7 M of them in Flatten -> Dense(256)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert [layer.filters for layer in model.layers if type(layer).__name__ == "Conv2D"] == [32, 32, 64, 64, 128, 128]
    assert kinds.count("BatchNormalization") == 8 and kinds.count("MaxPooling2D") == 3 and "Flatten" in kinds
    assert [layer.rate for layer in model.layers if type(layer).__name__ == "Dropout"] == [0.25] * 3 + [0.5] * 2
    assert [layer.units for layer in model.layers if type(layer).__name__ == "Dense"] == [256, 128, 3]
    assert model.layers[-1].activation.__name__ == "softmax"
    assert math.isclose(float(model.optimizer.learning_rate), 1e-3, rel_tol=1e-6)  # float32


def test_augmenter_reproduces_image_data_generator_settings():
    aug = baseline.build_augmenter(0)
    names = [type(layer).__name__ for layer in aug.layers]
    assert names[:2] == ["RandomRotation", "RandomTranslation"] and "RandomFlip" in names
    assert "RandomShear" in names  # Keras 3.15 has it
    shear = aug.get_layer(index=names.index("RandomShear"))
    assert math.isclose(shear.x_factor[1], math.tan(math.radians(0.1)))  # shear_range is in degrees
    x = np.full((2, 16, 16, 3), 200.0, dtype="float32")
    y = np.asarray(aug(x, training=True))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 255


def _images(root: Path, names: dict[str, list[str]]) -> list[tuple[Path, str]]:
    items = []
    for label, files in names.items():
        for name in files:
            path = root / label / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"{label}/{name}".encode())
            items.append((path, label))
    return items


def test_notebook_folders_lay_out_by_class_keep_order_and_clean_up(tmp_path):
    train = _images(tmp_path / "a", {"normal": ["N1.jpg"], "osteopenia": ["OP1.JPEG", "OP2.jpg"]})
    clash = _images(tmp_path / "b", {"osteopenia": ["OP1.JPEG"]})  # same name, other file
    test = _images(tmp_path / "c", {"osteoporosis": ["OS1.jpg"], "normal": ["N2.jpg"]})
    with baseline.notebook_folders(train + clash, test, tmp_path) as (train_dir, test_dir, copies):
        assert sorted(p.name for p in train_dir.iterdir()) == sorted(DEFAULT_CLASSES)  # empty class folder too
        assert sorted(p.name for p in (train_dir / "osteopenia").iterdir()) == ["OP1.JPEG", "OP1~2.JPEG", "OP2.jpg"]
        assert (train_dir / "osteopenia" / "OP1~2.JPEG").read_bytes() == clash[0][0].read_bytes()
        assert [p.relative_to(test_dir).as_posix() for p in copies] == ["osteoporosis/OS1.jpg", "normal/N2.jpg"]
        scratch = train_dir.parent
    assert not scratch.exists()
    with pytest.raises(RuntimeError):
        with baseline.notebook_folders(train, test, tmp_path) as (train_dir, _, _):
            scratch = train_dir.parent
            raise RuntimeError("training failed")
    assert not scratch.exists()


def test_stratified_subset_keeps_every_class_and_the_size(tmp_path):
    items = [(Path(f"{c}/{i}.jpg"), c) for c, n in zip(DEFAULT_CLASSES, (36, 154, 49)) for i in range(n)]
    subset = baseline.stratified_subset(items, 30, seed=1)
    counts = pd.Series([label for _, label in subset]).value_counts()
    assert len(subset) == 30 and counts["normal"] == 5 and counts["osteopenia"] == 19 and counts["osteoporosis"] == 6
    assert subset == baseline.stratified_subset(items, 30, seed=1)
    assert baseline.stratified_subset(items, 1000, seed=1) == items


def test_bootstrap_helpers():
    y = np.array([0, 1, 1, 2, 2, 2])
    perfect = np.eye(3)[y]
    ci = baseline.bootstrap_recall_ci(y, perfect, 2, resamples=50, seed=0)
    assert ci == {"low": 1.0, "high": 1.0}
    wrong = np.eye(3)[np.array([0, 1, 1, 1, 1, 1])]  # osteoporosis never found
    assert baseline.paired_delta_ci(y, perfect, perfect, resamples=50, seed=0) == {
        "delta": 0.0,
        "low": 0.0,
        "high": 0.0,
    }
    delta = baseline.paired_delta_ci(y, perfect, wrong, resamples=100, seed=0)
    assert delta["delta"] > 0 and delta["low"] <= delta["delta"] <= delta["high"]
    metrics = baseline.our_metrics(y, wrong, resamples=20, seed=0)
    assert metrics["osteoporosis_recall"] == 0.0 and metrics["ci95"]["osteoporosis_recall"]["high"] == 0.0
    assert metrics["macro_f1"] < 1 and "ci95" in metrics and "macro_f1" in metrics["ci95"]
    assert baseline.notebook_metrics(y, perfect)["weighted_f1"] == 1.0


def test_original_files_map_our_split_back_and_check_the_bytes(tmp_path):
    data = tmp_path / "data"
    items = _images(data, {"normal": ["N1.JPEG"], "osteoporosis": ["OS3.jpg"]})
    index = pd.DataFrame(
        {
            "path": ["images/normal/N1.JPEG", "images/osteoporosis/OS3.jpg"],
            "label": ["normal", "osteoporosis"],
            "source": ["normal/N1.JPEG", "osteoporosis/OS3.jpg"],
            "sha256": [hashlib.sha256(p.read_bytes()).hexdigest() for p, _ in items],
        }
    )
    rows = index[["path", "label"]].iloc[::-1]
    assert compare.original_files(rows, index, data) == items[::-1]
    items[0][0].write_bytes(b"another image")
    with pytest.raises(ValueError, match="SHA-256"):
        compare.original_files(rows, index, data)


def _side(f1, wall, mem, weights="random"):
    metrics = {
        "accuracy": f1,
        "macro_f1": f1,
        "osteoporosis_recall": 0.5,
        "weighted_f1": f1,
        "ci95": {
            "accuracy": {"low": 0.1, "high": 0.9},
            "macro_f1": {"low": 0.1, "high": 0.9},
            "osteoporosis_recall": {"low": None, "high": None},
        },
    }
    models = {
        m: {
            "metrics": metrics,
            "epochs_run": 3,
            "max_epochs": 20,
            "train_s": 10.0,
            "weights_source": weights if m == "resnet" else "none (trained from scratch)",
        }
        for m in compare.MODELS
    }
    return {
        "run": {"wall_s": wall, "cpu_s": wall * 2, "peak_tree_mib": mem, "largest_process_mib": mem - 100},
        "models": models,
    }


def test_comparison_ratios_and_table():
    y = np.array([0, 1, 2, 2])
    good, bad = np.eye(3)[y], np.eye(3)[np.array([1, 1, 1, 1])]
    ours, base = _side(0.8, 100.0, 900.0), _side(0.5, 600.0, 1000.0, weights="imagenet")
    comp = compare.compare(
        ours, base, y, {"cnn": good, "resnet": bad}, {"cnn": bad, "resnet": good}, resamples=50, seed=0
    )
    assert comp["wall_ratio"] == round(100 / 600, 3) and comp["memory_ratio"] == 0.9
    assert comp["met"] == {"wall": True, "memory": True, "macro_f1_cnn": True, "macro_f1_resnet": False}
    summary = {
        "ours": {**ours, "working_tree_differs": ["kneexray/model/training.py"]},
        "baseline": base,
        "comparison": comp,
        "test_set": {"n_test": 4, "per_class": {"normal": 1, "osteopenia": 1, "osteoporosis": 2}},
        "settings": {"limit": None, "epochs_override": None},
    }
    table = compare.format_table(summary)
    assert "| | CNN ours | CNN baseline | ResNet50 ours | ResNet50 baseline |" in table
    assert "| macro-F1 [95% CI] | 0.800 [0.10, 0.90] | 0.500 [0.10, 0.90] |" in table
    assert "| osteoporosis recall [95% CI] | 0.500 |" in table  # no CI when none could be computed
    assert "| wall time (s) | 100 | 600 | 0.167 | ≤ 0.33: yes |" in table
    assert "| peak memory, process tree (MiB) | 900 | 1000 | 0.9 | ≤ 1: yes |" in table
    assert "target ≥ 0: **no**" in table and "RANDOM weights" in table and "COMMITTED code" in table
    assert "SMOKE" not in table
    json.dumps(summary)  # what gets written is plain JSON


def test_measure_wrapper_reports_the_childs_own_peak_memory(tmp_path):
    out = tmp_path / "m.json"
    child = "x = bytearray(300 * 2**20); import time; time.sleep(0.5)"
    result = subprocess.run(
        [sys.executable, "-m", "bench.compare_baseline", "_measure", str(out), "--", sys.executable, "-c", child],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert figures["returncode"] == 0 and figures["wall_s"] >= 0.5
    assert 300 <= figures["largest_process_mib"] < 600 and 300 <= figures["peak_tree_mib"] < 600


def test_override_value_reads_the_last_matching_override():
    overrides = ["cnn.image_size=64", "cnn.epochs=1", "split.val_ratio=0.25", "cnn.epochs=3"]
    assert compare.override_value(overrides, "cnn.epochs", 30) == 3
    assert compare.override_value(overrides, "cnn.image_size", 224) == 64
    assert compare.override_value(overrides, "resnet.epochs", 15) == 15
