"""Scaling with DVC's own machinery on a tiny phantom: a shared remote, the CI report. (The experiment
queue runs in tests/test_pipeline_e2e.py, on the same reproduced project.)

One reproduced-and-committed project is built per module; each test works on its own copy of it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.support import ALWAYS_CHANGED, OUTPUTS, ROOT, digest, run

pytestmark = pytest.mark.slow


@pytest.fixture
def repo(reproduced) -> Path:
    """A copy of the session's reproduced tiny project (conftest.reproduced)."""
    return reproduced


def test_push_to_a_local_remote_then_pull_into_an_empty_cache_restores_everything(repo, tmp_path):
    remote = tmp_path / "dvc-remote"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], repo)
    before = {name: digest(repo / name) for name in OUTPUTS}
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
    assert {name: digest(repo / name) for name in OUTPUTS} == before


def test_ci_report_script_reproduces_and_writes_metrics_and_params_diff(repo):
    shutil.copytree(ROOT / "ci", repo / "ci")
    # a change to the evaluation only (new bootstrap CIs): the models are reused, the metrics change
    run(["git", "checkout", "-qb", "more-resamples"], repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["bootstrap_resamples"] = 80
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "more bootstrap resamples"], repo)

    result = run(["bash", "ci/exp_report.sh", "main", "report.md"], repo)
    assert "Running stage 'evaluate'" in result.stdout and "Running stage 'fetch'" not in result.stdout
    assert "Running stage 'train_cnn'" not in result.stdout
    report = (repo / "report.md").read_text()
    metrics, params_part = report.split("### Params")
    assert "`main`" in report and "### Metrics" in metrics
    assert "reports/metrics.json" in metrics and "cnn." in metrics and "| Path" in metrics
    assert "evaluate.bootstrap_resamples" in params_part and "50" in params_part and "80" in params_part
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
