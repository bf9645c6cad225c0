"""Write and validate submissions: ``id,experiment,particle_type,x,y,z`` (Å)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from czii_kit.atomic import atomic_write
from czii_kit.catalog import PARTICLE_NAMES
from czii_kit.errors import SubmissionError

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


def validate_submission(df: pd.DataFrame, path: str | Path | None = None) -> pd.DataFrame:
    """Check columns, ids, particle types and coordinates; return ``df`` unchanged.

    Raises
    ------
    SubmissionError
        Naming ``path`` (when given) and the first problem found.
    """
    missing = [c for c in SUBMISSION_COLUMNS if c not in df.columns]
    if missing:
        raise SubmissionError(path, f"missing columns {missing}; expected {','.join(SUBMISSION_COLUMNS)}")
    for c in ("x", "y", "z"):
        values = pd.to_numeric(df[c], errors="coerce")
        bad = values.isna() & df[c].notna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise SubmissionError(path, f"row {i}{_line(path, i)}: column {c!r} is not a number ({df[c].iloc[i]!r})")
        if values.isna().any() or not np.isfinite(values.to_numpy(float)).all():
            i = int(np.flatnonzero(~np.isfinite(values.to_numpy(float)))[0])
            raise SubmissionError(path, f"row {i}{_line(path, i)}: column {c!r} is NaN or infinite")
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


def read_submission(path: str | Path) -> pd.DataFrame:
    """Read and validate a submission CSV."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(path, "no such file")
    try:
        df = pd.read_csv(path, dtype={"experiment": str, "particle_type": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SubmissionError(path, f"not a readable CSV ({exc})") from exc
    validate_submission(df, path)
    for c in ("x", "y", "z"):
        df[c] = df[c].astype(float)
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
