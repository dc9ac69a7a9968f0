"""The patient table: WHO T-score categories and image labels checked against them."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from kneexray.data.patients import audit_patient_table, check_labels, find_table, read_table, who_category


@pytest.mark.parametrize(
    "t_score, category",
    [
        (1.2, "normal"),
        (0.0, "normal"),
        (-1.0, "normal"),  # the normal threshold is inclusive
        (-1.01, "osteopenia"),
        (-1.8, "osteopenia"),
        (-2.49, "osteopenia"),
        (-2.5, "osteoporosis"),  # the osteoporosis threshold is inclusive too
        (-4.1, "osteoporosis"),
        (float("nan"), None),
        (None, None),
    ],
)
def test_who_category(t_score, category) -> None:
    assert who_category(t_score) == category


# One image per row; OP2 is filed under osteopenia but its T-score (-3.1) and the table's diagnosis
# say osteoporosis. OS9 has no row.
TABLE = pd.DataFrame(
    {
        "S.No": [1, 2, 3, 4, 5, 6],
        "Patient Id": ["N1", "N2", "OP1", "OP2", "OS1", "OS2"],
        "Age": [55, 61, 63, 70, 72, 68],
        "T-score Value": [-0.5, 0.3, -1.8, -3.1, -2.5, -2.9],
        "Diagnosis": ["normal", "normal", "osteopenia", "osteoporosis", "osteoporosis", "osteoporosis"],
    }
)
INDEX = pd.DataFrame(
    {
        "source": [
            "normal/N1.jpg",
            "normal/N2.JPEG",
            "osteopenia/OP1.jpg",
            "osteopenia/OP2.jpg",
            "osteoporosis/OS1.jpg",
            "osteoporosis/sub/OS2.jpg",
            "osteoporosis/OS9.jpg",
        ],
        "label": ["normal", "normal", "osteopenia", "osteopenia", "osteoporosis", "osteoporosis", "osteoporosis"],
    }
)
WRONG = {
    "source": "osteopenia/OP2.jpg",
    "label": "osteopenia",
    "t_score": -3.1,
    "who_category": "osteoporosis",
    "table_diagnosis": "osteoporosis",
}


def read_table_from(frame: pd.DataFrame) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "table.csv"
        frame.to_csv(path, index=False)
        return read_table(path)


def check_result(result: dict) -> None:
    assert result["found"] is True
    assert result["rows"] == 6
    assert result["images_matched"] == 6
    assert result["images_unmatched"] == 1
    assert result["label_disagreements"] == 1
    assert result["disagreements"] == [WRONG]


def test_csv_table_with_one_wrong_label(tmp_path: Path) -> None:
    root = tmp_path / "unpacked"
    (root / "Knee-X-ray").mkdir(parents=True)
    TABLE.to_csv(root / "Knee-X-ray" / "patient details.csv", index=False)
    result = audit_patient_table(root, INDEX)
    assert result["file"] == "patient details.csv"
    check_result(result)


def test_xlsx_table_as_published(tmp_path: Path) -> None:
    # as in the real file: capitalised, padded diagnoses and a few empty rows at the end
    table = TABLE.copy()
    table["Diagnosis"] = [f" {d.capitalize()} " for d in table["Diagnosis"]]
    blank = pd.DataFrame([[None] * len(table.columns)] * 3, columns=table.columns)
    table = pd.concat([table, blank], ignore_index=True)
    root = tmp_path / "unpacked"
    root.mkdir()
    table.to_excel(root / "patient details.xlsx", index=False)
    read = read_table(root / "patient details.xlsx")
    # the label columns first; age, sex and weight where the table has them (the clinical baselines)
    assert list(read.columns)[:3] == ["patient_id", "t_score", "diagnosis"]
    assert set(read.columns) <= {"patient_id", "t_score", "diagnosis", "age", "sex", "weight"}
    assert read["diagnosis"].iloc[0] == "normal"  # stripped and lower-cased
    result = audit_patient_table(root, INDEX)
    assert result["file"] == "patient details.xlsx"
    check_result(result)  # the empty rows are not read as patients


def test_diagnosis_disagreeing_with_the_label_is_reported_even_if_t_score_agrees() -> None:
    table = read_table_from(
        TABLE.assign(Diagnosis=["osteopenia", "normal", "osteopenia", "osteopenia", "osteoporosis", "osteoporosis"])
    )
    result = check_labels(INDEX, table)
    sources = [d["source"] for d in result["disagreements"]]
    assert sources == ["normal/N1.jpg", "osteopenia/OP2.jpg"]
    assert result["disagreements"][0]["who_category"] == "normal"
    assert result["disagreements"][0]["table_diagnosis"] == "osteopenia"


def test_blank_diagnosis_cell_is_not_a_disagreement() -> None:
    frame = TABLE.copy()
    frame.loc[0, "Diagnosis"] = None  # N1: no diagnosis, T-score -0.5 agrees with "normal"
    result = check_labels(INDEX, read_table_from(frame))
    assert [d["source"] for d in result["disagreements"]] == ["osteopenia/OP2.jpg"]


def test_table_without_diagnosis_column_uses_the_t_score_only() -> None:
    result = check_labels(INDEX, read_table_from(TABLE.drop(columns="Diagnosis")))
    assert result["label_disagreements"] == 1
    assert result["disagreements"][0]["source"] == "osteopenia/OP2.jpg"
    assert result["disagreements"][0]["table_diagnosis"] is None


def test_missing_t_score_falls_back_to_the_diagnosis() -> None:
    frame = TABLE.copy()
    frame.loc[2, "T-score Value"] = None  # OP1: no T-score, diagnosis agrees
    frame.loc[3, "T-score Value"] = None  # OP2: no T-score, diagnosis still disagrees
    result = check_labels(INDEX, read_table_from(frame))
    assert [d["source"] for d in result["disagreements"]] == ["osteopenia/OP2.jpg"]
    assert result["disagreements"][0]["who_category"] is None
    assert result["disagreements"][0]["t_score"] is None  # not NaN: the audit is written as JSON
    json.dumps(result, allow_nan=False)


def test_no_table() -> None:
    assert audit_patient_table(Path(__file__).parent / "nonexistent", INDEX) == {"found": False}


def test_no_table_in_a_folder_of_images(tmp_path: Path) -> None:
    (tmp_path / "normal").mkdir()
    (tmp_path / "normal" / "N1.jpg").write_bytes(b"\xff\xd8")
    (tmp_path / "~$patient details.xlsx").write_bytes(b"office lock file")
    (tmp_path / ".hidden.csv").write_text("Patient Id,T-score\nN1,-3\n")
    assert find_table(tmp_path) is None
    assert audit_patient_table(tmp_path, INDEX) == {"found": False}


def test_table_without_the_needed_columns(tmp_path: Path) -> None:
    pd.DataFrame({"Name": ["a"], "Age": [50]}).to_csv(tmp_path / "other.csv", index=False)
    result = audit_patient_table(tmp_path, INDEX)
    assert result["found"] is True and result["file"] == "other.csv"
    assert "no 'Patient Id' and 'T-score' columns" in result["error"]
    assert "Name" in result["error"]


def test_images_of_one_patient_share_a_group():
    from kneexray.data.patients import merge_patient_groups

    index = pd.DataFrame(
        {
            "source": [
                "normal/P1.jpg",
                "osteopenia/P1.png",
                "osteopenia/P2.jpg",
                "osteoporosis/P3.jpg",
                "osteoporosis/P2.jpg",
            ],
            "group": [0, 1, 2, 3, 4],
        }
    )
    groups = merge_patient_groups(index)
    assert groups[0] == groups[1]  # P1 twice
    assert groups[2] == groups[4]  # P2 twice
    assert len({groups[0], groups[2], groups[3]}) == 3  # three patients, three groups
