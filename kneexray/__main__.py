"""Command line: `kneexray predict PATH... --model MODEL` (the console script that `pip install .`
makes), or `python -m kneexray predict ...` from a checkout. `kneexray --version` prints the version.
Global options (-v) go before or after the command.

Exit status: 0 when at least one file was classified, 1 when none was or on an error (one line
on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Before TensorFlow is imported: no C++ info chatter around the results.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kneexray import __version__  # noqa: E402
from kneexray.errors import MissingInputError
from kneexray.stage import USER_ERRORS  # noqa: E402

log = logging.getLogger("kneexray")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _add_global_options(parser: argparse.ArgumentParser, *, on_command: bool) -> None:
    """-v and --version, on the main parser and on each command's, so `kneexray predict -v ...` works.

    On a command's parser -v defaults to SUPPRESS: argparse copies a subparser's defaults over the
    main parser's values, which would turn `kneexray -v predict ...` back into not verbose.
    """
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS if on_command else False,
        help="log progress and error details",
    )
    parser.add_argument("--version", action="version", version=f"kneexray {__version__}")


def _default_prog() -> str:
    """The name usage messages give: `python -m kneexray` when run that way, else `kneexray`."""
    return "python -m kneexray" if sys.argv and Path(sys.argv[0]).name == "__main__.py" else "kneexray"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or _default_prog(), description="Knee X-ray osteoporosis classifier.")
    _add_global_options(parser, on_command=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = commands.add_parser(
        "predict",
        help="classify radiographs with a trained model",
        description="Classify image files (PNG, JPEG, TIFF, 16-bit, DICOM) and folders of them (recursively).",
    )
    predict.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image file or folder")
    predict.add_argument("--model", required=True, type=Path, help="a .keras model trained by this pipeline")
    output = predict.add_mutually_exclusive_group()
    output.add_argument("--csv", type=Path, metavar="FILE", help="write the predictions as CSV")
    output.add_argument("--json", type=Path, metavar="FILE", help="write the predictions as JSON")
    predict.add_argument("--explain", type=Path, metavar="OUTDIR", help="write a Grad-CAM PNG per image here")
    predict.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="default: 32")
    _add_global_options(predict, on_command=True)
    predict.set_defaults(handler=_predict)
    return parser


def format_table(rows: list[dict]) -> str:
    """Classified rows as aligned text: path, predicted class, one probability column per class."""
    classified = [row for row in rows if "error" not in row]
    if not classified:
        return ""
    classes = list(classified[0]["probabilities"])
    width = max(len("path"), *(len(row["path"]) for row in classified))
    label_width = max(len("predicted"), *(len(c) for c in classes))
    columns = {c: max(len(c), 5) for c in classes}
    lines = [f"{'path':<{width}}  {'predicted':<{label_width}}  " + "  ".join(f"{c:>{w}}" for c, w in columns.items())]
    for row in classified:
        probabilities = "  ".join(f"{row['probabilities'][c]:>{w}.3f}" for c, w in columns.items())
        lines.append(f"{row['path']:<{width}}  {row['predicted']:<{label_width}}  {probabilities}")
    return "\n".join(lines)


def _predict(args: argparse.Namespace) -> int:
    if not args.model.is_file():  # said before TensorFlow takes seconds to load
        raise MissingInputError(f"{args.model}: no such model file")
    from kneexray.atomic import check_file_target

    for option, target in (("--csv", args.csv), ("--json", args.json)):
        if target is not None:  # a file output onto a folder: refused before any work, nothing lost
            check_file_target(target, option)
    from kneexray.model.files import read_metadata
    from kneexray.predict import predict_files, write_csv, write_json  # TensorFlow: not for --help or usage errors

    warn_about_training_data(read_metadata(args.model))

    rows = predict_files(args.model, args.paths, args.batch_size, explain_dir=args.explain)
    for row in rows:
        if "error" in row:
            print(f"{row['path']}: {row['error']}", file=sys.stderr)
    if args.csv:
        write_csv(rows, args.csv)
    elif args.json:
        write_json(rows, args.json)
    elif table := format_table(rows):
        print(table)
    if not rows:
        print(f"error: no images found in {', '.join(map(str, args.paths))}", file=sys.stderr)
    return 0 if any("error" not in row for row in rows) else 1


def warn_about_training_data(metadata: dict) -> None:
    """A model trained on the synthetic phantom says so before it classifies a real radiograph."""
    source = metadata.get("data", {}).get("source")
    if source == "phantom":
        print(
            "warning: this model was trained on the synthetic knee phantom, not on radiographs: "
            "its classes for real X-rays mean nothing",
            file=sys.stderr,
        )
    elif source is None:
        print("warning: this model file does not say what data it was trained on", file=sys.stderr)


HANDLED = USER_ERRORS  # ours, and a missing or unreadable file


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.verbose:
        log.setLevel(logging.DEBUG)
    try:
        return args.handler(args)
    except HANDLED as err:
        log.debug("details", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
