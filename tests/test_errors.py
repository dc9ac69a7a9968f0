"""One error root: our errors are one line, a bug inside a library shows its traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT, tool_env

SCRIPT = """
import argparse, sys
from kneexray import stage
from kneexray.errors import InputError

def main(args, params):
    if sys.argv[1] == "ours":
        raise InputError("train.csv: missing column(s) label")
    raise ValueError("operands could not be broadcast together")  # what numpy says on a bug

parser = argparse.ArgumentParser()
parser.add_argument("what")
stage.run(main, parser)
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, *args, "--params", str(ROOT / "params.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=tool_env(),
    )


def test_our_errors_are_one_line_and_verbose_adds_the_traceback():
    out = _run("ours")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == "error: train.csv: missing column(s) label"
    assert "Traceback" not in out.stderr
    verbose = _run("ours", "--verbose")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def test_a_bug_inside_a_library_shows_its_traceback():
    out = _run("bug")
    assert out.returncode == 1 and "Traceback" in out.stderr
    assert "ValueError: operands could not be broadcast together" in out.stderr
    assert "error: operands" not in out.stderr


@pytest.mark.parametrize(
    "where",
    [
        "params:ParamsError",
        "data.images:ImageError",
        "data.archive:ArchiveError",
        "data.splitting:SplitError",
        "data.download:DownloadError",
        "evaluate.metrics:MetricsError",
        "atomic:OutputIsDirectoryError",
        "model.networks:WeightsUnavailable",
    ],
)
def test_every_domain_error_has_the_one_root(where):
    import importlib

    from kneexray.errors import KneexrayError

    module, name = where.split(":")
    assert issubclass(getattr(importlib.import_module(f"kneexray.{module}"), name), KneexrayError)
