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
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_RATIO_MIN_BYTES = 1 << 20  # the ratio cap only applies above this, so tiny text files don't trip it
_ENCRYPTED = 0x1
_IGNORED_DIRS = ("__macosx",)  # macOS resource-fork junk; never data
# what zipfile and the decompressors raise on damaged data (ArchiveError is excluded before these)
_CORRUPT = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError, ValueError)


class ArchiveError(ValueError):
    """A hostile, corrupt or unexpected archive; the message is one line naming the entry."""


@dataclass(frozen=True)
class ExtractLimits:
    max_depth: int = 4  # nesting levels of zips-in-zips (the outer zip is depth 1)
    max_total_bytes: int = 8 * 2**30  # bytes written over all levels, inner zips included
    max_ratio: float = 200.0  # per-entry uncompressed/compressed cap (zip bomb)
    max_entries: int = 100_000  # entries over all levels


def extract_nested(archive: str | Path, dest: str | Path,
                   limits: ExtractLimits = ExtractLimits()) -> list[Path]:
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
    extractor = _Extractor(dest, limits)
    try:
        extractor.extract(archive, (), 1, archive.name)
    except BaseException:
        _reset(dest if existed else top, remove=not existed)
        raise
    log.info("extracted %d files from %s into %s (%d bytes)",
             len(extractor.files), archive, dest, extractor.written)
    return extractor.files


@dataclass
class _Planned:
    info: zipfile.ZipInfo
    rel: tuple[str, ...]  # canonical output path, relative to dest
    kind: str  # "dir" | "file" | "zip"
    inner: tuple[str, ...] = ()  # for "zip": the folder it is extracted into


class _Extractor:
    def __init__(self, dest: Path, limits: ExtractLimits) -> None:
        self.dest = dest
        self.limits = limits
        self.written = 0
        self.entries = 0
        self.files: list[Path] = []
        # case-folded output path -> "file" | "dir", over all levels: two entries that would land on
        # the same path on macOS/Windows are a collision even on a case-sensitive disk
        self.kinds: dict[str, str] = {}
        self.dir_spelling: dict[str, tuple[str, ...]] = {}  # first spelling wins, variants merge

    def extract(self, zip_path: Path, base: tuple[str, ...], depth: int, label: str) -> None:
        try:
            zf = zipfile.ZipFile(zip_path)
        except (OSError, *_CORRUPT) as err:
            raise ArchiveError(f"{label}: not a readable zip archive ({_one_line(err)})") from None
        nested: list[_Planned] = []
        with zf:
            plan = self._plan(zf, base, depth, label)  # everything is validated before any write
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

    def _plan(self, zf: zipfile.ZipFile, base: tuple[str, ...], depth: int,
              label: str) -> list[_Planned]:
        limits = self.limits
        infos = zf.infolist()
        self.entries += len(infos)
        if self.entries > limits.max_entries:
            raise ArchiveError(f"{label}: more than max_entries={limits.max_entries} entries "
                               f"in total (this zip has {len(infos)})")
        budget = limits.max_total_bytes - self.written
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
            is_dir = name.endswith(("/", "\\"))
            if is_dir:
                plan.append(_Planned(info, self._claim(base + parts, True, where), "dir"))
                continue

            declared += info.file_size
            if declared > budget:
                raise ArchiveError(
                    f"{where} declares {info.file_size} bytes, beyond the remaining extraction "
                    f"budget (max_total_bytes={limits.max_total_bytes}); possible zip bomb")
            ratio = info.file_size / max(info.compress_size, 1)
            if max(info.file_size, info.compress_size) > _RATIO_MIN_BYTES and ratio > limits.max_ratio:
                raise ArchiveError(f"{where} has compression ratio {ratio:.0f} "
                                   f"> max_ratio={limits.max_ratio:g}; possible zip bomb")

            leaf = parts[-1]
            # "._x.zip" is an AppleDouble sidecar, not a zip, even outside __MACOSX
            if leaf.lower().endswith(".zip") and not leaf.startswith("._"):
                if depth + 1 > limits.max_depth:
                    raise ArchiveError(f"{where} is a zip nested {depth + 1} levels deep "
                                       f"> max_depth={limits.max_depth}")
                stem = leaf[: -len(".zip")]
                if stem.strip(" .") == "":
                    raise ArchiveError(f"{where}: nested zip has no usable folder name")
                rel = self._claim(base + parts, False, where)
                inner = self._claim(rel[:-1] + (stem,), True, where)
                plan.append(_Planned(info, rel, "zip", inner))
            else:
                plan.append(_Planned(info, self._claim(base + parts, False, where), "file"))
        return plan

    def _claim(self, parts: tuple[str, ...], is_dir: bool, where: str) -> tuple[str, ...]:
        """Reserve an output path; return its canonical spelling or raise on a collision."""
        out: tuple[str, ...] = ()
        for i, part in enumerate(parts):
            out = out + (part,)
            key = "/".join(_fold(p) for p in out)
            if i == len(parts) - 1 and not is_dir:
                if key in self.kinds:
                    what = "a folder" if self.kinds[key] == "dir" else "another entry"
                    raise ArchiveError(f"{where} collides with {what} at the same path "
                                       "(names compared ignoring case)")
                self.kinds[key] = "file"
                break
            if self.kinds.setdefault(key, "dir") == "file":
                raise ArchiveError(f"{where} needs folder {'/'.join(out)!r}, which is also a file "
                                   "entry (names compared ignoring case)")
            out = self.dir_spelling.setdefault(key, out)
        _check_inside(self.dest, out, where)
        return out

    # ---------------------------------------------------------------------------------- writing

    def _mkdir(self, target: Path, item: _Planned, label: str) -> None:
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ArchiveError(f"{label}: cannot create folder for entry {item.info.orig_filename!r}"
                               f" ({_one_line(err)})") from None

    def _write(self, zf: zipfile.ZipFile, item: _Planned, target: Path, label: str) -> None:
        name = item.info.orig_filename
        limit = self.limits.max_total_bytes
        try:
            # "xb": never overwrite or follow anything already at the target
            with zf.open(item.info) as src, open(target, "xb") as out:
                while True:
                    chunk = src.read(_CHUNK)
                    if not chunk:
                        break
                    # headers can lie: count what is actually produced
                    self.written += len(chunk)
                    if self.written > limit:
                        raise ArchiveError(f"{label}: entry {name!r} expands past the extraction "
                                           f"budget max_total_bytes={limit}; possible zip bomb")
                    out.write(chunk)
        except ArchiveError:
            raise
        except FileExistsError:
            raise ArchiveError(f"{label}: entry {name!r} collides with a file already extracted") from None
        except _CORRUPT as err:
            raise ArchiveError(f"{label}: corrupt or truncated archive, cannot read entry {name!r} "
                               f"({_one_line(err)})") from None
        except OSError as err:
            raise ArchiveError(f"{label}: cannot extract entry {name!r} ({_one_line(err)})") from None


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
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and d.casefold() not in _IGNORED_DIRS)
        here = Path(dirpath)
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
        raise ArchiveError(f"no folder under {root} has subfolders for all classes "
                           f"{', '.join(classes)}; folders found: {shown or '(none)'}")
    if len(candidates) > 1:
        places = ", ".join(str(next(iter(c.values())).parent) for c in candidates)
        raise ArchiveError(f"several folders under {root} hold all class subfolders ({places}); "
                           "point dataset.path at one of them")
    return candidates[0]
