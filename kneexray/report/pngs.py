"""`dvc plots show/diff --json` rendered to PNG files with no browser and no network (vl-convert),
for places that show pictures but run no JavaScript: a pull-request comment, a CI artifact.

    dvc plots diff main --json > plots.json
    python -m kneexray.report.pngs plots.json --out exp_plots
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from kneexray.atomic import write_bytes
from kneexray.errors import InputError


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_") or "plot"


def render(plots: dict, out_dir: str | Path) -> list[Path]:
    """One PNG per vega plot of DVC's JSON (its `data` mapping of title -> renderings)."""
    import vl_convert

    if not isinstance(plots, dict) or not isinstance(plots.get("data"), dict):
        raise InputError("not the JSON of `dvc plots show/diff --json` (no 'data' mapping)")
    out_dir = Path(out_dir)
    written = []
    for title, renderings in plots["data"].items():
        for rendering in renderings:
            if rendering.get("type") != "vega":
                continue  # the PNG figures DVC lists are files already
            path = out_dir / f"{_slug(title)}.png"
            write_bytes(path, vl_convert.vegalite_to_png(rendering["content"], scale=1))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plots_json", help="output of `dvc plots show --json` or `dvc plots diff --json`")
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    args = parser.parse_args(argv)
    try:
        written = render(json.loads(Path(args.plots_json).read_text()), args.out)
    except (InputError, OSError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
