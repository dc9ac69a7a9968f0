"""Scaling with DVC's own machinery on a tiny phantom: the experiment queue, a shared remote, the CI report.

One reproduced-and-committed project is built per module; each test works on its own copy of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from bench import real_data  # the queue helpers the real-data benchmark uses
from tests.support import ALWAYS_CHANGED, ROOT, run, tool_env

pytestmark = pytest.mark.slow

OUTPUTS = ("data/raw/dataset.zip", "data/extracted", "data/split", "models/cnn.keras", "models/resnet.keras")


@pytest.fixture
def repo(reproduced) -> Path:
    """A copy of the session's reproduced tiny project (conftest.reproduced)."""
    return reproduced


def _digest(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(path.parent).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _experiments(shown: list) -> dict[str, dict]:
    """Experiment name -> its `data` (params, metrics) from `dvc exp show --json`."""
    found = {}

    def walk(node):
        if isinstance(node, dict):
            if node.get("name") and isinstance(node.get("data"), dict) and node["data"].get("params"):
                found[node["name"]] = node["data"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(shown)
    return found


def test_queued_grid_runs_two_experiments_in_parallel_and_exp_show_compares_them(repo):
    before = {name: _digest(repo / name) for name in OUTPUTS}
    queued = run(
        ["dvc", "exp", "run", "--queue", "-S", "cnn.learning_rate=0.002,0.0003", "-S", "train.threads=1"], repo
    )
    assert queued.stdout.count("Queued experiment") == 2, queued.stdout
    run(["dvc", "queue", "start", "-j", "2"], repo)
    try:
        status = real_data.wait_for_queue(repo, tool_env(), timeout_s=900, poll_s=3)
    finally:
        run(["dvc", "queue", "stop"], repo)
    assert sorted(status.values()) == ["Success", "Success"], status
    logs = [run(["dvc", "queue", "logs", name], repo).stdout for name in status]
    for log in logs:  # the cached data stages were reused; only what the changed params feed reran
        assert "Running stage 'train_cnn'" in log and "Running stage 'fetch'" not in log
        # train.threads changes how training runs, not its result: a CNN-only sweep leaves the ResNet be
        assert "Running stage 'train_resnet'" not in log
        assert "1 TensorFlow thread" in log  # train.threads reached the training process

    experiments = _experiments(json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout))
    runs = {name: data for name, data in experiments.items() if name in status}
    assert len(runs) == 2
    rates, results = [], []
    for data in runs.values():
        params = data["params"]["params.yaml"]["data"]
        rates.append(params["cnn"]["learning_rate"])
        assert params["train"]["threads"] == 1
        results.append(data["metrics"]["reports/metrics.json"]["data"]["cnn"])
    assert sorted(rates) == [0.0003, 0.002]
    assert results[0] != results[1]  # each ran its own training: no output was overwritten by the other

    table = run(["dvc", "exp", "show", "--md", "--keep", "cnn.learning_rate|cnn.macro_f1", "--drop", ".*"], repo).stdout
    assert "0.0003" in table and "cnn.macro_f1" in table
    # the queue ran in its own workspaces: this one is untouched
    assert yaml.safe_load((repo / "params.yaml").read_text())["cnn"]["learning_rate"] == 0.001
    assert {name: _digest(repo / name) for name in OUTPUTS} == before


def test_push_to_a_local_remote_then_pull_into_an_empty_cache_restores_everything(repo, tmp_path):
    remote = tmp_path / "dvc-remote"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], repo)
    before = {name: _digest(repo / name) for name in OUTPUTS}
    pushed = run(["dvc", "push"], repo)
    assert "pushed" in pushed.stdout
    assert sum(1 for p in remote.rglob("*") if p.is_file()) >= len(OUTPUTS)

    shutil.rmtree(repo / ".dvc" / "cache")
    for name in OUTPUTS:
        path = repo / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    missing = json.loads(run(["dvc", "status", "--json"], repo).stdout)
    assert missing, "dvc status should report the deleted outputs"

    run(["dvc", "pull"], repo)
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == ALWAYS_CHANGED
    assert {name: _digest(repo / name) for name in OUTPUTS} == before


def test_ci_report_script_reproduces_and_writes_metrics_and_params_diff(repo):
    shutil.copytree(ROOT / "ci", repo / "ci")
    run(["git", "checkout", "-qb", "faster-cnn"], repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["cnn"]["learning_rate"] = 0.01
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "try a higher learning rate"], repo)

    result = run(["bash", "ci/exp_report.sh", "main", "report.md"], repo)
    assert "Running stage 'train_cnn'" in result.stdout and "Running stage 'fetch'" not in result.stdout
    report = (repo / "report.md").read_text()
    metrics, params_part = report.split("### Params")
    assert "`main`" in report and "### Metrics" in metrics
    assert "reports/metrics.json" in metrics and "cnn." in metrics and "| Path" in metrics
    assert "cnn.learning_rate" in params_part and "0.001" in params_part and "0.01" in params_part
    assert not list(repo.glob("report.md.*"))  # the temporary file was renamed, not left behind
    # which ResNet50 weights each side had: an environment change must not read as a result
    weights = report.split("### ResNet50 weights")[1]
    assert "- main: random" in weights and "- this experiment: random" in weights
    # the plots of both sides, rendered offline to PNG for the comment and the CI artifact
    pngs = sorted((repo / "report_plots").glob("*.png"))
    assert len(pngs) == 5 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "5 PNG files" in report


def test_ci_report_script_fails_loudly_when_the_experiment_fails(repo):
    shutil.copytree(ROOT / "ci", repo / "ci")
    with pytest.raises(AssertionError, match="split.test_ratio"):
        run(["bash", "ci/exp_report.sh", "main", "report.md", "--", "-S", "split.test_ratio=0.9"], repo)
    assert not (repo / "report.md").exists()


def test_github_workflow_runs_the_report_script_and_posts_it():
    workflow = yaml.safe_load((ROOT / ".github/workflows/experiment.yml").read_text())
    steps = workflow["jobs"]["reproduce"]["steps"]
    commands = "\n".join(step.get("run", "") for step in steps)
    assert "ci/exp_report.sh" in commands and "-r requirements.txt" in commands
    assert "gh pr comment" in commands and "--body-file exp_report.md" in commands and "--edit-last" in commands
    post = next(step for step in steps if "gh pr comment" in step.get("run", ""))
    assert "head.repo.full_name == github.repository" in post["if"]  # forks: read-only token, no comment
    assert workflow["concurrency"]["cancel-in-progress"] is True
    assert "make lint" in "\n".join(s.get("run", "") for s in workflow["jobs"]["lint-and-test"]["steps"])
    checkout = next(step for step in steps if step.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0  # `dvc metrics diff origin/main` needs the base commit
    assert os.access(ROOT / "ci/exp_report.sh", os.X_OK)
