"""The whole pipeline through DVC on a tiny phantom: repro, exp run, metrics diff, plots show."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.support import ALWAYS_CHANGED, run

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

    # an experiment with another learning rate reruns training only, then is compared with the baseline
    exp = run(["dvc", "exp", "run", "-S", "cnn.learning_rate=0.01"], project)
    assert "Running stage 'fetch'" not in exp.stdout and "Running stage 'train_cnn'" in exp.stdout
    assert yaml.safe_load((project / "params.yaml").read_text())["cnn"]["learning_rate"] == 0.01
    diff = json.loads(run(["dvc", "metrics", "diff", "--json", "--all"], project).stdout)
    assert "reports/metrics.json" in diff and "cnn.accuracy" in diff["reports/metrics.json"]
    params_diff = json.loads(run(["dvc", "params", "diff", "--json"], project).stdout)
    change = params_diff["params.yaml"]["cnn.learning_rate"]
    assert (change["old"], change["new"]) == (0.001, 0.01)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    assert len(shown) >= 1

    # two commits with different params: `dvc metrics diff` between them prints what changed
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "higher learning rate"], project)
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
