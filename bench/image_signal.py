"""How much class signal simple image features carry on the real knee X-rays, under leakage-safe CV.

    python -m bench.image_signal [--data DIR] [--only chance,thumb16] [--cache DIR] [--out JSON]

Reads --data (default bench.REAL_DATA); writes bench/results/image_signal.json. Details: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.dummy import DummyClassifier
from sklearn.exceptions import ConvergenceWarning, UndefinedMetricWarning
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench import REAL_DATA, ROOT

CLASSES = ["normal", "osteopenia", "osteoporosis"]
NEAR_DUPLICATE_CORR = 0.994  # Pearson correlation of 32x32 thumbnails above which two images are one group
REPEATS, FOLDS, INNER_FOLDS = 5, 5, 3
CS = np.logspace(-4, 0, 9)


def centre(a: np.ndarray) -> np.ndarray:
    """The central half of an image in each direction (the joint, without the borders and labels)."""
    h, w = a.shape
    return a[h // 4 : h - h // 4, w // 4 : w - w // 4]


# ---------------------------------------------------------------- decoding


def decode(data: str, cache_dir: Path) -> dict[str, np.ndarray]:
    """Per file: relative path, label, SHA-256, metadata, 256 px greyscale image and 64-bin grey histograms."""
    paths = [(ci, f) for ci, c in enumerate(CLASSES) for f in sorted(glob.glob(f"{data}/{c}/*"))]
    # Decoding takes a while, so it is cached; the key covers every file's path, size and mtime, so a changed
    # data folder is decoded again instead of silently reusing stale arrays.
    listing = "\n".join(f"{f}\t{os.stat(f).st_size}\t{os.stat(f).st_mtime_ns}" for _, f in paths)
    cache = cache_dir / f"decoded-{hashlib.sha256(listing.encode()).hexdigest()[:16]}.npz"
    if not cache.exists():
        t0 = time.time()
        files, labels, sha, meta, img256, hist_full, hist_ctr = [], [], [], [], [], [], []
        for ci, f in paths:
            raw = Path(f).read_bytes()
            im = Image.open(f)
            mode_rgb = float(im.mode != "L")
            g = np.asarray(im.convert("L"), dtype=np.uint8)
            h, w = g.shape
            files.append(os.path.relpath(f, data))
            labels.append(ci)
            sha.append(hashlib.sha256(raw).hexdigest())
            meta.append([w, h, w / h, float(f.endswith(".JPEG")), len(raw), mode_rgb])
            hist_full.append(np.bincount(g.ravel() // 4, minlength=64) / g.size)
            cc = centre(g)
            hist_ctr.append(np.bincount(cc.ravel() // 4, minlength=64) / cc.size)
            img256.append(np.asarray(Image.fromarray(g).resize((256, 256), Image.BILINEAR), dtype=np.uint8))
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.npz")  # written whole, then renamed: no half-written cache
        np.savez(
            partial,
            files=np.array(files),
            labels=np.array(labels),
            sha=np.array(sha),
            meta=np.array(meta, float),
            img256=np.stack(img256),
            hist_full=np.array(hist_full),
            hist_ctr=np.array(hist_ctr),
        )
        os.replace(partial, cache)
        print(f"decoded {len(files)} files in {time.time() - t0:.0f}s")
    with np.load(cache) as z:
        return {k: z[k] for k in z.files}


# ---------------------------------------------------------------- cleaning


def drop_exact_duplicates(d: dict[str, np.ndarray]) -> tuple[np.ndarray, int, list[list[str]]]:
    """Keep one file per SHA-256; a copy set whose files carry different labels is dropped whole."""
    keep = np.zeros(len(d["labels"]), bool)
    copies_dropped, conflicts = 0, []
    for s in np.unique(d["sha"]):
        idx = np.where(d["sha"] == s)[0]
        if len(set(d["labels"][idx])) > 1:
            conflicts.append(d["files"][idx].tolist())
            continue
        keep[idx[0]] = True
        copies_dropped += len(idx) - 1
    return keep, copies_dropped, conflicts


def thumbnails(img256: np.ndarray, s: int) -> np.ndarray:
    return np.stack(
        [np.asarray(Image.fromarray(a).resize((s, s), Image.BILINEAR), float).ravel() / 255 for a in img256]
    )


def near_duplicate_groups(t32: np.ndarray) -> np.ndarray:
    """Connected components of 'thumbnail correlation > NEAR_DUPLICATE_CORR': re-encoded or resized copies that
    SHA-256 misses must fall in the same CV fold, or the score leaks."""
    n = len(t32)
    tz = (t32 - t32.mean(1, keepdims=True)) / (t32.std(1, keepdims=True) + 1e-9)
    corr = tz @ tz.T / tz.shape[1]
    adj = sparse.csr_matrix((corr > NEAR_DUPLICATE_CORR) & ~np.eye(n, dtype=bool))
    return connected_components(adj, directed=False)[1]


# ---------------------------------------------------------------- texture features (numpy only: no skimage here)


def lbp_hist(a: np.ndarray) -> np.ndarray:
    """8-neighbour radius-1 LBP, mapped to 10 rotation-invariant-uniform bins (riu2)."""
    a = a.astype(np.int16)
    c = a[1:-1, 1:-1]
    offs = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]
    bits = np.stack([(a[1 + dy : a.shape[0] - 1 + dy, 1 + dx : a.shape[1] - 1 + dx] >= c) for dy, dx in offs])
    bits = bits.astype(np.int8)
    trans = np.abs(np.diff(np.concatenate([bits, bits[:1]], 0), axis=0)).sum(0)
    code = np.where(trans <= 2, bits.sum(0), 9)
    return np.bincount(code.ravel(), minlength=10) / code.size


def glcm_feats(a: np.ndarray, levels: int = 32) -> np.ndarray:
    """Contrast, dissimilarity, homogeneity, energy, correlation and entropy of the symmetric grey-level
    co-occurrence matrix at 16 offsets (distances 1, 2, 4, 8 in 4 directions)."""
    q = (a.astype(int) * levels) // 256
    out = []
    gi, gj = np.meshgrid(np.arange(levels), np.arange(levels), indexing="ij")
    for d in (1, 2, 4, 8):
        for dy, dx in ((0, d), (d, 0), (d, d), (d, -d)):
            h, w = q.shape
            y0, y1 = max(0, -dy), h - max(0, dy)
            x0, x1 = max(0, -dx), w - max(0, dx)
            p = q[y0:y1, x0:x1].ravel()
            r = q[y0 + dy : y1 + dy, x0 + dx : x1 + dx].ravel()
            m = np.bincount(p * levels + r, minlength=levels * levels).reshape(levels, levels).astype(float)
            m = m + m.T
            m /= m.sum()
            mi, mj = (gi * m).sum(), (gj * m).sum()
            si = np.sqrt(((gi - mi) ** 2 * m).sum())
            sj = np.sqrt(((gj - mj) ** 2 * m).sum())
            out += [
                ((gi - gj) ** 2 * m).sum(),
                (np.abs(gi - gj) * m).sum(),
                (m / (1 + (gi - gj) ** 2)).sum(),
                (m**2).sum(),
                ((gi - mi) * (gj - mj) * m).sum() / (si * sj + 1e-12),
                -(m[m > 0] * np.log(m[m > 0])).sum(),
            ]
    return np.array(out)


def grad_hist(a: np.ndarray, bins: int = 32) -> np.ndarray:
    gy, gx = np.gradient(a.astype(float))
    m = np.hypot(gx, gy)
    return np.histogram(np.clip(m, 0, 63.9), bins=bins, range=(0, 64))[0] / m.size


def lbp_features(d: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([np.concatenate([lbp_hist(a), lbp_hist(a[::2, ::2]), lbp_hist(centre(a))]) for a in d["img256"]])


def glcm_features(d: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([np.concatenate([glcm_feats(a), glcm_feats(centre(a))]) for a in d["img256"]])


def grad_features(d: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([np.concatenate([grad_hist(a), grad_hist(centre(a))]) for a in d["img256"]])


def meta_features(d: dict[str, np.ndarray]) -> np.ndarray:
    m = d["meta"].copy()
    m[:, 4] = np.log(m[:, 4])  # file size spans orders of magnitude
    return m


# name -> (description, features from the cleaned arrays; None = the chance baseline)
FEATURE_SETS = {
    "chance": ("chance (stratified dummy)", None),
    "thumb16": ("thumb 16x16", lambda d: thumbnails(d["img256"], 16)),
    "thumb32": ("thumb 32x32", lambda d: thumbnails(d["img256"], 32)),
    "thumb64": ("thumb 64x64", lambda d: thumbnails(d["img256"], 64)),
    "hist64_whole": ("hist64 whole", lambda d: d["hist_full"]),
    "hist64_centre": ("hist64 centre crop", lambda d: d["hist_ctr"]),
    "lbp": ("LBP riu2 (r1, r1@128px, centre)", lbp_features),
    "glcm": ("GLCM 6 stats x16 offsets (whole+centre)", glcm_features),
    "gradient_hist": ("gradient-magnitude hist (whole+centre)", grad_features),
    "metadata": ("metadata (w,h,aspect,.JPEG,logsize,RGB)", meta_features),
}


# ---------------------------------------------------------------- cross-validation


class SpanProjector(BaseEstimator, TransformerMixin):
    """Rotate standardized features onto the row space of the training data (X V, V from SVD).
    Exact for L2-penalized logistic regression with unpenalized intercept (solution lies in that span;
    inner-CV subsets span a subspace of it), but ~n_train dims instead of s*s -> much faster."""

    def fit(self, X, y=None):
        _, S, Vt = np.linalg.svd(X, full_matrices=False)
        self.V_ = Vt[S > 1e-8 * S[0]].T
        return self

    def transform(self, X):
        return X @ self.V_


def cross_validate(X: np.ndarray | None, y: np.ndarray, groups: np.ndarray) -> dict[str, np.ndarray]:
    """Per shuffle: out-of-fold macro-F1, macro one-vs-rest AUC of the pooled out-of-fold probabilities, and the
    mean of the per-fold AUCs. Folds keep near-duplicate groups together; C is tuned by an inner grouped CV."""
    n = len(y)
    f1s, aucs_pool, aucs_fold = [], [], []
    for r in range(REPEATS):
        cv = StratifiedGroupKFold(FOLDS, shuffle=True, random_state=r)
        pred = np.zeros(n, int)
        proba = np.zeros((n, len(CLASSES)))
        fa = []
        for tr, te in cv.split(np.zeros(n), y, groups):
            if X is None:
                m = DummyClassifier(strategy="stratified", random_state=1000 * r + te[0])
                m.fit(np.zeros((len(tr), 1)), y[tr])
                Xte = np.zeros((len(te), 1))
            else:
                inner_cv = StratifiedGroupKFold(INNER_FOLDS, shuffle=True, random_state=r)
                inner = list(inner_cv.split(X[tr], y[tr], groups[tr]))
                steps = [StandardScaler()] + ([SpanProjector()] if X.shape[1] > len(tr) else [])
                m = make_pipeline(
                    *steps,
                    LogisticRegressionCV(Cs=CS, cv=inner, class_weight="balanced", scoring="f1_macro", max_iter=3000),
                ).fit(X[tr], y[tr])
                Xte = X[te]
            pred[te] = m.predict(Xte)
            proba[te] = m.predict_proba(Xte)
            try:
                fa.append(roc_auc_score(y[te], proba[te], multi_class="ovr", average="macro"))
            except ValueError:  # a test fold without every class has no macro AUC
                pass
        f1s.append(f1_score(y, pred, average="macro"))
        aucs_pool.append(roc_auc_score(y, proba, multi_class="ovr", average="macro"))
        aucs_fold.append(np.mean(fa))
    return {"macro_f1": np.array(f1s), "auc_pooled": np.array(aucs_pool), "auc_fold_mean": np.array(aucs_fold)}


def mean_sd(values: np.ndarray) -> dict[str, float]:
    return {"mean": round(float(values.mean()), 3), "sd": round(float(values.std(ddof=1)), 3)}


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REAL_DATA))
    parser.add_argument("--only", default="", help="feature-set name prefixes, comma-separated (default: all)")
    parser.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "kneexray-image-signal"),
        help="where the decoded images are cached",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "image_signal.json"), help="the JSON summary")
    args = parser.parse_args()
    prefixes = [p for p in args.only.split(",") if p]
    if unknown := [p for p in prefixes if not any(name.startswith(p) for name in FEATURE_SETS)]:
        parser.error(f"--only: no feature set starts with {unknown}; sets: {', '.join(FEATURE_SETS)}")
    selected = [name for name in FEATURE_SETS if not prefixes or any(name.startswith(p) for p in prefixes)]
    # Settings are the probe's; these warnings are sklearn 1.10 transition notices, non-converged inner fits
    # at tiny C, and inner folds where a class is never predicted: noise for every one of thousands of fits.
    for category in (FutureWarning, ConvergenceWarning, UndefinedMetricWarning):
        warnings.filterwarnings("ignore", category=category)
    t0 = time.time()

    d = decode(args.data, Path(args.cache))
    n_files = len(d["labels"])
    keep, copies_dropped, conflicts = drop_exact_duplicates(d)
    d = {k: v[keep] for k, v in d.items()}
    y = d["labels"]
    groups = near_duplicate_groups(thumbnails(d["img256"], 32))
    sizes = np.bincount(groups)
    members = [groups == g for g in range(len(sizes))]
    mixed = [d["files"][m].tolist() for m in members if m.sum() > 1 and len(set(y[m])) > 1]
    cleaning = {
        "files": n_files,
        "exact_duplicate_copies_dropped": copies_dropped,
        "label_conflict_files_dropped": sum(len(c) for c in conflicts),
        "label_conflict_sets": conflicts,
        "kept": int(keep.sum()),
        "class_counts": dict(zip(CLASSES, np.bincount(y, minlength=len(CLASSES)).tolist())),
        "near_duplicate_groups": len(sizes),
        "near_duplicate_multi_member_groups": int((sizes > 1).sum()),
        "near_duplicate_images_in_multi_member_groups": int(sizes[sizes > 1].sum()),
        "near_duplicate_mixed_label_groups": mixed,
    }
    print(json.dumps(cleaning, indent=2))

    summary = {
        "data": args.data,
        "protocol": {
            "near_duplicate_corr_32px": NEAR_DUPLICATE_CORR,
            "cv": f"StratifiedGroupKFold({FOLDS}) x {REPEATS} shuffles (random_state 0..{REPEATS - 1})",
            "model": f"StandardScaler + LogisticRegressionCV(Cs=logspace(-4,0,9), inner StratifiedGroupKFold"
            f"({INNER_FOLDS}), class_weight=balanced, scoring=f1_macro, max_iter=3000)",
            "figures": "mean and sample SD over the shuffles",
        },
        "cleaning": cleaning,
        "feature_sets": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n{'feature set':45s} {'dim':>5s}  {'macro-F1':>13s}  {'AUC pooled OOF':>14s}  {'AUC per-fold':>13s}")
    for name in selected:
        description, build = FEATURE_SETS[name]
        X = None if build is None else build(d)
        scores = cross_validate(X, y, groups)
        row = {"description": description, "dim": 0 if X is None else X.shape[1]}
        row.update({metric: mean_sd(values) for metric, values in scores.items()})
        summary["feature_sets"][name] = row
        figures = "    ".join(f"{row[m]['mean']:.3f}±{row[m]['sd']:.3f}" for m in scores)
        print(f"{description:45s} {row['dim']:5d}  {figures}   [{time.time() - t0:.0f}s]", flush=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")  # after each set, so a killed run keeps what it finished
    print(f"total {time.time() - t0:.0f}s; wrote {out}")


if __name__ == "__main__":
    main()
