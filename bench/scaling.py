"""Scaling of the data stages and of one training epoch with the number of images (phantom data).

    python -m bench.scaling [--sizes 1000,5000,20000] [--image-size 128] [--train-size 20000]
                            [--out bench/results/scaling.json]

Details: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ruamel.yaml import YAML

from bench import ROOT
from bench.real_data import stage_stats

DATA_STAGES = ("fetch", "extract", "split")
DATA_MEMORY_TARGET_MIB = 3 * 1024
TRAIN_MEMORY_TARGET_MIB = 4 * 1024
TIME_RATIO_TARGET = 1.3
TARGET_N = 20_000


class StageFailed(RuntimeError):
    pass


def run_stage(name: str, argv: list[str], repo: Path, env: dict) -> dict:
    """Run `python -m stages.<name> ...` in the clone; its wall time and peak memory from its own log."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", f"stages.{name}", *argv], cwd=repo, env=env, capture_output=True, text=True
    )
    process_s = time.perf_counter() - started
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-40:])
        raise StageFailed(f"stage {name} exited with {proc.returncode}; last lines of its stderr:\n{tail}")
    stats = stage_stats(f"Running stage '{name}'\n{log}").get(name)
    if not stats or "peak_mib" not in stats:
        raise StageFailed(f"stage {name}: no 'kneexray: done in X s, peak memory Y MiB' line in its log")
    return {**stats, "process_s": round(process_s, 2), "log": log}


def write_params(base: dict, path: Path, overrides: dict[str, object]) -> dict:
    """A copy of `base` with dotted keys set, written as YAML (what the stages read with --params)."""
    params = json.loads(json.dumps(base))
    for key, value in overrides.items():
        section, field = key.split(".")
        if field not in params[section]:
            raise KeyError(f"params.yaml has no {key}")
        params[section][field] = value
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    with open(path, "w") as fh:
        yaml.dump(params, fh)
    return params


def data_stages(n: int, args, base: dict, repo: Path, env: dict) -> dict:
    """fetch, extract and split for n phantom images, in repo/scaling/n<n>/."""
    work = repo / "scaling" / f"n{n}"
    (work / "reports").mkdir(parents=True)
    # the phantom's sides are 0.8x to 1.25x phantom.size: keep the small ones at small --image-size
    min_side = min(base["extract"]["min_side"], int(args.image_size * 0.8))
    overrides = {"phantom.n_images": n, "phantom.size": args.image_size, "extract.min_side": min_side}
    write_params(base, work / "params.yaml", overrides)
    p = ["--params", str(work / "params.yaml")]
    commands = {
        "fetch": ["--out", str(work / "raw.zip"), *p],
        "extract": [
            *("--archive", str(work / "raw.zip"), "--out", str(work / "extracted")),
            *("--audit", str(work / "reports/data_audit.json")),
            *("--audit-details", str(work / "reports/data_audit_details.json")),
            *("--audit-pairs", str(work / "reports/data_audit_pairs.png")),
            *p,
        ],
        "split": [
            *("--data", str(work / "extracted"), "--out", str(work / "split")),
            *("--report", str(work / "reports/split.json")),
            *p,
        ],
    }
    stages = {}
    for name in DATA_STAGES:
        print(f"[scaling] N={n}: {name} ...", file=sys.stderr, flush=True)
        stats = run_stage(name, commands[name], repo, env)
        stats.pop("log")
        stats["ms_per_image"] = round(1000 * stats["wall_s"] / n, 3)
        stages[name] = stats
    audit = json.loads((work / "reports/data_audit.json").read_text())
    split = json.loads((work / "reports/split.json").read_text())["images_per_split"]
    extract_split_s = stages["extract"]["wall_s"] + stages["split"]["wall_s"]
    return {
        "n_images": n,
        "overrides": overrides,
        "images_kept": audit["images_kept"],
        "near_duplicate_groups": audit["near_duplicate_groups"],
        "images_per_split": {name: sum(counts.values()) for name, counts in split.items()},
        "stages": stages,
        "extract_split_s": round(extract_split_s, 2),
        "extract_split_ms_per_image": round(1000 * extract_split_s / n, 3),
        "work": work,
    }


def train_check(data: dict, args, base: dict, repo: Path, env: dict) -> dict:
    """One CNN epoch on the train list of `data` (folds=1), its validation list scored."""
    work = data["work"]
    overrides = {
        **data["overrides"],
        "cnn.epochs": 1,
        "cnn.image_size": args.image_size,
        "train.folds": 1,
        "train.min_epochs": 1,
    }
    write_params(base, work / "params_train.yaml", overrides)
    argv = [
        "cnn",
        *("--split", str(work / "split"), "--data", str(work / "extracted")),
        *("--out", str(work / "cnn.keras"), "--live", str(work / "reports/train/cnn")),
        *("--params", str(work / "params_train.yaml")),
    ]
    print(f"[scaling] N={data['n_images']}: train cnn, 1 epoch ...", file=sys.stderr, flush=True)
    stats = run_stage("train", argv, repo, env)
    log = stats.pop("log")
    epoch = re.search(r"epoch 1: ([\d.]+) s, ([\d.]+) train images/s", log)
    return {
        "n_images": data["n_images"],
        "overrides": overrides,
        "train_images": data["images_per_split"]["train"],  # folds=1: the fit set is train.csv
        "validation_images": data["images_per_split"]["val"],
        "image_size": args.image_size,
        **stats,
        "epoch_fit_s": float(epoch.group(1)) if epoch else None,
        "train_images_per_s": float(epoch.group(2)) if epoch else None,
        "peak_target_mib": TRAIN_MEMORY_TARGET_MIB,
        "peak_within_target": stats["peak_mib"] <= TRAIN_MEMORY_TARGET_MIB,
    }


def targets(runs: list[dict]) -> dict:
    first, last = runs[0], runs[-1]
    ratio = last["extract_split_ms_per_image"] / first["extract_split_ms_per_image"]
    peaks = {name: last["stages"][name]["peak_mib"] for name in DATA_STAGES}
    return {
        "extract_split_time_per_image": {
            "smallest_n": first["n_images"],
            "largest_n": last["n_images"],
            "ratio": round(ratio, 3),
            "target": f"<= {TIME_RATIO_TARGET}",
            "met": ratio <= TIME_RATIO_TARGET,
        },
        "data_stage_peak_memory": {
            "n": last["n_images"],
            "target_n": TARGET_N,
            "peak_mib": peaks,
            "target_mib": DATA_MEMORY_TARGET_MIB,
            "met_excluding_fetch": all(peaks[name] <= DATA_MEMORY_TARGET_MIB for name in ("extract", "split")),
            "met": all(value <= DATA_MEMORY_TARGET_MIB for value in peaks.values()),
        },
    }


def table(summary: dict) -> str:
    lines = [
        "| N | fetch s | extract s | split s | extract+split ms/image | peak MiB fetch / extract / split |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for run in summary["runs"]:
        s = run["stages"]
        peaks = " / ".join(f"{s[name]['peak_mib']:.0f}" for name in DATA_STAGES)
        lines.append(
            f"| {run['n_images']} | {s['fetch']['wall_s']:.1f} | {s['extract']['wall_s']:.1f} | "
            f"{s['split']['wall_s']:.1f} | {run['extract_split_ms_per_image']:.2f} | {peaks} |"
        )
    t = summary["targets"]["extract_split_time_per_image"]
    m = summary["targets"]["data_stage_peak_memory"]
    lines += [
        "",
        f"extract+split time per image, N={t['largest_n']} vs N={t['smallest_n']}: {t['ratio']:.2f}x "
        f"(target {t['target']}: {'met' if t['met'] else 'NOT met'})",
        f"data stages' peak memory at N={m['n']} (target <= {m['target_mib']} MiB at {m['target_n']}): "
        f"{'met' if m['met'] else 'NOT met'}",
    ]
    tr = summary["training"]
    lines += [
        "",
        "| training | N | train images | size px | stage s | epoch fit s | train images/s | peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| cnn, 1 epoch, folds=1 | {tr['n_images']} | {tr['train_images']} | {tr['image_size']} | "
        f"{tr['wall_s']:.1f} | {tr['epoch_fit_s']} | {tr['train_images_per_s']} | {tr['peak_mib']:.0f} |",
        "",
        f"training peak memory target <= {TRAIN_MEMORY_TARGET_MIB} MiB: "
        f"{'met' if tr['peak_within_target'] else 'NOT met'}",
    ]
    return "\n".join(lines)


def machine() -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,5000,20000", help="numbers of phantom images, comma-separated")
    parser.add_argument("--image-size", type=int, default=128, help="phantom.size and cnn.image_size, pixels")
    parser.add_argument("--train-size", type=int, default=TARGET_N, help="N whose split trains one CNN epoch")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scaling.json"), help="the JSON summary")
    args = parser.parse_args()
    sizes = sorted({int(n) for n in args.sizes.split(",")})

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    info = machine()
    with tempfile.TemporaryDirectory(prefix="kneexray-scaling-") as scratch:
        repo = Path(scratch) / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
        env["PYTHONPATH"] = str(repo)  # the clone's kneexray, whatever the environment has installed
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        base = YAML(typ="safe", pure=True).load((repo / "params.yaml").read_text())
        try:
            runs = [data_stages(n, args, base, repo, env) for n in sizes]
            by_n = {run["n_images"]: run for run in runs}
            train_data = by_n.get(args.train_size) or data_stages(args.train_size, args, base, repo, env)
            training = train_check(train_data, args, base, repo, env)
        except StageFailed as err:
            sys.exit(f"bench.scaling: {err}\nbench.scaling: stopped; nothing written to {args.out}")
        for run in [*runs, train_data]:
            run.pop("work", None)
        summary = {
            "command": "python -m bench.scaling " + " ".join(sys.argv[1:]),
            "commit": commit,
            "machine": info,
            "image_size": args.image_size,
            "sizes": sizes,
            "runs": runs,
            "targets": targets(runs),
            "training": training,
        }
        if args.train_size not in by_n:
            summary["training_data_stages"] = train_data
    summary["table"] = table(summary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("runs", "table")}, indent=2))
    print()
    print(summary["table"])
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
