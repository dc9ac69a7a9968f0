"""The optional patient table: check each image's label against its T-score (WHO thresholds).

The real dataset ships `patient details.xlsx` with a `Patient Id` per image stem, a T-score and a
diagnosis. Labels there come from a quantitative-ultrasound T-score: normal >= -1,
osteopenia between, osteoporosis <= -2.5.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from kneexray.errors import InputError

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".xlsx", ".xls", ".csv")


def who_category(t_score: float) -> str | None:
    if t_score is None or math.isnan(t_score):
        return None
    if t_score >= -1.0:
        return "normal"
    if t_score <= -2.5:
        return "osteoporosis"
    return "osteopenia"


def _column(frame: pd.DataFrame, *names: str) -> str | None:
    norm = {"".join(ch for ch in str(c).lower() if ch.isalnum()): c for c in frame.columns}
    for name in names:
        if name in norm:
            return norm[name]
    return None


def find_table(root: str | Path) -> Path | None:
    tables = sorted(
        p for p in Path(root).rglob("*") if p.suffix.lower() in TABLE_SUFFIXES and not p.name.startswith((".", "~$"))
    )
    return tables[0] if tables else None


def read_table(path: str | Path) -> pd.DataFrame:
    """Columns: patient_id, t_score, diagnosis (None where absent)."""
    path = Path(path)
    frame = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_excel(path)
    pid = _column(frame, "patientid", "id")
    tsc = _column(frame, "tscorevalue", "tscore")
    if pid is None or tsc is None:
        raise InputError(
            f"{path.name}: no 'Patient Id' and 'T-score' columns (found: {', '.join(map(str, frame.columns))})"
        )
    diag = _column(frame, "diagnosis")
    out = pd.DataFrame(
        {
            "patient_id": frame[pid].astype(str).str.strip(),
            "t_score": pd.to_numeric(frame[tsc], errors="coerce"),
            "diagnosis": frame[diag].astype(str).str.strip().str.lower() if diag else None,
        }
    )
    for name, aliases in CLINICAL.items():  # for the clinical baselines, where the table has them
        column = _column(frame, *aliases)
        if column is not None:
            out[name] = frame[column] if name == "sex" else pd.to_numeric(frame[column], errors="coerce")
    return out


# Never the T-score or the diagnosis: those are the labels.
CLINICAL = {"age": ("age",), "sex": ("sex", "gender"), "weight": ("weight", "weightkg")}


def clinical_table(root: str | Path) -> pd.DataFrame | None:
    """patient_id, age, sex, weight from the archive's patient table, when it has all three."""
    path = find_table(root)
    if path is None:
        return None
    try:
        table = read_table(path)
    except (ValueError, OSError):
        return None
    if not set(CLINICAL) <= set(table.columns):
        return None
    return table[["patient_id", *CLINICAL]].drop_duplicates("patient_id")


def check_labels(index: pd.DataFrame, table: pd.DataFrame) -> dict:
    """Compare each image's folder label with its patient row (matched on the file stem)."""
    by_id = table.drop_duplicates("patient_id").set_index("patient_id")
    disagreements, unmatched = [], 0
    for source, label in zip(index["source"], index["label"]):
        stem = Path(source).stem
        if stem not in by_id.index:
            unmatched += 1
            continue
        row = by_id.loc[stem]
        expected = who_category(row["t_score"])
        # A blank cell reads as NaN (pandas keeps missing values through astype(str)): no diagnosis.
        diagnosis = row["diagnosis"]
        diagnosis = diagnosis if isinstance(diagnosis, str) and diagnosis not in ("", "nan") else None
        if expected is not None and expected != label or (diagnosis is not None and diagnosis != label):
            t_score = None if pd.isna(row["t_score"]) else float(row["t_score"])  # no NaN in the JSON audit
            disagreements.append(
                {
                    "source": source,
                    "label": label,
                    "t_score": t_score,
                    "who_category": expected,
                    "table_diagnosis": diagnosis,
                }
            )
    return {
        "rows": int(len(table)),
        "images_matched": int(len(index) - unmatched),
        "images_unmatched": unmatched,
        "label_disagreements": len(disagreements),
        "disagreements": disagreements,
    }


def audit_patient_table(root: str | Path, index: pd.DataFrame) -> dict:
    path = find_table(root)
    if path is None:
        log.info("no patient table in the archive: label/T-score check skipped")
        return {"found": False}
    try:
        result = check_labels(index, read_table(path))
    except (ValueError, OSError) as err:
        log.warning("patient table %s unreadable: %s", path.name, err)
        return {"found": True, "file": path.name, "error": str(err)}
    if result["label_disagreements"]:
        log.warning("%d image label(s) disagree with the patient table's T-score", result["label_disagreements"])
    return {"found": True, "file": path.name, **result}


def merge_patient_groups(index: pd.DataFrame) -> np.ndarray:
    """Group ids where all images of one patient (file stem = Patient Id) share a group.

    Splits go by group, so a patient's images never sit on both sides of a split.
    """
    groups = index["group"].to_numpy().copy()
    stems = index["source"].map(lambda s: Path(s).stem).to_numpy()
    for stem in pd.unique(stems):
        members = np.flatnonzero(stems == stem)
        if len(members) > 1:
            merged = np.isin(groups, groups[members])
            groups[merged] = groups[members].min()
    return groups
