"""The synthetic knee phantom: reproducible archives in the published layout, a real class signal, no shortcuts."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kneexray import DEFAULT_CLASSES
from kneexray.data import phantom
from kneexray.data.phantom import phantom_labels, render_knee, write_phantom_archive

FRACTIONS = {"normal": 0.15, "osteopenia": 0.64, "osteoporosis": 0.21}
SMALL = dict(n_images=12, class_fractions=FRACTIONS, size=48, difficulty=0.5, seed=3)


def _inner_names(path: Path) -> tuple[list[str], zipfile.ZipFile]:
    with zipfile.ZipFile(path) as outer:
        assert outer.namelist() == ["Knee-X-ray.zip"]
        inner = zipfile.ZipFile(io.BytesIO(outer.read("Knee-X-ray.zip")))
    return inner.namelist(), inner


def _central_mean(image: Image.Image) -> float:
    grey = np.asarray(image.convert("L"), dtype=np.float64) / 255
    h, w = grey.shape
    return float(grey[3 * h // 10 : 7 * h // 10, 3 * w // 10 : 7 * w // 10].mean())


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    paths = [tmp_path / f"{name}.zip" for name in "abc"]
    write_phantom_archive(paths[0], **SMALL)
    write_phantom_archive(paths[1], **SMALL)
    write_phantom_archive(paths[2], **{**SMALL, "seed": 4})
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()


def test_archive_is_nested_like_the_published_dataset(tmp_path: Path) -> None:
    target = tmp_path / "phantom.zip"
    counts = write_phantom_archive(target, **SMALL)
    # 12 x (0.15, 0.64, 0.21) = 1.8, 7.68, 2.52: floors 1, 7, 2, the two spare images go to the largest remainders
    assert counts == {"normal": 2, "osteopenia": 8, "osteoporosis": 2}
    names, inner = _inner_names(target)
    expected = [
        f"Knee-X-ray/{cls}/{prefix}{i}.jpg"
        for cls, prefix in zip(DEFAULT_CLASSES, ("N", "OP", "OS"))
        for i in range(1, counts[cls] + 1)
    ]
    assert names == expected
    for info in inner.infolist():
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        with Image.open(io.BytesIO(inner.read(info))) as img:
            img.load()
            assert img.format == "JPEG" and img.mode in ("L", "RGB")
    assert list(tmp_path.iterdir()) == [target]  # no temporary files left beside it


def test_labels_use_largest_remainder_and_a_seeded_order() -> None:
    labels = phantom_labels(240, FRACTIONS, seed=7)
    assert [labels.count(c) for c in DEFAULT_CLASSES] == [36, 154, 50]
    assert phantom_labels(7, {"normal": 0.5, "osteopenia": 0.3, "osteoporosis": 0.2}, seed=0).count("normal") == 4
    # Equal remainders: the spare image goes to the class listed first.
    thirds = phantom_labels(10, dict.fromkeys(DEFAULT_CLASSES, 1 / 3), seed=0)
    assert [thirds.count(c) for c in DEFAULT_CLASSES] == [4, 3, 3]
    assert labels == phantom_labels(240, FRACTIONS, seed=7)
    assert labels != phantom_labels(240, FRACTIONS, seed=8)
    assert labels != sorted(labels, key=DEFAULT_CLASSES.index)  # shuffled, not grouped by class


@pytest.mark.parametrize(
    "fractions, message",
    [
        ({"normal": 0.2, "osteopenia": 0.5, "osteoporosis": 0.2}, "sum to 1"),
        ({"normal": 0.0, "osteopenia": 0.8, "osteoporosis": 0.2}, "> 0"),
        ({"normal": -0.1, "osteopenia": 0.9, "osteoporosis": 0.2}, "> 0"),
        ({"normal": 1.0}, "at least 2 classes"),
    ],
)
def test_invalid_fractions_are_rejected(fractions: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        phantom_labels(10, fractions, seed=0)


def test_bone_intensity_follows_the_class_at_difficulty_0() -> None:
    means = {
        c: np.mean(
            [_central_mean(render_knee(np.random.default_rng([0, i]), c, size=64, difficulty=0.0)) for i in range(20)]
        )
        for c in DEFAULT_CLASSES
    }
    assert means["normal"] > means["osteopenia"] > means["osteoporosis"]


def test_any_class_set_orders_density_from_the_first_class_to_the_last(tmp_path) -> None:
    grades = ["kl0", "kl1", "kl2", "kl3", "kl4"]
    means = [
        np.mean(
            [
                _central_mean(render_knee(np.random.default_rng([0, i]), g, classes=grades, size=64, difficulty=0.0))
                for i in range(8)
            ]
        )
        for g in grades
    ]
    assert all(a > b for a, b in zip(means, means[1:])), means
    counts = write_phantom_archive(
        tmp_path / "kl.zip", n_images=10, class_fractions=dict.fromkeys(grades, 0.2), size=40, difficulty=0.0, seed=1
    )
    assert counts == dict.fromkeys(grades, 2)
    with (
        zipfile.ZipFile(tmp_path / "kl.zip") as outer,
        zipfile.ZipFile(io.BytesIO(outer.read("Knee-X-ray.zip"))) as inner,
    ):
        assert "Knee-X-ray/kl3/kl3_2.jpg" in inner.namelist()


def test_classes_are_identical_at_difficulty_1() -> None:
    # The class acts only through bone density, whose distribution no longer depends on it.
    images = [
        np.asarray(render_knee(np.random.default_rng([5, 1]), c, size=48, difficulty=1.0)) for c in DEFAULT_CLASSES
    ]
    assert all(np.array_equal(images[0], other) for other in images[1:])


def test_nuisances_vary_but_do_not_depend_on_the_class() -> None:
    seen = []
    for i in range(30):
        # The same generator state under each label: size and colour mode must not change with it.
        variants = {
            (img.size, img.mode)
            for c in DEFAULT_CLASSES
            for img in [render_knee(np.random.default_rng([1, i]), c, size=40, difficulty=0.0)]
        }
        assert len(variants) == 1
        seen.append(variants.pop())
    sizes, modes = {s for s, _ in seen}, {m for _, m in seen}
    assert modes == {"L", "RGB"}
    assert len(sizes) > 20
    assert len({w / h for w, h in sizes}) > 20  # aspect ratios vary too
    assert all(32 <= side <= 50 for size in sizes for side in size)  # 0.8 to 1.25 x 40


@pytest.mark.parametrize(
    "override, name",
    [
        ({"n_images": 2}, "n_images"),
        ({"difficulty": 1.5}, "difficulty"),
        ({"difficulty": float("nan")}, "difficulty"),
        ({"size": 16}, "size"),
        ({"class_fractions": {"normal": 1.0}}, "class_fractions"),
    ],
)
def test_invalid_archive_params_name_the_parameter(tmp_path: Path, override: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        write_phantom_archive(tmp_path / "p.zip", **{**SMALL, **override})
    assert list(tmp_path.iterdir()) == []


def test_invalid_render_params_name_the_parameter() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="label"):
        render_knee(rng, "arthritis")
    with pytest.raises(ValueError, match="size"):
        render_knee(rng, "normal", size=8)
    with pytest.raises(ValueError, match="difficulty"):
        render_knee(rng, "normal", difficulty=-0.1)


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("stage", ["render", "outer zip"])
def test_a_failure_while_writing_leaves_the_target_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool, stage: str
) -> None:
    target = tmp_path / "phantom.zip"
    if existing:
        target.write_bytes(b"previous archive")
    real_render = phantom.render_knee
    calls = []

    def failing_render(*args, **kwargs) -> Image.Image:
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("crashed")
        return real_render(*args, **kwargs)

    def failing_copy(archive, name, *args) -> None:
        assert name == "Knee-X-ray.zip"  # the outer archive is already open in its temporary file
        raise RuntimeError("crashed")

    if stage == "render":
        monkeypatch.setattr(phantom, "render_knee", failing_render)
    else:
        monkeypatch.setattr(phantom, "copy_into_zip", failing_copy)
    with pytest.raises(RuntimeError, match="crashed"):
        write_phantom_archive(target, **SMALL)
    assert list(tmp_path.iterdir()) == ([target] if existing else [])
    if existing:
        assert target.read_bytes() == b"previous archive"
