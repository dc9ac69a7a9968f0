"""An HTML template for `dvc plots show` / `dvc plots diff` whose pages render with no network.

DVC's default page loads vega, vega-lite and vega-embed from a public CDN, so offline it opens
blank. DVC accepts a page template of our own (`plots.html_template`, a path relative to `.dvc/`)
in which it replaces `{plot_divs}` (and `{scripts}`, `{refresh_tag}` where present). This module
writes one that inlines the three libraries' minified builds, installed from the npm registry at
pinned versions (package.json / package-lock.json, `npm ci`), and leaves out `{scripts}`, which is
where DVC would put its CDN <script> tags (only the vega renderer has any; images have none).

    python -m kneexray.offline_plots            # what `make` runs after `npm ci`

writes build/dvc_plots_template.html and points `.dvc/config.local` at it. The setting is local to
the clone, not committed: where the template has not been built (no Node.js), DVC keeps its default
CDN page instead of failing on a configured template that does not exist.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from kneexray.atomic import write_text

log = logging.getLogger("kneexray.offline_plots")

# Load order matters: vega-lite needs the `vega` global, vega-embed needs both.
LIBRARIES = ("vega", "vega-lite", "vega-embed")
DEFAULT_NODE_MODULES = Path("node_modules")
DEFAULT_TEMPLATE = Path("build/dvc_plots_template.html")
DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- {versions}: inlined by kneexray/offline_plots.py, so the page needs no network -->
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


def library_script(node_modules: str | Path, name: str) -> tuple[str, str]:
    """(version, an inline <script> element) for one npm package's minified browser build."""
    package = Path(node_modules) / name
    if not (package / "package.json").is_file():
        raise FileNotFoundError(f"{package}: not installed (run `npm ci` in the repository root, or `make setup`)")
    version = json.loads((package / "package.json").read_text(encoding="utf-8"))["version"]
    source = (package / "build" / f"{name}.min.js").read_text(encoding="utf-8")
    for placeholder in DVC_PLACEHOLDERS:
        if placeholder in source:  # DVC would replace it inside the JavaScript
            raise ValueError(f"{name}@{version} contains DVC's placeholder {placeholder}; it cannot be inlined")
    if "<!--" in source:  # would switch the HTML parser into its escaped script state
        raise ValueError(f"{name}@{version} contains '<!--'; it cannot be inlined safely")
    # "</script" would end the element early; "<\/script" means the same inside strings and regexes.
    source = source.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")
    return version, f"    <script>/* {name}@{version} */\n{source}\n    </script>"


def template_html(node_modules: str | Path = DEFAULT_NODE_MODULES) -> str:
    """The page template: DVC's default page, with the libraries inline instead of `{scripts}`."""
    versions, scripts = zip(*(library_script(node_modules, name) for name in LIBRARIES))
    return PAGE.format(versions=", ".join(f"{n}@{v}" for n, v in zip(LIBRARIES, versions)),
                       inline_scripts="\n".join(scripts), refresh_tag="{refresh_tag}", plot_divs="{plot_divs}")


def install(repo: str | Path = ".", node_modules: str | Path | None = None, template: str | Path | None = None) -> Path:
    """Write the template (relative paths are taken from `repo`) and set `plots.html_template` in
    the repo's `.dvc/config.local`. Returns the template's path."""
    repo = Path(repo).resolve()
    node_modules = repo / (node_modules or DEFAULT_NODE_MODULES)
    template = repo / (template or DEFAULT_TEMPLATE)
    write_text(template, template_html(node_modules))
    # DVC reads a relative html_template from the .dvc folder.
    setting = os.path.relpath(template, repo / ".dvc")
    subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", setting],
                   cwd=repo, check=True, capture_output=True, text=True)
    log.info("wrote %s (%d kB); plots.html_template = %s in .dvc/config.local",
             template, template.stat().st_size // 1024, setting)
    return template


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=".", help="the DVC repository (default: .)")
    parser.add_argument("--node-modules", default=str(DEFAULT_NODE_MODULES),
                        help=f"npm's install folder, relative to --repo (default: {DEFAULT_NODE_MODULES})")
    parser.add_argument("--out", default=str(DEFAULT_TEMPLATE),
                        help=f"template to write, relative to --repo (default: {DEFAULT_TEMPLATE})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        install(args.repo, args.node_modules, args.out)
    except (FileNotFoundError, ValueError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or ""
        sys.exit(f"error: {err} {detail}".strip())


if __name__ == "__main__":
    main()
