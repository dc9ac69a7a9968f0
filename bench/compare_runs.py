"""Two `bench.real_data` results compared run by run (same split and training seeds): the mean
difference of each model's macro-F1 and macro AUC, with a 95% bootstrap CI over runs.

    python -m bench.compare_runs bench/results/real_data.json bench/results/real_data_letterbox.json

Details: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def paired(base: dict, other: dict, model: str, metric: str, resamples: int = 10_000, seed: int = 0) -> dict:
    runs = sorted(set(base) & set(other))
    diff = np.array([other[r][model][metric] - base[r][model][metric] for r in runs])
    boot = np.random.default_rng(seed).choice(diff, (resamples, len(diff))).mean(axis=1)
    return {
        "runs": len(runs),
        "base_mean": float(np.mean([base[r][model][metric] for r in runs])),
        "other_mean": float(np.mean([other[r][model][metric] for r in runs])),
        "mean_difference": float(diff.mean()),
        "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "other_better_in": int((diff > 0).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="a bench.real_data JSON (the reference)")
    parser.add_argument("other", help="a bench.real_data JSON of the same runs with one change")
    args = parser.parse_args()
    base, other = (json.load(open(path))["per_run"] for path in (args.base, args.other))
    for model in ("cnn", "resnet"):
        for metric in ("macro_f1", "macro_auc"):
            r = paired(base, other, model, metric)
            print(
                f"{model:7s} {metric:9s} {r['base_mean']:.3f} -> {r['other_mean']:.3f}: "
                f"{r['mean_difference']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}], "
                f"better in {r['other_better_in']} of {r['runs']}"
            )


if __name__ == "__main__":
    main()
