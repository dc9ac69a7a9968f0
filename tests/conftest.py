"""Shared fixtures. Helpers live in tests/support.py."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
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
    pytest-xdist the workers share it: worker gw0 starts building it once collected (see
    pytest_collection_modifyitems), and a worker that needs it first waits for it."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _reproduce(tmp_path_factory.mktemp("reproduced") / "repo")
    shared = _shared(tmp_path_factory.getbasetemp())
    with FileLock(f"{shared}.lock"):
        _build_once(shared)  # a no-op once built
    return shared / "repo"


def _runs_first(item) -> int:
    """The slow tests first and the quick ones last, so two workers end together; of the slow, those
    that copy the reproduced project after the others, by when it is built."""
    if item.get_closest_marker("slow") is None:
        return 2
    return 1 if "reproduced_project" in getattr(item, "fixturenames", ()) else 0


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected
def pytest_collection_modifyitems(config, items):
    """Orders the tests (every worker the same way: pytest-xdist requires it); then worker gw0
    builds the shared reproduced project in a thread from the start, so the build overlaps the
    tests that don't need it rather than holding up a worker that does."""
    items.sort(key=_runs_first)  # stable: file order within each group
    if os.environ.get("PYTEST_XDIST_WORKER") != "gw0":
        return
    if not any("reproduced_project" in getattr(item, "fixturenames", ()) for item in items):
        return
    shared = _shared(config._tmp_path_factory.getbasetemp())
    locked = threading.Event()

    def build():
        with FileLock(f"{shared}.lock"):
            locked.set()
            _build_once(shared)

    threading.Thread(target=build, name="reproduce").start()
    locked.wait()  # held before any test can ask for the project


def _shared(worker_temp: Path) -> Path:
    return worker_temp.parent / "reproduced"  # the run's folder, above each worker's


def _build_once(shared: Path) -> None:
    """Call holding the lock. A failed build leaves no `done`: the next caller tries again and
    reports the failure."""
    if not (shared / "done").is_file():
        shutil.rmtree(shared, ignore_errors=True)
        _reproduce(shared / "repo")
        (shared / "done").touch()


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
