"""Benchmarks of the kneexray pipeline, run from the repository root as `python -m bench.NAME`.

ROOT is the repository root. REAL_DATA is where the real knee X-rays (the Mendeley class folders
normal/, osteopenia/, osteoporosis/) are read from: $KNEEXRAY_REAL_DATA, else
../shared/data/knee-xray-mendeley beside the repository; they are never copied into the project.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("KNEEXRAY_REAL_DATA", ROOT.parent / "shared/data/knee-xray-mendeley"))
