"""reports/report.html: the results in one self-contained HTML file that opens by double-click.

The content is the plot stage's Markdown summary (reports/README.md: the model table with CIs, the
data audit, the split, every figure), rendered to HTML, so the two cannot disagree. Images become
base64 data URIs; links to local images (the audit's flagged pairs) point at a copy embedded at the
end; the data audit and split reports are attached as JSON. No script and no external request.

Why PNGs and not vega views: the figures are the PNGs the plot stage already draws for
reports/README.md (training curves, confusion matrices, ROC, reliability, Grad-CAM: every plot of
dvc.yaml), byte-stable, so the report's bytes depend only on the results. Inline vega views would
need the vl-convert bundle when the stage runs and make the output depend on whether it is
there, and add 800 kB of JavaScript; `dvc plots show` (offline template, kneexray/report/offline_template.py)
is the interactive view.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import mimetypes
from pathlib import Path
from urllib.parse import unquote, urlsplit

from markdown_it import MarkdownIt

from kneexray.atomic import write_text
from kneexray.errors import MissingInputError

log = logging.getLogger("kneexray.report.html_page")

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; }
h1, h2, h3 { line-height: 1.2; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; }
code { background: #f3f3f3; padding: 0 0.2em; border-radius: 3px; }
img { display: inline-block; vertical-align: top; max-width: 100%; margin: 0.5em 0.5em 0.5em 0;
      border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
footer { margin-top: 3em; color: #777; font-size: 0.9em; }
"""


def _local(url: str) -> bool:
    parts = urlsplit(url)
    return not parts.scheme and not parts.netloc and bool(parts.path)


def data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _anchor(path: Path) -> str:
    return "file-" + "".join(c if c.isalnum() else "-" for c in path.stem)


def markdown_to_html(markdown: str, base_dir: str | Path) -> tuple[str, list[Path]]:
    """HTML body for the summary, with local images inlined as data URIs and local image links
    turned into in-page anchors; also returns the linked image files, to embed."""
    base_dir = Path(base_dir)
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    linked: list[Path] = []
    for token in tokens:
        for child in token.children or ():
            if child.type == "image" and _local(src := str(child.attrGet("src"))):
                child.attrSet("src", data_uri(base_dir / unquote(src)))
            elif child.type == "link_open" and _local(href := str(child.attrGet("href"))):
                target = base_dir / unquote(href)
                if (mimetypes.guess_type(target.name)[0] or "").startswith("image/"):
                    if not target.is_file():
                        raise MissingInputError(f"{target}: linked from the summary, not found")
                    linked.append(target)
                    child.attrSet("href", f"#{_anchor(target)}")
    return md.renderer.render(tokens, md.options, {}), linked


def report_html(
    summary_path: str | Path, attachments: dict[str, str | Path] | None = None, title: str = "kneexray results"
) -> str:
    """The whole page: the rendered summary, linked images, then each JSON attachment (a label and
    a path) shown in a collapsible block."""
    summary_path = Path(summary_path)
    body, linked = markdown_to_html(summary_path.read_text(encoding="utf-8"), summary_path.parent)
    parts = [body]
    if linked:
        parts.append("<h2>Linked images</h2>")
        for path in dict.fromkeys(linked):
            parts.append(
                f'<h3 id="{_anchor(path)}">{html.escape(path.name)}</h3>\n'
                f'<img src="{data_uri(path)}" alt="{html.escape(path.stem)}">'
            )
    if attachments:
        parts.append("<h2>Reports</h2>")
        for label, attached in attachments.items():
            content = json.dumps(json.loads(Path(attached).read_text(encoding="utf-8")), indent=2, sort_keys=True)
            parts.append(
                f"<details open><summary><code>{html.escape(label)}</code></summary>\n"
                f"<pre>{html.escape(content)}</pre></details>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(parts)
        + "\n<footer>Written by the <code>plot</code> stage (kneexray/report/html_page.py); "
        "one file, no network needed.</footer>\n</body>\n</html>\n"
    )


def write_report(
    out_path: str | Path, summary_path: str | Path, attachments: dict[str, str | Path] | None = None
) -> Path:
    """Write the report atomically; returns its path."""
    page = report_html(summary_path, attachments)
    write_text(out_path, page)
    log.info("wrote %s (%d kB)", out_path, len(page) // 1024)
    return Path(out_path)
