"""Near-duplicate fingerprints and curation: copies found, conflicts dropped, broken files explained."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from kneexray import DEFAULT_CLASSES
from kneexray.data.curation import INDEX_COLUMNS, curate
from kneexray.data.fingerprint import CROP_FRACTIONS, THUMB_SIDE, fingerprint, group_near_duplicates, pairwise_distance
from kneexray.data.phantom import render_knee

THRESHOLD = 0.006  # extract.near_duplicate_distance in params.yaml
DIFFICULTY = 0.3


def knee(i: int, label: str = "osteopenia", seed: int = 11) -> Image.Image:
    return render_knee(np.random.default_rng([seed, i]), label, size=96, difficulty=DIFFICULTY)


def reencode(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def crop(img: Image.Image, fraction: float) -> Image.Image:
    w, h = img.size
    dx, dy = round(w * fraction), round(h * fraction)
    return img.crop((dx, dy, w - dx, h - dy))


def variants(img: Image.Image) -> dict[str, Image.Image]:
    w, h = img.size
    return {
        "upscaled": img.resize((w * 2, h * 2), Image.Resampling.BICUBIC),
        "downscaled": img.resize((w * 3 // 4, h * 3 // 4), Image.Resampling.LANCZOS),
        "jpeg_q60": reencode(img, 60),
        "crop_3pct": crop(img, 0.03),
        "brighter": ImageEnhance.Brightness(img).enhance(1.3),
        "grey": img.convert("L"),
    }


def distance(a: Image.Image, b: Image.Image) -> float:
    return float(pairwise_distance(np.stack([fingerprint(a), fingerprint(b)]))[0, 1])


# ---- fingerprints -------------------------------------------------------------------------------


def test_fingerprint_shape_and_normalisation() -> None:
    fp = fingerprint(knee(0))
    assert fp.shape == (len(CROP_FRACTIONS), THUMB_SIDE**2) and fp.dtype == np.float32
    assert np.allclose(fp.mean(axis=1), 0, atol=1e-5)
    assert np.allclose(np.linalg.norm(fp, axis=1), 1, atol=1e-4)


def test_pairwise_distance_basic_properties() -> None:
    prints = np.stack([fingerprint(knee(i)) for i in range(4)])
    dist = pairwise_distance(prints)
    assert dist.shape == (4, 4)
    assert np.allclose(dist, dist.T)
    assert np.allclose(np.diag(dist), 0, atol=1e-5)
    assert (dist >= 0).all() and (dist <= 2).all()
    assert pairwise_distance(np.zeros((0, len(CROP_FRACTIONS), THUMB_SIDE**2))).shape == (0, 0)


@pytest.mark.parametrize("name", ["upscaled", "downscaled", "jpeg_q60", "crop_3pct", "brighter", "grey"])
def test_near_duplicates_are_within_the_threshold(name: str) -> None:
    base = knee(0)
    assert distance(base, variants(base)[name]) <= THRESHOLD


def test_distinct_knees_are_all_above_the_threshold() -> None:
    images = [knee(i, DEFAULT_CLASSES[i % 3]) for i in range(30)]
    dist = pairwise_distance(np.stack([fingerprint(img) for img in images]))
    off_diagonal = dist[np.triu_indices(len(images), k=1)]
    assert off_diagonal.min() > THRESHOLD, f"closest distinct pair at {off_diagonal.min():.4f}"


def test_group_near_duplicates() -> None:
    distinct = [knee(i) for i in range(1, 9)]
    base = knee(0)
    copies = list(variants(base).values())
    # order: two distinct, the original, one distinct, its copies, the remaining distinct
    images = distinct[:2] + [base] + distinct[2:3] + copies + distinct[3:]
    groups = group_near_duplicates(np.stack([fingerprint(img) for img in images]), THRESHOLD)
    assert groups.dtype == np.int64 and len(groups) == len(images)
    copy_slots = list(range(4, 4 + len(copies)))
    assert {int(groups[k]) for k in [2, *copy_slots]} == {2}  # all with the original
    others = [k for k in range(len(images)) if k not in [2, *copy_slots]]
    assert len({int(groups[k]) for k in others}) == len(others)  # each distinct image alone
    # ids are 0..k-1 in order of first appearance
    assert groups.tolist()[:4] == [0, 1, 2, 3]
    assert sorted(set(groups.tolist())) == list(range(len(others) + 1))
    # a tiny threshold joins identical pixels (up to float rounding) and nothing else
    same = np.stack([fingerprint(base), fingerprint(distinct[0]), fingerprint(base.copy())])
    assert group_near_duplicates(same, 1e-6).tolist() == [0, 1, 0]


def test_grouping_is_transitive() -> None:
    # a ~ b and b ~ c put a, b, c in one group even where a and c alone would not be
    prints = np.zeros((3, len(CROP_FRACTIONS), 4), dtype=np.float32)
    vecs = [
        np.array([1.0, 0.0, 0.0, 0.0]),
        np.array([np.cos(0.1), np.sin(0.1), 0, 0]),
        np.array([np.cos(0.2), np.sin(0.2), 0, 0]),
    ]
    for k, v in enumerate(vecs):
        prints[k, :] = v
    dist = pairwise_distance(prints)
    threshold = 1 - np.cos(0.15)
    assert dist[0, 1] <= threshold and dist[1, 2] <= threshold and dist[0, 2] > threshold
    assert group_near_duplicates(prints, threshold).tolist() == [0, 0, 0]


# ---- curation -----------------------------------------------------------------------------------


def save_jpeg(img: Image.Image, path: Path, quality: int = 92) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=quality)
    return path


@pytest.fixture
def raw(tmp_path: Path) -> dict[str, Path]:
    """Class folders with one of each problem the published data has."""
    root = tmp_path / "raw"
    dirs = {c: root / c.capitalize() for c in DEFAULT_CLASSES}
    # normal: N1 and an exact byte copy of it in a subfolder; N2 whose bytes also sit under osteopenia
    n1 = save_jpeg(knee(1, "normal"), dirs["normal"] / "N1.jpg")
    (dirs["normal"] / "sub").mkdir()
    shutil.copyfile(n1, dirs["normal"] / "sub" / "N1copy.jpg")
    n2 = save_jpeg(knee(2, "normal"), dirs["normal"] / "N2.jpg")
    save_jpeg(knee(3, "normal"), dirs["normal"] / "N3.jpg")
    # osteopenia: the conflicting copy of N2, OP1 and a resized PNG of it (a near-duplicate)
    op1 = knee(4, "osteopenia")
    save_jpeg(op1, dirs["osteopenia"] / "OP1.jpg")
    shutil.copyfile(n2, dirs["osteopenia"] / "OP9.jpg")
    op1.resize((op1.width * 2, op1.height * 2), Image.Resampling.BICUBIC).save(dirs["osteopenia"] / "OP1_big.png")
    save_jpeg(knee(5, "osteopenia"), dirs["osteopenia"] / "OP2.jpg")
    # osteoporosis: two good images, a truncated JPEG, a text file, a tiny image, and OS junk to ignore
    save_jpeg(knee(6, "osteoporosis"), dirs["osteoporosis"] / "OS1.jpg")
    save_jpeg(knee(7, "osteoporosis"), dirs["osteoporosis"] / "OS2.jpg")
    good = (dirs["osteoporosis"] / "OS1.jpg").read_bytes()
    (dirs["osteoporosis"] / "OS3.jpg").write_bytes(good[: len(good) // 2])
    (dirs["osteoporosis"] / "readme.jpg").write_text("not an image")
    save_jpeg(knee(8, "osteoporosis").resize((20, 20)), dirs["osteoporosis"] / "OS4.jpg")
    (dirs["osteoporosis"] / ".DS_Store").write_bytes(b"\0\1junk")
    (dirs["osteoporosis"] / "__MACOSX").mkdir()
    (dirs["osteoporosis"] / "__MACOSX" / "._OS1.jpg").write_bytes(b"\0resource fork")
    return dirs


def run_curate(raw: dict[str, Path], out: Path, keep_conflicts: bool = False):
    return curate(
        {"dataset": raw},
        out,
        max_pixels=10**7,
        min_side=32,
        near_duplicate_distance=THRESHOLD,
        keep_conflicts=keep_conflicts,
    )


def test_curate(raw: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "images"
    result = run_curate(raw, out)
    index, audit = result.index, result.audit

    assert list(index.columns) == INDEX_COLUMNS
    assert len(result.fingerprints) == len(index)
    kept = dict(zip(index["source"], index["label"]))
    assert kept == {
        "normal/N1.jpg": "normal",
        "normal/N3.jpg": "normal",
        "osteopenia/OP1.jpg": "osteopenia",
        "osteopenia/OP1_big.png": "osteopenia",
        "osteopenia/OP2.jpg": "osteopenia",
        "osteoporosis/OS1.jpg": "osteoporosis",
        "osteoporosis/OS2.jpg": "osteoporosis",
    }

    # files seen: hidden files and __MACOSX are not
    assert audit["files_seen"] == 13
    # exact copy within a class: kept once
    assert audit["exact_copy_files_removed"] == 1
    assert ["normal/N1.jpg", "normal/sub/N1copy.jpg"] in audit["exact_copies"]
    assert "normal/sub/N1copy.jpg" not in kept
    # the same bytes under two classes: a conflict, both dropped
    assert audit["label_conflicts"] == 1
    (conflict,) = audit["label_conflict_groups"]
    assert sorted(conflict["members"]) == ["normal/N2.jpg (normal)", "osteopenia/OP9.jpg (osteopenia)"]
    assert audit["label_conflicts_kept"] is False
    # broken files skipped with a reason each
    reasons = {s["source"]: s["reason"] for s in audit["unreadable_files"]}
    assert set(reasons) == {"osteoporosis/OS3.jpg", "osteoporosis/readme.jpg", "osteoporosis/OS4.jpg"}
    assert "unreadable image data" in reasons["osteoporosis/OS3.jpg"]
    assert "not a recognised image format" in reasons["osteoporosis/readme.jpg"]
    assert "smaller than the minimum side 32" in reasons["osteoporosis/OS4.jpg"]
    assert audit["unreadable"] == 3
    # the resized copy: same group, both kept, reported as a near-duplicate group
    group = dict(zip(index["source"], index["group"]))
    assert group["osteopenia/OP1.jpg"] == group["osteopenia/OP1_big.png"]
    others = [g for s, g in group.items() if not s.startswith("osteopenia/OP1")]
    assert len(set(others)) == len(others) and group["osteopenia/OP1.jpg"] not in others
    assert sorted(map(sorted, audit["near_duplicates"])) == [
        ["normal/N2.jpg", "osteopenia/OP9.jpg"],
        ["osteopenia/OP1.jpg", "osteopenia/OP1_big.png"],
    ]
    assert audit["images_kept"] == 7
    assert audit["images_per_class"] == {"normal": 2, "osteopenia": 3, "osteoporosis": 2}

    # the kept originals are copied byte for byte to out_dir/<class>/
    for path, source, label, sha in zip(index["path"], index["source"], index["label"], index["sha256"]):
        assert path.startswith(f"{label}/")
        target = out / path
        assert target.is_file()
        original = raw[label] / source.split("/", 1)[1]
        assert target.read_bytes() == original.read_bytes()
        assert len(sha) == 64
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(index["path"])
    # sizes and modes come from the files
    row = index.set_index("source").loc["osteopenia/OP1_big.png"]
    with Image.open(raw["osteopenia"] / "OP1_big.png") as img:
        assert (row["width"], row["height"], row["mode"]) == (img.width, img.height, img.mode)


def test_curate_keep_conflicts(raw: dict[str, Path], tmp_path: Path) -> None:
    result = run_curate(raw, tmp_path / "images", keep_conflicts=True)
    index, audit = result.index, result.audit
    assert audit["label_conflicts"] == 1 and audit["label_conflicts_kept"] is True
    by_source = index.set_index("source")
    assert by_source.loc["normal/N2.jpg", "label"] == "normal"
    assert by_source.loc["osteopenia/OP9.jpg", "label"] == "osteopenia"
    assert by_source.loc["normal/N2.jpg", "group"] == by_source.loc["osteopenia/OP9.jpg", "group"]
    assert audit["images_kept"] == 9 and len(result.fingerprints) == 9
    assert (tmp_path / "images" / "osteopenia" / "OP9.jpg").is_file()


def test_near_duplicate_under_another_class_is_a_conflict_too(tmp_path: Path) -> None:
    dirs = {c: tmp_path / c for c in DEFAULT_CLASSES}
    img = knee(20, "osteopenia")
    save_jpeg(img, dirs["osteopenia"] / "OP1.jpg")
    save_jpeg(img.resize((img.width * 3 // 2, img.height * 3 // 2)), dirs["osteoporosis"] / "OS1.jpg", quality=70)
    save_jpeg(knee(21, "normal"), dirs["normal"] / "N1.jpg")
    result = run_curate(dirs, tmp_path / "out")
    assert result.audit["exact_copy_sets"] == 0
    assert result.audit["label_conflicts"] == 1
    assert result.index["source"].tolist() == ["normal/N1.jpg"]


def test_curate_fingerprints_align_with_the_index(raw: dict[str, Path], tmp_path: Path) -> None:
    result = run_curate(raw, tmp_path / "images")
    for row, fp in zip(result.index.itertuples(), result.fingerprints):
        with Image.open(tmp_path / "images" / row.path) as img:
            img.load()
            assert np.allclose(fingerprint(img), fp, atol=1e-5), row.source


def test_curate_with_nothing_usable(tmp_path: Path) -> None:
    dirs = {c: tmp_path / c for c in DEFAULT_CLASSES}
    for d in dirs.values():
        d.mkdir()
    (dirs["normal"] / "x.jpg").write_bytes(b"")
    result = run_curate(dirs, tmp_path / "out")
    assert isinstance(result.index, pd.DataFrame) and result.index.empty
    assert list(result.index.columns) == INDEX_COLUMNS
    assert result.audit["unreadable_files"] == [{"source": "normal/x.jpg", "reason": "empty file"}]
    assert result.audit["images_kept"] == 0


def test_flattened_names_do_not_overwrite_each_other(tmp_path: Path) -> None:
    # nested folders are flattened with "__": "a/N1.jpg" and a file literally named "a__N1.jpg"
    dirs = {c: tmp_path / "raw" / c for c in DEFAULT_CLASSES}
    save_jpeg(knee(30, "normal"), dirs["normal"] / "a" / "N1.jpg")
    save_jpeg(knee(31, "normal"), dirs["normal"] / "a__N1.jpg")
    save_jpeg(knee(32, "osteopenia"), dirs["osteopenia"] / "OP1.jpg")
    save_jpeg(knee(33, "osteoporosis"), dirs["osteoporosis"] / "OS1.jpg")
    out = tmp_path / "out"
    result = run_curate(dirs, out)
    index = result.index
    assert len(index) == 4 and index["path"].is_unique
    for path, source in zip(index["path"], index["source"]):
        label, rest = source.split("/", 1)
        assert (out / path).read_bytes() == (dirs[label] / rest).read_bytes(), source
