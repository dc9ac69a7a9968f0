"""Helpers the tests share: the project root, a tiny configuration, running tools, scratch projects."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", ".dvcignore", ".gitignore", "kneexray", "stages")


def tiny_params() -> dict:
    """The committed params.yaml shrunk so a whole pipeline runs in seconds."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = copy.deepcopy(params)
    params["phantom"].update(
        n_images=48, size=64, difficulty=0.0, class_fractions={"normal": 0.34, "osteopenia": 0.33, "osteoporosis": 0.33}
    )
    params["extract"].update(min_side=32)
    params["split"].update(test_ratio=0.25, val_ratio=0.25)
    params["image"].update(batch_size=8)
    params["cnn"].update(image_size=32, filters=[8, 16], dense_units=8, epochs=2)
    params["resnet"].update(image_size=32, dense_units=8, epochs=1)
    params["train"].update(patience=2, folds=2, min_epochs=1, warmup_epochs=0)
    params["evaluate"].update(bootstrap_resamples=50)
    return params


# What `dvc repro` writes that DVC caches: a digest of each shows whether anything was rewritten
OUTPUTS = ("data/raw/dataset.zip", "data/extracted", "data/split", "models/cnn.keras", "models/resnet.keras")

# `dvc status` of a reproduced pipeline: the track stage always runs (it hashes inputs outside the repo)
ALWAYS_CHANGED = {"track": ["always changed"]}


def tool_env() -> dict:
    """The environment for `dvc` and the stage scripts: the venv's bin first, so `dvc` and the
    `python` in dvc.yaml's commands are the project's."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "TF_CPP_MIN_LOG_LEVEL": "2", "DVC_NO_ANALYTICS": "1"}


def run(cmd: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output if it fails."""
    result = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def make_project(repo: Path) -> Path:
    """A fresh git + DVC repo at `repo` holding the pipeline code and the tiny params, committed."""
    repo.mkdir(parents=True)
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "config", "user.email", "test@example.com"], repo)
    run(["git", "config", "user.name", "test"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "config", "core.analytics", "false"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "tiny pipeline"], repo)
    return repo


def model_metadata(size: int) -> dict:
    """The least kneexray metadata a test model needs (a CNN of `size` px on the default classes)."""
    from kneexray import DEFAULT_CLASSES, __version__

    return {
        "model": "cnn",
        "classes": list(DEFAULT_CLASSES),
        "image_size": size,
        "data": {"source": "path"},
        "kneexray_version": __version__,
    }


def check_class_set(project: Path, classes: list[str], n_images: int) -> None:
    """A reproduced project on `classes`: every output speaks of those classes, in that order; the
    saved model beats the majority class clearly (a label mix-up anywhere would drop it to chance);
    prediction answers with one of them."""
    from kneexray.model.files import read_metadata
    from kneexray.predict import predict_files

    k = len(classes)
    audit = json.loads((project / "reports/data_audit.json").read_text())
    assert list(audit["images_per_class"]) == classes and sum(audit["images_per_class"].values()) == n_images
    split = json.loads((project / "reports/split.json").read_text())
    assert all(list(counts) == classes for counts in split["images_per_split"].values())
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["classes"] == classes and list(metrics["cnn"]["recall"]) == classes
    assert "clinical_ost" not in metrics["baselines"]  # the OST rule has three risk levels of its own
    details = json.loads((project / "reports/eval/cnn/details.json").read_text())
    assert len(details["confusion_matrix"]) == k and all(len(row) == k for row in details["confusion_matrix"])
    for model in ("cnn", "resnet"):
        assert read_metadata(project / f"models/{model}.keras")["classes"] == classes
    majority = metrics["baselines"]["majority"]["macro_f1"]
    assert metrics["cnn"]["macro_f1"] > majority + 0.25, (metrics["cnn"]["macro_f1"], majority)
    assert all(f"recall {c}" in (project / "reports/README.md").read_text() for c in classes)

    image = next(p for p in sorted((project / "data/extracted/images").rglob("*")) if p.is_file())
    [row] = predict_files(project / "models/cnn.keras", [image])  # what `kneexray predict` prints
    assert row["predicted"] in classes and list(row["probabilities"]) == classes


def digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and bytes)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    hashed = hashlib.sha256()
    for file in files:
        hashed.update(file.relative_to(path.parent).as_posix().encode())
        hashed.update(file.read_bytes())
    return hashed.hexdigest()


def experiments(shown: list) -> dict[str, dict]:
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
