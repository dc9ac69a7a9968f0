"""A picture of the flagged pairs (copies, near-duplicates, label conflicts) for a person to check."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from kneexray.atomic import atomic_path  # noqa: E402
from kneexray.data.images import open_image, to_grey  # noqa: E402

MAX_ROWS = 12


def _parts(source: str, several: bool) -> tuple[str, str, str]:
    """(origin, label, path in the class folder) of an audit entry: "label/rest", or with several
    sources "origin/label/rest"."""
    if several:
        origin, label, rest = source.split("/", 2)
        return origin, label, rest
    label, rest = source.split("/", 1)
    return "", label, rest


def flagged_pairs(audit: dict) -> list[tuple[str, str, str]]:
    """(source a, source b, why) for label conflicts first, then near-duplicates, then exact copies."""
    several = "images_per_source" in audit
    pairs = []
    for group in audit["label_conflict_groups"]:
        members = [m.rsplit(" (", 1)[0] for m in group["members"]]
        pairs.append((members[0], members[1], "label conflict"))
    for members in audit["near_duplicates"]:
        pairs.append((members[0], members[1], "near-duplicate"))
    for members in audit["exact_copies"]:
        same_label = _parts(members[0], several)[1] == _parts(members[1], several)[1]
        why = "exact copy" if same_label else "exact copy, two labels"
        pairs.append((members[0], members[1], why))
    unique, seen = [], set()
    for a, b, why in pairs:
        if (a, b) not in seen:
            seen.add((a, b))
            unique.append((a, b, why))
    return unique


def draw_pairs(pairs: list[tuple[str, str, str]], sources: Mapping[str, Mapping[str, Path]], path: str | Path) -> int:
    """Write a PNG with up to MAX_ROWS pairs side by side; returns how many were drawn. `sources`:
    the class folders of each source, as `curate` takes them."""
    several = len(sources) > 1
    shown = pairs[:MAX_ROWS]
    rows = max(1, len(shown))
    fig = Figure(figsize=(6, 2.8 * rows), layout="constrained")
    axes = fig.subplots(rows, 2, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for (a, b, why), (left, right) in zip(shown, axes):
        for ax, source in ((left, a), (right, b)):
            origin, label, rest = _parts(source, several)
            class_dirs = sources[origin] if several else next(iter(sources.values()))
            img = to_grey(open_image(class_dirs[label] / rest))
            img.thumbnail((400, 400))
            ax.imshow(img, cmap="gray")
            ax.set_title(f"{source}\n{why}", fontsize=8, color="tab:red" if "label" in why else "black")
    if not shown:
        axes[0, 0].text(0.5, 0.5, "no copies, near-duplicates or label conflicts found", ha="center")
    title = f"Flagged by the data audit: {len(shown)} of {len(pairs)} pair(s)"
    fig.suptitle(title)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, metadata={"Software": "kneexray"})
    return len(shown)
