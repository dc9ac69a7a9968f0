"""DICOM radiographs to the same 8-bit greyscale the models were trained on.

The stored values are not what a radiologist sees: the modality LUT (rescale slope/intercept)
gives physical values, the VOI window picks the displayed range, and MONOCHROME1 shows low
values as white. All three are applied here, so a DICOM and its exported PNG look alike.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from kneexray.images import ImageError

log = logging.getLogger(__name__)

DICOM_SUFFIXES = {".dcm", ".dicom"}


def is_dicom(data: bytes) -> bool:
    """Part 10 files carry 'DICM' after a 128-byte preamble; PACS exports often lack a suffix."""
    return data[128:132] == b"DICM"


def read_dicom_grey(source: str | Path | bytes, *, max_pixels: int = 200_000_000) -> Image.Image:
    """The first frame of a greyscale DICOM as an 8-bit 'L' image, as it would be displayed."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as err:  # garbage makes pydicom fail in many ways, InvalidDicomError the commonest
        raise ImageError(f"not a readable DICOM file ({type(err).__name__}: {err})") from None
    if "PixelData" not in ds:
        raise ImageError("DICOM file without pixel data")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError(f"DICOM photometric interpretation {photometric or 'missing'}: only greyscale is supported")
    rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * columns > max_pixels:
        raise ImageError(f"{columns}x{rows} exceeds the pixel cap of {max_pixels}")
    try:
        ds.pixel_array_options(index=0)  # decode only the first frame of a multi-frame file
        stored = ds.pixel_array
        values = apply_modality_lut(stored, ds).astype(np.float64)
        if "WindowCenter" in ds and "WindowWidth" in ds:
            # prefer_lut=False: a VOI LUT sequence has its own output range; the window's is
            # found by windowing -inf and +inf (the two ends it clips to).
            values = apply_voi_lut(values, ds, prefer_lut=False)
            with np.errstate(over="ignore", invalid="ignore"):
                lo, hi = apply_voi_lut(np.array([-np.inf, np.inf]), ds, prefer_lut=False)
        else:
            lo, hi = float(values.min()), float(values.max())
    except Exception as err:  # compressed syntax without a decoder, truncated data, bad window...
        raise ImageError(f"undecodable DICOM pixel data ({type(err).__name__}: {err})") from None
    grey = np.round((values - lo) / (hi - lo) * 255) if hi != lo else np.zeros_like(values)
    grey = np.clip(grey, 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":  # low values are white
        grey = 255 - grey
    log.debug("DICOM %dx%d %s, display range [%g, %g]", columns, rows, photometric, lo, hi)
    return Image.fromarray(grey, mode="L")
