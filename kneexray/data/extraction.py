"""The extract stage's work: unpack safely, find the class folders, curate, audit."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from kneexray.data.archive import ExtractLimits, extract_nested, find_class_dirs
from kneexray.atomic import atomic_path, write_json
from kneexray.data.audit_pairs import draw_pairs, flagged_pairs
from kneexray.data.curation import curate
from kneexray.errors import InputError
from kneexray.params import ExtractParams
from kneexray.layout import CLINICAL_FILE, FINGERPRINTS_FILE, IMAGES_DIR, INDEX_FILE, SOURCES_DIR
from kneexray.data.patients import audit_patient_table, clinical_table, merge_patient_groups

try:
    import fcntl as _fcntl
except ImportError:  # Windows: no flock, so other runs' scratch folders are left alone
    _fcntl = None  # type: ignore[assignment]
fcntl = _fcntl

log = logging.getLogger(__name__)

SCRATCH_PREFIX = ".extract-"


@contextlib.contextmanager
def _scratch(parent: Path) -> Iterator[Path]:
    """A scratch folder in `parent`, locked while this run lives and removed when it ends.

    A killed run can't remove its own, so first the folders of earlier runs are removed: those
    named SCRATCH_PREFIX* in `parent` whose lock is free (the OS drops a dead process's locks).
    """
    _remove_stale_scratch(parent)
    # Unlocked for a moment after mkdtemp: only an extract starting in that instant, in the same
    # folder, could take it for stale (DVC runs one stage at a time in a workspace).
    scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent))
    fd = None
    try:
        if fcntl is not None:
            fd = os.open(scratch, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if fd is not None:
            os.close(fd)


def _remove_stale_scratch(parent: Path) -> None:
    if fcntl is None:
        return
    for old in parent.glob(SCRATCH_PREFIX + "*"):
        if old.is_symlink() or not old.is_dir():
            continue
        try:
            fd = os.open(old, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a live run holds it
        except OSError:
            continue
        else:
            log.info("removing %s, left by an interrupted run", old)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            os.close(fd)


def audit_counts(audit: dict) -> dict:
    """The numbers of the audit, without the lists of files."""
    counts = {k: v for k, v in audit.items() if not isinstance(v, (list, dict))}
    counts["images_per_class"] = audit["images_per_class"]
    for key in ("images_per_source", "copies_across_sources"):  # with several sources
        if key in audit:
            counts[key] = audit[key]
    table = audit["patient_table"]
    counts["patient_table"] = {k: v for k, v in table.items() if isinstance(v, (int, float, bool))}
    return counts


def _class_dirs(root: Path, classes: Sequence[str]) -> dict[str, Path]:
    class_dirs = find_class_dirs(root, classes)
    log.info("class folders: %s", {c: str(p.relative_to(root)) for c, p in class_dirs.items()})
    parent = next(iter(class_dirs.values())).parent
    others = sorted(d.name for d in parent.iterdir() if d.is_dir() and d not in class_dirs.values())
    if others:  # a class left out of dataset.classes, or stray folders: say so, don't guess
        log.warning("folders beside the class folders, not in dataset.classes, are ignored: %s", ", ".join(others))
    return class_dirs


def extract_dataset(
    archive: str | Path,
    out_dir: str | Path,
    audit_path: str | Path,
    details_path: str | Path,
    cfg: ExtractParams,
    classes: Sequence[str],
    pairs_path: str | Path | None = None,
    *,
    origins: Sequence[str] = ("dataset",),
) -> dict:
    """Unpack `archive` into a scratch folder beside `out_dir`, then write out_dir atomically:
    images/<class>/*, index.csv and fingerprints.npy. The audit's counts go to `audit_path`
    (small, diffable), its lists of files to `details_path`, and a picture of the flagged pairs
    to `pairs_path`. `origins` names the sources: one, whose dataset `archive` is, or several,
    whose datasets the fetch stage packed into `archive` as sources/<name>.zip."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    limits = ExtractLimits(
        max_depth=cfg.max_depth, max_total_bytes=cfg.max_total_mb * 2**20, max_ratio=float(cfg.max_ratio)
    )
    with _scratch(out_dir.parent) as scratch:
        unpacked = scratch / "unpacked"
        sources = {}
        if len(origins) == 1:
            extract_nested(archive, unpacked, limits)
            sources[origins[0]] = _class_dirs(unpacked, classes)
        else:
            with zipfile.ZipFile(archive) as outer:
                for name in origins:
                    member = f"{SOURCES_DIR}/{name}.zip"
                    if member not in outer.namelist():
                        raise InputError(f"{archive}: no {member}: run the fetch stage for dataset.sources")
                    with outer.open(member) as src, open(scratch / f"{name}.zip", "wb") as dst:
                        shutil.copyfileobj(src, dst, 2**20)
                    extract_nested(scratch / f"{name}.zip", unpacked / name, limits)
                    (scratch / f"{name}.zip").unlink()
                    sources[name] = _class_dirs(unpacked / name, classes)
        with atomic_path(out_dir) as tmp:
            curated = curate(
                sources,
                tmp / IMAGES_DIR,
                max_pixels=cfg.max_pixels,
                min_side=cfg.min_side,
                near_duplicate_distance=cfg.near_duplicate_distance,
                keep_conflicts=cfg.keep_conflicts,
            )
            if curated.index.empty:
                raise InputError(f"{archive}: no usable images in the class folders")
            # patient ids are file names, which mean nothing across sources: one source only
            table = audit_patient_table(unpacked, curated.index) if len(sources) == 1 else {"found": False}
            audit = {**curated.audit, "patient_table": table}
            if audit["patient_table"].get("found"):
                curated.index["group"] = merge_patient_groups(curated.index)
            curated.index["path"] = IMAGES_DIR + "/" + curated.index["path"]  # relative to out_dir
            curated.index.to_csv(tmp / INDEX_FILE, index=False)
            clinical = clinical_table(unpacked) if audit["patient_table"].get("found") else None
            if clinical is not None:  # age, sex and weight: the evaluate stage's clinical baselines
                clinical.to_csv(tmp / CLINICAL_FILE, index=False)
            np.save(tmp / FINGERPRINTS_FILE, curated.fingerprints)
            write_json(details_path, audit)
            write_json(audit_path, audit_counts(audit))
            if pairs_path is not None:
                draw_pairs(flagged_pairs(audit), sources, pairs_path)
    return audit
