"""kneexray.data.archive: nested extraction, hostile archives, class-folder discovery."""

from __future__ import annotations

import io
import os
import stat
import warnings
import zipfile
from pathlib import Path

import pytest

from kneexray.data import archive as archive_mod
from kneexray.data.archive import ArchiveError, ExtractLimits, extract_nested, find_class_dirs

DEFAULT_CLASSES = ("normal", "osteopenia", "osteoporosis")


def zip_bytes(entries: dict[str, bytes] | list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    items = entries.items() if isinstance(entries, dict) else entries
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate-name cases are deliberate
        with zipfile.ZipFile(buf, "w", compression) as zf:
            for name, data in items:
                zf.writestr(name, data)
    return buf.getvalue()


def write_zip(path: Path, entries, **kwargs) -> Path:
    path.write_bytes(zip_bytes(entries, **kwargs))
    return path


def snapshot(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture
def hostile(tmp_path: Path):
    """Run extract_nested on a zip in tmp_path/src and check nothing was written anywhere."""

    def run(entries_or_bytes, limits: ExtractLimits | None = None, match: str | None = None) -> str:
        limits = limits or ExtractLimits()
        src = tmp_path / "src"
        src.mkdir(exist_ok=True)
        zpath = src / "hostile.zip"
        data = entries_or_bytes if isinstance(entries_or_bytes, bytes) else zip_bytes(entries_or_bytes)
        zpath.write_bytes(data)
        before = snapshot(tmp_path)
        dest = tmp_path / "out"
        with pytest.raises(ArchiveError, match=match) as info:
            extract_nested(zpath, dest, limits)
        assert snapshot(tmp_path) == before  # nothing outside dest, and dest itself removed
        assert not dest.exists()
        assert not (tmp_path / "evil.txt").exists()
        message = str(info.value)
        assert "\n" not in message
        return message

    return run


def knee_inner_zip() -> bytes:
    return zip_bytes(
        {
            "Knee-X-ray/Normal/n1.jpg": b"n1",
            "Knee-X-ray/OSTEOPENIA/p1.jpg": b"p1",
            "Knee-X-ray/osteo porosis/o1.jpg": b"o1",
            "Knee-X-ray/osteo porosis/o2.jpg": b"o2",
        }
    )


def test_nested_zip_extracted_and_classes_found(tmp_path: Path) -> None:
    outer = write_zip(
        tmp_path / "outer.zip",
        {
            "readme.txt": b"hello",
            "dataset/Knee.ZIP": knee_inner_zip(),
            "__MACOSX/dataset/._Knee.ZIP": b"resource fork, not a zip",
        },
    )
    dest = tmp_path / "out"
    files = extract_nested(outer, dest)
    rel = sorted(p.relative_to(dest).as_posix() for p in files)
    assert rel == [
        "dataset/Knee/Knee-X-ray/Normal/n1.jpg",
        "dataset/Knee/Knee-X-ray/OSTEOPENIA/p1.jpg",
        "dataset/Knee/Knee-X-ray/osteo porosis/o1.jpg",
        "dataset/Knee/Knee-X-ray/osteo porosis/o2.jpg",
        "readme.txt",
    ]
    assert not (dest / "dataset" / "Knee.ZIP").exists()  # the inner zip is not kept
    assert not (dest / "__MACOSX").exists()
    assert all(p.is_file() for p in files)
    assert (dest / "dataset/Knee/Knee-X-ray/osteo porosis/o2.jpg").read_bytes() == b"o2"

    found = find_class_dirs(dest, DEFAULT_CLASSES)
    base = dest / "dataset/Knee/Knee-X-ray"
    assert found == {
        "normal": base / "Normal",
        "osteopenia": base / "OSTEOPENIA",
        "osteoporosis": base / "osteo porosis",
    }
    assert list(found) == list(DEFAULT_CLASSES)


def test_dest_may_exist_empty_and_is_kept_empty_on_error(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    good = write_zip(tmp_path / "good.zip", {"a/b.txt": b"x"})
    assert extract_nested(good, dest) == [dest / "a" / "b.txt"]
    with pytest.raises(ArchiveError, match="not empty"):
        extract_nested(good, dest)
    bad = write_zip(tmp_path / "bad.zip", {"ok.txt": b"x", "inner.zip": zip_bytes({"../evil.txt": b"x"})})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArchiveError, match=r"'\.\.'"):
        extract_nested(bad, empty)
    assert empty.is_dir() and list(empty.iterdir()) == []  # existed before: emptied, not removed


def test_created_parents_removed_on_error(tmp_path: Path) -> None:
    bad = write_zip(tmp_path / "bad.zip", {"ok.txt": b"x", "/etc/evil.txt": b"x"})
    with pytest.raises(ArchiveError, match="absolute"):
        extract_nested(bad, tmp_path / "new" / "deeper" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


def test_validates_whole_zip_before_writing(tmp_path: Path, monkeypatch) -> None:
    writes = []
    monkeypatch.setattr(archive_mod._Extractor, "_write", lambda self, *a: writes.append(a))
    bad = write_zip(tmp_path / "bad.zip", {"first.txt": b"ok", "../evil.txt": b"x"})
    with pytest.raises(ArchiveError):
        extract_nested(bad, tmp_path / "out")
    assert writes == []


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("../evil.txt", r"'\.\.'"),
        ("a/../../evil.txt", r"'\.\.'"),
        ("a\\..\\..\\evil.txt", r"'\.\.'"),
        ("/etc/evil.txt", "absolute"),
        ("C:\\evil.txt", "absolute"),
        ("c:evil.txt", "absolute"),
        ("\\evil.txt", "absolute"),
        ("//server/share/evil.txt", "absolute"),
    ],
)
def test_path_traversal_rejected(hostile, name: str, match: str) -> None:
    message = hostile({"fine.txt": b"ok", name: b"pwned"}, match=match)
    assert repr(name) in message  # names the entry


def test_traversal_inside_nested_zip_rejected(hostile) -> None:
    message = hostile({"ok/a.txt": b"ok", "ok/inner.zip": zip_bytes({"../../evil.txt": b"x"})}, match=r"'\.\.'")
    assert "inner.zip" in message


def test_symlink_entry_rejected(tmp_path: Path, hostile) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        link = zipfile.ZipInfo("link")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, str(tmp_path / "evil.txt"))
        zf.writestr("link/evil.txt", b"through the link")
    hostile(buf.getvalue(), match="symbolic link")


def test_special_file_entry_rejected(hostile) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        fifo = zipfile.ZipInfo("pipe")
        fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
        zf.writestr(fifo, b"")
    hostile(buf.getvalue(), match="special file")


def test_ratio_zip_bomb_rejected(hostile) -> None:
    zeros = bytes(8 * 2**20)  # deflates ~1000:1
    message = hostile({"bomb.bin": zeros}, match="compression ratio")
    assert "zip bomb" in message


def test_small_compressible_files_are_fine(tmp_path: Path) -> None:
    z = write_zip(tmp_path / "z.zip", {"notes.txt": b" " * 500_000})  # ratio ~1000 but < 1 MiB
    assert len(extract_nested(z, tmp_path / "out")) == 1


def test_declared_size_over_budget_rejected(hostile) -> None:
    hostile(
        {"a.bin": os.urandom(600_000), "b.bin": os.urandom(600_000)},
        limits=ExtractLimits(max_total_bytes=1_000_000),
        match="max_total_bytes",
    )


def test_budget_counts_all_levels(hostile) -> None:
    inner = zip_bytes({"x.bin": os.urandom(400_000)}, compression=zipfile.ZIP_STORED)
    # each level fits alone; outer files + inner zip + its content do not
    hostile(
        {"a.bin": os.urandom(300_000), "inner.zip": inner},
        limits=ExtractLimits(max_total_bytes=1_000_000),
        match="max_total_bytes",
    )


def test_lying_header_is_caught(hostile, tmp_path: Path) -> None:
    """Central directory claims 10 bytes for 600 kB: the budget check passes, reading must not."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.bin", os.urandom(600_000))
        zf.infolist()[0].file_size = 10  # written into the central directory at close
    message = hostile(buf.getvalue(), limits=ExtractLimits(max_total_bytes=100_000), match="corrupt")
    assert "'big.bin'" in message


def test_streaming_budget_enforced_even_if_declared_sizes_pass(tmp_path: Path, monkeypatch) -> None:
    # Simulate a decompressor that yields more than declared: the byte count must stop it.
    z = write_zip(tmp_path / "z.zip", {"a.bin": b"x" * 10})
    real_open = zipfile.ZipFile.open

    def endless(self, info, *args, **kwargs):
        handle = real_open(self, info, *args, **kwargs)
        handle.read = lambda n=-1: b"y" * 4096
        return handle

    monkeypatch.setattr(zipfile.ZipFile, "open", endless)
    with pytest.raises(ArchiveError, match="expands past"):
        extract_nested(z, tmp_path / "out", ExtractLimits(max_total_bytes=50_000))
    assert not (tmp_path / "out").exists()


def test_depth_limit(tmp_path: Path, hostile) -> None:
    def chain(levels: int) -> bytes:
        data = zip_bytes({"Normal/deep.jpg": b"d"})
        for i in range(levels - 1):
            data = zip_bytes({f"level{i}.zip": data})
        return data

    ok = tmp_path / "ok.zip"
    ok.write_bytes(chain(3))
    files = extract_nested(ok, tmp_path / "ok_out", ExtractLimits(max_depth=3))
    assert [p.relative_to(tmp_path / "ok_out").as_posix() for p in files] == ["level1/level0/Normal/deep.jpg"]
    hostile(chain(4), limits=ExtractLimits(max_depth=3), match="max_depth=3")
    hostile(chain(6), match="max_depth=4")


def test_entry_count_limit(hostile) -> None:
    hostile({f"f{i}.txt": b"x" for i in range(10)}, limits=ExtractLimits(max_entries=5), match="max_entries=5")


def test_encrypted_entry_rejected(hostile) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("secret.jpg", b"xx")
        zf.infolist()[0].flag_bits |= 0x1
    hostile(buf.getvalue(), match="encrypted entry 'secret.jpg'|encrypted entry is not supported")


def test_truncated_zip_rejected(hostile) -> None:
    data = zip_bytes({"a.bin": os.urandom(50_000)})
    message = hostile(data[: len(data) // 2], match="not a readable zip")
    assert "hostile.zip" in message


def test_crc_error_rejected_and_cleaned(hostile) -> None:
    payload = b"A" * 5000
    data = bytearray(zip_bytes({"good.txt": b"fine", "bad.txt": payload}, compression=zipfile.ZIP_STORED))
    at = data.index(payload)
    data[at + 100] ^= 0xFF
    message = hostile(bytes(data), match="corrupt")
    assert "'bad.txt'" in message and "hostile.zip" in message


def test_corrupt_nested_zip_named(hostile) -> None:
    message = hostile({"ok.txt": b"x", "inner.zip": b"this is not a zip"}, match="not a readable zip")
    assert "inner.zip" in message


@pytest.mark.parametrize(
    "entries",
    [
        [("a/X.jpg", b"1"), ("a/x.jpg", b"2")],
        [("a/b.txt", b"1"), ("a/b.txt", b"2")],
        [("a", b"file"), ("a/b.txt", b"child")],
        [("data", b"file"), ("data.zip", zip_bytes({"x.txt": b"x"}))],
        [("caf\u00e9.txt", b"1"), ("cafe\u0301.txt", b"2")],  # NFC vs NFD spelling
    ],
)
def test_colliding_entries_rejected(hostile, entries) -> None:
    hostile(entries, match="collides|also a file")


def test_collision_across_levels_rejected(hostile) -> None:
    hostile({"d/Inner/Scan.jpg": b"1", "d/inner.zip": zip_bytes({"scan.jpg": b"2"})}, match="collides")


def test_folder_case_variants_merge(tmp_path: Path) -> None:
    z = write_zip(tmp_path / "z.zip", {"Normal/a.jpg": b"a", "NORMAL/b.jpg": b"b"})
    files = extract_nested(z, tmp_path / "out")
    assert [p.relative_to(tmp_path / "out").as_posix() for p in files] == ["Normal/a.jpg", "Normal/b.jpg"]


def test_control_characters_rejected(hostile) -> None:
    hostile({"bad\x01name.txt": b"x"}, match="control characters")


def test_nul_in_name_rejected(hostile) -> None:
    # zipfile cuts names at NUL on write, so patch the raw bytes afterwards
    data = zip_bytes({"evil.txtXjpg": b"x"}).replace(b"evil.txtXjpg", b"evil.txt\x00jpg")
    hostile(data, match="NUL")


def test_cp437_names_accepted(tmp_path: Path) -> None:
    # no UTF-8 flag: zipfile decodes the name as cp437 (0x82 is e-acute there)
    data = zip_bytes({"cafXX.txt": b"x"}).replace(b"cafXX.txt", b"caf\x82_.txt")
    z = tmp_path / "z.zip"
    z.write_bytes(data)
    files = extract_nested(z, tmp_path / "out")
    assert [p.name for p in files] == ["caf\u00e9_.txt"]


def test_missing_archive_and_non_empty_dest(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="does not exist"):
        extract_nested(tmp_path / "nope.zip", tmp_path / "out")
    z = write_zip(tmp_path / "z.zip", {"a.txt": b"x"})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ArchiveError, match="not empty"):
        extract_nested(z, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- find_class_dirs


def make_dirs(root: Path, *rels: str) -> None:
    for rel in rels:
        (root / rel).mkdir(parents=True, exist_ok=True)


def test_find_class_dirs_variants_and_ignored_copies(tmp_path: Path) -> None:
    make_dirs(
        tmp_path,
        "x/data/normal_",
        "x/data/Osteo-Penia",
        "x/data/OSTEO_POROSIS",
        "__MACOSX/x/data/normal",
        "__MACOSX/x/data/osteopenia",
        "__MACOSX/x/data/osteoporosis",
        ".cache/normal",
        ".cache/osteopenia",
        ".cache/osteoporosis",
    )
    found = find_class_dirs(tmp_path, DEFAULT_CLASSES)
    assert found == {
        "normal": tmp_path / "x/data/normal_",
        "osteopenia": tmp_path / "x/data/Osteo-Penia",
        "osteoporosis": tmp_path / "x/data/OSTEO_POROSIS",
    }


def test_find_class_dirs_at_root(tmp_path: Path) -> None:
    make_dirs(tmp_path, "Normal", "Osteopenia", "Osteoporosis", "Normal/extra")
    assert find_class_dirs(tmp_path, DEFAULT_CLASSES)["normal"] == tmp_path / "Normal"


def test_find_class_dirs_none_lists_found_folders(tmp_path: Path) -> None:
    make_dirs(tmp_path, "images/Normal", "images/Osteopenia", "images/Other")
    with pytest.raises(ArchiveError) as info:
        find_class_dirs(tmp_path, DEFAULT_CLASSES)
    message = str(info.value)
    assert "osteoporosis" in message
    for name in ("images", "images/Normal", "images/Osteopenia", "images/Other"):
        assert name in message
    assert "\n" not in message


def test_find_class_dirs_lists_at_most_20(tmp_path: Path) -> None:
    make_dirs(tmp_path, *[f"d{i:02d}" for i in range(30)])
    message = str(pytest.raises(ArchiveError, find_class_dirs, tmp_path, DEFAULT_CLASSES).value)
    assert "d19" in message and "d20" not in message and "10 more" in message


def test_find_class_dirs_ambiguous(tmp_path: Path) -> None:
    make_dirs(tmp_path, *[f"{split}/{c}" for split in ("train", "test") for c in DEFAULT_CLASSES])
    with pytest.raises(ArchiveError, match="several folders") as info:
        find_class_dirs(tmp_path, DEFAULT_CLASSES)
    assert "train" in str(info.value) and "test" in str(info.value)


def test_find_class_dirs_two_spellings_of_one_class(tmp_path: Path) -> None:
    make_dirs(tmp_path, "d/Normal", "d/normal_", "d/osteopenia", "d/osteoporosis")
    with pytest.raises(ArchiveError, match="same class"):
        find_class_dirs(tmp_path, DEFAULT_CLASSES)
