"""Run the whole pipeline on the real knee X-rays the way a user would, and report what it finds.

It packs ../shared/data/knee-xray-mendeley as the published nested ZIP, serves it over HTTP on
127.0.0.1, and runs `dvc exp run -S dataset.source=url -S dataset.url=...` in a scratch clone of
this repository, so fetch, extract, split, both trainings, evaluate and plot all run on real data.
The data is read from its shared path and never copied into the project.

    python bench/real_data.py [--data ../shared/data/knee-xray-mendeley] [--set key=value ...]

Prints a JSON summary (audit, split counts, per-stage wall time, metrics with 95% CIs) and writes it
to bench/results/real_data.json.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pack_nested_zip(folder: Path, out: Path) -> None:
    """outer.zip -> Knee-X-ray.zip -> Knee-X-ray/<class>/*, plus the patient table, as published."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, f"Knee-X-ray/{path.relative_to(folder).as_posix()}")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("Knee-X-ray.zip", inner.getvalue())


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/dataset.zip"


def stage_times(log: str) -> dict[str, float]:
    """Wall time per stage from the stage scripts' 'done in X s' lines."""
    times, current = {}, None
    for line in log.splitlines():
        if m := re.match(r"Running stage '(\w+)'", line):
            current = m.group(1)
        elif (m := re.search(r"kneexray: done in ([\d.]+) s", line)) and current:
            times[current] = float(m.group(1))
    return times


def shortcut_check(repo: Path) -> dict:
    """A size-and-mode-only classifier on the same split, and each model within one size/mode stratum."""
    import pandas as pd

    sys.path.insert(0, str(ROOT))
    from kneexray.shortcuts import largest_stratum_scores, metadata_only_macro_f1

    index = pd.read_csv(repo / "data/extracted/index.csv")
    train = pd.read_csv(repo / "data/split/train.csv")
    test = pd.read_csv(repo / "data/split/test.csv")
    out = {"metadata_only_macro_f1": metadata_only_macro_f1(index, train["path"], test["path"])}
    for model in ("cnn", "resnet"):
        out[model] = largest_stratum_scores(index, pd.read_csv(repo / f"reports/eval/{model}/predictions.csv"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/knee-xray-mendeley"))
    parser.add_argument("--set", action="append", default=[], help="extra `dvc exp run -S` overrides")
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "normal").is_dir():
        sys.exit(f"error: {data} does not hold the real dataset (normal/, osteopenia/, osteoporosis/)")

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    with tempfile.TemporaryDirectory(prefix="kneexray-real-") as scratch:
        scratch = Path(scratch)
        (scratch / "www").mkdir()
        pack_nested_zip(data, scratch / "www" / "dataset.zip")
        server, url = serve(scratch / "www")
        repo = scratch / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
        overrides = ["-S", "dataset.source=url", "-S", f"dataset.url={url}"]
        for item in args.set:
            overrides += ["-S", item]
        started = time.perf_counter()
        result = subprocess.run(["dvc", "exp", "run", *overrides], cwd=repo, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        server.shutdown()
        log = result.stdout + result.stderr
        if result.returncode != 0:
            sys.exit(f"dvc exp run failed:\n{log[-5000:]}")
        read = lambda name: json.loads((repo / "reports" / name).read_text())  # noqa: E731
        summary = {
            "command": "dvc exp run " + " ".join(overrides),
            "wall_s": round(wall, 1),
            "stage_s": stage_times(log),
            "audit": read("data_audit.json"),
            "split": read("split.json"),
            "metrics": read("metrics.json"),
            "results_table": (repo / "reports" / "README.md").read_text(),
            "shortcut_check": shortcut_check(repo),
        }
    out = ROOT / "bench" / "results" / "real_data.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "results_table"}, indent=2))
    print(summary["results_table"])


if __name__ == "__main__":
    main()
