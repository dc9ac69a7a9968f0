"""What every stage script shares: logging, quiet TensorFlow, validated params, one-line errors."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
from collections.abc import Callable

# Before TensorFlow is imported anywhere: no C++ info chatter in stage logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kneexray import params as params_module  # noqa: E402
from kneexray.errors import KneexrayError  # noqa: E402

log = logging.getLogger("kneexray")

# Errors a user can act on, printed as one line: ours, and the operating system's (a missing or
# unreadable file, a full disk). A ValueError or RuntimeError from inside a library is a bug and
# shows its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (KneexrayError, OSError)


def run(main: Callable[[argparse.Namespace, params_module.Params], None], parser: argparse.ArgumentParser) -> None:
    """Parse arguments, validate params.yaml, run `main`, and turn user errors into one line + exit 1."""
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="on an error, show its traceback too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    started = time.perf_counter()
    try:
        params = params_module.load(args.params)
        main(args, params)
        # ru_maxrss is the kernel's high-water mark of this process, in KiB on Linux
        log.info(
            "done in %.1f s, peak memory %.0f MiB",
            time.perf_counter() - started,
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        )
    except USER_ERRORS as err:
        if args.verbose:
            log.error("details", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
