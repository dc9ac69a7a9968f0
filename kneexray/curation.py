"""From an extracted archive to a clean, audited image index.

Walks the class folders, keeps what is a usable image (and says why the rest is not), keeps one
of each set of exact copies, groups near-duplicates, and drops label conflicts: copies of one
radiograph filed under different classes, which the published knee data contains.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from kneexray import CLASSES
from kneexray.fingerprint import fingerprint, group_near_duplicates
from kneexray.images import ImageError, inspect

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["path", "label", "source", "sha256", "width", "height", "mode", "group"]


@dataclass
class Curated:
    index: pd.DataFrame  # kept images, INDEX_COLUMNS
    fingerprints: np.ndarray  # aligned with index rows
    audit: dict = field(default_factory=dict)


def _walk(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(folder).parts))


def curate(class_dirs: dict[str, Path], out_dir: str | Path, *, max_pixels: int, min_side: int,
           near_duplicate_distance: float, keep_conflicts: bool) -> Curated:
    """Copy usable, de-duplicated images to out_dir/<class>/ and describe them."""
    out_dir = Path(out_dir)
    rows, prints, skipped = [], [], []
    files = [(label, path, folder) for label in CLASSES for folder in [class_dirs[label]] for path in _walk(folder)]
    for label, path, folder in tqdm(files, desc="inspect", disable=not sys.stderr.isatty(), leave=False):
        source = f"{label}/{path.relative_to(folder).as_posix()}"
        try:
            info, img = inspect(path, max_pixels=max_pixels, min_side=min_side)
        except ImageError as err:
            skipped.append({"source": source, "reason": str(err)})
            continue
        except OSError as err:
            skipped.append({"source": source, "reason": f"unreadable file ({err.strerror or err})"})
            continue
        rows.append({"label": label, "source": source, "file": path, "sha256": info.sha256,
                     "width": info.width, "height": info.height, "mode": info.mode})
        prints.append(fingerprint(img))
    if skipped:
        log.warning("skipped %d unusable file(s): %s", len(skipped),
                    "; ".join(f"{s['source']} ({s['reason']})" for s in skipped[:10]))
    frame = pd.DataFrame(rows, columns=["label", "source", "file", "sha256", "width", "height", "mode"])
    prints_arr = np.stack(prints) if prints else np.zeros((0, 1, 1), np.float32)

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
            conflicts.append({"group": int(group), "members": [f"{s} ({lab})" for s, lab in zip(members["source"], members["label"])]})
            conflict_rows[members.index] = True
    if conflicts:
        log.warning("%d label conflict(s) (one radiograph under several classes)%s", len(conflicts),
                    "; kept (extract.keep_conflicts)" if keep_conflicts else "; dropped")
    if not keep_conflicts:
        frame, prints_arr = frame[~conflict_rows].reset_index(drop=True), prints_arr[~conflict_rows]

    # Copy the kept originals; names are made unique per class since nested folders are flattened.
    paths, used = [], set()
    for file, label, source in zip(frame["file"], frame["label"], frame["source"]):
        name = flat = source.split("/", 1)[1].replace("/", "__")
        taken = 1
        while f"{label}/{name}" in used:  # "a/b.jpg" and a file named "a__b.jpg" would collide
            taken += 1
            name = f"{Path(flat).stem}~{taken}{Path(flat).suffix}"
        target = out_dir / label / name
        target.parent.mkdir(parents=True, exist_ok=True)
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
        "images_per_class": {c: int(counts.get(c, 0)) for c in CLASSES},
    }
    return Curated(index=index, fingerprints=prints_arr, audit=audit)
