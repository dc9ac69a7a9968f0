"""Near-duplicate distances on the real knee X-rays: why `extract.near_duplicate_distance` is 0.006.

    python -m bench.near_duplicates [--data DIR]   (default: bench.REAL_DATA, $KNEEXRAY_REAL_DATA)

Prints JSON. Details: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from bench import REAL_DATA
from kneexray.data.fingerprint import fingerprint, pairwise_distance
from kneexray.data.images import open_image, to_grey


def edits(img: Image.Image) -> dict[str, Image.Image]:
    w, h = img.size
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=60)
    return {
        "resized to 1/3": img.resize((w // 3, h // 3)),
        "JPEG quality 60": Image.open(io.BytesIO(buffer.getvalue())),
        "brightness x1.3": ImageEnhance.Brightness(img).enhance(1.3),
        "contrast x0.8": ImageEnhance.Contrast(img).enhance(0.8),
        "cropped 3% per side": img.crop((int(w * 0.03), int(h * 0.03), w - int(w * 0.03), h - int(h * 0.03))),
        "cropped 4% on one side": img.crop((int(w * 0.04), 0, w, h)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REAL_DATA))
    args = parser.parse_args()
    files = sorted(p for p in Path(args.data).glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg"))
    images = [to_grey(open_image(p)) for p in files]
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    prints = np.stack([fingerprint(img) for img in images])
    dist = pairwise_distance(prints)
    i, j = np.triu_indices(len(files), 1)
    distinct = np.array([digests[a] != digests[b] for a, b in zip(i, j)])
    order = np.argsort(np.where(distinct, dist[i, j], np.inf))[:5]
    worst: dict[str, float] = {}
    for img in images[::4]:
        base = fingerprint(img)
        for name, edited in edits(img).items():
            d = float(pairwise_distance(np.stack([base, fingerprint(edited)]))[0, 1])
            worst[name] = max(worst.get(name, 0.0), d)
    print(
        json.dumps(
            {
                "images": len(files),
                "distinct_pairs": int(distinct.sum()),
                "smallest_distinct": [
                    {"a": files[i[k]].name, "b": files[j[k]].name, "distance": round(float(dist[i[k], j[k]]), 4)}
                    for k in order
                ],
                "largest_edited_copy": {k: round(v, 4) for k, v in worst.items()},
                "edited_images": len(images[::4]),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
