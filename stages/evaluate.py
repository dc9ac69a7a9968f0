"""evaluate: metrics with bootstrap CIs, calibration and per-image predictions for each model."""

import argparse

from kneexray import stage
from kneexray.params import Params


def main(args: argparse.Namespace, params: Params) -> None:
    from kneexray.evaluate.scoring import evaluate_models

    models = dict(item.split("=", 1) for item in args.model)
    evaluate_models(
        models, test_csv=args.test, data_root=args.data, out_dir=args.out, metrics_path=args.metrics, params=params
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="a model to evaluate")
    parser.add_argument("--test", required=True, help="test split CSV")
    parser.add_argument("--data", required=True, help="extract stage output folder")
    parser.add_argument("--out", required=True, help="folder for per-model predictions, ROC and calibration")
    parser.add_argument("--metrics", required=True, help="headline metrics JSON to write")
    stage.run(main, parser)
