"""The whole pipeline through DVC on a tiny phantom: repro, a queued grid of experiments, exp apply,
metrics diff, plots show."""

from __future__ import annotations

import json

import pytest
import yaml

from bench import real_data  # the queue helpers the real-data benchmark uses
from tests.support import ALWAYS_CHANGED, OUTPUTS, digest, experiments, run, tool_env

pytestmark = pytest.mark.slow


def test_dvc_pipeline_end_to_end(reproduced):
    project = reproduced  # `dvc repro` from scratch, once per session (conftest.reproduced_project)

    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["data"]["source"] == "phantom"
    for model in ("cnn", "resnet"):
        entry = metrics[model]
        assert 0 <= entry["accuracy"] <= 1
        assert entry["ci95"]["accuracy"]["low"] <= entry["accuracy"] <= entry["ci95"]["accuracy"]["high"]
    assert metrics["resnet"]["weights_source"] == "random"  # no network here: said, not hidden
    # every run scores the baselines on the same test images, and each model against the best of them
    assert {"chance", "majority", "thumbnail_logistic"} <= set(metrics["baselines"])
    for model in ("cnn", "resnet"):
        versus = metrics[model]["vs_best_baseline"]
        assert (
            versus["baseline"] in metrics["baselines"]
            and versus["low"] <= versus["macro_f1_difference"] <= versus["high"]
        )
        assert metrics[model]["folds"] == 2 and isinstance(metrics[model]["no_skill"], bool)
    assert "Baselines on the same test images" in (project / "reports/README.md").read_text()
    card = (project / "reports/eval/cnn/model_card.md").read_text()  # the model card, test metrics with CIs
    assert "Intended use" in card and "`phantom` data" in card and "mean nothing" in card and "macro-F1" in card
    for output in (
        "models/cnn.keras",
        "models/resnet.keras",
        "reports/figures/cnn_confusion.png",
        "reports/README.md",
        "reports/eval/cnn/predictions.csv",
        "reports/train/cnn/metrics.json",
    ):
        assert (project / output).is_file(), output
    # DVC owns every output; nothing stray is left in data/ (the extract scratch folder is gone)
    assert sorted(p.name for p in (project / "data").iterdir()) == [".gitignore", "extracted", "inputs", "raw", "split"]
    status = run(["dvc", "status", "--json"], project)
    assert json.loads(status.stdout) == ALWAYS_CHANGED

    # PNGs are byte-stable: redrawing the same results changes nothing DVC would see
    figures = {p.name: p.read_bytes() for p in (project / "reports/figures").glob("*.png")}
    assert len(figures) == 10  # curves, confusion, ROC, reliability, Grad-CAM per model
    run(["dvc", "repro", "-f", "-s", "plot"], project)
    assert figures == {p.name: p.read_bytes() for p in (project / "reports/figures").glob("*.png")}

    # a grid of two settings, queued and run side by side, each in its own workspace: the cached stages
    # are reused, only what the changed param feeds reruns, and `dvc exp show` compares them. The grid
    # is over an evaluation setting so no model is retrained here (a training param reaching the
    # training through `dvc exp run`: tests/test_params_overrides.py)
    before = {name: digest(project / name) for name in OUTPUTS}
    queued = run(["dvc", "exp", "run", "--queue", "-S", "evaluate.bootstrap_resamples=60,80"], project)
    assert queued.stdout.count("Queued experiment") == 2, queued.stdout
    run(["dvc", "queue", "start", "-j", "2"], project)
    try:
        status = real_data.wait_for_queue(project, tool_env(), timeout_s=900, poll_s=3)
    finally:
        run(["dvc", "queue", "stop"], project)
    assert sorted(status.values()) == ["Success", "Success"], status
    for name in status:
        log = run(["dvc", "queue", "logs", name], project).stdout
        assert "Running stage 'evaluate'" in log and "Running stage 'plot'" in log
        assert "Running stage 'fetch'" not in log and "Running stage 'train_cnn'" not in log
    runs = {
        name: data
        for name, data in experiments(json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)).items()
        if name in status
    }
    resamples = {
        name: data["params"]["params.yaml"]["data"]["evaluate"]["bootstrap_resamples"] for name, data in runs.items()
    }
    assert sorted(resamples.values()) == [60, 80]
    results = [data["metrics"]["reports/metrics.json"]["data"]["cnn"]["ci95"] for data in runs.values()]
    assert results[0] != results[1]  # each ran its own evaluation: no output was overwritten by the other
    table = run(
        ["dvc", "exp", "show", "--md", "--keep", "evaluate.bootstrap_resamples|cnn.macro_f1", "--drop", ".*"], project
    )
    assert "80" in table.stdout and "cnn.macro_f1" in table.stdout
    # the queue ran in its own workspaces: this one is untouched
    assert yaml.safe_load((project / "params.yaml").read_text())["evaluate"]["bootstrap_resamples"] == 50
    assert {name: digest(project / name) for name in OUTPUTS} == before

    # one of them brought into the workspace, then compared with the baseline
    run(["dvc", "exp", "apply", next(name for name, value in resamples.items() if value == 80)], project)
    assert yaml.safe_load((project / "params.yaml").read_text())["evaluate"]["bootstrap_resamples"] == 80
    diff = json.loads(run(["dvc", "metrics", "diff", "--json", "--all"], project).stdout)
    assert "reports/metrics.json" in diff and "cnn.accuracy" in diff["reports/metrics.json"]
    params_diff = json.loads(run(["dvc", "params", "diff", "--json"], project).stdout)
    change = params_diff["params.yaml"]["evaluate.bootstrap_resamples"]
    assert (change["old"], change["new"]) == (50, 80)

    # two commits with different params: `dvc metrics diff` between them prints what changed
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "more bootstrap resamples"], project)
    between = run(["dvc", "metrics", "diff", "HEAD~1", "HEAD", "--all"], project).stdout
    assert "reports/metrics.json" in between and "cnn.macro_f1" in between and "resnet.macro_f1" in between

    run(["dvc", "plots", "show", "-o", "dvc_plots"], project)
    html = (project / "dvc_plots/index.html").read_text()
    for plot_id in (
        "Confusion matrix (test)",
        "Training accuracy",
        "Training loss",
        "ROC curves (test, one vs rest)",
        "Reliability diagram (test)",
    ):
        assert plot_id in html, plot_id
    assert "osteoporosis" in html  # class names, not numbers, in the confusion data
    assert "cnn_confusion.png" in html

    # the experiment against the committed baseline, side by side
    run(["dvc", "plots", "diff", "HEAD~1", "HEAD", "-o", "dvc_plots_diff"], project)
    diff_html = (project / "dvc_plots_diff/index.html").read_text()
    assert "HEAD~1" in diff_html and "HEAD" in diff_html
