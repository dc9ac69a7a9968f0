"""An HTML template for `dvc plots show` / `dvc plots diff` whose pages render with no network.

DVC's default page loads vega, vega-lite and vega-embed from a public CDN, so offline it opens
blank. DVC accepts a page template of our own (`plots.html_template`, a path relative to `.dvc/`)
in which it replaces `{plot_divs}` (and `{scripts}`, `{refresh_tag}` where present). This module
writes one that inlines the three libraries, taken from the `vl-convert-python` wheel pinned in
requirements.txt (`vl_convert.javascript_bundle()`: one minified script, dependencies included,
that sets the `vega`, `vegaLite` and `vegaEmbed` globals), and leaves out `{scripts}`, which is
where DVC would put its CDN <script> tags (only the vega renderer has any; images have none).
No Node.js or npm is involved.

    python -m kneexray.report.offline_template            # what `make setup` runs

writes build/dvc_plots_template.html and points `.dvc/config.local` at it. The setting is local to
the clone, not committed: where the template has not been built, DVC keeps its default CDN page
instead of failing on a configured template that does not exist.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from kneexray.atomic import write_text
from kneexray.errors import InputError, MissingInputError

log = logging.getLogger("kneexray.report.offline_template")

LIBRARIES = ("vega", "vega-lite", "vega-embed")
GLOBALS = ("vega", "vegaLite", "vegaEmbed")  # what the bundle sets on window; DVC's pages call vegaEmbed
# DVC's vega specs declare "$schema": ".../vega-lite/v5.json"; vega-embed warns when the inlined
# Vega-Lite has another major version, so the bundle gets the newest 5.x that vl-convert ships.
VEGA_LITE_MAJOR = 5
DEFAULT_TEMPLATE = Path("build/dvc_plots_template.html")
DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")
# vega-embed 7 (vl-convert's) draws SVG unless told otherwise; vega-embed 6 (DVC's CDN page, and this
# template before it came from vl-convert) drew on a canvas. DVC calls `vegaEmbed('#id', spec)` with no
# options, so the page wraps vegaEmbed to keep the canvas as the default; options passed still win.
CANVAS_DEFAULT = (
    "(function (embed) {\n"
    "    window.vegaEmbed = Object.assign(function (el, spec, opts) {\n"
    '        return embed(el, spec, Object.assign({renderer: "canvas"}, opts));\n'
    "    }, embed);\n"
    "})(window.vegaEmbed);"
)
LICENCES = (
    "vega, vega-lite, vega-embed: BSD-3-Clause, (c) University of Washington Interactive Data Lab; "
    "bundled by vl-convert (BSD-3-Clause, (c) Jon Mease) with their dependencies "
    "(d3 modules and others, under ISC, MIT and BSD licences)"
)

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- {versions}: inlined by kneexray/report/offline_template.py from vl-convert-python {vl_convert},
         so the page needs no network.
         Licences: {licences}. -->
{inline_scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def vega_lite_version(available: list[str], major: int = VEGA_LITE_MAJOR) -> str:
    """The newest of vl-convert's Vega-Lite versions ("5.21", ...) with that major version."""
    matching = [v for v in available if v.split(".")[0] == str(major)]
    if not matching:
        raise InputError(f"vl-convert ships no Vega-Lite {major}.x (it has {', '.join(available)})")
    return max(matching, key=lambda v: tuple(int(part) for part in v.split(".")))


def bundle() -> tuple[dict[str, str], str]:
    """({library: version}, the minified JavaScript) from the installed vl-convert-python."""
    try:
        import vl_convert
    except ImportError as err:
        raise MissingInputError(
            "vl-convert-python is not installed (pip install -r requirements.txt, or `make setup`)"
        ) from err
    vl_version = vega_lite_version(vl_convert.get_vegalite_versions())
    versions = {
        "vega": vl_convert.get_vega_version(),
        "vega-lite": vl_version,
        "vega-embed": vl_convert.get_vega_embed_version(),
    }
    # the stub marks `snippet` required; the function takes it as optional (no snippet: the bare libraries)
    return versions, vl_convert.javascript_bundle(vl_version=vl_version)  # type: ignore[call-arg]


def inline_script(label: str, source: str) -> str:
    """An inline <script> element holding `source`, made safe to put in the page and for DVC to fill."""
    for placeholder in DVC_PLACEHOLDERS:
        if placeholder in source:  # DVC would replace it inside the JavaScript
            raise InputError(f"{label} contains DVC's placeholder {placeholder}; it cannot be inlined")
    if "<!--" in source:  # would switch the HTML parser into its escaped script state
        raise InputError(f"{label} contains '<!--'; it cannot be inlined safely")
    for name in GLOBALS:
        if f"window.{name}=" not in source.replace(" ", ""):
            raise InputError(f"{label} does not set the global {name}, which DVC's pages need")
    # "</script" would end the element early; "<\/script" means the same inside strings and regexes.
    source = source.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")
    return f"    <script>/* {label} */\n{source}\n{CANVAS_DEFAULT}\n    </script>"


def template_html(versions: dict[str, str] | None = None, source: str | None = None) -> str:
    """The page template: DVC's default page, with the libraries inline instead of `{scripts}`.
    By default the libraries come from vl-convert (`bundle()`)."""
    if versions is None or source is None:
        versions, source = bundle()
    label = ", ".join(f"{name}@{versions[name]}" for name in LIBRARIES)
    try:
        from importlib.metadata import version

        vl_convert = version("vl-convert-python")
    except Exception:  # noqa: BLE001 - only a comment in the page
        vl_convert = "(version unknown)"
    return PAGE.format(
        versions=label,
        vl_convert=vl_convert,
        licences=LICENCES,
        inline_scripts=inline_script(label, source),
        refresh_tag="{refresh_tag}",
        plot_divs="{plot_divs}",
    )


def install(repo: str | Path = ".", template: str | Path | None = None) -> Path:
    """Write the template (a relative path is taken from `repo`) and set `plots.html_template` in
    the repo's `.dvc/config.local`. Returns the template's path."""
    repo = Path(repo).resolve()
    template = repo / (template or DEFAULT_TEMPLATE)
    write_text(template, template_html())
    # DVC reads a relative html_template from the .dvc folder.
    setting = os.path.relpath(template, repo / ".dvc")
    subprocess.run(
        [sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", setting],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    )
    log.info(
        "wrote %s (%d kB); plots.html_template = %s in .dvc/config.local",
        template,
        template.stat().st_size // 1024,
        setting,
    )
    return template


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=".", help="the DVC repository (default: .)")
    parser.add_argument(
        "--out",
        default=str(DEFAULT_TEMPLATE),
        help=f"template to write, relative to --repo (default: {DEFAULT_TEMPLATE})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        install(args.repo, args.out)
    except (FileNotFoundError, ValueError, RuntimeError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or ""
        sys.exit(f"error: {err} {detail}".strip())


if __name__ == "__main__":
    main()
