"""Where the raw dataset comes from: the built-in phantom, a URL, or a local ZIP or folder.

Whatever the source, the result is one ZIP file (nested or not) for the extract stage.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from kneexray.data.archive import walk_tree
from kneexray.atomic import atomic_path, copy_into_zip
from kneexray.data.download import download, sha256_file
from kneexray.errors import InputError, MissingInputError
from kneexray.layout import SOURCES_DIR
from kneexray.params import DatasetParams, PhantomParams, SourceParams, dataset_sources
from kneexray.data.phantom import write_phantom_archive

log = logging.getLogger(__name__)


def _pack_folder(folder: Path, out_zip: Path) -> None:
    """A folder laid out by class becomes a ZIP (stored, not compressed: JPEGs don't shrink).

    Files are streamed, so a stray huge file costs no memory here; the extract stage then skips
    any file too large to be an image (and says so in the audit).
    """
    files = sorted(here / name for here, _, names in walk_tree(folder) for name in names)
    with atomic_path(out_zip, kind="file") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for path in files:
            if path.is_symlink() or not path.is_file():
                continue
            copy_into_zip(archive, path.relative_to(folder).as_posix(), path, zipfile.ZIP_STORED)


def _copy_zip(source: Path, out_zip: Path, sha256: str) -> None:
    if not zipfile.is_zipfile(source):
        raise InputError(f"dataset.path: {source} is neither a folder nor a ZIP archive")
    if sha256 and sha256_file(source).lower() != sha256.lower():
        raise InputError(f"dataset.path: {source} does not match dataset.sha256")
    with atomic_path(out_zip, kind="file") as tmp:
        shutil.copyfile(source, tmp)


def _fetch_one(spec: SourceParams, cfg: DatasetParams, phantom: PhantomParams, out_zip: Path) -> None:
    """One source's dataset as a ZIP at `out_zip`; download settings from `cfg`."""
    if spec.source == "phantom":
        counts = write_phantom_archive(
            out_zip,
            n_images=phantom.n_images,
            class_fractions=phantom.class_fractions,
            size=phantom.size,
            difficulty=phantom.difficulty,
            seed=phantom.seed if spec.seed is None else spec.seed,
            progress=True,
        )
        log.info("phantom: %s", counts)
    elif spec.source == "url":
        # require_zip: an HTML error page must fail here, not be cached by DVC as the dataset
        download(
            spec.url,
            out_zip,
            sha256=spec.sha256 or None,
            max_bytes=cfg.max_download_mb * 2**20,
            timeout=cfg.timeout_s,
            retries=cfg.retries,
            deadline=cfg.deadline_s,
            min_rate_kbps=cfg.min_rate_kbps,
            require_zip=True,
        )
    else:
        path = Path(spec.path).expanduser()
        if path.is_dir():
            _pack_folder(path, out_zip)
        elif path.is_file():
            _copy_zip(path, out_zip, spec.sha256)
        else:
            raise MissingInputError(f"dataset.path: {path} does not exist (a ZIP or a folder laid out by class)")


def fetch(cfg: DatasetParams, phantom: PhantomParams, out_zip: str | Path) -> dict:
    """Produce the raw dataset ZIP at `out_zip` from the source(s) `cfg` names (`phantom`: its
    settings). With several dataset.sources, each source's ZIP goes into it as sources/<name>.zip."""
    out_zip = Path(out_zip)
    specs = dataset_sources(cfg)
    if not cfg.sources:
        _fetch_one(specs[0], cfg, phantom, out_zip)
    else:
        out_zip.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=out_zip.parent) as scratch:
            parts = []
            for spec in specs:
                log.info("source %s: %s", spec.name, spec.source)
                parts.append((spec.name, Path(scratch) / f"{spec.name}.zip"))
                _fetch_one(spec, cfg, phantom, parts[-1][1])
            with atomic_path(out_zip, kind="file") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
                for name, part in parts:
                    copy_into_zip(archive, f"{SOURCES_DIR}/{name}.zip", part, zipfile.ZIP_STORED)
    source = "+".join(spec.name for spec in specs) if cfg.sources else cfg.source
    return {"source": source, "bytes": out_zip.stat().st_size, "sha256": sha256_file(out_zip)}
