"""`pip install .`: the wheel holds only the kneexray package, and its `kneexray` command classifies
images from any folder, without the repository on the path.

The wheel is built from a copy of pyproject.toml, README.md and kneexray/ (the build writes build/
and *.egg-info beside its sources), offline, with the venv's setuptools (--no-build-isolation), and
installed with --target into a folder that is then the only kneexray on PYTHONPATH; the runtime
dependencies come from the running venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kneexray import DEFAULT_CLASSES, __version__

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "kneexray", src / "kneexray", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "-w",
            str(dist),
            str(src),
        ],
        cwd=dist,
    )
    wheels = list(dist.glob("kneexray-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The folder the wheel was installed into (kneexray/ and bin/kneexray)."""
    target = tmp_path_factory.mktemp("site")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(wheel),
        ],
        cwd=target,
    )
    return target


@pytest.fixture(scope="module")
def outside(installed, tmp_path_factory) -> tuple[Path, dict]:
    """A working folder outside the repository, and an environment whose only kneexray is the installed one."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    assert ROOT not in cwd.parents
    env = {**os.environ, "PYTHONPATH": str(installed), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return cwd, env


def kneexray_cmd(installed: Path) -> list[str]:
    """The console script pip generated, run by this interpreter (its #! line names it too)."""
    script = installed / "bin" / "kneexray"
    assert script.is_file()
    return [sys.executable, str(script)]


def test_wheel_holds_the_package_only(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = f"kneexray-{__version__}.dist-info"
        metadata = archive.read(f"{dist_info}/METADATA").decode()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert {name.split("/")[0] for name in names} == {"kneexray", dist_info}
    assert "kneexray/__main__.py" in names and "kneexray/predict.py" in names
    assert f"Version: {__version__}\n" in metadata
    assert "Requires-Dist: tensorflow>=" in metadata
    assert 'Requires-Dist: dvc>=3.67.1; extra == "pipeline"' in metadata
    assert "kneexray = kneexray.__main__:main" in entry_points


def test_version_and_imports_come_from_the_install(installed, outside):
    cwd, env = outside
    assert _run(kneexray_cmd(installed) + ["--version"], cwd, env).stdout == f"kneexray {__version__}\n"
    assert _run([sys.executable, "-m", "kneexray", "--version"], cwd, env).stdout == f"kneexray {__version__}\n"
    where = _run([sys.executable, "-c", "import kneexray.__main__ as m; print(m.__file__)"], cwd, env).stdout.strip()
    assert Path(where) == installed / "kneexray" / "__main__.py"


def test_installed_command_predicts_outside_the_repo(installed, outside):
    import keras

    from kneexray.model.files import save_model
    from kneexray.model.networks import build_cnn

    cwd, env = outside
    keras.utils.set_random_seed(0)
    model = build_cnn(SIZE, 3, filters=[4], dense_units=4, dropout=0.0)  # untrained: the output's shape is the test
    metadata = {
        "model": "cnn",
        "classes": list(DEFAULT_CLASSES),
        "image_size": SIZE,
        "weights_source": "none (trained from scratch)",
        "kneexray_version": __version__,
        "data": {"source": "path"},
    }
    save_model(model, metadata, cwd / "tiny.keras")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 40), dtype=np.uint8)).save(cwd / "knee.png")

    # -v after the command: accepted, and it does turn logging on (predict's INFO line).
    result = _run(
        kneexray_cmd(installed) + ["predict", "-v", "knee.png", "--model", "tiny.keras", "--json", "out.json"], cwd, env
    )
    assert "tiny.keras: cnn model, 32 px, 1 file(s)" in result.stderr
    rows = json.loads((cwd / "out.json").read_text())
    assert [row["path"] for row in rows] == ["knee.png"]
    assert rows[0]["predicted"] in DEFAULT_CLASSES
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)


def test_options_after_the_command_and_usage_errors(installed, outside):
    cwd, env = outside
    missing = ["knee.png", "--model", "missing.keras"]  # fails before TensorFlow loads
    quiet = _run(kneexray_cmd(installed) + ["predict", *missing], cwd, env, check=False)
    assert (quiet.returncode, quiet.stderr) == (1, "error: missing.keras: no such model file\n")
    for argv in (["-v", "predict", *missing], ["predict", "-v", *missing], ["predict", *missing, "--verbose"]):
        verbose = _run(kneexray_cmd(installed) + argv, cwd, env, check=False)
        assert verbose.returncode == 1 and "Traceback" in verbose.stderr, argv
    usage = _run(kneexray_cmd(installed) + ["predict"], cwd, env, check=False)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: kneexray predict")
    assert _run(kneexray_cmd(installed) + ["predict", "--version"], cwd, env).stdout == f"kneexray {__version__}\n"
