"""The .keras model file: our metadata inside it, byte-stable and atomic writes, checked loads."""

from __future__ import annotations

import json
import logging
import tempfile
import zipfile
from pathlib import Path

import keras

from kneexray.atomic import atomic_path, stable_zip_entry
from kneexray.data.images import FITS
from kneexray.errors import InputError
from kneexray.model.devices import is_chief

log = logging.getLogger(__name__)

META_ENTRY = "kneexray.json"  # extra member in the .keras zip: what inference needs to know


def save_model(model: keras.Model, metadata: dict, path: str | Path) -> None:
    """Write the .keras file with our metadata inside it, atomically.

    In multi-worker training only the chief writes `path`. The other workers save too, as Keras
    advises (saving may read distributed variables, which every worker must join), but into a
    temporary folder that is deleted at once."""
    if is_chief(model.distribute_strategy):
        with atomic_path(path, suffix=".keras") as tmp:
            _write_model(model, metadata, tmp)
        return
    with tempfile.TemporaryDirectory(prefix="kneexray-worker-") as scratch:
        _write_model(model, metadata, Path(scratch) / "model.keras")
    log.info("not the chief: %s is left to the chief to write", path)


def _renumber_shared_objects(config):
    """Keras names objects shared between layers (the dtype policy) by their Python id(), which
    changes with every process; only equality matters on loading, so number them 0, 1, ... instead."""
    numbers: dict[int, int] = {}

    def walk(node):
        if isinstance(node, dict):
            return {
                key: numbers.setdefault(value, len(numbers)) if key == "shared_object_id" else walk(value)
                for key, value in node.items()
            }
        if isinstance(node, list):
            return [walk(value) for value in node]
        return node

    return walk(config)


def _write_model(model: keras.Model, metadata: dict, path: Path) -> None:
    """model.save, then the archive rewritten byte-stable: Keras stamps the save date into
    metadata.json and the clock time onto the weights entry, so identical weights would get a new
    md5 in dvc.lock on every `dvc repro -f`."""
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            if info.filename == "metadata.json":
                keras_meta = json.loads(data)
                keras_meta.pop("date_saved", None)
                data = json.dumps(keras_meta).encode()
            elif info.filename == "config.json":
                data = json.dumps(_renumber_shared_objects(json.loads(data))).encode()
            archive.writestr(stable_zip_entry(info.filename, info.compress_type), data)
        archive.writestr(stable_zip_entry(META_ENTRY), json.dumps(metadata, indent=2, sort_keys=True))


def read_metadata(path: str | Path) -> dict:
    """The metadata a kneexray model carries, checked; a clear error for other .keras files."""
    try:
        with zipfile.ZipFile(path) as archive:
            metadata = json.loads(archive.read(META_ENTRY))
    except json.JSONDecodeError:
        raise InputError(f"{path}: its kneexray metadata is not JSON") from None
    except KeyError:
        raise InputError(
            f"{path}: a Keras model without kneexray metadata (classes, image size); train it with this pipeline"
        ) from None
    except zipfile.BadZipFile:
        raise InputError(f"{path}: not a .keras model file") from None
    _check_metadata(path, metadata)
    return metadata


def _check_metadata(path: str | Path, metadata: object) -> None:
    """What inference relies on: a mapping with class names and an image size it can use."""
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: its kneexray metadata is not a mapping")
    classes, size = metadata.get("classes"), metadata.get("image_size")
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise InputError(f"{path}: its kneexray metadata has no list of class names")
    if isinstance(size, bool) or not isinstance(size, int) or not 32 <= size <= 1024:
        raise InputError(f"{path}: its kneexray metadata has no image size in [32, 1024] (got {size!r})")
    if metadata.get("image_fit", "squash") not in FITS:
        raise InputError(f"{path}: its kneexray metadata has an unknown image_fit {metadata['image_fit']!r}")


def load_model(path: str | Path) -> tuple[keras.Model, dict]:
    metadata = read_metadata(path)
    import kneexray.model.layers  # noqa: F401  registers the custom layers for deserialisation

    try:  # safe mode: a config that names arbitrary code (a Lambda, builtins.exec) is refused
        return keras.saving.load_model(path, safe_mode=True), metadata
    except (ValueError, TypeError) as err:
        raise InputError(f"{path}: Keras refused to load it ({' '.join(str(err).split())[:300]})") from None
