"""Robust image reading: broken files give a reason, every mode comes out as 8-bit grey."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from kneexray.data.images import ImageError, ImageInfo, inspect, load_grey_array, open_image, to_grey, to_square

ORIENTATION = 0x0112


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0, mode: str = "L") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (height, width) if mode == "L" else (height, width, 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def gradient(width: int, height: int) -> Image.Image:
    """Smooth content (JPEG keeps it well): brightness rises left to right and top to bottom."""
    x = np.linspace(0, 1, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    return Image.fromarray(np.round(255 * (0.7 * x + 0.3 * y)).astype(np.uint8))


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ---- broken files -------------------------------------------------------------------------------


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = encode(noise(160, 120), "JPEG", quality=90)
    path = write(tmp_path, "cut.jpg", data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"unreadable image data \(.*truncated"):
        open_image(path)
    with pytest.raises(ImageError, match="unreadable image data"):
        inspect(path, max_pixels=10**8, min_side=1)
    with pytest.raises(ImageError, match="unreadable image data"):
        load_grey_array(path, 64)  # the JPEG draft path must not return half a picture


def test_zero_byte_file(tmp_path: Path) -> None:
    path = write(tmp_path, "empty.jpg", b"")
    for call in (
        lambda: open_image(path),
        lambda: inspect(path, max_pixels=10**8, min_side=1),
        lambda: load_grey_array(path, 64),
    ):
        with pytest.raises(ImageError, match="^empty file$"):
            call()


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.jpg", b"Patient list, not an image.\n" * 20)
    with pytest.raises(ImageError, match="not a recognised image format"):
        open_image(path)
    with pytest.raises(ImageError, match="not a recognised image format"):
        load_grey_array(path, 64)


def test_pil_bomb_limit_is_restored_even_after_an_error(tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    open_image(encode(noise(40, 40), "PNG"))
    with pytest.raises(ImageError):
        open_image(encode(noise(40, 40), "PNG"), max_pixels=100)
    with pytest.raises(ImageError):
        open_image(b"garbage")
    assert Image.MAX_IMAGE_PIXELS == before


# ---- modes --------------------------------------------------------------------------------------


def test_16_bit_greyscale_png_is_stretched_to_full_8_bit_range(tmp_path: Path) -> None:
    # a radiograph-like 16-bit image using only 1000..20990 of 0..65535
    raw = np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 10 + 1000
    path = write(tmp_path, "deep.png", encode(Image.fromarray(raw), "PNG"))
    img = open_image(path)
    assert img.mode == "I;16"
    grey = to_grey(img)
    assert grey.mode == "L"
    arr = np.asarray(grey)
    assert arr.dtype == np.uint8 and arr.shape == (40, 50)
    assert arr.min() == 0 and arr.max() == 255
    assert arr[0, 0] == 0 and arr[-1, -1] == 255  # darkest and brightest pixels land at the ends
    expected = np.round((raw.astype(float) - 1000) / (20990 - 1000) * 255)
    assert np.abs(arr.astype(float) - expected).max() <= 1
    # and through the array loader (not JPEG: the full-decode path)
    loaded = load_grey_array(path, 32)
    assert loaded.dtype == np.uint8 and loaded.shape == (32, 32)
    assert loaded.max() > 230 and loaded.min() < 25


def test_flat_16_bit_image_does_not_divide_by_zero(tmp_path: Path) -> None:
    flat = Image.fromarray(np.full((40, 40), 3000, dtype=np.uint16))
    arr = np.asarray(to_grey(open_image(encode(flat, "PNG"))))
    assert arr.dtype == np.uint8 and (arr == 0).all()


def test_palette_png(tmp_path: Path) -> None:
    pal = Image.new("P", (40, 40))
    pal.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0] + [0] * (256 * 3 - 9))
    arr = np.zeros((40, 40), dtype=np.uint8)
    arr[:, 20:] = 1  # white
    arr[:10, :] = 2  # red
    pal.putdata(arr.ravel().tolist())
    img = open_image(encode(pal, "PNG"))
    assert img.mode == "P"
    grey = np.asarray(to_grey(img))
    assert grey.dtype == np.uint8
    assert grey[20, 5] == 0 and grey[20, 30] == 255
    assert grey[5, 5] == round(0.299 * 255)  # ITU-R 601 luma of pure red


def test_palette_png_with_transparency_is_composited_on_black() -> None:
    pal = Image.new("P", (40, 40))
    pal.putpalette([255, 255, 255, 200, 200, 200] + [0] * (256 * 3 - 6))
    arr = np.zeros((40, 40), dtype=np.uint8)
    arr[:, 20:] = 1
    pal.putdata(arr.ravel().tolist())
    img = open_image(encode(pal, "PNG", transparency=0))  # index 0 (white) is transparent
    assert img.mode == "P" and "transparency" in img.info
    grey = np.asarray(to_grey(img))
    assert (grey[:, :20] == 0).all()  # transparent white shows the black background
    assert (grey[:, 20:] == 200).all()


def test_rgba_png_is_composited_on_black() -> None:
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[:, :20] = (255, 255, 255, 0)  # fully transparent white
    rgba[:, 20:] = (200, 200, 200, 255)  # opaque grey
    rgba[:10, 20:] = (200, 200, 200, 128)  # half transparent grey
    img = open_image(encode(Image.fromarray(rgba), "PNG"))
    assert img.mode == "RGBA"
    grey = np.asarray(to_grey(img))
    assert grey.dtype == np.uint8
    assert (grey[:, :20] == 0).all()
    assert (grey[20:, 20:] == 200).all()
    assert abs(int(grey[5, 30]) - 100) <= 1  # 200 * 128/255


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = np.zeros((60, 80, 4), dtype=np.uint8)
    cmyk[:, 40:, 3] = 255  # right half: full black ink
    path = write(tmp_path, "print.jpg", encode(Image.fromarray(cmyk, mode="CMYK"), "JPEG", quality=95))
    img = open_image(path)
    assert img.mode == "CMYK"
    grey = np.asarray(to_grey(img))
    assert grey.shape == (60, 80)
    assert grey[:, :30].mean() > 240  # no ink: white
    assert grey[:, 50:].mean() < 15  # black ink: black
    loaded = load_grey_array(path, 40)
    assert loaded.shape == (40, 40) and loaded.dtype == np.uint8
    assert loaded[:, :15].mean() > 240 and loaded[:, 25:].mean() < 15


@pytest.mark.parametrize("mode", ["1", "LA", "I", "F", "RGB"])
def test_other_modes_become_l(mode: str) -> None:
    base = gradient(48, 32)
    img = (
        base.convert(mode)
        if mode not in ("I", "F")
        else Image.fromarray(np.asarray(base).astype(np.int32 if mode == "I" else np.float32))
    )
    assert img.mode == mode
    grey = to_grey(img)
    assert grey.mode == "L" and grey.size == (48, 32)
    arr = np.asarray(grey)
    assert arr[:, -1].mean() > arr[:, 0].mean()  # orientation and contrast kept


# ---- size checks --------------------------------------------------------------------------------


def test_image_over_the_pixel_cap(tmp_path: Path) -> None:
    path = write(tmp_path, "big.png", encode(noise(200, 100), "PNG"))  # 20 000 pixels
    with pytest.raises(ImageError, match=r"200x100 exceeds the pixel cap of 10000"):
        open_image(path, max_pixels=10_000)
    with pytest.raises(ImageError, match="pixel cap of 10000"):
        inspect(path, max_pixels=10_000, min_side=1)
    with pytest.raises(ImageError, match="pixel cap of 10000"):
        load_grey_array(path, 32, max_pixels=10_000)
    assert open_image(path, max_pixels=20_000).size == (200, 100)  # the cap itself is allowed


def test_jpeg_over_the_pixel_cap_in_the_array_loader(tmp_path: Path) -> None:
    # JPEGs take the fast draft path in load_grey_array; the cap must hold there too
    path = write(tmp_path, "big.jpg", encode(noise(300, 200), "JPEG"))
    with pytest.raises(ImageError, match=r"300x200 exceeds the pixel cap of 10000"):
        load_grey_array(path, 32, max_pixels=10_000)
    assert load_grey_array(path, 32, max_pixels=60_000).shape == (32, 32)


def test_image_under_the_minimum_side(tmp_path: Path) -> None:
    path = write(tmp_path, "thin.png", encode(noise(100, 40), "PNG"))
    with pytest.raises(ImageError, match=r"100x40 is smaller than the minimum side 64"):
        inspect(path, max_pixels=10**8, min_side=64)
    info, _ = inspect(path, max_pixels=10**8, min_side=40)
    assert (info.width, info.height) == (100, 40)


# ---- orientation and the array loader -----------------------------------------------------------


def exif_jpeg(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encode(img, "JPEG", quality=95, exif=exif)


def test_exif_orientation_is_honoured(tmp_path: Path) -> None:
    raw = gradient(80, 40)  # wide; bright on the right
    path = write(tmp_path, "rotated.jpg", exif_jpeg(raw, 6))
    with Image.open(path) as stored:
        assert stored.size == (80, 40) and stored.getexif()[ORIENTATION] == 6
    img = open_image(path)
    assert img.size == (40, 80)  # width and height swap
    # orientation 6: the stored image is shown rotated 90 degrees clockwise, so its right edge
    # (bright) becomes the bottom
    arr = np.asarray(img, dtype=float)
    assert arr[-5:].mean() > arr[:5].mean() + 100
    expected = np.asarray(raw.transpose(Image.Transpose.ROTATE_270), dtype=float)
    assert np.abs(arr - expected).mean() < 3

    info, _ = inspect(path, max_pixels=10**8, min_side=1)
    assert (info.width, info.height) == (40, 80)
    assert info == ImageInfo(40, 80, "L", hashlib.sha256(path.read_bytes()).hexdigest())


def test_array_loader_honours_exif_orientation_on_the_draft_path(tmp_path: Path) -> None:
    raw = gradient(640, 320)  # large enough for the JPEG draft (reduced-scale) decode
    path = write(tmp_path, "rotated_big.jpg", exif_jpeg(raw, 6))
    arr = load_grey_array(path, 64).astype(float)
    assert arr.shape == (64, 64)
    assert arr[-8:].mean() > arr[:8].mean() + 100  # bright side at the bottom, as displayed
    expected = np.asarray(
        raw.transpose(Image.Transpose.ROTATE_270).resize((64, 64), Image.Resampling.BILINEAR), dtype=float
    )
    assert np.abs(arr - expected).mean() < 4


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_array_loader_large_jpeg_draft_matches_full_decode(tmp_path: Path, mode: str) -> None:
    raw = gradient(900, 700)
    if mode == "RGB":
        raw = Image.merge("RGB", [raw, raw, raw])
    path = write(tmp_path, f"large_{mode}.jpg", encode(raw, "JPEG", quality=90))
    fast = load_grey_array(path, 64)
    assert fast.shape == (64, 64) and fast.dtype == np.uint8
    full = np.asarray(to_grey(open_image(path)).resize((64, 64), Image.Resampling.BILINEAR), dtype=np.uint8)
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 3
    assert fast[:, -1].mean() > fast[:, 0].mean() + 100


def test_array_loader_png_and_bytes(tmp_path: Path) -> None:
    data = encode(gradient(150, 90), "PNG")
    path = write(tmp_path, "knee.png", data)
    arr = load_grey_array(path, 96)
    assert arr.shape == (96, 96) and arr.dtype == np.uint8
    assert np.array_equal(arr, load_grey_array(data, 96))  # path or bytes: same pixels
    assert arr[:, -1].mean() > arr[:, 0].mean() + 100


def test_array_loader_upscales_small_images(tmp_path: Path) -> None:
    arr = load_grey_array(encode(gradient(40, 30), "JPEG"), 128)
    assert arr.shape == (128, 128) and arr.dtype == np.uint8


def test_very_large_radiograph_under_and_over_the_pixel_cap(tmp_path):
    big = Image.new("L", (12000, 12000), 0)
    ImageDraw.Draw(big).rectangle((3000, 3000, 9000, 9000), fill=200)
    path = tmp_path / "huge.jpg"
    big.save(path, quality=80)
    del big
    info, _ = inspect(path, max_pixels=200_000_000, min_side=64)  # the default cap: kept
    assert (info.width, info.height) == (12000, 12000)
    arr = load_grey_array(path, 224, max_pixels=200_000_000)
    assert arr.shape == (224, 224) and arr[112, 112] > 150 and arr[5, 5] < 30
    with pytest.raises(ImageError, match="pixel cap"):
        inspect(path, max_pixels=100_000_000, min_side=64)


def test_letterbox_keeps_the_aspect_ratio_and_pads_with_black(tmp_path: Path) -> None:
    # a 200 x 100 white image: squashed it fills the square, letterboxed it is a centred 64 x 32 band
    path = tmp_path / "wide.png"
    Image.new("L", (200, 100), 255).save(path)
    assert (load_grey_array(path, 64) == 255).all()
    boxed = load_grey_array(path, 64, fit="letterbox")
    assert boxed.shape == (64, 64)
    assert (boxed[16:48] == 255).all() and (boxed[:16] == 0).all() and (boxed[48:] == 0).all()
    tall = tmp_path / "tall.png"
    Image.new("L", (100, 200), 255).save(tall)
    np.testing.assert_array_equal(load_grey_array(tall, 64, fit="letterbox"), boxed.T)


def test_letterbox_of_a_square_image_is_the_squash() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 90), dtype=np.uint8))
    np.testing.assert_array_equal(to_square(img, 40, "letterbox"), to_square(img, 40, "squash"))
    with pytest.raises(ValueError, match="fit must be one of"):
        to_square(img, 40, "crop")


def test_images_spilled_to_a_memory_map_are_the_same_pixels(tmp_path: Path) -> None:
    from kneexray.model.inputs import load_images

    rng = np.random.default_rng(3)
    paths = []
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40 + i, 50), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(f"{i}.png")
    in_memory = load_images(paths, 32, root=tmp_path)
    mapped = load_images(paths, 32, root=tmp_path, spill_to=tmp_path / "images.npy")
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, in_memory)
    assert np.array_equal(np.load(tmp_path / "images.npy", mmap_mode="r"), in_memory)  # the pixels are on disk
