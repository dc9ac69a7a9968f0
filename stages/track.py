"""track: content hashes of the inputs outside the repository (runs on every `dvc repro`)."""

import argparse

from kneexray import stage
from kneexray.params import Params


def main(args: argparse.Namespace, params: Params) -> None:
    from kneexray.data.tracking import write_hashes

    for name, record in write_hashes(params, args.out).items():
        for each in record.get("inputs", [record] if record else []):
            stage.log.info("%s: %s sha256 %s", name, each["path"], each["sha256"][:12])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder for one <input>.json per outside input")
    stage.run(main, parser)
