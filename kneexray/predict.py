"""Classifying new radiographs (PNG, JPEG, 16-bit, DICOM...) with a trained model.

Images are decoded exactly as for training and evaluation, and predicted through the evaluate
stage's own `predict_proba`, so a file gets the same probabilities here as in the reports.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from kneexray import atomic
from kneexray.dicom import DICOM_SUFFIXES, is_dicom, read_dicom_grey
from kneexray.evaluation import predict_proba
from kneexray.gradcam import GradCam, save_explanation
from kneexray.images import IMAGE_SUFFIXES, ImageError, load_grey_array
from kneexray.training import load_model

log = logging.getLogger(__name__)

INPUT_SUFFIXES = IMAGE_SUFFIXES | DICOM_SUFFIXES


def collect_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, plus the images under any folders (recursively), sorted and without duplicates.

    A path that is not a folder is kept whatever its suffix (DICOM files often have none); if it
    can't be read, its prediction row says why.
    """
    found: set[Path] = set()
    for path in map(Path, paths):
        if path.is_dir():
            # Hidden files in image folders are mostly macOS "._" resource forks, not images.
            found.update(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in INPUT_SUFFIXES
                         and not f.name.startswith("."))
        else:
            found.add(path)
    return sorted(found)


def load_for_model(path: str | Path, size: int) -> np.ndarray:
    """(size, size) uint8 greyscale, decoded as training decodes; DICOM recognised by content or suffix."""
    data = Path(path).read_bytes()
    if is_dicom(data) or Path(path).suffix.lower() in DICOM_SUFFIXES:
        # The resize of images.load_grey_array, so a DICOM and its PNG export give the same array.
        grey = read_dicom_grey(data).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(grey, dtype=np.uint8)
    return load_grey_array(data, size)


def _decode(path: Path, size: int) -> np.ndarray | str:
    """The image, or why it can't be used."""
    try:
        return load_for_model(path, size)
    except ImageError as err:
        return str(err)
    except OSError as err:  # missing or unreadable: strerror is the short reason
        return err.strerror or str(err)


def _explanation_names(files: list[Path]) -> list[str]:
    """Output name stems; inputs sharing a stem (a/knee.png, b/knee.png) get _2, _3... after the first."""
    seen: Counter[str] = Counter()
    names = []
    for path in files:
        seen[path.stem] += 1
        names.append(path.stem if seen[path.stem] == 1 else f"{path.stem}_{seen[path.stem]}")
    return names


def predict_files(model_path: str | Path, paths: Iterable[str | Path], batch_size: int = 32, *,
                  explain_dir: str | Path | None = None) -> list[dict]:
    """One row per input file, in sorted order.

    Classified: {"path", "predicted", "probabilities": {class: p}} (plus "explanation", the
    Grad-CAM PNG, with `explain_dir`); unusable: {"path", "error"}. Files are decoded and
    predicted `batch_size` at a time, so a large folder never sits in memory at once.
    """
    model, metadata = load_model(model_path)
    classes, size = list(metadata["classes"]), int(metadata["image_size"])
    if model.output_shape[-1] != len(classes):
        raise ValueError(f"{model_path}: the model has {model.output_shape[-1]} outputs but its metadata "
                         f"names {len(classes)} classes")
    files = collect_inputs(paths)
    log.info("%s: %s model, %d px, %d file(s)", model_path, metadata.get("model", "?"), size, len(files))
    explainer = GradCam(model) if explain_dir is not None else None
    names = _explanation_names(files)

    rows: list[dict] = []
    with ThreadPoolExecutor(max_workers=2) as pool:  # PIL releases the GIL while decoding
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            decoded = list(pool.map(partial(_decode, size=size), chunk))
            chunk_rows = [{"path": str(path)} if isinstance(d, np.ndarray) else {"path": str(path), "error": d}
                          for path, d in zip(chunk, decoded)]
            good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
            if good:
                images = np.stack([decoded[i] for i in good])[..., None]
                proba = predict_proba(model, images, batch_size)
                heatmaps = explainer(images, proba.argmax(axis=1)) if explainer else None
                for k, i in enumerate(good):
                    chunk_rows[i]["predicted"] = classes[int(proba[k].argmax())]
                    chunk_rows[i]["probabilities"] = {c: float(p) for c, p in zip(classes, proba[k])}
                    if explainer:
                        out = save_explanation(chunk[i], images[k, ..., 0], heatmaps[k], explain_dir,
                                               name=names[start + i])
                        chunk_rows[i]["explanation"] = str(out)
            rows.extend(chunk_rows)
    log.info("classified %d of %d file(s)", sum("error" not in r for r in rows), len(rows))
    return rows


def write_csv(rows: list[dict], path: str | Path) -> None:
    """Columns path, predicted, p_<class>..., error; an error row leaves the others empty."""
    classes = list(dict.fromkeys(c for row in rows for c in row.get("probabilities", {})))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "predicted", *(f"p_{c}" for c in classes), "error"])
    for row in rows:
        proba = row.get("probabilities", {})
        probabilities = (f"{proba[c]:.6f}" if c in proba else "" for c in classes)
        writer.writerow([row["path"], row.get("predicted", ""), *probabilities, row.get("error", "")])
    atomic.write_text(path, buffer.getvalue())


def write_json(rows: list[dict], path: str | Path) -> None:
    atomic.write_json(path, rows)
