"""extract: unpack nested ZIPs safely, keep usable de-duplicated images, write the index and audit."""

import kneexray.portable  # noqa: F401, I001  first, before numpy: the same bytes on any x86-64 CPU

import argparse

from kneexray import stage
from kneexray.params import Params, dataset_sources
from kneexray.data.extraction import extract_dataset


def main(args: argparse.Namespace, params: Params) -> None:
    audit = extract_dataset(
        args.archive,
        args.out,
        args.audit,
        args.audit_details,
        params.extract,
        params.dataset.classes,
        args.audit_pairs,
        origins=[spec.name for spec in dataset_sources(params.dataset)],
    )
    if "copies_across_sources" in audit:
        stage.log.info("copies shared between sources: %s", audit["copies_across_sources"])
    stage.log.info(
        "kept %d images %s; %d unreadable, %d exact copies removed, %d label conflicts",
        audit["images_kept"],
        audit["images_per_class"],
        audit["unreadable"],
        audit["exact_copy_files_removed"],
        audit["label_conflicts"],
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archive", required=True, help="raw dataset ZIP from the fetch stage")
    parser.add_argument("--out", required=True, help="folder to write: images/, index.csv, fingerprints.npy")
    parser.add_argument("--audit", required=True, help="data audit counts JSON to write (a DVC metric)")
    parser.add_argument("--audit-details", required=True, help="data audit lists JSON to write (which files, why)")
    parser.add_argument("--audit-pairs", help="PNG of the flagged pairs side by side, for a person to check")
    stage.run(main, parser)
