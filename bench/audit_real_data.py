"""The data audit of the real images, and how much visible signal they carry.

    python -m bench.audit_real_data [--data DIR]   (default: bench.REAL_DATA, $KNEEXRAY_REAL_DATA)

Prints JSON. Details: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench import REAL_DATA
from kneexray import DEFAULT_CLASSES
from kneexray.data.curation import curate
from kneexray.data.extraction import audit_counts
from kneexray.data.images import load_grey_array
from kneexray.data.patients import audit_patient_table


def probes(pixels: np.ndarray, index: pd.DataFrame) -> dict[str, np.ndarray]:
    centre = pixels[:, 64:192, 64:192]
    high_pass = centre[:, 1:, 1:] - 0.5 * (centre[:, :-1, 1:] + centre[:, 1:, :-1])
    return {
        "size and mode only": np.column_stack([index["width"], index["height"], index["mode"] != "L"]).astype(float),
        "intensity percentiles": np.percentile(
            pixels.reshape(len(pixels), -1), [5, 10, 25, 50, 75, 90, 95, 99], axis=1
        ).T,
        "32x32 thumbnail": pixels.reshape(len(pixels), 32, 8, 32, 8).mean(axis=(2, 4)).reshape(len(pixels), -1),
        "central texture": np.column_stack(
            [
                centre.mean((1, 2)),
                centre.std((1, 2)),
                np.abs(high_pass).mean((1, 2)),
                high_pass.std((1, 2)),
                np.percentile(centre, 90, axis=(1, 2)) - np.percentile(centre, 10, axis=(1, 2)),
            ]
        ),
    }


def cv_macro_f1(features: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    clf = make_pipeline(
        StandardScaler(),
        PCA(n_components=min(20, features.shape[1])),
        LogisticRegression(class_weight="balanced", max_iter=2000),
    )
    scores = [
        f1_score(
            labels,
            cross_val_predict(clf, features, labels, cv=StratifiedKFold(5, shuffle=True, random_state=s)),
            average="macro",
        )
        for s in range(5)
    ]
    return round(float(np.mean(scores)), 3), round(float(np.std(scores)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REAL_DATA))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        curated = curate(
            {"mendeley": {c: Path(args.data) / c for c in DEFAULT_CLASSES}},
            scratch,
            max_pixels=200_000_000,
            min_side=64,
            near_duplicate_distance=0.006,
            keep_conflicts=False,
        )
        index = curated.index
        audit = audit_counts({**curated.audit, "patient_table": audit_patient_table(args.data, index)})
        pixels = np.stack([load_grey_array(Path(scratch) / p, 256) for p in index["path"]]).astype(np.float32) / 255
    labels = index["label"].to_numpy()
    groups = index.assign(group=index["width"].astype(str) + "x" + index["height"].astype(str) + " " + index["mode"])
    mix = pd.crosstab(groups["group"], groups["label"])
    print(
        json.dumps(
            {
                "audit": audit,
                "cv_macro_f1_mean_sd": {name: cv_macro_f1(f, labels) for name, f in probes(pixels, index).items()},
                "class_mix_of_size_mode_groups": {g: row.to_dict() for g, row in mix[mix.sum(axis=1) >= 10].iterrows()},
            },
            indent=2,
            default=int,
        )
    )


if __name__ == "__main__":
    main()
