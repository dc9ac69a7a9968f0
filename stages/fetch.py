"""fetch: obtain the raw dataset archive (phantom, URL or local path) as one ZIP."""

import kneexray.portable  # noqa: F401, I001  first, before numpy: the same bytes on any x86-64 CPU

import argparse

from kneexray import stage
from kneexray.params import Params
from kneexray.data import sources


def main(args: argparse.Namespace, params: Params) -> None:
    info = sources.fetch(params.dataset, params.phantom, args.out)
    stage.log.info("fetched %s: %d bytes, sha256 %s", info["source"], info["bytes"], info["sha256"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="the raw dataset ZIP to write")
    stage.run(main, parser)
