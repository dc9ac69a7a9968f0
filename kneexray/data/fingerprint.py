"""Near-duplicate detection: the same radiograph resized, re-encoded, re-exposed or lightly cropped.

A fingerprint is a small auto-contrasted thumbnail, normalised to zero mean and unit length, so
the distance between two images is 1 - Pearson correlation of their thumbnails. Brightness,
contrast, JPEG re-encoding and resizing barely move it; a symmetric crop does, so each image also
gets fingerprints of its own central crops and a pair is compared at the best-matching crop.
Distances measured on the real data are in the README ("Data audit").
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from kneexray.data.images import to_grey

THUMB_SIDE = 32
CROP_FRACTIONS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05)  # per side


def _thumb(img: Image.Image) -> np.ndarray:
    arr = np.asarray(
        ImageOps.autocontrast(img).resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX), dtype=np.float64
    )
    arr = arr.ravel() - arr.mean()
    norm = np.linalg.norm(arr)
    return arr / norm if norm > 0 else arr


def fingerprint(img: Image.Image) -> np.ndarray:
    """(len(CROP_FRACTIONS), THUMB_SIDE**2) float32: the full image and its central crops."""
    grey = to_grey(img)
    grey.thumbnail((512, 512), Image.Resampling.BOX)  # speed: crops of a 2660 px image are costly
    w, h = grey.size
    crops = [grey.crop((round(w * f), round(h * f), w - round(w * f), h - round(h * f))) for f in CROP_FRACTIONS]
    return np.stack([_thumb(c) for c in crops]).astype(np.float32)


def cross_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) distances: 1 - the best correlation of one image with any crop of the other."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    a, b = a.astype(np.float64), b.astype(np.float64)
    a_in_b = np.einsum("id,jcd->ijc", a[:, 0, :], b).max(axis=2)  # full a[i] against every crop of b[j]
    b_in_a = np.einsum("jd,icd->ijc", b[:, 0, :], a).max(axis=2)  # full b[j] against every crop of a[i]
    return np.clip(1.0 - np.maximum(a_in_b, b_in_a), 0.0, 2.0)


def pairwise_distance(prints: np.ndarray) -> np.ndarray:
    """(n, n) distances within one set of fingerprints (small sets: n x n x crops floats in memory)."""
    return cross_distance(prints, prints)


BLOCK_BYTES = 2**28  # the working memory of one block of comparisons: 256 MiB


def _row_blocks(n_a: int, n_b: int):
    rows = max(1, BLOCK_BYTES // (max(1, n_b) * len(CROP_FRACTIONS) * 8 * 2))
    for start in range(0, n_a, rows):
        yield start, min(n_a, start + rows)


def close_pairs(a: np.ndarray, b: np.ndarray | None, threshold: float) -> list[tuple[int, int, float]]:
    """(i, j, distance) for every pair at or under `threshold`, computed in blocks of rows so that
    memory stays bounded whatever the number of images (cross_distance of all pairs at once took
    120 GB at 50,000 images). With b None, pairs within a, each once (i < j)."""
    same = b is None
    other = a if b is None else b
    pairs = []
    for start, stop in _row_blocks(len(a), len(other)):
        dist = cross_distance(a[start:stop], other)
        rows, cols = np.nonzero(dist <= threshold)
        for r, j in zip(rows, cols):
            i = start + int(r)
            if not same or i < j:
                pairs.append((i, int(j), float(dist[r, j])))
    return pairs


def nearest_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each fingerprint of a, its distance to the closest of b (inf when b is empty), blocked."""
    out = np.full(len(a), np.inf)
    for start, stop in _row_blocks(len(a), len(b)):
        if len(b):
            out[start:stop] = cross_distance(a[start:stop], b).min(axis=1)
    return out


def group_near_duplicates(prints: np.ndarray, threshold: float) -> np.ndarray:
    """Connected components of the 'distance <= threshold' graph; returns a group id per image."""
    n = len(prints)
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in close_pairs(prints, None, threshold):
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([root(i) for i in range(n)])
    # renumber 0..k-1 in order of first appearance so ids are stable for the same input
    _, first = np.unique(roots, return_index=True)
    order = {r: k for k, r in enumerate(roots[np.sort(first)])}
    return np.array([order[r] for r in roots], dtype=np.int64)
