"""``czii-kit score SOLUTION SUBMISSION``: the Kaggle metric, per type and final."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from czii_kit.errors import DataError
from czii_kit.layout import find_runs
from czii_kit.metric import format_table, score
from czii_kit.picks import PICK_COLUMNS, read_picks, run_extents, warn_outside
from czii_kit.submission import read_csv_table, read_submission


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "score",
        help="score a submission CSV with the competition metric",
        description=(
            "Score SUBMISSION (a CSV id,experiment,particle_type,x,y,z in Å, or a picks folder) against "
            "SOLUTION (a picks folder: dataset root, split, overlay root or run folder; or a CSV with "
            "experiment,particle_type,x,y,z). A dataset root with a solution.csv (as `czii-kit synth` writes) "
            "is scored against it for the test split, else against its picks. Prints the reference used, "
            "TP/FP/FN, precision, recall and F-beta (beta=4) per particle type and the weighted final score, "
            "exactly as the Kaggle metric computes them. Submission rows of experiments that are not in the "
            "solution are ignored; a submission matching none of them is an error. Points outside their "
            "tomogram by more than a particle radius are counted in a warning (Kaggle accepts them)."
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
        Unreadable CSV, missing columns or fields, non-numeric or NaN coordinates.
    """
    return read_csv_table(path, PICK_COLUMNS, DataError)[PICK_COLUMNS]


def _picks_reference(path: Path, split: str | None, user_id: str | None) -> tuple[pd.DataFrame, str, dict]:
    """Reference picks from a picks folder (or JSON file), a one-line description, and the runs' extents."""
    table = read_picks(path, split=split, user_id=user_id)
    if path.is_dir():
        runs = find_runs(path, split)
        n_files = sum(len(r.pick_files()) for r in runs)
        splits = sorted({str(r.split) for r in runs if r.split}) or ["-"]
        return table, f"{n_files} picks file(s) under {path} (split {', '.join(splits)})", run_extents(runs)
    return table, f"{path}", {}


def references(path: str | Path, split: str | None = None, user_id: str | None = None):
    """The reference tables ``score`` may use for SOLUTION ``path``, in order: ``(table, description, extents)``.

    A CSV is one; a dataset root with a ``solution.csv`` gives it first (the test split, unless
    ``split`` names another), then its picks; other folders give their picks.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file or folder (solution)")
    if path.is_file() and path.suffix.lower() != ".json":
        yield read_points_csv(path), f"{path}", {}
        return
    csv = path / "solution.csv" if path.is_dir() else None
    if csv is not None and csv.is_file() and split in (None, "test"):
        table = read_points_csv(csv)
        runs = [r for r in find_runs(path, "test") if r.name in set(table["experiment"])]
        yield table, f"{csv} (test split)", run_extents(runs)
        if split == "test":
            return
    yield _picks_reference(path, split, user_id)


def _looks_like_submission(path: Path) -> bool:
    """A CSV file whose header has the submission's ``id`` column."""
    if not path.is_file() or path.suffix.lower() != ".csv":
        return False
    try:
        return "id" in pd.read_csv(path, nrows=0).columns
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return False


def _no_match_hint(args, reference: str) -> str:
    """Why the submission's experiments match none of the reference's, and what to try."""
    sol, sub = Path(args.solution), Path(args.submission)
    if sol.is_file() and (sub.is_dir() or _looks_like_submission(sol)):
        return f"the arguments look swapped: the order is `czii-kit score SOLUTION SUBMISSION` (try {sub} {sol})"
    csv = sol / "solution.csv"
    if csv.is_file() and args.split not in (None, "test"):
        return f"{csv} exists: drop --split {args.split} to score the test runs against it"
    return f"is {sub} a submission for this dataset? (reference: {reference})"


def run(args) -> int:
    sub_path = Path(args.submission)
    if not sub_path.exists():
        raise DataError(sub_path, "no such file or folder (submission)")
    if sub_path.is_dir() and _looks_like_submission(Path(args.solution)):
        raise DataError(args.solution, f"looks like a submission (it has an 'id' column) and SUBMISSION {sub_path} "
                                       "is a folder: the arguments look swapped; the order is "
                                       "`czii-kit score SOLUTION SUBMISSION`")
    if sub_path.is_dir() or sub_path.suffix.lower() == ".json":
        submission = read_picks(sub_path, user_id=args.user_id)
    else:
        submission = read_submission(sub_path)
    sub_experiments = set(submission["experiment"].astype(str))
    tried, chosen = [], None
    for ref in references(args.solution, args.split, args.user_id):
        tried.append(ref)
        if set(ref[0]["experiment"].astype(str)) & sub_experiments:
            chosen = ref
            break
    if chosen is None:
        described = "; ".join(r[1] for r in tried)
        if not any(len(r[0]) for r in tried):
            raise DataError(args.solution, f"holds no reference picks to score against ({described})")
        shown = ", ".join(sorted(sub_experiments)[:3]) + (" ..." if len(sub_experiments) > 3 else "")
        raise DataError(sub_path, f"its experiments ({shown or 'none'}) match none of the reference's "
                                  f"({described}): {_no_match_hint(args, described)}")
    solution, reference, extents = chosen
    experiments = set(solution["experiment"].astype(str))
    warn_outside(solution, extents, args.solution)
    warn_outside(submission, extents, sub_path)
    ignored = int((~submission["experiment"].astype(str).isin(experiments)).sum())
    result = score(solution, submission)
    if args.json:
        out = result.to_dict()
        out.update(reference=reference, experiments=sorted(experiments), n_solution=len(solution),
                   n_submission=len(submission), n_ignored=ignored)
        print(json.dumps(out))
    else:
        print(f"scored against {reference}")
        print(format_table(result))
        print(f"{len(experiments)} experiment(s), {len(solution)} reference points, "
              f"{len(submission) - ignored} scored submission rows")
        if ignored:
            print(f"note: {ignored} submission row(s) of experiments not in the solution were ignored")
    return 0
