"""Classifying new radiographs (PNG, JPEG, 16-bit, DICOM...) with a trained model.

Images are decoded exactly as for training and evaluation, and predicted through the evaluate
stage's own `predict_proba`, so a file gets the same probabilities here as in the reports.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import stat
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from kneexray import atomic
from kneexray.data.archive import walk_tree
from kneexray.data.dicom import DICOM_SUFFIXES, is_dicom, read_dicom_grey
from kneexray.data.images import IMAGE_SUFFIXES, ImageError, load_grey_array, to_square
from kneexray.errors import InputError
from kneexray.evaluate.gradcam import GradCam, save_explanation
from kneexray.evaluate.scoring import predict_proba
from kneexray.model.files import load_model

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
            # walk_tree: no recursion, and a one-line error for a folder too deep to be a dataset
            found.update(
                here / name
                for here, _, names in walk_tree(path)
                for name in names
                if (here / name).is_file() and Path(name).suffix.lower() in INPUT_SUFFIXES and not name.startswith(".")
            )
        else:
            found.add(path)
    return sorted(found)


def read_regular_file(path: str | Path) -> bytes:
    """The file's bytes; a FIFO, socket or device is refused (reading one would block or never end).

    Opened non-blocking, so even a FIFO with no writer can be looked at without hanging.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            what = (
                "a FIFO"
                if stat.S_ISFIFO(mode)
                else "a device"
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket"
                if stat.S_ISSOCK(mode)
                else "not a regular file"
            )
            raise ImageError(f"{what}, not an image file; skipped")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    finally:
        os.close(fd)


def load_for_model(path: str | Path, size: int, fit: str = "squash") -> np.ndarray:
    """(size, size) uint8 greyscale, decoded as training decodes; DICOM recognised by content or suffix."""
    data = read_regular_file(path)
    if is_dicom(data) or Path(path).suffix.lower() in DICOM_SUFFIXES:
        # The resize of images.load_grey_array, so a DICOM and its PNG export give the same array.
        return to_square(read_dicom_grey(data), size, fit)
    return load_grey_array(data, size, fit=fit)


def _decode(path: Path, size: int, fit: str = "squash") -> np.ndarray | str:
    """The image, or why it can't be used (the row names the file)."""
    try:
        return load_for_model(path, size, fit)
    except ImageError as err:
        return str(err)
    except OSError as err:  # missing or unreadable: strerror is the short reason
        return err.strerror or str(err)
    except Exception as err:  # one odd file must not stop the others being classified
        log.debug("%s: decoding failed", path, exc_info=True)
        return f"unusable image ({type(err).__name__}: {' '.join(str(err).split())})"


def _explanation_names(files: list[Path]) -> list[str]:
    """Output name stems, unique and the same on every run (files come sorted).

    The first input with a stem keeps it; later ones (a/knee.png, b/knee.png) get _2, _3..., skipping
    any name another input already has as its own stem (c/knee_2.png). Compared case-folded, since
    macOS and Windows folders treat Knee and knee as one file.
    """
    taken = {path.stem.casefold() for path in files}
    firsts: set[str] = set()
    names = []
    for path in files:
        key = path.stem.casefold()
        if key not in firsts:
            firsts.add(key)
            names.append(path.stem)
            continue
        n = 2
        while f"{key}_{n}" in taken:
            n += 1
        taken.add(f"{key}_{n}")
        names.append(f"{path.stem}_{n}")
    return names


def predict_files(
    model_path: str | Path, paths: Iterable[str | Path], batch_size: int = 32, *, explain_dir: str | Path | None = None
) -> list[dict]:
    """One row per input file, in sorted order.

    Classified: {"path", "predicted", "probabilities": {class: p}} (plus "explanation", the
    Grad-CAM PNG, with `explain_dir`); unusable: {"path", "error"}. Files are decoded and
    predicted `batch_size` at a time, so a large folder never sits in memory at once.
    """
    model, metadata = load_model(model_path)
    classes, size = list(metadata["classes"]), int(metadata["image_size"])
    if model.output_shape[-1] != len(classes):
        raise InputError(
            f"{model_path}: the model has {model.output_shape[-1]} outputs but its metadata "
            f"names {len(classes)} classes"
        )
    files = collect_inputs(paths)
    log.info("%s: %s model, %d px, %d file(s)", model_path, metadata.get("model", "?"), size, len(files))
    explainer = GradCam(model) if explain_dir is not None else None
    names = _explanation_names(files)

    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=2) as pool:  # PIL releases the GIL while decoding
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            decoded = list(pool.map(partial(_decode, size=size, fit=metadata.get("image_fit", "squash")), chunk))
            chunk_rows: list[dict[str, Any]] = [
                {"path": str(path)} if isinstance(d, np.ndarray) else {"path": str(path), "error": d}
                for path, d in zip(chunk, decoded)
            ]
            good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
            if good:
                images = np.stack([decoded[i] for i in good])[..., None]
                proba = predict_proba(model, images, batch_size)
                heatmaps = explainer(images, proba.argmax(axis=1)) if explainer else None
                for k, i in enumerate(good):
                    chunk_rows[i]["predicted"] = classes[int(proba[k].argmax())]
                    chunk_rows[i]["probabilities"] = {c: float(p) for c, p in zip(classes, proba[k])}
                    if explainer and heatmaps is not None and explain_dir is not None:
                        out = save_explanation(
                            chunk[i], images[k, ..., 0], heatmaps[k], explain_dir, name=names[start + i]
                        )
                        chunk_rows[i]["explanation"] = str(out)
            rows.extend(chunk_rows)
    log.info("classified %d of %d file(s)", sum("error" not in r for r in rows), len(rows))
    return rows


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(text: str) -> str:
    """A text cell that a spreadsheet shows as text: a file named =HYPERLINK(...) must not run as a formula."""
    return f"'{text}" if text.startswith(_FORMULA_STARTS) else text


def write_csv(rows: list[dict], path: str | Path) -> None:
    """Columns path, predicted, p_<class>..., error; an error row leaves the others empty.

    Text cells starting with = + - @ (or a tab or carriage return) get a leading ' (OWASP's advice
    against CSV injection); probabilities are plain numbers and never start so.
    """
    classes = list(dict.fromkeys(c for row in rows for c in row.get("probabilities", {})))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "predicted", *(f"p_{c}" for c in classes), "error"])
    for row in rows:
        proba = row.get("probabilities", {})
        probabilities = (f"{proba[c]:.6f}" if c in proba else "" for c in classes)
        writer.writerow(
            [_cell(row["path"]), _cell(row.get("predicted", "")), *probabilities, _cell(row.get("error", ""))]
        )
    atomic.write_text(path, buffer.getvalue())


def write_json(rows: list[dict], path: str | Path) -> None:
    atomic.write_json(path, rows)
