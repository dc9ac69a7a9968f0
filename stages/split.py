"""split: stratified train/val/test lists by near-duplicate group, then a leakage check."""

import kneexray.portable  # noqa: F401, I001  first, before numpy: the same bytes on any x86-64 CPU

import argparse
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from kneexray import stage
from kneexray.params import Params
from kneexray.atomic import atomic_path, write_json
from kneexray.layout import FINGERPRINTS_FILE, INDEX_FILE
from kneexray.data.splitting import check_leakage, split_counts, split_index


def main(args: argparse.Namespace, params: Params) -> None:
    cfg, classes = params.split, params.dataset.classes
    data = Path(args.data)
    index = pd.read_csv(data / INDEX_FILE)
    splits = split_index(index, classes, **asdict(cfg))  # the split section is exactly its keyword arguments
    check_leakage(splits, index, np.load(data / FINGERPRINTS_FILE), params.extract.near_duplicate_distance)
    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        for name, part in splits.items():
            part[["path", "label", "group"]].to_csv(tmp / f"{name}.csv", index=False)
    counts = split_counts(splits, classes)
    report = {"images_per_split": counts, "leakage_pairs": 0, "seed": cfg.seed}
    if cfg.test_source:  # leave-one-source-out: the other sources' copies of test images sit in no split
        report["test_source"] = cfg.test_source
        report["copies_of_test_images_left_out"] = len(index) - sum(len(part) for part in splits.values())
    write_json(args.report, report)
    stage.log.info("split: %s", counts)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="extract stage output folder")
    parser.add_argument("--out", required=True, help="folder to write train.csv, val.csv, test.csv")
    parser.add_argument("--report", required=True, help="split summary JSON to write")
    stage.run(main, parser)
