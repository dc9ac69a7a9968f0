"""MultiWorkerMirroredStrategy for real: two local worker processes on 127.0.0.1 train the CNN
through the train stage, as two machines would; only the chief writes the model and metrics."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kneexray.model.files import load_model
from tests.test_training import tiny_split  # noqa: F401  the phantom split fixture, shared

pytestmark = pytest.mark.slow  # not in make test-fast

ROOT = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 300  # a worker waiting forever on its peer fails the test instead of blocking CI
PROXY_VARS = (
    "http_proxy",
    "https_proxy",
    "grpc_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "GRPC_PROXY",
    "all_proxy",
    "ALL_PROXY",
)


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports that are free now (all held open until all are picked)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def start_worker(index: int, cluster: dict, machine: Path, split: Path) -> tuple[subprocess.Popen, Path]:
    """`python -m stages.train cnn` in its own folder (its "machine") with its own TF_CONFIG and TMPDIR."""
    (machine / "tmp").mkdir(parents=True)
    env = {key: value for key, value in os.environ.items() if key not in PROXY_VARS}
    env.update(
        {
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
            "PYTHONPATH": str(ROOT),
            "TMPDIR": str(machine / "tmp"),  # where a non-chief's throwaway model goes: must be empty afterwards
            "CUDA_VISIBLE_DEVICES": "-1",  # one CPU replica per worker, also on a machine with GPUs
            "no_proxy": "127.0.0.1,localhost",
            "NO_PROXY": "127.0.0.1,localhost",  # gRPC stays on loopback
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
    )
    log_path = machine / "worker.log"
    with open(log_path, "w") as log_file:  # a file, not a pipe: a full pipe would stall a worker mid-collective
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stages.train",
                "cnn",
                "--split",
                str(split),
                "--data",
                str(split),
                "--out",
                "models/cnn.keras",
                "--live",
                "reports/train/cnn",
            ],
            cwd=machine,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return proc, log_path


def test_two_workers_train_one_model_and_only_the_chief_writes(tiny, tiny_split, tmp_path):  # noqa: F811
    # per-replica batch 4 x 2 workers: the 9 validation images still make one full global batch of 8
    params = {
        **tiny,
        "train": {**tiny["train"], "strategy": "auto", "threads": 1},
        "image": {**tiny["image"], "batch_size": 4},
    }
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    machines = [tmp_path / f"machine{i}" for i in range(2)]
    workers = []
    try:
        for index, machine in enumerate(machines):
            machine.mkdir()
            (machine / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            workers.append(start_worker(index, cluster, machine, tiny_split))
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        for proc, _ in workers:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"workers still running after {WORKER_TIMEOUT_S} s:\n{_tails(workers)}")
    finally:
        for proc, _ in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    assert [proc.returncode for proc, _ in workers] == [0, 0], _tails(workers)
    logs = [log_path.read_text() for _, log_path in workers]
    for index, text in enumerate(logs):
        role = "chief" if index == 0 else "not the chief"
        assert (
            f"strategy MultiWorkerMirroredStrategy, 2 replica(s) in sync, task worker:{index} of 2 workers ({role})"
            in text
        ), text[-3000:]
        assert "global batch 8" in text
    # one training in lockstep: both workers log the same per-epoch losses and out-of-fold scores
    epochs = [re.findall(r"epoch \d+/\d+: train loss (.*)", text) for text in logs]
    assert len(epochs[0]) == tiny["cnn"]["epochs"] and epochs[0] == epochs[1], epochs

    chief, other = machines
    model, meta = load_model(chief / "models" / "cnn.keras")
    assert meta["epochs_run"] == tiny["cnn"]["epochs"] and model.output_shape == (None, 3)
    assert (chief / "reports" / "train" / "cnn" / "plots" / "metrics" / "eval" / "loss.tsv").is_file()
    # the other worker trained too but wrote nothing lasting: no model, no metrics, its temporary model deleted
    assert "not the chief: models/cnn.keras is left to the chief to write" in logs[1]
    assert not (other / "models").exists() and not (other / "reports").exists()
    assert not list(other.rglob("*.keras")) and not list((other / "tmp").iterdir())


def _tails(workers) -> str:
    return "\n".join(f"--- worker {i} ---\n{log_path.read_text()[-3000:]}" for i, (_, log_path) in enumerate(workers))
