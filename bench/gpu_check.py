"""Device check: both trainings on a phantom of a few thousand images, with and without mixed precision.

    python -m bench.gpu_check [--images 3000] [--size 224] [--batch 64] [--epochs 4] [--policies ...] [--jit]

Writes bench/results/gpu_check.json (or --out). Details: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench import ROOT

EPOCH_LINE = re.compile(r"epoch (\d+): ([\d.]+) s, ([\d.]+) train images/s")


def gpu_names() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def epoch_rates(log: str) -> list[float]:
    """Train images/s of each epoch, in order, from a training log."""
    return [float(m.group(3)) for m in EPOCH_LINE.finditer(log)]


def steady_rate(rates: list[float]) -> float:
    """Median images/s without the first epoch (tracing, XLA compilation, cuDNN autotuning)."""
    if len(rates) < 2:
        raise ValueError(f"need at least 2 epochs to leave out the first, got {len(rates)}")
    return statistics.median(rates[1:])


def check_params(args: argparse.Namespace, policy: str) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["dataset"]["source"] = "phantom"
    # Only speed is measured: balanced classes let a small check split too. The phantom is drawn at its
    # own size (256 px) and resized by the training input.
    params["phantom"].update(
        n_images=args.images, class_fractions={label: 1 / 3 for label in params["phantom"]["class_fractions"]}
    )
    params["image"].update(batch_size=args.batch)
    params["cnn"].update(image_size=args.size)
    params["resnet"].update(image_size=args.size)
    params["train"].update(
        mixed_precision=policy,
        jit_compile=args.jit,
        patience=args.epochs,
        strategy="auto",
        folds=1,
        min_epochs=args.epochs,
        linear_probe=0,  # a scikit-learn fit on the CPU: not the device's speed
    )  # one model, every epoch: throughput only
    for model in ("cnn", "resnet"):
        params[model]["epochs"] = args.epochs
    params["resnet"]["fine_tune_layers"] = 0
    return params


def stage(args: list[str], params: Path) -> str:
    """Run one stage script; returns its log (stderr), failing with it."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-m", *args, "--params", str(params)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000, help="phantom images in all (about 70%% train)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64, help="per replica")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--policies", help="comma-separated train.mixed_precision values")
    parser.add_argument("--jit", action="store_true", help="train.jit_compile (XLA)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/gpu_check.json"))
    args = parser.parse_args()
    gpus = gpu_names()
    policies = (args.policies or ("float32,mixed_float16" if gpus else "float32,mixed_bfloat16")).split(",")

    results = {
        "device": ", ".join(gpus) or f"CPU only ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "gpus": len(gpus),
        "images": args.images,
        "size": args.size,
        "batch_per_replica": args.batch,
        "epochs": args.epochs,
        "jit_compile": args.jit,
        "images_per_s": {},
    }
    with tempfile.TemporaryDirectory(prefix="kneexray-gpu-check-") as scratch:
        work = Path(scratch)
        params_file = work / "params.yaml"
        params_file.write_text(yaml.safe_dump(check_params(args, policies[0])))
        raw, data, split, reports = work / "raw.zip", work / "extracted", work / "split", work / "reports"
        stage(["stages.fetch", "--out", str(raw)], params_file)
        stage(
            [
                "stages.extract",
                "--archive",
                str(raw),
                "--out",
                str(data),
                "--audit",
                str(reports / "audit.json"),
                "--audit-details",
                str(reports / "audit_details.json"),
            ],
            params_file,
        )
        stage(
            ["stages.split", "--data", str(data), "--out", str(split), "--report", str(reports / "split.json")],
            params_file,
        )
        results["train_images"] = sum(
            json.loads((reports / "split.json").read_text())["images_per_split"]["train"].values()
        )
        for policy in policies:
            params_file.write_text(yaml.safe_dump(check_params(args, policy)))
            for model in ("cnn", "resnet"):
                log = stage(
                    [
                        "stages.train",
                        model,
                        "--split",
                        str(split),
                        "--data",
                        str(data),
                        "--out",
                        str(work / f"{model}-{policy}.keras"),
                        "--live",
                        str(work / "live" / policy / model),
                    ],
                    params_file,
                )
                rates = epoch_rates(log)
                results["images_per_s"].setdefault(model, {})[policy] = {
                    "median": round(steady_rate(rates), 1),
                    "per_epoch": rates,
                }
    for by_policy in results["images_per_s"].values():
        base = by_policy[policies[0]]["median"]
        for figures in by_policy.values():
            figures["speedup"] = round(figures["median"] / base, 2)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"device: {results['device']}; {results['train_images']} train images at {args.size} px, "
        f"batch {args.batch} per replica, XLA {'on' if args.jit else 'off'}"
    )
    print("| model | " + " | ".join(f"{p} images/s (speed-up)" for p in policies) + " |")
    print("|---|" + "---|" * len(policies))
    for model, by_policy in results["images_per_s"].items():
        print(
            f"| {model} | "
            + " | ".join(f"{by_policy[p]['median']} ({by_policy[p]['speedup']}x)" for p in policies)
            + " |"
        )


if __name__ == "__main__":
    main()
