"""Opt-in: the extract and split stages on the real knee X-rays in ../shared/data (never copied here).

Pins the audit the README reports: the published archive's copies and label conflicts are found,
and the seed-42 split is the one the real-data figures were measured on. Skipped where the data is
absent (`pytest -m realdata` selects only these).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest

from bench import REAL_DATA as REAL
from bench import real_data  # packs the folder as the published nested ZIP
from kneexray.data.extraction import FINGERPRINTS_FILE, INDEX_FILE, extract_dataset
from kneexray.data.splitting import check_leakage, split_counts, split_index
from kneexray.params import load
from tests.support import ROOT

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.slow,  # extracts the real archive: not in make test-fast
    pytest.mark.skipif(not (REAL / "normal").is_dir(), reason=f"real data not at {REAL}"),
]


def test_extract_and_split_on_the_real_archive(tmp_path):
    params = load(ROOT / "params.yaml")
    archive = tmp_path / "dataset.zip"
    real_data.pack_nested_zip(REAL, archive)
    out = tmp_path / "extracted"
    audit = extract_dataset(
        archive, out, tmp_path / "audit.json", tmp_path / "details.json", params.extract, params.dataset.classes
    )

    assert audit["files_seen"] == 239 and audit["unreadable"] == 0
    assert audit["exact_copy_files_removed"] == 15  # same-class byte copies, kept once
    assert audit["label_conflicts"] == 7  # one radiograph under two classes: dropped
    assert audit["images_per_class"] == {"normal": 30, "osteopenia": 137, "osteoporosis": 43}
    table = audit["patient_table"]
    assert table["found"] and table["images_matched"] == 210 and table["label_disagreements"] == 0

    index = pd.read_csv(out / INDEX_FILE)
    splits = split_index(index, params.dataset.classes, **asdict(params.split))
    check_leakage(splits, index, np.load(out / FINGERPRINTS_FILE), params.extract.near_duplicate_distance)
    assert split_counts(splits, params.dataset.classes) == {
        "train": {"normal": 21, "osteopenia": 99, "osteoporosis": 31},
        "val": {"normal": 3, "osteopenia": 10, "osteoporosis": 4},
        "test": {"normal": 6, "osteopenia": 28, "osteoporosis": 8},
    }
