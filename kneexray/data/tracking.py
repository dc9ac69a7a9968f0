"""Content hashes of the inputs that live outside the repository.

DVC tracks `dataset.path`, `evaluate.external_path` and `resnet.weights_path` only as strings: swap
the data behind a path and `dvc repro` said everything was up to date. The `track` stage runs on
every `dvc repro` (it is cheap) and writes one small JSON file per input with the SHA-256 of its
content; the stages that read an input depend on its file, so they rerun exactly when the content
changed, and byte-identical files leave everything downstream alone.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from kneexray.data.archive import walk_tree
from kneexray.atomic import write_json
from kneexray.errors import MissingInputError
from kneexray.params import Params, dataset_sources

CHUNK = 2**20


def content_hash(path: str | Path) -> str:
    """SHA-256 of a file, or of a folder's relative file names and contents in sorted order."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingInputError(f"{path}: no such file or folder")
    digest = hashlib.sha256()
    files = (
        [path] if path.is_file() else sorted(p for here, _, names in walk_tree(path) for p in (here / n for n in names))
    )
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def used_inputs(params: Params) -> dict[str, list[str]]:
    """The outside inputs this configuration reads, from several sections: name -> paths (none when
    not used; a path per local source of dataset.sources)."""
    resnet, external = params.resnet, params.evaluate.external_path
    return {
        "dataset": [spec.path for spec in dataset_sources(params.dataset) if spec.source == "path"],
        "external": [external] if external else [],
        "resnet_weights": [resnet.weights_path] if resnet.weights == "file" else [],
    }


def write_hashes(params: Params, out_dir: str | Path) -> dict[str, dict]:
    """out_dir/<name>.json for each input: its path and content hash ({"inputs": [...]} for
    several), or {} when it is not used."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, paths in used_inputs(params).items():
        records = [{"path": path, "sha256": content_hash(path)} for path in paths]
        record = records[0] if len(records) == 1 else {"inputs": records} if records else {}
        write_json(out_dir / f"{name}.json", record)
        written[name] = record
    return written
