"""Reading radiographs robustly: any common mode in, one greyscale array out.

Radiographs are grey; the published data mixes greyscale and RGB JPEGs, and the colour mode and
size correlate with the label there. Converting every image to one greyscale, fixed-size array
removes those two shortcuts before the model ever sees a pixel.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


class ImageError(ValueError):
    """An image can't be used; the message says why in a few words."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    mode: str
    sha256: str


def open_image(source: str | Path | bytes, *, max_pixels: int = 200_000_000, min_side: int = 1) -> Image.Image:
    """Open, size-check and fully decode an image, honouring EXIF orientation."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
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
                img.load()
            finally:
                Image.MAX_IMAGE_PIXELS = previous
        return ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
        raise ImageError(f"unreadable image data ({err})") from None


def to_grey(img: Image.Image) -> Image.Image:
    """Any mode (1, L, P, RGB, RGBA, CMYK, I;16, I, F) to 8-bit greyscale 'L'."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Stretch the actual range: 16-bit radiographs rarely use the full 0..65535.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))  # X-ray background is black
        img = Image.alpha_composite(background, img)
    return img.convert("L")


def load_grey_array(source: str | Path | bytes, size: int, *, max_pixels: int = 200_000_000) -> np.ndarray:
    """Decode an image straight to a (size, size) uint8 greyscale array.

    JPEGs are decoded at reduced scale (PIL's draft mode) when much larger than `size`, which
    makes loading a 2660 px radiograph several times faster than a full decode.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
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
    grey = to_grey(img).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(grey, dtype=np.uint8)


def inspect(path: str | Path, *, max_pixels: int, min_side: int) -> tuple[ImageInfo, Image.Image]:
    """Validate one file and describe it; raises ImageError if it is not usable."""
    data = Path(path).read_bytes()
    img = open_image(data, max_pixels=max_pixels, min_side=min_side)
    return ImageInfo(
        width=img.width,
        height=img.height,
        mode=img.mode,
        sha256=hashlib.sha256(data).hexdigest(),
    ), img
