"""From an extracted archive to a clean, audited image index.

Walks the class folders, keeps what is a usable image (and says why the rest is not), keeps one
of each set of exact copies, groups near-duplicates, and drops label conflicts: copies of one
radiograph filed under different classes, which the published knee data contains.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from kneexray.data.archive import walk_tree
from kneexray.data.dicom import DICOM_SUFFIXES, is_dicom, read_dicom_grey
from kneexray.data.fingerprint import fingerprint, group_near_duplicates
from kneexray.data.images import ImageError, ImageInfo, inspect, read_capped

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["path", "label", "origin", "source", "sha256", "width", "height", "mode", "group"]


@dataclass
class Curated:
    index: pd.DataFrame  # kept images, INDEX_COLUMNS
    fingerprints: np.ndarray  # aligned with index rows
    audit: dict = field(default_factory=dict)


_MAX_NAME_BYTES = 200  # flattened names: under the usual 255-byte limit, with room for "~2" and temp names


def _walk(folder: Path) -> list[Path]:
    files: list[Path] = []
    for here, dirnames, filenames in walk_tree(folder):  # no recursion: trees 1,000 deep are refused, not a crash
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
        files.extend(here / name for name in filenames if not name.startswith("."))
    return sorted(p for p in files if p.is_file())


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as f:  # PACS exports often have no suffix: the preamble says
        return is_dicom(f.read(132))


def _inspect_dicom(path: Path, max_pixels: int, min_side: int) -> tuple[ImageInfo, Image.Image]:
    data = read_capped(path, max_pixels)
    img = read_dicom_grey(data, max_pixels=max_pixels)  # as displayed: rescale, window, MONOCHROME1 inverted
    if min(img.size) < min_side:
        raise ImageError(f"{img.width}x{img.height} is smaller than the minimum side {min_side}")
    return ImageInfo(width=img.width, height=img.height, mode="DICOM", sha256=hashlib.sha256(data).hexdigest()), img


def _examine(path: Path, max_pixels: int, min_side: int) -> tuple[ImageInfo, np.ndarray]:
    """Decode, describe and fingerprint one file; ImageError (a short reason) if it can't be used."""
    try:
        if _is_dicom_file(path):
            info, img = _inspect_dicom(path, max_pixels, min_side)
        else:
            info, img = inspect(path, max_pixels=max_pixels, min_side=min_side)
        return info, fingerprint(img)
    except ImageError:
        raise
    except OSError as err:
        raise ImageError(f"unreadable file ({err.strerror or err})") from None
    except Exception as err:  # one odd file must not stop the run; the audit names it
        raise ImageError(f"unusable image ({type(err).__name__}: {' '.join(str(err).split())})") from None


def _flat_name(rel: str) -> str:
    """'a/b/c.jpg' -> 'a__b__c.jpg'; a name over _MAX_NAME_BYTES keeps its start, a hash of the whole and its suffix."""
    flat = rel.replace("/", "__")
    if len(flat.encode()) <= _MAX_NAME_BYTES:
        return flat
    suffix = Path(flat).suffix if len(Path(flat).suffix.encode()) <= 16 else ""
    digest = hashlib.sha256(flat.encode()).hexdigest()[:16]
    head = flat.encode()[: _MAX_NAME_BYTES - len(suffix.encode()) - len(digest) - 1].decode(errors="ignore")
    return f"{head}-{digest}{suffix}"


def _shared_between_sources(frame: pd.DataFrame, prints: np.ndarray, threshold: float) -> list[list[tuple[str, str]]]:
    """Groups of exact or near copies that span several sources, as (origin, source path) lists;
    all usable images count, before exact copies are dropped."""
    groups = group_near_duplicates(prints, threshold)
    shared = []
    for _, members in frame.assign(g=groups).groupby("g", sort=True):
        if members["origin"].nunique() > 1:
            shared.append(list(zip(members["origin"], members["source"])))
    return shared


def curate(
    sources: Mapping[str, Mapping[str, Path]],
    out_dir: str | Path,
    *,
    max_pixels: int,
    min_side: int,
    near_duplicate_distance: float,
    keep_conflicts: bool,
) -> Curated:
    """Copy usable, de-duplicated images to out_dir/<class>/ and describe them.

    `sources` maps each source's name to its class folders ({class: folder}). With several, copies
    are found across sources too (a copy under two labels is a conflict wherever it sits), each
    image records its source (`origin`) and the audit counts the copies each pair of sources shares.
    """
    out_dir = Path(out_dir)
    several = len(sources) > 1
    rows, prints, skipped = [], [], []
    files = [
        (origin, label, path, folder)
        for origin, class_dirs in sources.items()
        for label, folder in class_dirs.items()
        for path in _walk(folder)
    ]

    def examine(item: tuple[str, str, Path, Path]) -> tuple[ImageInfo, np.ndarray] | ImageError:
        try:
            return _examine(item[2], max_pixels, min_side)
        except ImageError as err:
            return err

    # Decoding dominates and PIL and NumPy release the GIL: threads, results in file order.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        examined = list(
            tqdm(
                pool.map(examine, files), total=len(files), desc="decode", disable=not sys.stderr.isatty(), leave=False
            )
        )
    for (origin, label, path, folder), result in zip(files, examined):
        source = (f"{origin}/" if several else "") + f"{label}/{path.relative_to(folder).as_posix()}"
        if isinstance(result, ImageError):
            skipped.append({"source": source, "reason": str(result)})
            continue
        info, prints_of_file = result
        rows.append(
            {
                "label": label,
                "origin": origin,
                "source": source,
                "file": path,
                "sha256": info.sha256,
                "width": info.width,
                "height": info.height,
                "mode": info.mode,
            }
        )
        prints.append(prints_of_file)
    if skipped:
        log.warning(
            "skipped %d unusable file(s): %s",
            len(skipped),
            "; ".join(f"{s['source']} ({s['reason']})" for s in skipped[:10]),
        )
    frame = pd.DataFrame(rows, columns=["label", "origin", "source", "file", "sha256", "width", "height", "mode"])
    prints_arr = np.stack(prints) if prints else np.zeros((0, 1, 1), np.float32)
    shared = _shared_between_sources(frame, prints_arr, near_duplicate_distance) if several and len(frame) else []

    # exact copies: keep the first of each (label, sha256); the same bytes under two labels is a conflict
    exact_copies = []
    keep = np.ones(len(frame), dtype=bool)
    for _, same in frame.groupby("sha256", sort=False):
        if len(same) > 1:
            exact_copies.append(same["source"].tolist())
        for _, same_label in same.groupby("label", sort=False):
            keep[same_label.index[1:]] = False
    n_exact_removed = int((~keep).sum())
    frame, prints_arr = frame[keep].reset_index(drop=True), prints_arr[keep]
    frame["group"] = group_near_duplicates(prints_arr, near_duplicate_distance) if len(frame) else []

    near_groups, conflicts = [], []
    conflict_rows = np.zeros(len(frame), dtype=bool)
    for group, members in frame.groupby("group", sort=True):
        if len(members) > 1:
            near_groups.append(members["source"].tolist())
        if members["label"].nunique() > 1:
            conflicts.append(
                {
                    "group": int(group),
                    "members": [f"{s} ({lab})" for s, lab in zip(members["source"], members["label"])],
                }
            )
            conflict_rows[members.index] = True
    if conflicts:
        log.warning(
            "%d label conflict(s) (one radiograph under several classes)%s",
            len(conflicts),
            "; kept (extract.keep_conflicts)" if keep_conflicts else "; dropped",
        )
    if not keep_conflicts:
        frame, prints_arr = frame[~conflict_rows].reset_index(drop=True), prints_arr[~conflict_rows]

    # Copy the kept originals; names are made unique per class since nested folders are flattened.
    paths, used = [], set()
    for file, label, source, mode in zip(frame["file"], frame["label"], frame["source"], frame["mode"]):
        origin, _, rel = source.split("/", 2) if several else ("", "", source.split("/", 1)[1])
        name = flat = (f"{origin}__" if several else "") + _flat_name(rel) + (".png" if mode == "DICOM" else "")
        taken = 1
        while f"{label}/{name}" in used:  # "a/b.jpg" and a file named "a__b.jpg" would collide
            taken += 1
            name = f"{Path(flat).stem}~{taken}{Path(flat).suffix}"
        target = out_dir / label / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if mode == "DICOM":  # stored as the 8-bit greyscale it displays as, which training and predict read
            read_dicom_grey(read_capped(file, max_pixels), max_pixels=max_pixels).save(target, format="PNG")
        else:
            shutil.copyfile(file, target)
        paths.append(f"{label}/{name}")
        used.add(paths[-1])
    frame["path"] = paths
    index = frame[INDEX_COLUMNS].copy()

    counts = index["label"].value_counts()
    audit = {
        "files_seen": len(files),
        "unreadable": len(skipped),
        "unreadable_files": skipped,
        "exact_copy_sets": len(exact_copies),
        "exact_copy_files_removed": n_exact_removed,
        "exact_copies": exact_copies,
        "near_duplicate_groups": len(near_groups),
        "near_duplicates": near_groups,
        "near_duplicate_distance": near_duplicate_distance,
        "label_conflicts": len(conflicts),
        "label_conflict_groups": conflicts,
        "label_conflicts_kept": keep_conflicts,
        "images_kept": int(len(index)),
        "images_per_class": {c: int(counts.get(c, 0)) for c in next(iter(sources.values()))},
    }
    if several:
        per_source = index["origin"].value_counts()
        audit["images_per_source"] = {o: int(per_source.get(o, 0)) for o in sources}
        pairs = Counter(pair for group in shared for pair in combinations(sorted({o for o, _ in group}), 2))
        audit["copies_across_sources"] = {
            f"{a} & {b}": pairs.get((a, b), 0) for a, b in combinations(sorted(sources), 2)
        }
        audit["copies_across_sources_groups"] = [[s for _, s in group] for group in shared]
    return Curated(index=index, fingerprints=prints_arr, audit=audit)
