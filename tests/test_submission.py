"""Submission CSVs: atomic writing, reading, validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import random_picks

from czii_kit.errors import FileExistsNoForce, SubmissionError
from czii_kit.submission import (
    SUBMISSION_COLUMNS,
    read_submission,
    to_submission,
    validate_submission,
    write_submission,
)


def test_to_submission_numbers_rows():
    picks = random_picks(["TS_A", "TS_B"], per_type=2)
    sub = to_submission(picks)
    assert list(sub.columns) == SUBMISSION_COLUMNS
    assert sub["id"].tolist() == list(range(len(picks)))
    pd.testing.assert_frame_equal(sub.drop(columns="id"), picks.reset_index(drop=True))


def test_write_read_round_trip(tmp_path):
    picks = random_picks(["TS_A", "TS_B"], per_type=3, seed=2)
    path = write_submission(picks, tmp_path / "out" / "submission.csv")
    assert path.read_text().splitlines()[0] == "id,experiment,particle_type,x,y,z"
    back = read_submission(path)
    assert back["id"].tolist() == list(range(len(picks)))
    np.testing.assert_allclose(back[["x", "y", "z"]].to_numpy(), picks[["x", "y", "z"]].to_numpy(), atol=5e-4)
    assert back["experiment"].tolist() == picks["experiment"].tolist()
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]  # no temporary left behind


def test_run_names_stay_strings(tmp_path):
    picks = pd.DataFrame({"experiment": ["007"], "particle_type": ["ribosome"], "x": [1.0], "y": [2.0], "z": [3.0]})
    back = read_submission(write_submission(picks, tmp_path / "s.csv"))
    assert back["experiment"].tolist() == ["007"]


def test_never_overwrites_silently(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("precious\n")
    with pytest.raises(FileExistsNoForce, match="already exists"):
        write_submission(random_picks(["TS_A"], per_type=1), path)
    assert path.read_text() == "precious\n"
    write_submission(random_picks(["TS_A"], per_type=1), path, overwrite=True)
    assert len(read_submission(path)) == 6


def test_empty_submission_is_valid(tmp_path):
    empty = random_picks(["TS_A"], per_type=0)
    back = read_submission(write_submission(empty, tmp_path / "s.csv"))
    assert back.empty and list(back.columns) == SUBMISSION_COLUMNS


def _csv(tmp_path, text):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("id,experiment,particle_type,x,y\n0,TS_A,ribosome,1,2\n", "missing columns \\['z'\\]"),
        ("id,experiment,particle_type,x,y,z\n0,TS_A,ribosome,1,abc,3\n", "row 0 \\(line 2\\): column 'y' is not a number"),
        ("id,experiment,particle_type,x,y,z\n0,TS_A,ribosome,1,2,3\n1,TS_A,ribosome,1,,3\n",
         "row 1 \\(line 3\\): field 'y' is missing"),
        ("id,experiment,particle_type,x,y,z\n0,TS_A,ribosome,1,2\n", "row 0 \\(line 2\\): field 'z' is missing"),
        ("id,experiment,particle_type,x,y,z\n0,TS_A,ribosome,1,NaN,3\n", "row 0 \\(line 2\\): column 'y' is NaN or infinite"),
        ("id,experiment,particle_type,x,y,z\n0,TS_A,,1,2,3\n", "row 0 \\(line 2\\): field 'particle_type' is missing"),
        ("id,experiment,particle_type,x,y,z\n0,TS_A,ribosome,1,2,inf\n", "row 0 \\(line 2\\): column 'z' is NaN or infinite"),
        ("id,experiment,particle_type,x,y,z\n0,TS_A,ribozome,1,2,3\n", "unknown particle types \\['ribozome'\\]"),
        ("id,experiment,particle_type,x,y,z\n0,TS_A,ribosome,1,2,3\n0,TS_A,ribosome,4,5,6\n", "duplicate id 0 \\(row 1 \\(line 3\\)\\)"),
        ("id,experiment,particle_type,x,y,z\n,TS_A,ribosome,1,2,3\n", "row 0 \\(line 2\\): field 'id' is missing"),
        ("id,experiment,particle_type,x,y,z\n0,,ribosome,1,2,3\n", "row 0 \\(line 2\\): field 'experiment' is missing"),
        ("", "not a readable CSV"),
    ],
)
def test_bad_submissions_name_the_file_and_the_problem(tmp_path, text, message):
    path = _csv(tmp_path, text)
    with pytest.raises(SubmissionError, match=message) as exc:
        read_submission(path)
    assert str(exc.value).startswith(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(SubmissionError, match="no such file"):
        read_submission(tmp_path / "nope.csv")


def test_validate_rejects_tables_before_writing(tmp_path):
    picks = random_picks(["TS_A"], per_type=1)
    picks.loc[0, "x"] = np.nan
    with pytest.raises(SubmissionError, match="NaN"):
        write_submission(picks, tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()
    with pytest.raises(SubmissionError, match="lacks columns"):
        to_submission(picks.drop(columns="experiment"))
    ok = to_submission(random_picks(["TS_A"], per_type=1))
    assert validate_submission(ok) is ok
