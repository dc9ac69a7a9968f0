"""kneexray.atomic: a file write never deletes a folder; folder outputs still replace their last run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kneexray.atomic import OutputIsDirectoryError, atomic_path, check_file_target, write_bytes, write_json, write_text


def folder_with_thesis(tmp_path: Path) -> Path:
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("years of work")
    return folder


def left_intact(folder: Path) -> bool:
    return folder.is_dir() and (folder / "chapter1.tex").read_text() == "years of work"


@pytest.mark.parametrize(
    "writer", [lambda p: write_bytes(p, b"x"), lambda p: write_text(p, "x"), lambda p: write_json(p, [1])]
)
def test_file_write_onto_a_folder_is_refused(tmp_path: Path, writer) -> None:
    folder = folder_with_thesis(tmp_path)
    with pytest.raises(OutputIsDirectoryError, match=r"thesis is a directory; give a file name") as err:
        writer(folder)
    assert "\n" not in str(err.value)
    assert left_intact(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]  # no temporary left behind


def test_plain_atomic_path_refuses_a_file_over_a_folder(tmp_path: Path) -> None:
    """Callers that don't say what they write (plots, models) can't delete a folder either."""
    folder = folder_with_thesis(tmp_path)
    with pytest.raises(OutputIsDirectoryError, match="is a directory"):
        with atomic_path(folder, suffix=".png") as tmp:
            tmp.write_bytes(b"png")
    assert left_intact(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]


def test_file_kind_refuses_before_the_block_runs(tmp_path: Path) -> None:
    folder = folder_with_thesis(tmp_path)
    ran = []
    with pytest.raises(OutputIsDirectoryError):
        with atomic_path(folder, kind="file"):
            ran.append(True)
    assert ran == []


@pytest.mark.parametrize("name", [".", "..", "sub/..", "./"])
def test_dot_and_dotdot_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "keep.txt").write_text("keep")
    monkeypatch.chdir(work)
    with pytest.raises(OutputIsDirectoryError) as err:
        write_json(name, [])
    assert "\n" not in str(err.value)
    with pytest.raises(OutputIsDirectoryError):  # nor as a folder output
        with atomic_path(name) as tmp:
            tmp.mkdir()
    assert (work / "keep.txt").read_text() == "keep" and (work / "sub").is_dir()


def test_trailing_slash_means_a_folder(tmp_path: Path) -> None:
    target = f"{tmp_path / 'new'}{os.sep}"
    with pytest.raises(OutputIsDirectoryError, match="is a directory"):
        write_text(target, "x")
    with pytest.raises(OutputIsDirectoryError):
        with atomic_path(target) as tmp:
            tmp.write_text("x")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:  # a folder output may be spelt with a slash
        tmp.mkdir()
    assert (tmp_path / "new").is_dir()


def test_check_file_target_names_the_option(tmp_path: Path) -> None:
    folder = folder_with_thesis(tmp_path)
    with pytest.raises(OutputIsDirectoryError, match=rf"^--csv: {folder} is a directory; give a file name$"):
        check_file_target(folder, "--csv")
    check_file_target(folder / "out.csv", "--csv")  # a new file in it is fine


def test_folder_output_replaces_the_previous_folder(tmp_path: Path) -> None:
    out = tmp_path / "split"
    for run, name in enumerate(["first.csv", "second.csv"]):
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / name).write_text(str(run))
    assert sorted(p.name for p in out.iterdir()) == ["second.csv"]  # nothing stale from run 1
    with atomic_path(out, kind="dir") as tmp:
        tmp.mkdir()
    assert out.is_dir() and list(out.iterdir()) == []


def test_dir_kind_requires_a_folder_and_refuses_to_replace_a_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected the writer to create a folder"):
        with atomic_path(tmp_path / "out", kind="dir") as tmp:
            tmp.write_text("x")
    (tmp_path / "file").write_text("data")
    with pytest.raises(ValueError, match="is a file; expected a folder"):
        with atomic_path(tmp_path / "file") as tmp:
            tmp.mkdir()
    assert (tmp_path / "file").read_text() == "data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_file_replaces_a_file_and_failure_keeps_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    write_json(target, {"v": 2})
    assert target.read_text() == '{\n  "v": 2\n}\n'
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer crashed")
    assert target.read_text() == '{\n  "v": 2\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
