"""Run the whole pipeline on the real knee X-rays the way a user would, and report what it finds.

    python -m bench.real_data [--seeds 42,1,2,3,4] [--train-seeds 42,7] [--jobs 1] [--set key=value ...]

Reads --data (default bench.REAL_DATA); writes bench/results/real_data.json. Details: docs/benchmarks.md.
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

from bench import REAL_DATA, ROOT


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


def stage_stats(log: str) -> dict[str, dict[str, float]]:
    """Wall time and peak memory per stage from the stage scripts' 'done in X s, peak memory Y MiB' lines."""
    stats, current = {}, None
    for line in log.splitlines():
        if m := re.match(r"Running stage '(\w+)'", line):
            current = m.group(1)
        elif (m := re.search(r"kneexray: done in ([\d.]+) s(?:, peak memory ([\d.]+) MiB)?", line)) and current:
            stats[current] = {"wall_s": float(m.group(1))}
            if m.group(2):
                stats[current]["peak_mib"] = float(m.group(2))
    return stats


def stage_times(log: str) -> dict[str, float]:
    return {stage: value["wall_s"] for stage, value in stage_stats(log).items()}


def shortcut_check(repo: Path) -> dict:
    """A size-and-mode-only classifier on the same split, and each model within one size/mode stratum."""
    import pandas as pd

    from bench.shortcuts import largest_stratum_scores, metadata_only_macro_f1

    index = pd.read_csv(repo / "data/extracted/index.csv")
    train = pd.read_csv(repo / "data/split/train.csv")
    test = pd.read_csv(repo / "data/split/test.csv")
    out = {"metadata_only_macro_f1": metadata_only_macro_f1(index, train["path"], test["path"])}
    for model in ("cnn", "resnet"):
        out[model] = largest_stratum_scores(index, pd.read_csv(repo / f"reports/eval/{model}/predictions.csv"))
    return out


SEED_METRICS = ("accuracy", "macro_f1", "macro_auc", "osteoporosis_recall")


def seed_metrics(metrics: dict) -> dict[str, dict[str, float]]:
    """The per-model figures compared across runs, the baselines among them."""
    models = {model: m for model, m in metrics.items() if isinstance(m, dict) and "recall" in m}
    models.update({f"baseline_{name}": m for name, m in metrics.get("baselines", {}).items() if name != "chance"})
    out = {
        model: {
            "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"],
            "macro_auc": m["macro_auc"],
            "osteoporosis_recall": m["recall"]["osteoporosis"],
        }
        for model, m in models.items()
    }
    for model, m in models.items():
        out[model]["no_skill"] = float(
            m.get("no_skill", max(m["recall"].values()) == 1.0 and sum(m["recall"].values()) == 1.0)
        )
        if "vs_best_baseline" in m:
            out[model]["paired_ci_low"] = m["vs_best_baseline"]["low"]
        if "linear_probe" in m:  # the network's weight against the thumbnail probe in the saved model
            out[model]["network_weight"] = m["linear_probe"]["network_weight"]
    if "chance" in metrics.get("baselines", {}):
        out["chance"] = {"macro_f1": metrics["baselines"]["chance"]["macro_f1"]}
    return out


def run_counts(per_run: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, int]]:
    """Per model: runs with no skill, above chance, above the thumbnail baseline, and with a paired
    CI against the best baseline that lies wholly above zero."""
    out = {}
    for model in ("cnn", "resnet"):
        runs = [r for r in per_run.values() if model in r]
        out[model] = {
            "runs": len(runs),
            "no_skill": sum(int(r[model]["no_skill"]) for r in runs),
            "above_chance": sum(r[model]["macro_f1"] > r["chance"]["macro_f1"] for r in runs if "chance" in r),
            "above_thumbnail_baseline": sum(
                r[model]["macro_f1"] > r["baseline_thumbnail_logistic"]["macro_f1"]
                for r in runs
                if "baseline_thumbnail_logistic" in r
            ),
            "paired_ci_above_best_baseline": sum(r[model].get("paired_ci_low", -1) > 0 for r in runs),
        }
    return out


def spread_across_seeds(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict]]:
    """Mean, sample SD, min and max of each model's figures over the seeds."""
    import numpy as np

    models = sorted({model for figures in per_seed.values() for model in figures})
    out = {}
    for model in models:
        out[model] = {}
        for name in SEED_METRICS:
            values = np.array(
                [figures[model][name] for figures in per_seed.values() if name in figures.get(model, {})], float
            )
            if not len(values):
                continue
            out[model][name] = {
                "mean": round(float(values.mean()), 3),
                "sd": round(float(values.std(ddof=1)), 3) if len(values) > 1 else None,
                "min": round(float(values.min()), 3),
                "max": round(float(values.max()), 3),
                "n_seeds": int(len(values)),
            }
    return out


def seeds_table(spread: dict[str, dict[str, dict]]) -> str:
    lines = ["| model | " + " | ".join(SEED_METRICS) + " |", "|---|" + "---|" * len(SEED_METRICS)]
    for model, figures in spread.items():
        cells = [
            ""
            if f is None
            else f"{f['mean']:.3f} ± {f['sd']:.3f} [{f['min']:.3f}, {f['max']:.3f}]"
            if f["sd"] is not None
            else f"{f['mean']:.3f}"
            for f in (figures.get(name) for name in SEED_METRICS)
        ]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n(mean ± sample SD [min, max] over runs: split seeds x training seeds)\n"


def queue_status(repo: Path, env: dict) -> dict[str, str]:
    """Experiment name -> status (Queued, Running, Success, Failed) from `dvc queue status`."""
    out = subprocess.run(["dvc", "queue", "status"], cwd=repo, env=env, capture_output=True, text=True, check=True)
    status = {}
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[-1] in ("Queued", "Running", "Success", "Failed"):
            status[fields[1]] = fields[-1]
    return status


def wait_for_queue(repo: Path, env: dict, timeout_s: float = 24 * 3600, poll_s: float = 20) -> dict[str, str]:
    """Block until no queued experiment is Queued or Running; returns name -> final status."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = queue_status(repo, env)
        if not any(value in ("Queued", "Running") for value in status.values()):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"dvc queue still busy after {timeout_s:.0f} s: {status}")
        time.sleep(poll_s)


def run_queue(repo: Path, overrides: list[str], runs: list[tuple[int, int]], jobs: int, env: dict) -> dict[str, str]:
    """Queue one experiment per (split seed, training seed), run the queue, wait; returns name -> log."""
    names = {run: f"split-{run[0]}-train-{run[1]}" for run in runs}
    for (split_seed, train_seed), name in names.items():
        subprocess.run(
            [
                "dvc",
                "exp",
                "run",
                "--queue",
                "--name",
                name,
                *overrides,
                "-S",
                f"split.seed={split_seed}",
                "-S",
                f"train.seed={train_seed}",
            ],
            cwd=repo,
            env=env,
            check=True,
            capture_output=True,
        )
    subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=repo, env=env, check=True, capture_output=True)
    status = wait_for_queue(repo, env)
    logs = {
        name: subprocess.run(["dvc", "queue", "logs", name], cwd=repo, env=env, capture_output=True, text=True).stdout
        for name in names.values()
    }
    failed = [name for name in names.values() if status.get(name) != "Success"]
    if failed:
        sys.exit(f"queued experiments failed: {failed}\n" + "\n".join(log[-3000:] for log in logs.values()))
    return logs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REAL_DATA))
    parser.add_argument(
        "--seeds", default="42,1,2,3,4", help="split seeds, comma-separated; the first is reported in full"
    )
    parser.add_argument("--train-seeds", default="42,7", help="training seeds (train.seed), comma-separated")
    parser.add_argument("--jobs", type=int, default=1, help="`dvc queue start -j` (2 cores: 1 is fastest)")
    parser.add_argument("--set", action="append", default=[], help="extra `dvc exp run -S` overrides")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "real_data.json"), help="the JSON summary")
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "normal").is_dir():
        sys.exit(f"error: {data} does not hold the real dataset (normal/, osteopenia/, osteoporosis/)")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    runs = [(s, t) for s in seeds for t in (int(seed) for seed in args.train_seeds.split(","))]

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
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
        logs = run_queue(repo, overrides, runs, args.jobs, env)
        wall = time.perf_counter() - started
        server.shutdown()

        per_seed, first = {}, None
        for name in logs:
            # the experiment's outputs into the workspace, so the shortcut check can read its split
            subprocess.run(["dvc", "exp", "apply", name], cwd=repo, env=env, check=True, capture_output=True)
            read = lambda file: json.loads((repo / "reports" / file).read_text())  # noqa: E731
            per_seed[name] = seed_metrics(read("metrics.json"))
            if first is None:
                first = {
                    "run": name,
                    "stages": stage_stats(logs[name]),
                    "audit": read("data_audit.json"),
                    "split": read("split.json"),
                    "metrics": read("metrics.json"),
                    "results_table": (repo / "reports" / "README.md").read_text(),
                    "shortcut_check": shortcut_check(repo),
                }
        spread = spread_across_seeds(per_seed)
        summary = {
            "command": "dvc exp run --queue " + " ".join(overrides) + " -S split.seed=S -S train.seed=T; "
            "dvc queue start -j " + str(args.jobs),
            "seeds": seeds,
            "train_seeds": args.train_seeds,
            "queue_wall_s": round(wall, 1),
            "first_seed_run": first,
            "per_run": per_seed,
            "per_run_stages": {name: stage_stats(log) for name, log in logs.items()},
            "run_counts": run_counts(per_seed),
            "across_seeds": spread,
            "across_seeds_table": seeds_table(spread),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "first_seed_run"}, indent=2))
    print(first["results_table"])
    print(summary["across_seeds_table"])
    print(json.dumps(summary["run_counts"], indent=2))


if __name__ == "__main__":
    main()
