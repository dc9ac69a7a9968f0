"""`python -m kneexray predict` outputs: never over a folder, one Grad-CAM per input, CSV cells that
stay text, and inputs that are not regular files skipped instead of waited for."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from kneexray import DEFAULT_CLASSES
from kneexray.__main__ import main
from kneexray.predict import predict_files, write_csv
from tests.support import model_metadata

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
METADATA = model_metadata(SIZE)
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """An untrained tiny CNN: these tests are about files, not about what it predicts."""
    from kneexray.model.files import save_model
    from kneexray.model.networks import build_cnn

    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("model") / "cnn.keras"
    save_model(build_cnn(SIZE, 3, filters=[4], dense_units=4, dropout=0.0), METADATA, path)
    return path


def knee_png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40), dtype=np.uint8)).save(path)
    return path


# TensorFlow's C++ start-up chatter (absl/glog format), which no environment variable fully silences
_TF_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWEF]\d{4} \d\d:\d\d:[\d.]+ )")


def our_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not _TF_NOISE.match(line)]


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kneexray", "predict", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_csv_onto_a_folder_is_refused_and_the_folder_survives(model_path, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    image = knee_png(tmp_path / "in" / "knee.png")
    result = run_cli(str(image), "--model", str(model_path), "--csv", str(thesis), cwd=tmp_path)
    assert result.returncode == 1
    lines = our_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and str(thesis) in lines[0] and "directory" in lines[0]
    assert (thesis / "chapter1.tex").read_text() == "years of work"
    assert sorted(p.name for p in thesis.iterdir()) == ["chapter1.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "thesis"]  # no temporary left


@pytest.mark.parametrize("option", ["--json", "--csv"])
@pytest.mark.parametrize("target", [".", "..", "sub/"])
def test_dot_or_slash_target_keeps_the_folder(model_path, tmp_path, monkeypatch, capsys, option, target):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "keep.txt").write_text("keep")
    image = knee_png(work / "knee.png")
    monkeypatch.chdir(work)
    assert main(["predict", str(image), "--model", str(model_path), option, target]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "directory" in err[0]
    assert sorted(p.name for p in work.iterdir()) == ["knee.png", "sub"]
    assert (work / "sub" / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_inputs_sharing_a_name_each_get_their_own_explanation(model_path, tmp_path):
    # c/knee_2.png already owns the name "knee_2" that b/knee.png would have been given
    inputs = [
        knee_png(tmp_path / "in" / name, seed)
        for seed, name in enumerate(["a/knee.png", "b/knee.jpg", "c/knee_2.png", "d/Knee.png"])
    ]
    out = tmp_path / "explain"
    rows = predict_files(model_path, [tmp_path / "in"], explain_dir=out)
    written = [Path(r["explanation"]).name for r in rows]
    assert len(set(n.casefold() for n in written)) == len(inputs)
    assert sorted(p.name for p in out.iterdir()) == sorted(written)
    # the same names on a second run: outputs are replaced, not piled up
    again = predict_files(model_path, [tmp_path / "in"], explain_dir=out)
    assert [Path(r["explanation"]).name for r in again] == written
    assert dict(zip((r["path"] for r in rows), written))[str(inputs[0])] == "knee_gradcam.png"


def test_formula_like_cells_are_escaped(tmp_path):
    rows = [
        {"path": '=HYPERLINK("http://evil.example","x").png', "error": "not a recognised image format"},
        {"path": "+1.png", "error": "-oops"},
        {"path": "@SUM(A1).png", "predicted": "normal", "probabilities": {"normal": 1.0}},
        {"path": "-2.png", "error": "x"},
        {"path": "plain/knee.png", "predicted": "normal", "probabilities": {"normal": 1.0}},
    ]
    write_csv(rows, tmp_path / "p.csv")
    with open(tmp_path / "p.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["path"] for r in got] == [
        '\'=HYPERLINK("http://evil.example","x").png',
        "'+1.png",
        "'@SUM(A1).png",
        "'-2.png",
        "plain/knee.png",
    ]
    assert got[1]["error"] == "'-oops"
    assert got[2]["p_normal"] == "1.000000"


def test_formula_named_input_through_the_cli(model_path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    knee_png(tmp_path / '=HYPERLINK("evil.example","x").png')
    assert main(["predict", '=HYPERLINK("evil.example","x").png', "--model", str(model_path), "--csv", "p.csv"]) == 0
    with open(tmp_path / "p.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert row["path"] == '\'=HYPERLINK("evil.example","x").png' and row["predicted"] in DEFAULT_CLASSES


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_input_is_skipped_not_waited_for(model_path, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    image = knee_png(tmp_path / "knee.png")
    try:
        result = run_cli(
            str(fifo), str(image), "--model", str(model_path), "--json", "out.json", cwd=tmp_path, timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail("predict waited on a FIFO")
    assert result.returncode == 0, result.stderr
    assert our_lines(result.stderr) == [f"{fifo}: a FIFO, not an image file; skipped"]
    rows = {Path(r["path"]).name: r for r in json.loads((tmp_path / "out.json").read_text())}
    assert rows["pipe.png"]["error"] == "a FIFO, not an image file; skipped"
    assert rows["knee.png"]["predicted"] in DEFAULT_CLASSES
