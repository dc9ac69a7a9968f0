"""`dvc exp run -S` writes params.yaml the way DVC does (YAML 1.2): the stages must read it back so.
1e-5 is written as 1e-05, which YAML 1.1 (PyYAML) read as a string."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.support import run

pytestmark = pytest.mark.slow


def test_exp_run_overrides_reach_the_training_stage(reproduced):
    project = reproduced  # only train_cnn reruns
    result = run(
        [
            "dvc",
            "exp",
            "run",
            "--name",
            "overrides",
            "-S",
            "cnn.learning_rate=1e-5",
            "-S",
            "augment.horizontal_flip=false",
            "-S",
            "cnn.filters=[4,8]",
            "-S",
            'dataset.path="1e3"',
            "-S",
            "train.threads=1",
            "train_cnn",
        ],
        project,
    )
    assert "1 TensorFlow thread" in result.stdout + result.stderr  # train.threads reached the training process
    written = (project / "params.yaml").read_text()
    assert "1e-05" in written  # the form that broke PyYAML
    from kneexray.params import load

    params = load(project / "params.yaml")
    assert params.cnn.learning_rate == 1e-5 and params.augment.horizontal_flip is False
    assert params.cnn.filters == (4, 8) and params.dataset.path == "1e3"
    card = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    assert "overrides" in json.dumps(card)
    # what the training stage used, from the model file it wrote
    from kneexray.model.files import read_metadata

    meta = read_metadata(project / "models" / "cnn.keras")
    assert meta["params"]["cnn"]["learning_rate"] == 1e-5 and meta["params"]["cnn"]["filters"] == [4, 8]
    assert yaml.safe_load(written)["cnn"]["filters"] == [4, 8]
