"""The data stages give the same bytes on any x86-64 CPU: here, this machine's native SIMD against
an imitation of an older CPU (NumPy's code paths above x86-64-v2 switched off). Without
kneexray.portable the phantom archive of these params differs between the two."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import ROOT, tiny_params

OLDER_CPU = "X86_V3 X86_V4 AVX512_ICL AVX512_SPR"  # what an x86-64-v2 CPU lacks

pytestmark = [
    pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 only"),
    pytest.mark.slow,  # runs the data stages twice in subprocesses
]


def _stage(args: list[str], cwd: Path, features: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "NPY_DISABLE_CPU_FEATURES": features}
    out = subprocess.run(
        [sys.executable, "-m", *args, "--params", "params.yaml"], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_fetch_extract_split_are_bit_identical_on_an_older_cpu(tmp_path):
    params = tiny_params()
    params["phantom"].update(n_images=30, size=256, difficulty=0.3)  # big enough for SIMD to show
    runs = {}
    for name, features in (("native", ""), ("older", OLDER_CPU)):
        work = tmp_path / name
        work.mkdir()
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        _stage(["stages.fetch", "--out", "raw.zip"], work, features)
        _stage(
            [
                "stages.extract",
                "--archive",
                "raw.zip",
                "--out",
                "extracted",
                "--audit",
                "audit.json",
                "--audit-details",
                "details.json",
            ],
            work,
            features,
        )
        _stage(["stages.split", "--data", "extracted", "--out", "split", "--report", "split.json"], work, features)
        runs[name] = {key: value for key, value in _digests(work).items() if key != "params.yaml"}
    assert runs["native"] == runs["older"]
    assert {"raw.zip", "extracted/fingerprints.npy", "extracted/index.csv", "split/train.csv"} <= set(runs["native"])
