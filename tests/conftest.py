"""Shared fixtures. Helpers live in tests/support.py."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

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
    start from a reproduced pipeline take a copy (`reproduced`) instead of rebuilding it."""
    repo = make_project(tmp_path_factory.mktemp("reproduced") / "repo")
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "reproduced"], repo)
    return repo


@pytest.fixture
def reproduced(reproduced_project, tmp_path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(reproduced_project, copy, symlinks=True)
    return copy


def pytest_collection_modifyitems(items):
    # With pytest-xdist (`make test` runs two workers, --dist loadgroup), every test that copies the
    # reproduced project runs on one worker, so the project is reproduced once, not once per worker.
    for item in items:
        if "reproduced" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("reproduced"))
