"""Reading radiographs robustly: any common mode in, one greyscale array out.

Radiographs are grey; the published data mixes greyscale and RGB JPEGs, and the colour mode and
size correlate with the label there. Converting every image to one greyscale, fixed-size array
removes those two shortcuts before the model ever sees a pixel.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from kneexray.errors import KneexrayError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
# A file is refused before it is read when larger than 4 bytes a pixel (the most PIL stores) for
# max_pixels, plus room for metadata: reading it would cost more than decoding any allowed image.
_BYTES_PER_PIXEL = 4
_METADATA_BYTES = 16 * 2**20
_STRETCHED_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageError(KneexrayError, ValueError):
    """An image can't be used; the message says why in a few words."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    mode: str
    sha256: str


def max_file_bytes(max_pixels: int) -> int:
    """The largest image file read, for a pixel cap of `max_pixels` (extract.max_pixels)."""
    return _BYTES_PER_PIXEL * max_pixels + _METADATA_BYTES


def read_capped(source: str | Path | bytes, max_pixels: int) -> bytes:
    """The file's bytes, refused unread when over max_file_bytes (a stray 1.5 GB file is no image)."""
    cap = max_file_bytes(max_pixels)
    if isinstance(source, bytes):
        size = len(source)
    else:
        with open(source, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            source = handle.read(size) if size <= cap else b""  # read(n) allocates n bytes up front
    if size > cap:
        raise ImageError(
            f"file of {size} bytes is over the {cap}-byte cap for one image "
            f"(4 bytes a pixel of max_pixels={max_pixels}, plus metadata)"
        )
    return source


def open_image(source: str | Path | bytes, *, max_pixels: int = 200_000_000, min_side: int = 1) -> Image.Image:
    """Open, size-check and fully decode an image, honouring EXIF orientation."""
    data = read_capped(source, max_pixels)
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            # Our own pixel cap replaces PIL's bomb check, so a cap above PIL's default still works.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                img = Image.open(io.BytesIO(data))
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageError(f"{width}x{height} exceeds the pixel cap of {max_pixels}")
                if min(width, height) < min_side:
                    raise ImageError(f"{width}x{height} is smaller than the minimum side {min_side}")
                check_decode_bytes(width, height, img.mode)
                img.load()
                if img.format == "JPEG":
                    _check_jpeg_complete(data, img)
            finally:
                Image.MAX_IMAGE_PIXELS = previous
        return ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("not a recognised image format") from None
    except Exception as err:  # truncated or corrupt data; hostile files make PIL's plugins raise anything
        raise ImageError(f"unreadable image data ({_one_line(err) or type(err).__name__})") from None


# Bytes that can't form a JPEG marker (no 0xFF), to feed a decoder in place of missing data.
_FILLER = bytes((i * 97 + 13) % 255 for i in range(1024))


def _check_jpeg_complete(data: bytes, img: Image.Image) -> None:
    """Raise ImageError if the scan data ends before the picture does.

    libjpeg fills a scan cut short with flat blocks and only warns, which PIL drops: a JPEG cut
    after its header and closed with an end marker decodes "fine". The fill makes the last blocks
    flat; only then (or for a progressive file) is it decoded again with filler bytes before the
    end marker: they change the picture only if the decoder had run out of data. Not looked for:
    data missing from the last few blocks only (a corner of a few pixels), and a progressive
    file cut exactly between two scans (complete, if less sharp).
    """
    end = data.find(b"\xff\xd9", data.rfind(b"\xff\xda"))  # the end marker after the last scan
    end = len(data) if end < 0 else end
    pixels = np.asarray(img)
    height, width = pixels.shape[:2]
    corner = pixels[(height - 1) // 8 * 8 :, max(0, (width - 1) // 8 - 3) * 8 :]  # the last 4 blocks
    # progressive files are rare, and libjpeg smooths the blocks a missing scan leaves: always checked
    if not img.info.get("progressive") and not (corner == corner[:1, :1]).all():
        return
    try:
        again = Image.open(io.BytesIO(data[:end] + _FILLER + data[end:]))
        again.load()
        changed = not np.array_equal(np.asarray(again), pixels)
    except Exception:
        changed = True  # the filler was read as image data
    if changed:
        raise ImageError("unreadable image data (truncated JPEG: its data ends before the image does)")


def _one_line(err: object) -> str:
    return " ".join(str(err).split())


# The memory one image may take while it is decoded and converted to 8-bit grey. The pixel cap
# alone let a 1.3 MB float32 TIFF of 14000 x 14000 take 5.4 GiB.
MAX_DECODE_BYTES = 2 * 2**30
# Bytes per pixel while decoding and converting: the decoded image, plus for the stretched modes
# (16-bit, 32-bit int and float) the float64 working copy and the 8-bit result.
_DECODE_BYTES_PER_PIXEL = {
    "1": 1,
    "L": 2,
    "P": 2,
    "LA": 6,
    "PA": 6,
    "RGB": 4,
    "RGBA": 9,
    "CMYK": 5,
    "YCbCr": 4,
    "LAB": 4,
}
_STRETCH_BYTES_PER_PIXEL = 8 + 1


def check_decode_bytes(width: int, height: int, mode: str) -> None:
    """ImageError when decoding and converting this image would take more than MAX_DECODE_BYTES."""
    per_pixel = _DECODE_BYTES_PER_PIXEL.get(mode, 4 + _STRETCH_BYTES_PER_PIXEL)
    need = width * height * per_pixel
    if need > MAX_DECODE_BYTES:
        raise ImageError(
            f"{width}x{height} {mode} would take {need / 2**30:.1f} GiB to decode "
            f"(at most {MAX_DECODE_BYTES / 2**30:.0f} GiB)"
        )


def to_grey(img: Image.Image) -> Image.Image:
    """Any mode (1, L, P, RGB, RGBA, CMYK, LAB, I;16, I, F) to 8-bit greyscale 'L'; ImageError if none fits."""
    if img.mode == "LAB":  # PIL has no LAB conversion; L is the lightness, what a grey radiograph shows
        return img.getchannel("L")
    if img.mode in _STRETCHED_MODES:
        # Stretch the actual range: 16-bit radiographs rarely use the full 0..65535.
        # One float64 working copy, changed in place: the same operations in the same order as
        # ((arr - lo) / (hi - lo) * 255), so the same result, without four temporary arrays.
        arr = np.array(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if hi > lo:
            arr -= lo
            arr /= hi - lo
            arr *= 255
            np.round(arr, out=arr)
        else:
            arr[...] = 0
        return Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))  # X-ray background is black
        img = Image.alpha_composite(background, img)
    try:
        return img.convert("L")
    except ValueError:  # "conversion from La to L not supported" and the like
        raise ImageError(f"colour mode {img.mode} cannot be converted to greyscale") from None


FITS = ("squash", "letterbox")


def to_square(grey: Image.Image, size: int, fit: str = "squash") -> np.ndarray:
    """(size, size) uint8: `squash` stretches the image to a square; `letterbox` keeps its aspect
    ratio (the knee's shape) and pads the short side with black, the X-ray background."""
    if fit == "squash":
        return np.asarray(grey.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0), dtype=np.uint8)
    if fit != "letterbox":
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    scale = size / max(grey.width, grey.height)
    width, height = max(1, round(grey.width * scale)), max(1, round(grey.height * scale))
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - height) // 2, (size - width) // 2
    resized = grey.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0)
    out[top : top + height, left : left + width] = np.asarray(resized, dtype=np.uint8)
    return out


def load_grey_array(
    source: str | Path | bytes, size: int, *, fit: str = "squash", max_pixels: int = 200_000_000
) -> np.ndarray:
    """Decode an image straight to a (size, size) uint8 greyscale array (`fit`: see `to_square`).

    JPEGs are decoded at reduced scale (PIL's draft mode) when much larger than `size`, which
    makes loading a 2660 px radiograph several times faster than a full decode.
    """
    data = read_capped(source, max_pixels)
    try:
        probe = Image.open(io.BytesIO(data))
        # Over the cap: open_image below raises the clear error (the draft path must not skip it).
        if probe.format == "JPEG" and probe.mode in ("L", "RGB") and probe.width * probe.height <= max_pixels:
            probe.draft(probe.mode, (size * 2, size * 2))
            img = ImageOps.exif_transpose(probe)
            img.load()
        else:
            img = open_image(data, max_pixels=max_pixels)
    except ImageError:
        raise
    except Exception:
        img = open_image(data, max_pixels=max_pixels)  # gives the clear error
    return to_square(to_grey(img), size, fit)


def inspect(path: str | Path, *, max_pixels: int, min_side: int) -> tuple[ImageInfo, Image.Image]:
    """Validate one file and describe it; raises ImageError if it is not usable."""
    data = read_capped(path, max_pixels)
    img = open_image(data, max_pixels=max_pixels, min_side=min_side)
    return ImageInfo(
        width=img.width,
        height=img.height,
        mode=img.mode,
        sha256=hashlib.sha256(data).hexdigest(),
    ), img
