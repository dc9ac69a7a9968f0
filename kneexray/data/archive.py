"""Safe extraction of nested ZIP archives, and discovery of the class folders inside them.

Datasets arrive as zips of zips built on any OS, so extraction trusts nothing in them: every entry
of a zip is validated (paths, links, sizes, nesting, collisions) before any of it is written, and
the size budget is enforced again on the bytes actually produced.
"""

from __future__ import annotations

import logging
import lzma
import os
import re
import shutil
import stat
import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kneexray.errors import KneexrayError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_RATIO_MIN_BYTES = 1 << 20  # the ratio cap only applies above this, so tiny text files don't trip it
_ENCRYPTED = 0x1
# Folders in one path, over all nesting levels. Datasets use under 10; a deeper tree only serves to
# hit Python's recursion limit (pathlib's mkdir and shutil.rmtree recurse per level in 3.11).
MAX_FOLDER_DEPTH = 100
_IGNORED_DIRS = ("__macosx",)  # macOS resource-fork junk; never data
# what zipfile and the decompressors raise on damaged data (ArchiveError is excluded before these)
_CORRUPT = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError, ValueError)


class ArchiveError(KneexrayError, ValueError):
    """A hostile, corrupt or unexpected archive; the message is one line naming the entry."""


@dataclass(frozen=True)
class ExtractLimits:
    max_depth: int = 4  # nesting levels of zips-in-zips (the outer zip is depth 1)
    # bytes written over all levels, inner zips included; never more than max_ratio x the outer
    # archive's size either (or 1 MiB), so thousands of small entries can't add up to a bomb
    max_total_bytes: int = 8 * 2**30
    max_ratio: float = 200.0  # uncompressed/compressed cap per entry, per zip and overall (zip bomb)
    max_entries: int = 100_000  # entries over all levels


def extract_nested(archive: str | Path, dest: str | Path, limits: ExtractLimits = ExtractLimits()) -> list[Path]:
    """Extract `archive` into `dest`, recursing into member zips; return the regular files written.

    A member ``x/inner.zip`` (any case) is extracted into ``x/inner/`` and not kept. `dest` must be
    absent or an empty folder. On any error `dest` is put back as it was: removed (with any parent
    folders this call created) if it did not exist, emptied if it already existed. Entries under
    ``__MACOSX/`` are skipped.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise ArchiveError(f"archive {archive} does not exist or is not a file")
    existed = dest.exists() or dest.is_symlink()
    if existed:
        if not dest.is_dir():
            raise ArchiveError(f"extraction destination {dest} exists and is not a folder")
        if any(dest.iterdir()):
            raise ArchiveError(f"extraction destination {dest} is not empty")
    top = dest  # the topmost folder this call creates, so a failure can remove it again
    while not existed and not top.parent.exists():
        top = top.parent
    dest.mkdir(parents=True, exist_ok=True)
    extractor = _Extractor(dest, limits, archive.stat().st_size)
    try:
        extractor.extract(archive, (), 1, archive.name)
    except BaseException:
        _reset(dest if existed else top, remove=not existed)
        raise
    log.info("extracted %d files from %s into %s (%d bytes)", len(extractor.files), archive, dest, extractor.written)
    return extractor.files


@dataclass
class _Planned:
    info: zipfile.ZipInfo
    rel: tuple[str, ...]  # canonical output path, relative to dest
    kind: str  # "dir" | "file" | "zip"
    inner: tuple[str, ...] = ()  # for "zip": the folder it is extracted into


class _Extractor:
    def __init__(self, dest: Path, limits: ExtractLimits, archive_bytes: int) -> None:
        self.dest = dest
        self.limits = limits
        by_ratio = max(_RATIO_MIN_BYTES, int(limits.max_ratio * archive_bytes))
        self.budget = min(limits.max_total_bytes, by_ratio)
        self.budget_text = (
            f"max_total_bytes={limits.max_total_bytes}"
            if self.budget == limits.max_total_bytes
            else f"max_ratio={limits.max_ratio:g} x the archive's {archive_bytes} bytes"
        )
        self.written = 0
        self.entries = 0
        self.files: list[Path] = []
        # case-folded output path -> "file" | "dir", over all levels: two entries that would land on
        # the same path on macOS/Windows are a collision even on a case-sensitive disk
        self.kinds: dict[str, str] = {}
        self.dir_spelling: dict[str, tuple[str, ...]] = {}  # first spelling wins, variants merge

    def extract(self, zip_path: Path, base: tuple[str, ...], depth: int, label: str) -> None:
        left = self.limits.max_entries - self.entries
        try:
            # before zipfile parses the directory: it builds an object per record (~400 bytes each)
            records = _count_records(zip_path, left)
        except OSError as err:
            raise ArchiveError(f"{label}: not a readable zip archive ({_one_line(err)})") from None
        if records > left:
            raise ArchiveError(
                f"{label}: more than max_entries={self.limits.max_entries} entries in total "
                f"(this zip has at least {records})"
            )
        try:
            zf = zipfile.ZipFile(zip_path)
        except (OSError, *_CORRUPT) as err:
            raise ArchiveError(f"{label}: not a readable zip archive ({_one_line(err)})") from None
        nested: list[_Planned] = []
        with zf:
            plan = self._plan(zf, base, depth, label, zip_path.stat().st_size)  # all validated before writing
            for item in plan:
                target = self.dest.joinpath(*item.rel)
                if item.kind == "dir":
                    self._mkdir(target, item, label)
                    continue
                self._mkdir(target.parent, item, label)
                self._write(zf, item, target, label)
                if item.kind == "zip":
                    nested.append(item)
                else:
                    self.files.append(target)
        for item in nested:
            zip_file = self.dest.joinpath(*item.rel)
            self._mkdir(self.dest.joinpath(*item.inner), item, label)
            self.extract(zip_file, item.inner, depth + 1, f"{label} > {item.info.filename}")
            zip_file.unlink()

    # ------------------------------------------------------------------------------- validation

    def _plan(
        self, zf: zipfile.ZipFile, base: tuple[str, ...], depth: int, label: str, zip_bytes: int
    ) -> list[_Planned]:
        limits = self.limits
        infos = zf.infolist()
        self.entries += len(infos)
        if self.entries > limits.max_entries:  # _count_records should have said so already
            raise ArchiveError(
                f"{label}: more than max_entries={limits.max_entries} entries in total (this zip has {len(infos)})"
            )
        budget = self.budget - self.written
        declared = 0
        plan: list[_Planned] = []
        for info in infos:
            name = info.orig_filename  # .filename is cut at a NUL; the original still has it
            where = f"{label}: entry {name!r}"
            if any(unicodedata.category(ch) == "Cc" for ch in name):
                raise ArchiveError(f"{where} has control characters or NUL in its name")
            if info.flag_bits & _ENCRYPTED:
                raise ArchiveError(f"{where} is encrypted; encrypted entry is not supported")
            file_type = stat.S_IFMT(info.external_attr >> 16)
            if file_type == stat.S_IFLNK:
                raise ArchiveError(f"{where} is a symbolic link; links are not allowed")
            if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise ArchiveError(f"{where} is a special file (device/fifo/socket); not allowed")
            parts = _safe_parts(name, where)
            if parts[0].casefold() in _IGNORED_DIRS:
                continue
            if len(base + parts) > MAX_FOLDER_DEPTH:
                raise ArchiveError(
                    f"{where} is nested {len(base + parts)} folders deep > {MAX_FOLDER_DEPTH}; not a dataset layout"
                )
            is_dir = name.endswith(("/", "\\"))
            if is_dir:
                plan.append(_Planned(info, self._claim(base + parts, True, where), "dir"))
                continue

            ratio = info.file_size / max(info.compress_size, 1)
            if max(info.file_size, info.compress_size) > _RATIO_MIN_BYTES and ratio > limits.max_ratio:
                raise ArchiveError(
                    f"{where} has compression ratio {ratio:.0f} > max_ratio={limits.max_ratio:g}; possible zip bomb"
                )
            declared += info.file_size
            if declared > budget:
                raise ArchiveError(
                    f"{where} declares {info.file_size} bytes, beyond the remaining extraction "
                    f"budget ({self.budget_text}); possible zip bomb"
                )

            leaf = parts[-1]
            # "._x.zip" is an AppleDouble sidecar, not a zip, even outside __MACOSX
            if leaf.lower().endswith(".zip") and not leaf.startswith("._"):
                if depth + 1 > limits.max_depth:
                    raise ArchiveError(
                        f"{where} is a zip nested {depth + 1} levels deep > max_depth={limits.max_depth}"
                    )
                stem = leaf[: -len(".zip")]
                if stem.strip(" .") == "":
                    raise ArchiveError(f"{where}: nested zip has no usable folder name")
                rel = self._claim(base + parts, False, where)
                inner = self._claim(rel[:-1] + (stem,), True, where)
                plan.append(_Planned(info, rel, "zip", inner))
            else:
                plan.append(_Planned(info, self._claim(base + parts, False, where), "file"))
        self._check_total_ratio(infos, zip_bytes, label)
        return plan

    def _check_total_ratio(self, infos: list[zipfile.ZipInfo], zip_bytes: int, label: str) -> None:
        """The per-entry ratio skips small entries; thousands of them together must not slip by."""
        declared = sum(info.file_size for info in infos)
        ratio = declared / max(zip_bytes, 1)
        if declared > _RATIO_MIN_BYTES and ratio > self.limits.max_ratio:
            raise ArchiveError(
                f"{label}: its {len(infos)} entries together have compression ratio {ratio:.0f} "
                f"> max_ratio={self.limits.max_ratio:g} ({declared} bytes from {zip_bytes}); "
                "possible zip bomb"
            )

    def _claim(self, parts: tuple[str, ...], is_dir: bool, where: str) -> tuple[str, ...]:
        """Reserve an output path; return its canonical spelling or raise on a collision."""
        out: tuple[str, ...] = ()
        for i, part in enumerate(parts):
            out = out + (part,)
            key = "/".join(_fold(p) for p in out)
            if i == len(parts) - 1 and not is_dir:
                if key in self.kinds:
                    what = "a folder" if self.kinds[key] == "dir" else "another entry"
                    raise ArchiveError(f"{where} collides with {what} at the same path (names compared ignoring case)")
                self.kinds[key] = "file"
                break
            if self.kinds.setdefault(key, "dir") == "file":
                raise ArchiveError(
                    f"{where} needs folder {'/'.join(out)!r}, which is also a file entry (names compared ignoring case)"
                )
            out = self.dir_spelling.setdefault(key, out)
        _check_inside(self.dest, out, where)
        return out

    # ---------------------------------------------------------------------------------- writing

    def _mkdir(self, target: Path, item: _Planned, label: str) -> None:
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ArchiveError(
                f"{label}: cannot create folder for entry {item.info.orig_filename!r} ({_one_line(err)})"
            ) from None

    def _write(self, zf: zipfile.ZipFile, item: _Planned, target: Path, label: str) -> None:
        name = item.info.orig_filename
        try:
            # "xb": never overwrite or follow anything already at the target
            with zf.open(item.info) as src, open(target, "xb") as out:
                while True:
                    chunk = src.read(_CHUNK)
                    if not chunk:
                        break
                    # headers can lie: count what is actually produced
                    self.written += len(chunk)
                    if self.written > self.budget:
                        raise ArchiveError(
                            f"{label}: entry {name!r} expands past the extraction "
                            f"budget ({self.budget_text}); possible zip bomb"
                        )
                    out.write(chunk)
        except ArchiveError:
            raise
        except FileExistsError:
            raise ArchiveError(f"{label}: entry {name!r} collides with a file already extracted") from None
        except _CORRUPT as err:
            raise ArchiveError(
                f"{label}: corrupt or truncated archive, cannot read entry {name!r} ({_one_line(err)})"
            ) from None
        except OSError as err:
            raise ArchiveError(f"{label}: cannot extract entry {name!r} ({_one_line(err)})") from None


_EOCD = struct.Struct("<4s4H2LH")  # end of central directory: entries at 4, directory size at 5
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # ZIP64 end record: entries at 7, directory size at 8
_CENTRAL_HEADER = struct.Struct("<4s4B4HL2L5H2L")  # name, extra and comment lengths at 12-14


def _count_records(path: Path, cap: int) -> int:
    """How many records the central directory holds, counting no further than cap + 1.

    The end record's total is checked first (ZIP64 too), but zipfile reads records for as many
    bytes as the directory's declared size, whatever the total says, so the headers are walked
    as well (46 bytes each, nothing kept). 0 if there is no end record: zipfile then says why.
    """
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        tail_at = max(0, size - _EOCD.size - 0xFFFF)  # the end record, then a comment of <= 64 KiB
        fh.seek(tail_at)
        tail = fh.read()
        return max((_count_from(fh, tail, at, tail_at, cap) for at in _end_record_candidates(tail)), default=0)


def _end_record_candidates(tail: bytes) -> set[int]:
    """Where the end record may be: the last signature, which zipfile takes, and the last one whose
    comment length reaches exactly the end of the file (a comment may hold the signature too)."""
    found: set[int] = set()
    at = len(tail)
    while (at := tail.rfind(b"PK\x05\x06", 0, at)) >= 0:
        if len(tail) - at < _EOCD.size:
            continue
        if not found:
            found.add(at)
        if at + _EOCD.size + _EOCD.unpack_from(tail, at)[7] == len(tail):
            found.add(at)
            break
    return found


def _count_from(fh, tail: bytes, at: int, tail_at: int, cap: int) -> int:
    fields = _EOCD.unpack_from(tail, at)
    total, dir_size, end = fields[4], fields[5], tail_at + at  # end: where the directory ends
    zip64_at = end - _EOCD64_LOCATOR.size - _EOCD64.size  # as zipfile: no extensible data
    if zip64_at >= 0:
        fh.seek(zip64_at)
        record = fh.read(_EOCD64.size + _EOCD64_LOCATOR.size)
        if record[_EOCD64.size : _EOCD64.size + 4] == b"PK\x06\x07" and record[:4] == b"PK\x06\x06":
            fields = _EOCD64.unpack_from(record)
            total, dir_size, end = fields[7], fields[8], zip64_at
    if total > cap:
        return total
    return max(total, _walk_records(fh, end - dir_size, end, cap))


def _walk_records(fh, start: int, end: int, cap: int) -> int:
    if start < 0:
        return 0
    count, pos = 0, start
    while pos + _CENTRAL_HEADER.size <= end and count <= cap:
        fh.seek(pos)
        head = fh.read(_CENTRAL_HEADER.size)
        if len(head) < _CENTRAL_HEADER.size or head[:4] != b"PK\x01\x02":
            break  # zipfile reports the damage
        name_len, extra_len, comment_len = _CENTRAL_HEADER.unpack(head)[12:15]
        pos += _CENTRAL_HEADER.size + name_len + extra_len + comment_len
        count += 1
    return count


def _safe_parts(name: str, where: str) -> tuple[str, ...]:
    """Split an entry name into path components, rejecting anything that could leave dest."""
    norm = name.replace("\\", "/")  # zips made on Windows may use backslashes
    if norm.startswith("/") or re.match(r"[A-Za-z]:", norm):
        raise ArchiveError(f"{where} has an absolute path")
    parts = tuple(p for p in norm.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"{where} has a '..' component (path traversal)")
    if not parts:
        raise ArchiveError(f"{where} has an empty path")
    return parts


def _check_inside(dest: Path, rel: tuple[str, ...], where: str) -> None:
    """Belt and braces after _safe_parts: the normalised target must stay under dest."""
    root = os.path.normpath(os.path.abspath(dest))
    target = os.path.normpath(os.path.join(root, *rel))
    if os.path.commonpath([root, target]) != root or target == root:
        raise ArchiveError(f"{where} escapes the destination folder")


def _fold(name: str) -> str:
    # NFC: macOS may store "é" decomposed; casefold: macOS/Windows disks ignore case
    return unicodedata.normalize("NFC", name).casefold()


def _reset(dest: Path, *, remove: bool) -> None:
    if remove:
        shutil.rmtree(dest, ignore_errors=True)
        return
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# ------------------------------------------------------------------------------- class folders


def walk_tree(root: str | Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """os.walk's top-down (folder, subfolder names, other names), sorted, without recursion.

    Python 3.11's os.walk and Path.rglob recurse once per level, so a tree 1,000 folders deep
    raised RecursionError; here a tree deeper than MAX_FOLDER_DEPTH is a one-line ArchiveError.
    As os.walk: prune subfolders by editing the list in place, links to folders are listed but
    not entered, and unreadable folders are skipped.
    """
    root = Path(root)
    stack = [(root, 0)]
    while stack:
        here, depth = stack.pop()
        if depth > MAX_FOLDER_DEPTH:
            raise ArchiveError(f"{root}: folders nested more than {MAX_FOLDER_DEPTH} levels deep; not a dataset layout")
        try:
            with os.scandir(here) as entries:
                found = [(e.name, e.is_dir(), e.is_symlink()) for e in entries]
        except OSError:
            continue
        dirnames = sorted(name for name, is_dir, _ in found if is_dir)
        links = {name for name, is_dir, is_link in found if is_dir and is_link}
        yield here, dirnames, sorted(name for name, is_dir, _ in found if not is_dir)
        stack.extend((here / d, depth + 1) for d in reversed(dirnames) if d not in links)


def _class_key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", _fold(name))


def find_class_dirs(root: str | Path, classes: Sequence[str]) -> dict[str, Path]:
    """Find the single folder under `root` (any depth, root included) holding one subfolder per class.

    Names match ignoring case, spaces, underscores and hyphens ("Osteo Porosis" == "osteoporosis");
    hidden folders and ``__MACOSX`` are ignored. Returns ``{class: path}`` in the order of `classes`.
    """
    root = Path(root)
    if not classes:
        raise ValueError("find_class_dirs needs at least one class name")
    wanted = {_class_key(c): c for c in classes}
    if len(wanted) != len(classes):
        raise ValueError(f"class names {list(classes)} are not distinct once normalised")
    if not root.is_dir():
        raise ArchiveError(f"{root} is not a folder")

    candidates: list[dict[str, Path]] = []
    seen: list[str] = []
    for here, dirnames, _ in walk_tree(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d.casefold() not in _IGNORED_DIRS]
        seen.extend((here / d).relative_to(root).as_posix() for d in dirnames)
        matches: dict[str, list[Path]] = {}
        for d in dirnames:
            cls = wanted.get(_class_key(d))
            if cls is not None:
                matches.setdefault(cls, []).append(here / d)
        if len(matches) != len(wanted):
            continue
        doubles = [f"{c!r}: {', '.join(p.name for p in ps)}" for c, ps in matches.items() if len(ps) > 1]
        if doubles:
            raise ArchiveError(f"{here}: several subfolders match the same class ({'; '.join(doubles)})")
        candidates.append({c: matches[c][0] for c in classes})

    if not candidates:
        shown = ", ".join(seen[:20]) + (f", ... ({len(seen) - 20} more)" if len(seen) > 20 else "")
        raise ArchiveError(
            f"no folder under {root} has subfolders for all classes "
            f"{', '.join(classes)}; folders found: {shown or '(none)'}"
        )
    if len(candidates) > 1:
        places = ", ".join(str(next(iter(c.values())).parent) for c in candidates)
        raise ArchiveError(
            f"several folders under {root} hold all class subfolders ({places}); point dataset.path at one of them"
        )
    return candidates[0]
