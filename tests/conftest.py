"""Shared fixtures. Helpers live in tests/support.py."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from filelock import FileLock

from tests.support import make_project, run, tiny_params

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Keras' cache (ImageNet weights) of this run only, so the results don't depend on the machine's
# ~/.keras: a fresh empty one, removed at exit, unless KNEEXRAY_TEST_KERAS_HOME names one. Set
# before anything imports Keras; the stage scripts and dvc inherit it.
if os.environ.get("KNEEXRAY_TEST_KERAS_HOME"):
    os.environ["KERAS_HOME"] = os.environ["KNEEXRAY_TEST_KERAS_HOME"]
else:
    os.environ["KERAS_HOME"] = tempfile.mkdtemp(prefix="kneexray-keras-home-")
    atexit.register(shutil.rmtree, os.environ["KERAS_HOME"], ignore_errors=True)


@pytest.fixture
def tiny():
    return tiny_params()


@pytest.fixture
def project(tmp_path) -> Path:
    return make_project(tmp_path / "repo")


@pytest.fixture(scope="session")
def reproduced_project(tmp_path_factory) -> Path:
    """One tiny project, `dvc repro`-ed from scratch and committed once per session; tests that
    start from a reproduced pipeline take a copy (`reproduced`) instead of rebuilding it. Under
    pytest-xdist the workers share it: the first to need it builds it, the others wait for it."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _reproduce(tmp_path_factory.mktemp("reproduced") / "repo")
    shared = tmp_path_factory.getbasetemp().parent / "reproduced"  # the run's folder, above each worker's
    with FileLock(f"{shared}.lock"):
        if not (shared / "done").is_file():
            shutil.rmtree(shared, ignore_errors=True)  # a worker that failed half-way
            _reproduce(shared / "repo")
            (shared / "done").touch()
    return shared / "repo"


def _reproduce(repo: Path) -> Path:
    make_project(repo)
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "reproduced"], repo)
    return repo


@pytest.fixture
def reproduced(reproduced_project, tmp_path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(reproduced_project, copy, symlinks=True)
    return copy
