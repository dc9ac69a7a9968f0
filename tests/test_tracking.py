"""Inputs outside the repository are tracked by content: replace the data behind dataset.path and
`dvc repro` reruns what reads it; leave it alone and nothing downstream reruns."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from kneexray import DEFAULT_CLASSES
from kneexray.data.phantom import render_knee
from kneexray.data.tracking import content_hash, used_inputs
from kneexray.errors import MissingInputError
from kneexray.params import validate
from tests.support import run


def test_content_hash_follows_bytes_and_names(tmp_path):
    folder = tmp_path / "data"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "x.png").write_bytes(b"one")
    first = content_hash(folder)
    assert content_hash(folder) == first  # stable
    (folder / "a" / "x.png").write_bytes(b"two")
    assert content_hash(folder) != first  # content
    (folder / "a" / "x.png").rename(folder / "a" / "y.png")
    assert content_hash(folder) != content_hash(folder / "a" / "y.png")  # names count in a folder
    with pytest.raises(MissingInputError, match="no such file"):
        content_hash(tmp_path / "missing.zip")


def test_only_the_inputs_in_use_are_tracked(tiny):
    assert used_inputs(validate(tiny)) == {"dataset": [], "external": [], "resnet_weights": []}
    tiny["dataset"].update(source="path", path="/data/knees.zip")
    tiny["resnet"].update(weights="file", weights_path="/w.h5")
    assert used_inputs(validate(tiny)) == {"dataset": ["/data/knees.zip"], "external": [], "resnet_weights": ["/w.h5"]}


def _dataset_zip(path: Path, seed: int) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(24):
            label = DEFAULT_CLASSES[i % 3]
            image = render_knee(np.random.default_rng([seed, i]), label, size=64, difficulty=0.0)
            png = path.parent / "tmp.png"
            image.save(png)
            archive.write(png, f"knees/{label}/{i}.png")


@pytest.mark.slow
def test_a_replaced_local_dataset_reruns_fetch_and_an_unchanged_one_does_not(project, tmp_path):
    archive = tmp_path / "outside" / "knees.zip"
    archive.parent.mkdir()
    _dataset_zip(archive, seed=1)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dataset"].update(source="path", path=str(archive))
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro", "extract"], project)
    first = (project / "data/raw/dataset.zip").read_bytes()

    again = run(["dvc", "repro", "extract"], project).stdout
    assert "Running stage 'track'" in again and "Running stage 'fetch'" not in again  # nothing changed

    _dataset_zip(archive, seed=2)  # other images at the same path
    changed = run(["dvc", "repro", "extract"], project).stdout
    assert "Running stage 'fetch'" in changed and "Running stage 'extract'" in changed
    assert (project / "data/raw/dataset.zip").read_bytes() != first
    recorded = json.loads((project / "data/inputs/dataset.json").read_text())
    assert recorded == {"path": str(archive), "sha256": content_hash(archive)}
