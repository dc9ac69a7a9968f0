"""The audit picture shows label conflicts first, each pair once, and is drawn from the files."""

import numpy as np
from PIL import Image

from kneexray.data.audit_pairs import draw_pairs, flagged_pairs
from kneexray.data.phantom import render_knee


def test_conflicts_first_and_each_pair_once():
    audit = {
        "label_conflict_groups": [{"group": 0, "members": ["normal/a.jpg (normal)", "osteopenia/b.jpg (osteopenia)"]}],
        "near_duplicates": [["osteopenia/c.jpg", "osteopenia/d.jpg"]],
        "exact_copies": [["normal/a.jpg", "osteopenia/b.jpg"], ["normal/e.jpg", "normal/f.jpg"]],
    }
    assert flagged_pairs(audit) == [
        ("normal/a.jpg", "osteopenia/b.jpg", "label conflict"),
        ("osteopenia/c.jpg", "osteopenia/d.jpg", "near-duplicate"),
        ("normal/e.jpg", "normal/f.jpg", "exact copy"),
    ]


def test_pairs_are_drawn_side_by_side(tmp_path):
    dirs = {}
    for label in ("normal", "osteopenia"):
        dirs[label] = tmp_path / label
        dirs[label].mkdir()
    image = render_knee(np.random.default_rng(0), "normal", size=64)
    image.save(dirs["normal"] / "a.jpg")
    image.save(dirs["osteopenia"] / "b.jpg")
    out = tmp_path / "pairs.png"
    assert draw_pairs([("normal/a.jpg", "osteopenia/b.jpg", "label conflict")], {"dataset": dirs}, out) == 1
    assert Image.open(out).size[0] > Image.open(out).size[1] / 2  # one row of two images
    draw_pairs([], {"dataset": dirs}, tmp_path / "none.png")  # nothing flagged: still a picture that says so
    assert (tmp_path / "none.png").stat().st_size > 0
