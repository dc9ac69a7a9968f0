"""The offline `dvc plots show` template, built from vl-convert-python alone (no Node.js, no npm)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from dvc_render.html import render_html

from kneexray.report import offline_template
from tests.support import run

FAKE_VERSIONS = {"vega": "1.0.0", "vega-lite": "5.9", "vega-embed": "2.0.0"}
FAKE_BUNDLE = 'window.vega = {}; window.vegaLite = {}; window.vegaEmbed = function () { return "</script>"; };'


def external_scripts(html: str) -> list[str]:
    return re.findall(r"<script[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//[^\"'\s>]*", html, flags=re.IGNORECASE)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """`python -m kneexray.report.offline_template` run in a fresh DVC repo with no node_modules anywhere near."""
    repo = tmp_path_factory.mktemp("offline_plots") / "repo"
    repo.mkdir()
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["dvc", "init", "-q"], repo)
    assert not (repo / "node_modules").exists()
    offline_template.main(["--repo", str(repo), "--out", "build/template.html"])
    return repo, (repo / "build/template.html").read_text(encoding="utf-8")


def test_template_inlines_vega_vega_lite_and_vega_embed_from_vl_convert(built):
    repo, template = built
    versions, _ = offline_template.bundle()
    assert versions["vega-lite"].startswith(f"{offline_template.VEGA_LITE_MAJOR}.")
    for name in offline_template.LIBRARIES:
        assert f"{name}@{versions[name]}" in template
    for name in offline_template.GLOBALS:  # the bundle puts all three on window; DVC's pages call vegaEmbed
        assert f"window.{name}=" in template.replace(" ", "")
    assert "BSD-3-Clause" in template  # the licence comment
    assert offline_template.CANVAS_DEFAULT in template  # vega-embed 7 would draw SVG; DVC's page drew canvas
    assert len(template) > 500_000  # the real libraries, not a stub
    assert external_scripts(template) == [] and "{scripts}" not in template
    assert "cdn.jsdelivr" not in template
    assert (repo / ".dvc/config.local").read_text().count("html_template = ../build/template.html") == 1


def test_dvc_fills_the_template(built, tmp_path):
    _, template = built
    (tmp_path / "template.html").write_text(template, encoding="utf-8")
    page = Path(render_html([], tmp_path / "out" / "index.html", tmp_path / "template.html")).read_text()
    assert "{plot_divs}" not in page and "{refresh_tag}" not in page and "{scripts}" not in page
    assert page.count("<script>") == 1 and external_scripts(page) == []


def test_script_end_tags_are_escaped():
    template = offline_template.template_html(FAKE_VERSIONS, FAKE_BUNDLE)
    assert '"<\\/script>"' in template and '"</script>"' not in template
    assert "vega@1.0.0, vega-lite@5.9, vega-embed@2.0.0" in template


@pytest.mark.parametrize(
    "source",
    [
        "x = '{plot_divs}'; " + FAKE_BUNDLE,
        "x = '<!--'; " + FAKE_BUNDLE,
        FAKE_BUNDLE.replace("window.vegaEmbed", "window.embed"),
    ],
)
def test_template_refuses_what_it_cannot_inline(source):
    with pytest.raises(ValueError):
        offline_template.template_html(FAKE_VERSIONS, source)


def test_vega_lite_version_is_the_newest_of_the_major():
    assert offline_template.vega_lite_version(["5.8", "5.21", "5.9", "6.4"]) == "5.21"
    with pytest.raises(ValueError):
        offline_template.vega_lite_version(["6.1", "6.4"])
