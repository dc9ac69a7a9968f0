"""How far training results move across CPUs: the train_cnn stage on the phantom under oneDNN's
instruction-set limits (imitating older CPUs) and with oneDNN off, scored on the same test images.

    python -m bench.cpu_tolerance [--variants native,avx2,onednn_off] [--epochs N]

Needs `dvc repro split` first. Writes bench/results/cpu_tolerance.json. Details: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import ROOT

VARIANTS = {
    "native": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"},
    "onednn_off": {"TF_ENABLE_ONEDNN_OPTS": "0"},
}


def train(variant: str, out: Path, epochs: int | None) -> float:
    params = ["--params", str(ROOT / "params.yaml")]
    if epochs:  # a copy of params.yaml with fewer epochs
        import yaml

        p = yaml.safe_load((ROOT / "params.yaml").read_text())
        p["cnn"]["epochs"] = epochs
        (out / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        params = ["--params", str(out / "params.yaml")]
    env = {**os.environ, **VARIANTS[variant], "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.train",
            "cnn",
            "--split",
            str(ROOT / "data/split"),
            "--data",
            str(ROOT / "data/extracted"),
            "--out",
            str(out / "cnn.keras"),
            "--live",
            str(out / "live"),
            *params,
        ],
        check=True,
        env=env,
        cwd=out,
        capture_output=True,
    )
    return time.perf_counter() - started


def score(model_path: Path):
    import numpy as np
    import pandas as pd

    from kneexray.model.devices import infer
    from kneexray.model.files import load_model
    from kneexray.model.inputs import label_indices, load_images
    from kneexray.model.selection import score as f1

    model, meta = load_model(model_path)
    test = pd.read_csv(ROOT / "data/split/test.csv")
    proba = infer(model, load_images(test["path"], meta["image_size"], root=ROOT / "data/extracted"), 32)
    y = label_indices(test["label"], meta["classes"])
    return (
        proba,
        {
            "accuracy": float((proba.argmax(1) == y).mean()),
            "macro_f1": f1("macro_f1", y, proba),
            "selected_epoch": meta["selected_epoch"],
            "epochs_run": meta["epochs_run"],
        },
        np,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="native,avx2,onednn_off")
    parser.add_argument("--epochs", type=int, help="cnn.epochs for every variant (default: params.yaml)")
    args = parser.parse_args()
    results, probas = {}, {}
    with tempfile.TemporaryDirectory(prefix="kneexray-cpu-") as scratch:
        for variant in args.variants.split(","):
            out = Path(scratch) / variant
            out.mkdir()
            seconds = train(variant, out, args.epochs)
            probas[variant], results[variant], np = score(out / "cnn.keras")
            results[variant].update(env=VARIANTS[variant], wall_s=round(seconds, 1))
            if "native" in probas and variant != "native":
                results[variant]["max_probability_difference_vs_native"] = float(
                    np.abs(probas[variant] - probas["native"]).max()
                )
            print(variant, json.dumps(results[variant]), flush=True)
    path = ROOT / "bench/results/cpu_tolerance.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
