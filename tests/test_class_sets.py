"""Any class set from params: the whole pipeline on a 2-class and a 5-class phantom."""

from __future__ import annotations

import json

import pytest
import yaml

from kneexray.model.files import read_metadata
from tests.support import run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("classes", [["healthy", "sick"], ["kl0", "kl1", "kl2", "kl3", "kl4"]])
def test_pipeline_runs_on_any_class_set(project, classes):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dataset"]["classes"] = classes
    params["phantom"].update(n_images=24 * len(classes), class_fractions=dict.fromkeys(classes, 1 / len(classes)))
    # enough training to learn the phantom (the tiny settings stop after two epochs without progress)
    params["cnn"].update(image_size=48, filters=[16, 32, 64], dense_units=16, epochs=12)
    params["train"].update(patience=12, min_epochs=4)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro"], project)

    k = len(classes)
    audit = json.loads((project / "reports/data_audit.json").read_text())
    assert list(audit["images_per_class"]) == classes and sum(audit["images_per_class"].values()) == 24 * k
    split = json.loads((project / "reports/split.json").read_text())
    assert all(list(counts) == classes for counts in split["images_per_split"].values())
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["classes"] == classes and list(metrics["cnn"]["recall"]) == classes
    assert "clinical_ost" not in metrics["baselines"]  # the OST rule has three risk levels of its own
    details = json.loads((project / "reports/eval/cnn/details.json").read_text())
    assert len(details["confusion_matrix"]) == k and all(len(row) == k for row in details["confusion_matrix"])
    for model in ("cnn", "resnet"):
        assert read_metadata(project / f"models/{model}.keras")["classes"] == classes
    # the phantom is learnable whatever the classes: the CNN beats the majority class clearly
    majority = metrics["baselines"]["majority"]["macro_f1"]
    assert metrics["cnn"]["macro_f1"] > majority + 0.25, (metrics["cnn"]["macro_f1"], majority)
    assert all(f"recall {c}" in (project / "reports/README.md").read_text() for c in classes)

    image = next((project / "data/extracted/images" / classes[-1]).iterdir())
    out = run(["python", "-m", "kneexray", "predict", str(image), "--model", "models/cnn.keras"], project)
    assert out.stdout.split()[-k - 1] in classes  # path, predicted class, one probability per class
