"""The plots pages render with no network: DVC's (through our template) and reports/report.html.

The template on its own is checked in tests/test_offline_plots.py. Here `dvc plots show` and
`dvc plots diff` run on the committed reports in a scratch DVC repo with the real plot definitions
and the template installed as `make setup` installs it (from vl-convert: no npm), and headless
Chromium, with every request sent to a dead proxy, opens those pages and the HTML report: every vega
view must have drawn, every image decoded, and no request may have left the machine. Screenshots go to
$KNEEXRAY_TEST_ARTIFACTS (or pytest's temporary folder); their paths are printed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from kneexray.report import offline_template
from kneexray.report.html_page import write_report
from tests.browser import IMAGES_DECODED, Browser, BrowserError, find_chromium
from tests.support import ROOT, run

pytestmark = pytest.mark.slow  # not in make test-fast

PLOT_DEFINITIONS = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
VEGA_PLOTS = sum(isinstance(p, dict) for p in PLOT_DEFINITIONS)
IMAGE_PLOTS = len(list((ROOT / "reports/figures").glob("*.png"))) + 1  # + data_audit_pairs.png

needs_browser = pytest.mark.skipif(
    find_chromium() is None, reason="no Chromium installed (apt-get install chromium); .ci/run installs it"
)


@pytest.fixture(scope="module")
def plots_pages(tmp_path_factory) -> dict[str, Path]:
    """`dvc plots show` and `dvc plots diff` pages of the committed reports, with the offline template
    installed as `make setup` installs it."""
    repo = tmp_path_factory.mktemp("plots") / "repo"
    repo.mkdir()
    shutil.copytree(ROOT / "reports", repo / "reports")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": PLOT_DEFINITIONS}, sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "reports"], repo)
    offline_template.install(repo)
    assert "html_template" in (repo / ".dvc/config.local").read_text()
    assert "html_template" not in (repo / ".dvc/config").read_text()
    # a changed calibration in the workspace, so that the diff has two revisions to show
    calibration = repo / "reports/eval/cnn/calibration.csv"
    calibration.write_text(calibration.read_text().replace("0.", "0.0"))
    run(["dvc", "plots", "show", "-o", "show"], repo)
    run(["dvc", "plots", "diff", "HEAD", "-o", "diff"], repo)
    pages = {"show": repo / "show/index.html", "diff": repo / "diff/index.html"}
    for page in pages.values():
        text = page.read_text()
        assert "cdn.jsdelivr" not in text and "<script src" not in text
        assert text.count("vegaEmbed('#") == VEGA_PLOTS
    return pages


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """reports/report.html, written from the committed summary, figures and audit."""
    folder = tmp_path_factory.mktemp("report") / "reports"
    shutil.copytree(ROOT / "reports", folder, ignore=shutil.ignore_patterns("report.html"))
    return write_report(
        folder / "report.html",
        folder / "README.md",
        attachments={
            "reports/data_audit.json": folder / "data_audit.json",
            "reports/split.json": folder / "split.json",
        },
    )


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("KNEEXRAY_TEST_ARTIFACTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    with Browser(width=1280, height=900, timeout=60) as chromium:
        yield chromium


# Per vega view: what it drew. A canvas counts pixels that differ from its corner (the background).
VEGA_VIEWS = """[...document.querySelectorAll('.vega-embed')].map(view => {
  const canvas = view.querySelector('canvas'), svg = view.querySelector('svg.marks');
  if (canvas && canvas.width && canvas.height) {
    const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let drawn = 0;
    for (let i = 0; i < px.length; i += 4)
      if (px[i] !== px[0] || px[i + 1] !== px[1] || px[i + 2] !== px[2] || px[i + 3] !== px[3]) drawn++;
    return {id: view.id, kind: 'canvas', drawn};
  }
  if (svg) return {id: view.id, kind: 'svg', drawn: svg.querySelectorAll('path, rect, line, text').length};
  return {id: view.id, kind: null, drawn: 0};
})"""
ALL_DRAWN = f"(() => {{ const v = {VEGA_VIEWS}; return v.length === {VEGA_PLOTS} && v.every(x => x.drawn > 500) }})()"


def open_offline(browser: Browser, page: Path, screenshot: Path, ready: str, state: str = "null") -> None:
    """Open a page, wait until `ready` is true (else fail, showing the JavaScript `state`), screenshot
    it, and check that nothing went to the network and nothing threw."""
    browser.events.clear()
    browser.open(page)
    try:
        browser.wait_for(ready, timeout=60)
    except BrowserError as err:
        pytest.fail(f"{page}: {err}\nstate: {browser.evaluate(state)}\nerrors: {browser.errors()}")
    finally:
        browser.screenshot(screenshot)
        print(f"screenshot: {screenshot}")
    assert browser.external() == []
    assert browser.errors() == []
    assert browser.requested_urls()  # the request log is live: the page itself is in it


@needs_browser
@pytest.mark.parametrize("command", ["show", "diff"])
def test_dvc_plots_render_offline(plots_pages, browser, artifacts, command):
    open_offline(
        browser,
        plots_pages[command],
        artifacts / f"dvc_plots_{command}.png",
        f"{ALL_DRAWN} && {IMAGES_DECODED}",
        state=VEGA_VIEWS,
    )
    views = browser.evaluate(VEGA_VIEWS)
    assert len(views) == VEGA_PLOTS and all(v["kind"] and v["drawn"] > 500 for v in views), views
    images = browser.evaluate("[...document.images].map(i => i.naturalWidth)")
    revisions = 2 if command == "diff" else 1
    assert len(images) == IMAGE_PLOTS * revisions and all(images), images


@needs_browser
def test_html_report_renders_offline(report, browser, artifacts):
    open_offline(browser, report, artifacts / "report.png", IMAGES_DECODED)
    images = browser.evaluate("[...document.images].map(i => [i.naturalWidth, i.src.slice(0, 22)])")
    assert len(images) == IMAGE_PLOTS and all(w > 0 and src == "data:image/png;base64," for w, src in images)
    assert (
        browser.evaluate("document.querySelectorAll('table').length") == 4
    )  # models, baselines, models against the best baseline, split
    assert browser.evaluate("document.querySelectorAll('script').length") == 0
