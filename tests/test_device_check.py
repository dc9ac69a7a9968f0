"""bench/gpu_check.py, the device check, run small on the CPU so it cannot rot before a GPU runs it;
and mixed precision through the real training path."""

from __future__ import annotations

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from bench import gpu_check
from kneexray.model.inputs import build_augmenter
from kneexray.params import AugmentParams
from tests.support import ROOT


def test_epoch_log_lines_parse_and_the_first_epoch_is_left_out():
    log = (
        "INFO kneexray.model.training: epoch 0: 9.10 s, 10.0 train images/s\n"
        "INFO kneexray.model.training: epoch 1: 1.00 s, 90.0 train images/s\n"
        "INFO kneexray.model.training: epoch 2: 1.10 s, 80.0 train images/s\n"
    )
    rates = gpu_check.epoch_rates(log)
    assert rates == [10.0, 90.0, 80.0]
    assert gpu_check.steady_rate(rates) == 85.0
    with pytest.raises(ValueError, match="at least 2 epochs"):
        gpu_check.steady_rate([10.0])


def test_augmenter_stays_float32_under_a_mixed_precision_policy():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        augmenter = build_augmenter(
            AugmentParams(horizontal_flip=True, rotation_deg=15, shift=0.1, zoom=0.1, brightness=(0.8, 1.2)), seed=0
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x = np.linspace(0, 255, 2 * 16 * 16).reshape(2, 16, 16, 1).astype("float32")
    y = augmenter(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == "float32" and float(np.max(y)) <= 255.0


@pytest.mark.slow
def test_device_check_runs_both_trainings_under_two_precision_policies(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gpu_check",
            "--images",
            "60",
            "--size",
            "32",
            "--batch",
            "8",
            "--epochs",
            "2",
            "--policies",
            "float32,mixed_bfloat16",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"].startswith("CPU only") and report["gpus"] == 0  # no GPU here: said so
    for model in ("cnn", "resnet"):
        by_policy = report["images_per_s"][model]
        assert set(by_policy) == {"float32", "mixed_bfloat16"}
        for figures in by_policy.values():
            assert len(figures["per_epoch"]) == 2 and figures["median"] > 0
        assert by_policy["float32"]["speedup"] == 1.0
    assert "| cnn |" in result.stdout and "mixed_bfloat16 images/s" in result.stdout
