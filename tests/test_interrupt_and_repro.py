"""Killed training loses nothing and resumes; `dvc repro -f` twice gives identical results."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.support import run

pytestmark = pytest.mark.slow

TRAIN_CMD = [
    "-m",
    "stages.train",
    "cnn",
    "--split",
    "data/split",
    "--data",
    "data/extracted",
    "--out",
    "models/cnn.keras",
    "--live",
    "reports/train/cnn",
]


def _set_params(project: Path, **changes) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _epochs_logged(project: Path) -> int:
    tsv = project / "reports/train/cnn/plots/metrics/eval/loss.tsv"
    return max(0, len(tsv.read_text().splitlines()) - 1) if tsv.exists() else 0


def _kill_after_epochs(project: Path, epochs: int, timeout: float = 240) -> None:
    env = {**os.environ, "PYTHONPATH": str(project), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(
        [sys.executable, *TRAIN_CMD], cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + timeout
    try:
        while _epochs_logged(project) < epochs:
            assert proc.poll() is None, "training ended before it could be interrupted"
            assert time.monotonic() < deadline, "training too slow to interrupt"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _without_cnn_outputs(project: Path) -> Path:
    """The reproduced copy with train_cnn's outputs removed, as `dvc repro` removes them before it
    runs the stage (an old epoch log would also stop the kill too early)."""
    (project / "models/cnn.keras").unlink()
    shutil.rmtree(project / "reports/train/cnn")
    return project


def test_killed_training_leaves_no_model_then_repro_completes(reproduced):
    project = _without_cnn_outputs(reproduced)
    _set_params(project, cnn__epochs=50, train__patience=50)
    _kill_after_epochs(project, 1)
    assert not (project / "models/cnn.keras").exists()  # never a half-written model where DVC looks
    assert not list((project / "models").glob(".cnn.keras*"))

    _set_params(project, cnn__epochs=2)
    run(["dvc", "repro", "train_cnn"], project)
    from kneexray.model.files import load_model

    model, meta = load_model(project / "models/cnn.keras")
    assert meta["epochs_run"] == 2 and model.output_shape == (None, 3)


def test_resume_continues_from_the_last_finished_epoch(reproduced):
    project = _without_cnn_outputs(reproduced)
    _set_params(project, cnn__epochs=40, train__patience=40, train__resume=True)
    _kill_after_epochs(project, 2)
    assert (project / ".kneexray_backup/cnn").is_dir()  # the checkpoint survived the kill

    _set_params(project, cnn__epochs=4)
    result = run([sys.executable, *TRAIN_CMD], project)
    out = result.stdout + result.stderr
    # the training log has one "epoch N/M: ..." line per finished epoch
    first_epoch = next(line for line in out.splitlines() if re.search(r"kneexray.model.training: epoch \d+/", line))
    assert re.search(r"epoch (\d+)/", first_epoch).group(1) in ("3", "4"), first_epoch  # epochs 1-2 not redone
    summary = json.loads((project / "reports/train/cnn/metrics.json").read_text())
    assert summary["epochs_run"] == 4 and 1 <= summary["selected_epoch"] <= 4
    assert not (project / ".kneexray_backup/cnn").exists()  # removed once training completed


def _output_hashes(project) -> dict[str, str]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def test_repro_twice_gives_identical_metrics_and_weights(reproduced):
    from kneexray.model.files import load_model

    project = reproduced  # the first `dvc repro`, shared by the session
    first_metrics = (project / "reports/metrics.json").read_bytes()
    first = {m: load_model(project / f"models/{m}.keras")[0].get_weights() for m in ("cnn", "resnet")}
    first_lock = _output_hashes(project)
    # the stages that compute: fetch, extract and split are bit-identical across CPUs (test_portable),
    # and redrawn figures byte-stable (test_pipeline_e2e)
    run(["dvc", "repro", "-f", "-s", "train_cnn", "train_resnet", "evaluate"], project)
    assert (project / "reports/metrics.json").read_bytes() == first_metrics
    # every output has the same md5, the model files included: nothing for git or DVC to see
    assert _output_hashes(project) == first_lock
    for m in ("cnn", "resnet"):
        second = load_model(project / f"models/{m}.keras")[0].get_weights()
        assert len(second) == len(first[m])
        for a, b in zip(first[m], second):
            np.testing.assert_array_equal(a, b)
