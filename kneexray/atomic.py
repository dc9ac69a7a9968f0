"""Atomic file output: readers see the old file or the complete new one, never half of one.
Also the one way to write a ZIP entry whose bytes don't depend on the clock."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from kneexray.errors import KneexrayError


class OutputIsDirectoryError(KneexrayError, ValueError):
    """A file was to be written where a folder is: refused, since the rename would delete the folder."""


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = ".tmp", *, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it over `target`.

    The temporary file or folder lives in the same directory so the final rename is atomic, and it
    is removed if the block raises, so a failed run leaves nothing behind. `suffix` is for writers
    that insist on a file ending (Keras wants ".keras").

    `kind` ("file" or "dir") says what the block makes; "file" is refused up front when `target`
    is a folder. Whatever `kind`, only a folder replaces a folder: a file never deletes one, so a
    mistyped output path can't wipe a user's directory.
    """
    if kind not in (None, "file", "dir"):
        raise ValueError(f"atomic_path: kind must be 'file', 'dir' or None, got {kind!r}")
    if kind == "file":
        check_file_target(target)
    raw, target = str(target), Path(target)
    if target.name in ("", ".", ".."):  # the rename would replace the current or parent folder
        raise OutputIsDirectoryError(f"{raw} ({target.resolve()}) is not a usable output path")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # callers create it themselves (a file or a folder)
    try:
        yield tmp
        made_dir = tmp.is_dir() and not tmp.is_symlink()
        if kind == "dir" and not made_dir:
            raise ValueError(f"{target}: expected the writer to create a folder")
        if not made_dir:
            check_file_target(raw)  # before the rename: a file must not delete a folder
        elif target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # a previous run's folder output
        elif target.exists() or target.is_symlink():
            raise ValueError(f"{target} is a file; expected a folder there")
        os.replace(tmp, target)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def check_file_target(target: str | os.PathLike, label: str = "") -> None:
    """Raise OutputIsDirectoryError if writing a file at `target` would replace a folder.

    `label` (an option name such as "--csv") starts the message. Cheap: callers run it before any
    slow work so the user hears at once. Also catches ".", ".." and a trailing slash.
    """
    raw, path = str(target), Path(target)
    head = f"{label}: " if label else ""
    if path.is_dir() or path.name in ("", ".", "..") or raw.endswith(("/", os.sep)):
        shown = path.resolve() if path.name in ("", ".", "..") else raw
        raise OutputIsDirectoryError(f"{head}{shown} is a directory; give a file name")


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target, kind="file") as tmp:
        tmp.write_bytes(data)


def write_text(target: str | os.PathLike, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike, obj) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest date a ZIP entry can carry


def stable_zip_entry(name: str, compress_type: int = zipfile.ZIP_DEFLATED) -> zipfile.ZipInfo:
    """A ZIP entry with a fixed date and mode: the same content gives the same archive bytes."""
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.compress_type = compress_type
    info.external_attr = 0o644 << 16
    return info


def copy_into_zip(
    archive: zipfile.ZipFile, name: str, source: str | Path, compress_type: int = zipfile.ZIP_DEFLATED
) -> None:
    """Stream the file `source` into `archive` as the stable entry `name`: the bytes that writestr
    of its content would give, without holding it in memory."""
    entry = stable_zip_entry(name, compress_type)
    with open(source, "rb") as src:
        entry.file_size = os.fstat(src.fileno()).st_size  # as writestr sets it: ZIP64 only when needed
        with archive.open(entry, "w") as dst:
            shutil.copyfileobj(src, dst, 2**20)
