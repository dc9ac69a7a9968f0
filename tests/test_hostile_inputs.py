"""Hostile inputs of the probe in project issue 16: each case is built here, small and fast."""

from __future__ import annotations

import io
import os
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from kneexray import DEFAULT_CLASSES
from kneexray.data import archive as archive_mod
from kneexray.data.archive import MAX_FOLDER_DEPTH, ArchiveError, ExtractLimits, extract_nested, find_class_dirs
from kneexray.data.curation import curate
from kneexray.data.dicom import read_dicom_grey
from kneexray.data.extraction import extract_dataset
from kneexray.data.fingerprint import fingerprint
from kneexray.data.images import ImageError, inspect, load_grey_array, max_file_bytes, open_image, to_grey
from kneexray.data.sources import _pack_folder
from kneexray.params import ExtractParams

CFG = ExtractParams(
    max_depth=4,
    max_total_mb=8192,
    max_ratio=200,
    max_pixels=10**7,
    min_side=32,
    near_duplicate_distance=0.006,
    keep_conflicts=False,
)


def zip_of(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def refused(tmp_path: Path, data: bytes, limits: ExtractLimits | None = None, match: str = "") -> str:
    """extract_nested must refuse `data` in one line and leave no output."""
    limits = limits or ExtractLimits()
    src = tmp_path / "hostile.zip"
    src.write_bytes(data)
    with pytest.raises(ArchiveError, match=match) as info:
        extract_nested(src, tmp_path / "out", limits)
    assert not (tmp_path / "out").exists()
    assert "\n" not in str(info.value)
    return str(info.value)


def knee_jpeg(seed: int, side: int = 96, **kwargs) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side]
    pixels = 128 + 60 * np.sin(x / (5 + seed)) * np.cos(y / 7) + rng.normal(0, 8, x.shape)
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def class_dirs(root: Path) -> dict[str, Path]:
    dirs = {c: root / c for c in DEFAULT_CLASSES}
    for i, folder in enumerate(dirs.values()):
        folder.mkdir(parents=True)
        (folder / f"good{i}.jpg").write_bytes(knee_jpeg(i))
    return dirs


def run_curate(dirs: dict[str, Path], out: Path, max_pixels: int = 10**7):
    return curate(
        {"dataset": dirs}, out, max_pixels=max_pixels, min_side=32, near_duplicate_distance=0.006, keep_conflicts=False
    )


def reasons(result) -> dict[str, str]:
    return {s["source"]: s["reason"] for s in result.audit["unreadable_files"]}


# ---- 3: ZIP bomb of many small entries ---------------------------------------------------------


def test_many_small_entries_cannot_add_up_to_a_bomb(tmp_path: Path) -> None:
    # each entry is exactly 1 MiB, where the per-entry ratio check starts: the probe's bypass
    data = zip_of({f"Normal/{i}.bin": bytes(2**20) for i in range(8)})
    message = refused(tmp_path, data, match="max_ratio=200")
    assert "zip bomb" in message


def test_each_zip_has_a_total_ratio_cap(tmp_path: Path) -> None:
    # a small bomb of small entries inside a large archive, whose overall budget it fits
    bomb = zip_of({f"{i}.txt": b"a" * 200_000 for i in range(20)})  # 4 MB from ~10 kB
    data = zip_of({"photos.bin": os.urandom(200_000), "inner.zip": bomb}, zipfile.ZIP_STORED)
    message = refused(tmp_path, data, ExtractLimits(max_ratio=50), match="together have compression ratio")
    assert "hostile.zip > inner.zip" in message and "max_ratio=50" in message


def test_expansion_over_all_levels_is_bounded_by_the_archive_size(tmp_path: Path) -> None:
    # Each level passes the ratio checks (the inner zip stores its entries; the outer entry is
    # under 1 MiB), but 900 kB of zip plus 900 kB inside it come from a ~2 kB archive.
    inner = zip_of({f"Normal/{i}.bin": bytes(300_000) for i in range(3)}, zipfile.ZIP_STORED)
    data = zip_of({"inner.zip": inner})
    message = refused(tmp_path, data, match="the archive's")
    assert "max_ratio=200" in message and "zip bomb" in message


def test_the_real_layout_is_within_the_budget(tmp_path: Path) -> None:
    inner = zip_of({f"{c}/{c}{i}.jpg": knee_jpeg(i) for c in DEFAULT_CLASSES for i in range(2)}, zipfile.ZIP_STORED)
    src = tmp_path / "ok.zip"
    src.write_bytes(zip_of({"data/knees.zip": inner}))
    assert len(extract_nested(src, tmp_path / "out")) == 6


# ---- 4: entry count before the directory is parsed ---------------------------------------------


@pytest.fixture
def forbid_zipfile_parse(monkeypatch):
    """After this is called, zipfile.ZipFile must not be reached: the count has to refuse first."""

    def parse(*args, **kwargs):
        raise AssertionError("zipfile parsed the central directory before the entry count was checked")

    return lambda: monkeypatch.setattr(archive_mod.zipfile, "ZipFile", parse)


def eocd_at(data: bytes) -> int:
    return data.rfind(b"PK\x05\x06")


def with_declared_count(data: bytes, count: int) -> bytes:
    """The end record says `count` entries, whatever the directory holds."""
    at = eocd_at(data)
    return data[: at + 8] + struct.pack("<2H", count, count) + data[at + 12 :]


def as_zip64(data: bytes, count: int | None = None) -> bytes:
    """The same zip with a ZIP64 end record (declaring `count` entries) and a classic one of 0xFFFF."""
    at = eocd_at(data)
    _, _, _, _, total, size, offset, _ = struct.unpack_from("<4s4H2LH", data, at)
    count = total if count is None else count
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, size, offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, at, 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return data[:at] + record + locator + end


MANY = zip_of({f"f{i}.txt": b"x" for i in range(20)})


@pytest.mark.parametrize(
    "data", [MANY, with_declared_count(MANY, 1), as_zip64(MANY, 1)], ids=["plain", "end-record-lies", "zip64-lies"]
)
def test_entry_count_is_refused_before_zipfile_parses(tmp_path: Path, forbid_zipfile_parse, data: bytes) -> None:
    # a lying total can't help: zipfile reads records for the directory's size, so they are walked
    forbid_zipfile_parse()
    message = refused(tmp_path, data, ExtractLimits(max_entries=5), match="more than max_entries=5")
    assert "(this zip has at least 6)" in message or "(this zip has at least 20)" in message


def test_zip64_declared_count_is_refused_at_once(tmp_path: Path, forbid_zipfile_parse) -> None:
    data = as_zip64(zip_of({"a.txt": b"a"}), 3_000_000)
    forbid_zipfile_parse()
    message = refused(tmp_path, data, match="max_entries=100000")
    assert "at least 3000000" in message


@pytest.mark.parametrize("comment", [b"c" * 5000, b"PK\x05\x06 looks like an end record" + b"c" * 5000])
def test_archive_comment_does_not_hide_the_end_record(tmp_path: Path, forbid_zipfile_parse, comment: bytes) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.comment = comment
        for i in range(20):
            zf.writestr(f"f{i}.txt", b"x")
    forbid_zipfile_parse()
    refused(tmp_path, buf.getvalue(), ExtractLimits(max_entries=5), match="max_entries=5")


def test_zip64_end_record_under_the_cap_extracts(tmp_path: Path) -> None:
    src = tmp_path / "z64.zip"
    src.write_bytes(as_zip64(zip_of({"Normal/a.txt": b"a", "Normal/b.txt": b"b"})))
    assert len(extract_nested(src, tmp_path / "out", ExtractLimits(max_entries=2))) == 2


# ---- 8: whole files in memory; size cap on one image -------------------------------------------


def sparse(path: Path, size: int) -> Path:
    """A file of `size` zero bytes that takes no disk (and no time) to make."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def peak_python_memory(call) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_oversized_file_is_skipped_unread_with_an_audit_entry(tmp_path: Path) -> None:
    dirs = class_dirs(tmp_path / "raw")
    cap = max_file_bytes(10_000)
    sparse(dirs["normal"] / "stray.jpg", cap + 1)
    result = None

    def run() -> None:
        nonlocal result
        result = run_curate(dirs, tmp_path / "out", max_pixels=10_000)

    assert peak_python_memory(run) < cap // 2  # never read into memory
    assert f"over the {cap}-byte cap" in reasons(result)["normal/stray.jpg"]
    assert result.audit["images_kept"] == 3


def test_the_size_cap_follows_max_pixels(tmp_path: Path) -> None:
    assert max_file_bytes(200_000_000) == 4 * 200_000_000 + 16 * 2**20  # 1.5 GiB is over the default
    path = sparse(tmp_path / "big.png", max_file_bytes(100) + 1)
    for call in (
        lambda: open_image(path, max_pixels=100),
        lambda: inspect(path, max_pixels=100, min_side=1),
        lambda: load_grey_array(path, 32, max_pixels=100),
        lambda: read_dicom_grey(path, max_pixels=100),
    ):
        with pytest.raises(ImageError, match="cap for one image"):
            call()


def test_folder_source_streams_its_files(tmp_path: Path) -> None:
    sparse(tmp_path / "src" / "Normal" / "big.bin", 24 * 2**20)
    (tmp_path / "src" / "Normal" / "a.jpg").write_bytes(knee_jpeg(1))
    out = tmp_path / "raw.zip"
    assert peak_python_memory(lambda: _pack_folder(tmp_path / "src", out)) < 8 * 2**20
    with zipfile.ZipFile(out) as zf:
        assert {i.filename: i.file_size for i in zf.infolist()} == {
            "Normal/a.jpg": len(knee_jpeg(1)),
            "Normal/big.bin": 24 * 2**20,
        }


# ---- 9: one odd file must not stop a run --------------------------------------------------------


def lab_tiff(side: int = 64) -> bytes:
    lightness = np.tile(np.linspace(0, 255, side).astype(np.uint8), (side, 1))
    lab = Image.merge(
        "LAB", [Image.fromarray(lightness), Image.new("L", (side, side), 140), Image.new("L", (side, side), 100)]
    )
    buf = io.BytesIO()
    lab.save(buf, "TIFF")
    return buf.getvalue()


def test_lab_tiff_becomes_its_lightness() -> None:
    img = open_image(lab_tiff())
    assert img.mode == "LAB"
    grey = to_grey(img)
    assert grey.mode == "L" and np.array_equal(np.asarray(grey), np.asarray(img.getchannel("L")))
    assert load_grey_array(lab_tiff(), 32).shape == (32, 32)


def test_unconvertible_mode_is_an_image_error() -> None:
    with pytest.raises(ImageError, match="colour mode La cannot be converted"):
        to_grey(Image.new("La", (8, 8)))


def test_curation_keeps_a_lab_tiff_and_goes_on(tmp_path: Path) -> None:
    dirs = class_dirs(tmp_path / "raw")
    (dirs["osteopenia"] / "lab.tif").write_bytes(lab_tiff())
    result = run_curate(dirs, tmp_path / "out")
    assert "osteopenia/lab.tif" in set(result.index["source"])
    assert result.audit["images_kept"] == 4


def test_a_failing_fingerprint_is_one_audit_entry(tmp_path: Path, monkeypatch) -> None:
    dirs = class_dirs(tmp_path / "raw")
    (dirs["normal"] / "odd.jpg").write_bytes(knee_jpeg(9, side=77))

    def flaky(img):
        if img.size == (77, 77):
            raise RuntimeError("something odd in this one")
        return fingerprint(img)

    monkeypatch.setattr("kneexray.data.curation.fingerprint", flaky)
    result = run_curate(dirs, tmp_path / "out")
    assert reasons(result) == {"normal/odd.jpg": "unusable image (RuntimeError: something odd in this one)"}
    assert result.audit["images_kept"] == 3


def dicom_bytes(samples: int = 1, rows=16) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns = rows, 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, "MONOCHROME2"
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.arange(16 * 16 * samples, dtype="<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("kwargs", "reason"), [({"samples": 3}, "3 samples per pixel"), ({"rows": [16, 16]}, "Rows has 2 values")]
)
def test_odd_dicoms_are_one_line_image_errors(kwargs: dict, reason: str) -> None:
    with pytest.raises(ImageError, match=reason) as info:
        read_dicom_grey(dicom_bytes(**kwargs))
    assert "\n" not in str(info.value)
    assert read_dicom_grey(dicom_bytes()).size == (16, 16)  # the same file, well formed, is fine


def test_dicom_element_that_fails_when_read_is_an_image_error() -> None:
    data = dicom_bytes()
    rows = data.find(b"\x28\x00\x10\x00US\x02\x00")  # (0028,0010) Rows, US, 2 bytes
    odd = data[: rows + 6] + b"\x03\x00" + data[rows + 8 : rows + 10] + b"\x00" + data[rows + 10 :]  # 3 bytes
    with pytest.raises(ImageError, match=r"unreadable DICOM header \(BytesLengthException") as info:
        read_dicom_grey(odd)  # pydicom converts the value only when it is first read
    assert "\n" not in str(info.value)


def test_predict_reports_odd_files_and_classifies_the_rest(tmp_path: Path, monkeypatch) -> None:
    from kneexray import predict

    (tmp_path / "lab.tif").write_bytes(lab_tiff())
    (tmp_path / "rgb.dcm").write_bytes(dicom_bytes(samples=3))
    (tmp_path / "rows.dcm").write_bytes(dicom_bytes(rows=[16, 16]))
    (tmp_path / "odd.png").write_bytes(b"png")
    assert predict._decode(tmp_path / "lab.tif", 32).shape == (32, 32)
    assert "3 samples per pixel" in predict._decode(tmp_path / "rgb.dcm", 32)
    assert "Rows has 2 values" in predict._decode(tmp_path / "rows.dcm", 32)
    real = predict.load_for_model

    def surprising(path, size, fit="squash"):
        if Path(path).name == "odd.png":
            raise KeyError("a plugin bug")
        return real(path, size, fit)

    monkeypatch.setattr(predict, "load_for_model", surprising)
    assert predict._decode(tmp_path / "odd.png", 32) == "unusable image (KeyError: 'a plugin bug')"


# ---- 10: long flattened names, very deep folders -----------------------------------------------


def test_long_flattened_names_are_shortened_the_same_way_each_run(tmp_path: Path) -> None:
    dirs = class_dirs(tmp_path / "raw")
    nested = dirs["normal"] / ("a" * 100) / ("b" * 100) / ("c" * 100)  # flattened: over 255 bytes
    nested.mkdir(parents=True)
    (nested / "knee.jpg").write_bytes(knee_jpeg(20))
    (nested / "knee2.jpg").write_bytes(knee_jpeg(21))
    first, second = (run_curate(dirs, tmp_path / name) for name in ("out1", "out2"))
    assert list(first.index["path"]) == list(second.index["path"])
    long_ones = [p for p in first.index["path"] if "aaa" in p]
    assert len(long_ones) == 2 and len(set(long_ones)) == 2
    for path in long_ones:
        name = path.split("/", 1)[1]
        assert len(name.encode()) <= 200 and name.endswith(".jpg") and (tmp_path / "out1" / path).is_file()


@pytest.fixture
def deep_folder(tmp_path: Path):
    """A folder 1,500 levels deep, made and removed without recursion (pytest's cleanup recurses)."""
    made = [tmp_path / "deep"]
    made[0].mkdir()
    for _ in range(1500):
        made.append(made[-1] / "d")
        made[-1].mkdir()
    (made[-1] / "x.jpg").write_bytes(knee_jpeg(3))
    yield made[0]
    (made[-1] / "x.jpg").unlink()
    for folder in reversed(made):
        folder.rmdir()


def test_a_very_deep_folder_is_a_one_line_error(tmp_path: Path, deep_folder: Path) -> None:
    dirs = class_dirs(tmp_path / "raw")
    os.replace(deep_folder, dirs["normal"] / "deep")
    try:
        with pytest.raises(ArchiveError, match=f"more than {MAX_FOLDER_DEPTH} levels deep"):
            run_curate(dirs, tmp_path / "out")
        with pytest.raises(ArchiveError, match=f"more than {MAX_FOLDER_DEPTH} levels deep"):
            find_class_dirs(tmp_path / "raw", DEFAULT_CLASSES)
        with pytest.raises(ArchiveError, match=f"more than {MAX_FOLDER_DEPTH} levels deep"):
            _pack_folder(tmp_path / "raw", tmp_path / "raw.zip")
    finally:
        os.replace(dirs["normal"] / "deep", deep_folder)


def test_a_very_deep_zip_entry_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, zip_of({"d/" * 1500 + "x.jpg": b"x"}), match="folders deep")
    assert "1501 folders deep" in message


# ---- 11: scratch of a killed run; a JPEG cut after its header ----------------------------------


def test_scratch_of_killed_runs_is_removed_and_live_ones_kept(tmp_path: Path, monkeypatch) -> None:
    fcntl = pytest.importorskip("fcntl")
    data = tmp_path / "data"
    stale = data / ".extract-killed"
    (stale / "unpacked" / "Normal").mkdir(parents=True)
    (stale / "unpacked" / "Normal" / "x.jpg").write_bytes(b"x")
    live = data / ".extract-live"
    live.mkdir()
    other = data / ".elsewhere-keep"
    other.mkdir()
    (data / ".extract-a-file").write_bytes(b"not a folder")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running extract holds its own
    seen = []

    def fake_extract(archive, dest, limits):
        scratch = Path(dest).parent
        probe = os.open(scratch, os.O_RDONLY)
        try:  # this run's scratch is locked while it runs
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
        seen.append(scratch)
        raise ArchiveError("stop here")

    monkeypatch.setattr("kneexray.data.extraction.extract_nested", fake_extract)
    try:
        with pytest.raises(ArchiveError, match="stop here"):
            extract_dataset(
                tmp_path / "raw.zip", data / "prepared", tmp_path / "a.json", tmp_path / "d.json", CFG, DEFAULT_CLASSES
            )
    finally:
        os.close(fd)
    assert not stale.exists() and live.is_dir() and other.is_dir() and (data / ".extract-a-file").is_file()
    assert seen and not seen[0].exists()  # its own scratch removed too


def complete_and_cut(jpeg: bytes) -> dict[str, bytes]:
    scan = jpeg.rfind(b"\xff\xda")
    return {
        "cut after the header, end marker added": jpeg[: scan + 40] + b"\xff\xd9",
        "cut half way, end marker added": jpeg[: len(jpeg) // 2] + b"\xff\xd9",
        "cut after the header, zero-padded": jpeg[: scan + 40].ljust(len(jpeg), b"\0"),
    }


@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"restart_marker_blocks": 4}])
def test_jpeg_cut_after_its_header_is_unreadable(tmp_path: Path, options: dict) -> None:
    good = knee_jpeg(5, side=128, **options)
    assert open_image(good).size == (128, 128)
    for how, data in complete_and_cut(good).items():
        with pytest.raises(ImageError, match="truncated") as info:  # the padded one PIL already refuses
            open_image(data)
        if "end marker added" in how:  # libjpeg fills these in with only a warning
            assert "truncated JPEG: its data ends before the image does" in str(info.value), how
        path = tmp_path / "cut.jpg"
        path.write_bytes(data)
        with pytest.raises(ImageError, match="truncated"):
            inspect(path, max_pixels=10**7, min_side=1)


@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"restart_marker_blocks": 2}])
def test_complete_jpegs_with_flat_corners_are_kept(options: dict) -> None:
    pixels = np.zeros((120, 200), np.uint8)
    pixels[20:80, 30:150] = 200  # a bright knee on black: the last blocks are flat, as a fill would be
    for mode in ("L", "RGB"):
        buf = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buf, "JPEG", quality=85, **options)
        assert open_image(buf.getvalue() + b"trailing bytes after the end marker").size == (200, 120)


def test_curation_lists_a_cut_jpeg_as_unreadable(tmp_path: Path) -> None:
    dirs = class_dirs(tmp_path / "raw")
    good = knee_jpeg(7, side=128)
    (dirs["normal"] / "cut.jpg").write_bytes(good[: good.rfind(b"\xff\xda") + 40] + b"\xff\xd9")
    result = run_curate(dirs, tmp_path / "out")
    assert "truncated JPEG" in reasons(result)["normal/cut.jpg"]
    assert result.audit["images_kept"] == 3


def test_decoding_memory_is_bounded_in_bytes_not_only_pixels(tmp_path, monkeypatch):
    """A small float32 TIFF under the pixel cap still can't take gigabytes: its decode is refused
    up front when it would need more than MAX_DECODE_BYTES (here lowered to 32 MiB)."""
    from PIL import Image as PILImage

    from kneexray.data import images

    path = tmp_path / "huge.tif"
    PILImage.fromarray(np.zeros((2000, 2000), np.float32), mode="F").save(path, compression="tiff_deflate")
    assert path.stat().st_size < 2**20  # compresses to almost nothing
    monkeypatch.setattr(images, "MAX_DECODE_BYTES", 32 * 2**20)
    with pytest.raises(images.ImageError, match=r"2000x2000 F would take .* to decode"):
        images.open_image(path)
    monkeypatch.setattr(images, "MAX_DECODE_BYTES", 2**30)
    assert images.to_grey(images.open_image(path)).size == (2000, 2000)  # allowed: decoded and converted
