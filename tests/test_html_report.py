"""reports/report.html: one file, figures inlined, the summary's table with CIs, no external reference."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kneexray.report.figures import format_with_ci, summary_markdown
from kneexray.report.html_page import write_report
from tests.support import ROOT

FIGURES = ("figures/cnn_curves.png", "figures/cnn_confusion.png", "figures/resnet_roc.png")


def png(path: Path, colour: tuple[int, int, int], size=(6, 4)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path.read_bytes()


@pytest.fixture
def reports(tmp_path) -> Path:
    """A reports folder: the committed metrics, audit and split; tiny figures; the summary."""
    folder = tmp_path / "reports"
    folder.mkdir()
    for name in ("metrics.json", "data_audit.json", "split.json"):
        shutil.copy(ROOT / "reports" / name, folder / name)
    for i, figure in enumerate(FIGURES):
        png(folder / figure, (40 * i, 100, 200))
    png(folder / "data_audit_pairs.png", (250, 250, 0), size=(8, 8))
    summary = summary_markdown(
        json.loads((folder / "metrics.json").read_text()),
        json.loads((folder / "data_audit.json").read_text()),
        json.loads((folder / "split.json").read_text()),
        list(FIGURES),
    )
    (folder / "README.md").write_text(summary)
    return folder


def build(reports: Path) -> Path:
    return write_report(
        reports / "report.html",
        reports / "README.md",
        attachments={
            "reports/data_audit.json": reports / "data_audit.json",
            "reports/split.json": reports / "split.json",
        },
    )


def test_report_is_one_self_contained_file(reports):
    page = build(reports).read_text()

    # every figure, and the linked audit pairs, inlined byte for byte, in the summary's order
    sources = re.findall(r'<img src="([^"]*)"', page)
    expected = [(reports / f).read_bytes() for f in FIGURES] + [(reports / "data_audit_pairs.png").read_bytes()]
    assert [s.split(",", 1)[0] for s in sources] == ["data:image/png;base64"] * len(expected)
    assert [base64.b64decode(s.split(",", 1)[1]) for s in sources] == expected
    # the link to the pairs picture is an in-page anchor that exists
    anchors = re.findall(r'href="#([^"]+)"', page)
    assert anchors and all(f'id="{a}"' in page for a in anchors)
    # nothing to fetch, nothing to run
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert "<script" not in page and "<link" not in page and "http" not in page

    metrics = json.loads((reports / "metrics.json").read_text())
    for model in ("cnn", "resnet"):
        for name in ("accuracy", "macro_f1", "macro_auc"):
            assert f"<td>{format_with_ci(metrics[model], name)}</td>" in page
    assert page.count("<table>") == 4  # models, baselines, models against the best baseline, split
    # the audit and split reports attached, in full
    for name in ("data_audit.json", "split.json"):
        data = json.loads((reports / name).read_text())
        assert html.escape(json.dumps(data, indent=2, sort_keys=True)) in page


def test_report_bytes_depend_only_on_inputs(reports):
    first = build(reports).read_bytes()
    assert build(reports).read_bytes() == first
    png(reports / FIGURES[0], (1, 2, 3))
    assert build(reports).read_bytes() != first


def test_missing_figure_fails_and_writes_nothing(reports):
    (reports / FIGURES[1]).unlink()
    with pytest.raises(FileNotFoundError, match="cnn_confusion.png"):
        build(reports)
    assert not (reports / "report.html").exists()
    assert not list(reports.glob(".report.html*"))  # no temporary file left behind


def test_summary_text_is_escaped_not_interpreted(tmp_path):
    (tmp_path / "README.md").write_text("# Results\n\nA <script>alert(1)</script> and [a site](https://example.org).\n")
    page = write_report(tmp_path / "report.html", tmp_path / "README.md").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'href="https://example.org"' in page  # a link a person may follow; nothing loads it


def test_plot_stage_writes_the_report(reports):
    """The stage's --html glue, run as dvc.yaml runs it, with figure drawing (tested elsewhere) stubbed."""
    r = reports
    args = [
        sys.executable,
        "-c",
        "import runpy, kneexray.report.figures as plots; plots.make_figures = lambda **kw: []; "
        "runpy.run_module('stages.plot', run_name='__main__')",
        "--metrics",
        r / "metrics.json",
        "--eval",
        r / "eval",
        "--live",
        f"cnn={r}/train/cnn",
        "--audit",
        r / "data_audit.json",
        "--split-report",
        r / "split.json",
        "--figures",
        r / "figures",
        "--summary",
        r / "README.md",
        "--html",
        r / "report.html",
        "--params",
        ROOT / "params.yaml",
    ]
    subprocess.run([str(a) for a in args], cwd=ROOT, check=True, capture_output=True, text=True)
    page = (r / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == len(FIGURES) + 1
    assert "<code>" + html.escape(str(r / "split.json")) + "</code>" in page
