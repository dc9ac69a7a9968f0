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
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from kneexray.errors import InputError
from kneexray.data.images import MAX_DECODE_BYTES, ImageError, read_capped

log = logging.getLogger(__name__)

DICOM_SUFFIXES = {".dcm", ".dicom"}


def is_dicom(data: bytes) -> bool:
    """Part 10 files carry 'DICM' after a 128-byte preamble; PACS exports often lack a suffix."""
    return data[128:132] == b"DICM"


def _single_int(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    """A one-valued count from the header; ImageError for two values, text or a missing element."""
    value = ds.get(keyword, default)
    if value is None:
        raise ImageError(f"DICOM without {keyword}")
    if isinstance(value, (list, tuple, MultiValue)):
        raise ImageError(f"DICOM {keyword} has {len(value)} values; expected one")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ImageError(f"DICOM {keyword} is not a number ({value!r:.40})") from None
    if number < 1:
        raise ImageError(f"DICOM {keyword} is {number}")
    return number


def read_dicom_grey(source: str | Path | bytes, *, max_pixels: int = 200_000_000) -> Image.Image:
    """The first frame of a greyscale DICOM as an 8-bit 'L' image, as it would be displayed."""
    data = read_capped(source, max_pixels)
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as err:  # garbage makes pydicom fail in many ways, InvalidDicomError the commonest
        raise ImageError(f"not a readable DICOM file ({type(err).__name__}: {_one_line(err)})") from None
    try:
        return _display_grey(ds, max_pixels)
    except ImageError:
        raise
    except Exception as err:  # pydicom converts an element when first read, so a malformed one raises here
        raise ImageError(f"unreadable DICOM header ({type(err).__name__}: {_one_line(err)})") from None


def _display_grey(ds: pydicom.Dataset, max_pixels: int) -> Image.Image:
    if "PixelData" not in ds:
        raise ImageError("DICOM file without pixel data")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError(f"DICOM photometric interpretation {photometric or 'missing'}: only greyscale is supported")
    samples = _single_int(ds, "SamplesPerPixel", default=1)
    if samples != 1:  # a greyscale interpretation does not make 3 samples a pixel grey
        raise ImageError(f"DICOM with {samples} samples per pixel: only greyscale (1) is supported")
    rows, columns = _single_int(ds, "Rows"), _single_int(ds, "Columns")
    if rows * columns > max_pixels:
        raise ImageError(f"{columns}x{rows} exceeds the pixel cap of {max_pixels}")
    # stored values, float64 values, windowed values and the scaled copy: about 40 bytes a pixel
    if rows * columns * 40 > MAX_DECODE_BYTES:
        raise ImageError(
            f"{columns}x{rows} DICOM would take {rows * columns * 40 / 2**30:.1f} GiB to decode "
            f"(at most {MAX_DECODE_BYTES / 2**30:.0f} GiB)"
        )
    try:
        ds.pixel_array_options(index=0)  # decode only the first frame of a multi-frame file
        stored = ds.pixel_array
        if stored.shape != (rows, columns):
            raise InputError(f"decoded shape {stored.shape}, expected ({rows}, {columns})")
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
        raise ImageError(f"undecodable DICOM pixel data ({type(err).__name__}: {_one_line(err)})") from None
    grey = np.round((values - lo) / (hi - lo) * 255) if hi != lo else np.zeros_like(values)
    grey = np.clip(grey, 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":  # low values are white
        grey = 255 - grey
    log.debug("DICOM %dx%d %s, display range [%g, %g]", columns, rows, photometric, lo, hi)
    return Image.fromarray(grey, mode="L")


def _one_line(err: object) -> str:
    return " ".join(str(err).split())
