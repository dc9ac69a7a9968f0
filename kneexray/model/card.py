"""The model card a trained model carries: its data, its code and its settings."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from kneexray.layout import INDEX_FILE
from kneexray.params import Params, as_plain

INTENDED_USE = (
    "Research and teaching: a demonstration of a reproducible pipeline. Not a medical device; "
    "not validated for diagnosis. Its out-of-fold figures describe the data it was trained on only."
)


def code_digest() -> str:
    """sha256 over the kneexray modules this process has imported: the train stage's code deps.

    Not the git commit: a clone that reruns `dvc repro` at a later commit must write the same bytes
    (and dvc.lock must not change) when the code it ran is the same.
    """
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    files = {Path(f).resolve() for m in list(sys.modules.values()) if (f := getattr(m, "__file__", None))}
    for path in sorted(f for f in files if f.is_relative_to(package) and f.suffix == ".py"):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def model_card(kind: str, params: Params, data_root: str | Path) -> dict:
    """What a reader of the model file needs to judge it: which data (source and the hash of the
    extract stage's index, which lists every image's sha256), which code, which settings."""
    index = Path(data_root) / INDEX_FILE
    augment = as_plain(params.augment) if kind == "cnn" else {"horizontal_flip": params.augment.horizontal_flip}
    return {
        "data": {
            "source": params.dataset.source,
            "index_sha256": hashlib.sha256(index.read_bytes()).hexdigest() if index.is_file() else None,
        },
        "code_sha256": code_digest(),
        "params": {
            kind: as_plain(params.model(kind)),
            "augment": augment,
            "image": as_plain(params.image),
            "train": {k: v for k, v in as_plain(params.train).items() if k not in ("threads", "resume")},
        },
        "intended_use": INTENDED_USE,
    }
