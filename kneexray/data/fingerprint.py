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
PROJECTION_DIMS = 24  # coordinates of the candidate search; any number gives the same pairs, only faster or slower
_PREFILTER_MAX_THRESHOLD = 0.05  # above this the search radius covers most pairs: compare them all instead


def _row_blocks(n_a: int, n_b: int):
    rows = max(1, BLOCK_BYTES // (max(1, n_b) * len(CROP_FRACTIONS) * 8 * 2))
    for start in range(0, n_a, rows):
        yield start, min(n_a, start + rows)


def _all_pairs(a: np.ndarray, other: np.ndarray, same: bool, threshold: float) -> list[tuple[int, int, float]]:
    """Every pair compared, in blocks of rows (bounded memory, quadratic time)."""
    pairs = []
    for start, stop in _row_blocks(len(a), len(other)):
        dist = cross_distance(a[start:stop], other)
        rows, cols = np.nonzero(dist <= threshold)
        for r, j in zip(rows, cols):
            i = start + int(r)
            if not same or i < j:
                pairs.append((i, int(j), float(dist[r, j])))
    return pairs


def _candidates(a: np.ndarray, other: np.ndarray, same: bool, threshold: float) -> np.ndarray:
    """(i, j) rows that include every pair at or under `threshold`, found with a k-d tree.

    Fingerprints are unit (or zero) vectors, so 1 - <x, y> <= t implies |x - y| <= sqrt(2 t); an
    orthonormal projection never lengthens a difference, so that radius in projected coordinates
    misses no pair. A pair is close when the full image of one is close to some crop of the other.
    """
    from scipy.spatial import cKDTree

    both = a if same else np.concatenate([a, other])
    full = both[:, 0, :].astype(np.float64)
    # principal axes of the full-image fingerprints: the projection keeps most of each difference
    _, _, vt = np.linalg.svd(full[:: max(1, len(full) // 1024)] - full.mean(axis=0), full_matrices=False)
    basis = vt[:PROJECTION_DIMS].T
    radius = float(np.sqrt(2 * threshold)) * (1 + 1e-6) + 1e-9
    crops = len(CROP_FRACTIONS)

    def hits(queries: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """(query row, target row) where the query's full image is near one of the target's crops."""
        tree = cKDTree(targets.reshape(-1, targets.shape[-1]).astype(np.float64) @ basis)
        found = tree.query_ball_point(queries[:, 0, :].astype(np.float64) @ basis, radius, return_sorted=True)
        rows = np.repeat(np.arange(len(queries)), [len(f) for f in found])
        cols = np.concatenate([np.asarray(f, dtype=np.int64) for f in found]) // crops if len(rows) else rows
        return np.column_stack([rows, cols]).astype(np.int64)

    forward = hits(a, other)  # a's full image in b's crops
    backward = hits(other, a)[:, ::-1]  # b's full image in a's crops, as (i, j)
    pairs = np.concatenate([forward, backward])
    if same:
        pairs = np.sort(pairs, axis=1)
        pairs = pairs[pairs[:, 0] < pairs[:, 1]]
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def _pair_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """cross_distance for aligned rows: the distance of a[p] to b[p] for each p."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    a_in_b = np.einsum("pd,pcd->pc", a[:, 0, :], b).max(axis=1)
    b_in_a = np.einsum("pd,pcd->pc", b[:, 0, :], a).max(axis=1)
    return np.clip(1.0 - np.maximum(a_in_b, b_in_a), 0.0, 2.0)


def close_pairs(a: np.ndarray, b: np.ndarray | None, threshold: float) -> list[tuple[int, int, float]]:
    """(i, j, distance) for every pair at or under `threshold`, sorted; with b None, pairs within
    a, each once (i < j).

    Near-duplicate thresholds are small, so candidates come from a k-d tree search (about n log n)
    and only they are compared exactly: 20,000 images compared pair by pair took hours. Memory
    stays bounded whatever the number of images."""
    same = b is None
    other = a if b is None else b
    if len(a) == 0 or len(other) == 0:
        return []
    if threshold > _PREFILTER_MAX_THRESHOLD:
        return _all_pairs(a, other, same, threshold)
    pairs = []
    candidates = _candidates(a, other, same, threshold)
    for start in range(0, len(candidates), 2048):  # 2048 pairs: about 200 MB of float64 crops
        block = candidates[start : start + 2048]
        dist = _pair_distance(a[block[:, 0]], other[block[:, 1]])
        pairs += [(int(i), int(j), float(d)) for (i, j), d in zip(block, dist) if d <= threshold]
    return pairs


def near_any(a: np.ndarray, b: np.ndarray, threshold: float) -> np.ndarray:
    """For each fingerprint of a, whether one of b is at or under `threshold` (a copy of it)."""
    out = np.zeros(len(a), dtype=bool)
    out[[i for i, _, _ in close_pairs(a, b, threshold)]] = True
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
