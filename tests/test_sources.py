"""Several dataset sources in one run: copies found across them, every image's source kept,
metrics per source, and one source held out whole as the test set."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from kneexray import DEFAULT_CLASSES
from kneexray.data.curation import curate
from kneexray.data.phantom import render_knee
from kneexray.evaluate.scoring import evaluate_models
from kneexray.params import ParamsError, load, validate
from tests.support import check_class_set, run, tiny_params


def make_sources(
    root: Path, per_class: int = 12, classes: Sequence[str] = DEFAULT_CLASSES
) -> tuple[Path, Path, list[tuple[str, str]]]:
    """Sources a and b laid out by class; b also holds copies of some of a's images: the same
    bytes, re-encoded and resized. Returns both folders and the (a file, b file) shared pairs."""
    a, b, shared = root / "a", root / "b", []
    for k, label in enumerate(classes):
        for folder in (a, b):
            (folder / label).mkdir(parents=True)
        for i in range(per_class):
            for folder, seed in ((a, 1), (b, 2)):
                # 128 px: a 4/5 resize of an 80 px image sits at the copy threshold (distance up to 0.0063)
                image = render_knee(
                    np.random.default_rng([seed, k, i]), label, classes=classes, size=128, difficulty=0.0
                )
                image.save(folder / label / f"{i}.jpg", quality=90)
        for i, how in enumerate(("exact", "reencoded", "resized")):
            original = a / label / f"{i}.jpg"
            copy = b / label / f"copy_{how}.jpg"
            if how == "exact":
                shutil.copy(original, copy)
            else:
                image = Image.open(original)
                if how == "resized":
                    image = image.resize((image.width * 4 // 5, image.height * 4 // 5))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=70)
                copy.write_bytes(buffer.getvalue())
            shared.append((f"a/{label}/{i}.jpg", f"b/{label}/{copy.name}"))
    return a, b, shared


def curate_both(a: Path, b: Path, out: Path):
    sources = {name: {c: folder / c for c in DEFAULT_CLASSES} for name, folder in (("a", a), ("b", b))}
    return curate(sources, out, max_pixels=10**7, min_side=32, near_duplicate_distance=0.006, keep_conflicts=False)


def test_copies_across_sources_are_all_found(tmp_path):
    a, b, shared = make_sources(tmp_path / "raw")
    curated = curate_both(a, b, tmp_path / "out")
    audit, index = curated.audit, curated.index
    groups = [set(g) for g in audit["copies_across_sources_groups"]]
    for pair in shared:
        assert any(set(pair) <= g for g in groups), pair
    assert audit["copies_across_sources"] == {"a & b": len(shared)}
    # every kept image carries its source; an exact copy is kept once, the near copies stay grouped
    assert set(index["origin"]) == {"a", "b"} and index["path"].is_unique
    assert audit["images_per_source"] == {"a": 36, "b": 36 + 6}  # b's 3 exact copies dropped
    grouped = index.set_index("source")["group"]
    for pair in shared:
        if pair[1] in grouped:
            assert grouped[pair[0]] == grouped[pair[1]], pair


def test_sources_params_are_checked():
    base = tiny_params()
    good = {**base, "dataset": {**base["dataset"], "sources": [{"name": "a", "source": "path", "path": "/x"}]}}
    assert validate(good).dataset.sources[0].name == "a"
    for sources, message in [
        ([{"name": "a", "source": "path"}], r"dataset\.sources\[0\]\.path: required"),
        ([{"name": "a", "source": "ftp"}], r"dataset\.sources\[0\]\.source"),
        ([{"name": "a", "source": "phantom", "colour": 1}], r"dataset\.sources\[0\]\.colour: unknown key"),
        ([{"name": "a", "source": "phantom"}, {"name": "a", "source": "phantom"}], "distinct"),
    ]:
        with pytest.raises(ParamsError, match=message):
            validate({**base, "dataset": {**base["dataset"], "sources": sources}})
    with pytest.raises(ParamsError, match=r"split\.test_source: 'c' is not one of dataset\.sources"):
        validate({**good, "split": {**base["split"], "test_source": "c"}})


@pytest.mark.slow
def test_two_sources_of_a_two_class_set_through_the_pipeline_then_one_held_out(project, tmp_path, monkeypatch):
    classes = ["healthy", "sick"]  # the 2-class case of tests/test_class_sets.py, run here to share the pipeline
    a, b, shared = make_sources(tmp_path / "raw", classes=classes)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dataset"]["classes"] = classes
    params["phantom"]["class_fractions"] = {"healthy": 0.5, "sick": 0.5}  # unused, but checked against the classes
    params["dataset"]["sources"] = [
        {"name": "a", "source": "path", "path": str(a)},
        {"name": "b", "source": "path", "path": str(b)},
    ]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro"], project)
    audit = json.loads((project / "reports/data_audit.json").read_text())
    assert audit["copies_across_sources"] == {"a & b": len(shared)}
    check_class_set(project, classes, n_images=2 * 2 * 12 + len(shared) - len(classes))  # exact copies kept once
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert set(metrics["data"]["test_per_source"]) == {"a", "b"}
    assert set(metrics["cnn"]["per_source"]) == {"a", "b"}
    assert "Per source" in (project / "reports/README.md").read_text()
    predictions = (project / "reports/eval/cnn/predictions.csv").read_text().splitlines()
    assert predictions[0].startswith("path,origin,")

    # leave-one-source-out: every test image is b's, and b's copies of a's images leave training.
    # The experiment runs up to the split; evaluating the models already trained on the new test set
    # shows the per-source report without training them again.
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "two sources"], project)
    run(["dvc", "exp", "run", "-S", "split.test_source=b", "split"], project)
    split = json.loads((project / "reports/split.json").read_text())
    # b's exact copies were dropped at curation (one per class); its near copies leave training
    assert split["test_source"] == "b" and split["copies_of_test_images_left_out"] == len(shared) - len(classes)
    out = tmp_path / "held_out"
    monkeypatch.chdir(project)  # the evaluate stage's own call, in this process
    evaluate_models(
        {"cnn": "models/cnn.keras", "resnet": "models/resnet.keras"},
        test_csv="data/split/test.csv",
        data_root="data/extracted",
        out_dir=out / "eval",
        metrics_path=out / "metrics.json",
        params=load(project / "params.yaml"),
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["test_per_source"] == {"b": metrics["data"]["n_test"]}
    assert set(metrics["cnn"]["per_source"]) == {"b"}


def test_a_copy_under_another_label_in_another_source_is_a_conflict(tmp_path):
    a, b, _ = make_sources(tmp_path / "raw", per_class=4)
    shutil.copy(a / "normal" / "3.jpg", b / "osteoporosis" / "conflict.jpg")
    curated = curate_both(a, b, tmp_path / "out")
    members = [set(g["members"]) for g in curated.audit["label_conflict_groups"]]
    assert {"a/normal/3.jpg (normal)", "b/osteoporosis/conflict.jpg (osteoporosis)"} in members
    assert not curated.index["source"].isin(["a/normal/3.jpg", "b/osteoporosis/conflict.jpg"]).any()
