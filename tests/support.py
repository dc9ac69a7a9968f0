"""Helpers the tests share: the project root, a tiny configuration, running tools, scratch projects."""

from __future__ import annotations

import copy
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
