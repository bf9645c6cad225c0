"""Write and validate submissions: ``id,experiment,particle_type,x,y,z`` (Å)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from czii_kit.atomic import atomic_write
from czii_kit.catalog import PARTICLE_NAMES
from czii_kit.errors import SubmissionError
from czii_kit.picks import warn_outside

SUBMISSION_COLUMNS = ["id", "experiment", "particle_type", "x", "y", "z"]


def to_submission(picks: pd.DataFrame) -> pd.DataFrame:
    """A picks table ``experiment, particle_type, x, y, z`` -> a submission table with ``id`` 0..N-1."""
    missing = [c for c in SUBMISSION_COLUMNS[1:] if c not in picks.columns]
    if missing:
        raise SubmissionError(None, f"picks table lacks columns {missing}")
    df = picks[SUBMISSION_COLUMNS[1:]].reset_index(drop=True).copy()
    df.insert(0, "id", np.arange(len(df), dtype=np.int64))
    validate_submission(df)
    return df


def _missing(values: pd.Series) -> np.ndarray:
    """Empty fields: NaN / None in a text column, or blank text (as read with ``keep_default_na=False``)."""
    if pd.api.types.is_numeric_dtype(values.dtype):
        return np.zeros(len(values), bool)
    return (values.isna() | (values.astype(str).str.strip() == "")).to_numpy()


def check_fields(df: pd.DataFrame, columns, path: str | Path | None = None, error=SubmissionError) -> None:
    """Check that ``df`` has ``columns``, none of them with an empty field, and finite numbers in x, y, z.

    Raises
    ------
    error (SubmissionError or DataError)
        Naming ``path`` (when given), the row and its line in the file, and what is wrong.
    """
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise error(path, f"missing columns {missing}; expected {','.join(columns)}")
    for c in columns:
        empty = _missing(df[c])
        if empty.any():
            i = int(np.flatnonzero(empty)[0])
            raise error(path, f"row {i}{_line(path, i)}: field {c!r} is missing")
    for c in ("x", "y", "z"):
        values = pd.to_numeric(df[c], errors="coerce")
        text = df[c].astype(str).str.strip().str.lower()
        bad = values.isna() & df[c].notna() & ~text.isin(["nan", "+nan", "-nan"])
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise error(path, f"row {i}{_line(path, i)}: column {c!r} is not a number ({df[c].iloc[i]!r})")
        if not np.isfinite(values.to_numpy(float)).all():
            i = int(np.flatnonzero(~np.isfinite(values.to_numpy(float)))[0])
            raise error(path, f"row {i}{_line(path, i)}: column {c!r} is NaN or infinite")


def read_csv_table(path: str | Path, columns, error=SubmissionError) -> pd.DataFrame:
    """Read a points CSV, its text read as text (an empty field stays empty, not NaN), checked by
    :func:`check_fields`; x, y, z as float (Å)."""
    path = Path(path)
    if not path.is_file():
        raise error(path, "no such file")
    try:
        df = pd.read_csv(path, dtype={c: str for c in ("experiment", "particle_type", "x", "y", "z")},
                         keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise error(path, f"not a readable CSV ({exc})") from None
    check_fields(df, columns, path, error)
    for c in ("x", "y", "z"):
        df[c] = pd.to_numeric(df[c]).astype(float)
    return df


def validate_submission(df: pd.DataFrame, path: str | Path | None = None) -> pd.DataFrame:
    """Check columns, empty fields, ids, particle types and coordinates; return ``df`` unchanged.

    Raises
    ------
    SubmissionError
        Naming ``path`` (when given) and the first problem found.
    """
    check_fields(df, SUBMISSION_COLUMNS, path)
    if df["id"].isna().any():
        raise SubmissionError(path, "column 'id' has empty values")
    dup = df["id"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise SubmissionError(path, f"duplicate id {df['id'].iloc[i]} (row {i}{_line(path, i)})")
    unknown = sorted(set(df["particle_type"].astype(str)) - set(PARTICLE_NAMES))
    if unknown:
        raise SubmissionError(path, f"unknown particle types {unknown}; known: {', '.join(PARTICLE_NAMES)}")
    if df["experiment"].isna().any():
        raise SubmissionError(path, "column 'experiment' has empty values")
    return df


def _line(path, row: int) -> str:
    """`` (line N)`` of a data row in a CSV file with a header, when reading from a file."""
    return f" (line {row + 2})" if path is not None else ""


def read_submission(path: str | Path, extents: dict | None = None) -> pd.DataFrame:
    """Read and validate a submission CSV (x, y, z as float, Å).

    ``extents`` (``{run: (2, 3) corners}``, :func:`czii_kit.picks.run_extents`): warn once, with
    the count, about points outside their tomogram by more than a particle radius.
    """
    df = read_csv_table(path, SUBMISSION_COLUMNS)
    validate_submission(df, path)
    if extents:
        warn_outside(df, extents, path)
    return df


def write_submission(picks: pd.DataFrame, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``picks`` (with or without ``id``) as a submission CSV, atomically.

    Parameters
    ----------
    picks : DataFrame
        ``experiment, particle_type, x, y, z`` (Å), as :func:`czii_kit.predict.predict` returns;
        ``id`` is added (0, 1, ...) when missing.
    path : path-like
        The CSV to write (``id,experiment,particle_type,x,y,z``, coordinates to 3 decimals).
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    FileExistsNoForce
        If ``path`` exists and ``overwrite`` is false.
    """
    df = validate_submission(picks) if "id" in picks.columns else to_submission(picks)
    df = df[SUBMISSION_COLUMNS]
    return atomic_write(path, lambda p: df.to_csv(p, index=False, float_format="%.3f"), overwrite)
