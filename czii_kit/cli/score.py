"""``czii-kit score SOLUTION SUBMISSION``: the Kaggle metric, per type and final."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from czii_kit.errors import DataError
from czii_kit.metric import format_table, score
from czii_kit.picks import PICK_COLUMNS, read_picks
from czii_kit.submission import read_submission


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "score",
        help="score a submission CSV with the competition metric",
        description=(
            "Score SUBMISSION (a CSV id,experiment,particle_type,x,y,z in Å, or a picks folder) against "
            "SOLUTION (a picks folder: dataset root, split, overlay root or run folder; or a CSV with "
            "experiment,particle_type,x,y,z). Prints TP/FP/FN, precision, recall and F-beta (beta=4) per "
            "particle type and the weighted final score, exactly as the Kaggle metric computes them. "
            "Submission rows of experiments that are not in the solution are ignored."
        ),
    )
    p.add_argument("solution", metavar="SOLUTION", help="reference picks: folder or CSV")
    p.add_argument("submission", metavar="SUBMISSION", help="submission CSV (or a picks folder)")
    p.add_argument("--split", help="with a dataset root as SOLUTION: only runs of this split")
    p.add_argument("--user-id", help="only copick-named picks of this user in picks folders")
    p.add_argument("--json", action="store_true", help="print one JSON object (final + per-type figures)")
    return p


def read_points_csv(path: str | Path) -> pd.DataFrame:
    """Read a CSV with at least ``experiment, particle_type, x, y, z`` (Å); other columns are dropped.

    Raises
    ------
    DataError
        Unreadable CSV, missing columns, non-numeric or NaN coordinates.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"experiment": str, "particle_type": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(path, f"not a readable CSV ({exc})") from None
    missing = [c for c in PICK_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(path, f"missing columns {missing}; expected {','.join(PICK_COLUMNS)}")
    for c in ("x", "y", "z"):
        values = pd.to_numeric(df[c], errors="coerce")
        if not np.isfinite(values.to_numpy(float)).all():
            i = int(np.flatnonzero(~np.isfinite(values.to_numpy(float)))[0])
            raise DataError(path, f"row {i}: column {c!r} is not a finite number ({df[c].iloc[i]!r})")
        df[c] = values.astype(float)
    if df["experiment"].isna().any() or df["particle_type"].isna().any():
        raise DataError(path, "empty 'experiment' or 'particle_type' values")
    return df[PICK_COLUMNS]


def load_table(path: str | Path, role: str, split: str | None = None, user_id: str | None = None) -> pd.DataFrame:
    """A picks table from a CSV file, one picks JSON file, or a picks folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, f"no such file or folder ({role})")
    if path.is_dir() or path.suffix.lower() == ".json":
        return read_picks(path, split=split, user_id=user_id)
    if role == "submission":
        return read_submission(path)
    return read_points_csv(path)


def run(args) -> int:
    solution = load_table(args.solution, "solution", args.split, args.user_id)
    if solution.empty:
        raise DataError(args.solution, "holds no reference picks to score against")
    submission = load_table(args.submission, "submission", None, args.user_id)
    experiments = set(solution["experiment"].astype(str))
    ignored = int((~submission["experiment"].astype(str).isin(experiments)).sum())
    result = score(solution, submission)
    if args.json:
        out = result.to_dict()
        out.update(experiments=sorted(experiments), n_solution=len(solution), n_submission=len(submission),
                   n_ignored=ignored)
        print(json.dumps(out))
    else:
        print(format_table(result))
        print(f"{len(experiments)} experiment(s), {len(solution)} reference points, "
              f"{len(submission) - ignored} scored submission rows")
        if ignored:
            print(f"note: {ignored} submission row(s) of experiments not in the solution were ignored")
    return 0
