"""plot: PNG figures (training curves, confusion heatmaps, ROC, reliability), a results summary and
a self-contained HTML report."""

import argparse

from kneexray import stage
from kneexray.params import Params
from kneexray.report.figures import make_figures
from kneexray.report.html_page import write_report


def main(args: argparse.Namespace, params: Params) -> None:
    live_dirs = dict(item.split("=", 1) for item in args.live)
    written = make_figures(
        metrics_path=args.metrics,
        eval_dir=args.eval,
        live_dirs=live_dirs,
        audit_path=args.audit,
        split_report=args.split_report,
        figures_dir=args.figures,
        summary_path=args.summary,
        models=dict(item.split("=", 1) for item in args.model),
        data_root=args.data,
    )
    stage.log.info("wrote %d figures and %s", len(written), args.summary)
    if args.html:
        write_report(
            args.html, args.summary, attachments={args.audit: args.audit, args.split_report: args.split_report}
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--eval", required=True, help="evaluate stage per-model folder")
    parser.add_argument("--live", action="append", required=True, metavar="MODEL=DIR", help="DVCLive folder per model")
    parser.add_argument("--audit", required=True)
    parser.add_argument("--split-report", required=True)
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a model to explain with Grad-CAM on test images",
    )
    parser.add_argument("--data", default=".", help="extract stage output folder (test image paths are relative to it)")
    parser.add_argument("--figures", required=True, help="folder for the PNGs")
    parser.add_argument("--summary", required=True, help="Markdown results summary to write")
    parser.add_argument("--html", help="single-file HTML report to write (the summary, figures inlined)")
    stage.run(main, parser)
