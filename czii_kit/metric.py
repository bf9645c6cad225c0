"""The competition metric, exactly as Kaggle's "CZII - CryoET Object Identification" computes it.

Per (experiment, particle type): k-d trees of reference and candidate points; TP is the number of
distinct reference points with at least one candidate within ``0.5 * radius``; FP = candidates - TP;
FN = references - TP. One candidate near two references therefore gives two TPs (and FP = -1), two
candidates on one reference give one TP and one FP. TP/FP/FN are summed over experiments per type;
F-beta (beta = 4) per type; final = sum(weight * F) / sum(weight) = / 7.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from czii_kit.catalog import PARTICLE_NAMES, PARTICLES
from czii_kit.errors import DataError, UnknownParticleError

BETA = 4.0
DISTANCE_MULTIPLIER = 0.5


@dataclass
class ScoreResult:
    """The competition score of a submission: per-type counts and F-beta, and the weighted final score.

    Attributes
    ----------
    table : DataFrame
        One row per catalog particle type (index, 6 rows); columns ``tp, fp, fn`` (int, summed over
        experiments), ``precision, recall, f_beta`` (float in [0, 1]) and ``weight`` (the metric weight).
    final : float
        Σ weight × F-beta / Σ weight, in [0, 1] (Kaggle's leaderboard score).
    """

    table: pd.DataFrame
    final: float

    def to_dict(self) -> dict:
        """``{"final": float, "particles": {type: {tp, fp, fn, precision, recall, f_beta, weight}}}``."""
        rows = {
            name: {k: (int(v) if k in ("tp", "fp", "fn") else float(v)) for k, v in row.items()}
            for name, row in self.table.iterrows()
        }
        return {"final": float(self.final), "particles": rows}


def match_counts(reference: np.ndarray, candidates: np.ndarray, radius: float) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` for reference ``(N, 3)`` and candidate ``(M, 3)`` points within ``radius``."""
    reference = np.asarray(reference, dtype=float).reshape(-1, 3)
    candidates = np.asarray(candidates, dtype=float).reshape(-1, 3)
    n_ref, n_cand = len(reference), len(candidates)
    if n_ref == 0:
        return 0, n_cand, 0
    if n_cand == 0:
        return 0, 0, n_ref
    ref_tree = cKDTree(reference)
    cand_tree = cKDTree(candidates)
    matched: set[int] = set()
    for hits in cand_tree.query_ball_tree(ref_tree, r=radius):
        matched.update(hits)
    tp = len(matched)
    return tp, n_cand - tp, n_ref - tp


def f_beta(tp: float, fp: float, fn: float, beta: float = BETA) -> tuple[float, float, float]:
    """``(precision, recall, F-beta)`` with Kaggle's zero conventions."""
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    denom = beta**2 * precision + recall
    f = (1 + beta**2) * precision * recall / denom if precision + recall > 0 and denom != 0 else 0.0
    return float(precision), float(recall), float(f)


def _check_columns(df: pd.DataFrame, what: str) -> None:
    missing = [c for c in ("experiment", "particle_type", "x", "y", "z") if c not in df.columns]
    if missing:
        raise DataError(None, f"{what} lacks columns {missing}")


def _check_values(df: pd.DataFrame, what: str) -> None:
    unknown = sorted(set(df["particle_type"].astype(str)) - set(PARTICLE_NAMES))
    if unknown:
        raise UnknownParticleError(f"{what} has unknown particle types {unknown}; known: {', '.join(PARTICLE_NAMES)}")
    try:
        xyz = df[["x", "y", "z"]].to_numpy(float)
    except (TypeError, ValueError) as exc:
        raise DataError(None, f"{what} has non-numeric coordinates ({exc})") from None
    if not np.isfinite(xyz).all():
        bad = int(np.flatnonzero(~np.isfinite(xyz).all(axis=1))[0])
        raise DataError(None, f"{what} row {bad} has a NaN or infinite coordinate")


def score(
    solution: pd.DataFrame,
    submission: pd.DataFrame,
    beta: float = BETA,
    distance_multiplier: float = DISTANCE_MULTIPLIER,
) -> ScoreResult:
    """Score a submission against a solution.

    Parameters
    ----------
    solution, submission : DataFrame
        Columns ``experiment, particle_type, x, y, z`` (Å). Submission rows of experiments absent
        from the solution are ignored (and, as on Kaggle, not checked).
    beta : float
        F-beta's beta (4 on Kaggle).
    distance_multiplier : float
        A candidate matches a reference within ``distance_multiplier * radius`` (0.5 on Kaggle).

    Returns
    -------
    ScoreResult
        Per-type TP, FP, FN, precision, recall, F-beta and weight; the weighted final score.

    Raises
    ------
    UnknownParticleError
        If the solution, or a submission row of a solution experiment, names a particle type
        outside the catalog.
    DataError
        Missing columns, non-numeric or NaN coordinates.
    """
    _check_columns(solution, "solution")
    _check_columns(submission, "submission")
    solution = solution.assign(experiment=solution["experiment"].astype(str))
    experiments = sorted(set(solution["experiment"]))
    sub = submission[submission["experiment"].astype(str).isin(experiments)]
    sub = sub.assign(experiment=sub["experiment"].astype(str))
    _check_values(solution, "solution")
    _check_values(sub, "submission")

    def groups(df: pd.DataFrame) -> dict:
        return {k: g[["x", "y", "z"]].to_numpy(float) for k, g in df.groupby(["experiment", "particle_type"])}

    sol_groups, sub_groups = groups(solution), groups(sub)
    rows = {}
    for p in PARTICLES:
        tp = fp = fn = 0
        for exp in experiments:
            ref = sol_groups.get((exp, p.name), np.empty((0, 3)))
            cand = sub_groups.get((exp, p.name), np.empty((0, 3)))
            t, f, n = match_counts(ref, cand, p.radius * distance_multiplier)
            tp, fp, fn = tp + t, fp + f, fn + n
        precision, recall, f = f_beta(tp, fp, fn, beta)
        rows[p.name] = {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall,
                        "f_beta": f, "weight": p.weight}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "particle_type"
    final = float((table["f_beta"] * table["weight"]).sum() / table["weight"].sum())
    return ScoreResult(table, final)


def format_table(result: ScoreResult) -> str:
    """A human-readable per-type table with the final score.

    Parameters
    ----------
    result : ScoreResult
        What :func:`score` returned.

    Returns
    -------
    str
        One line per particle type (weight, TP, FP, FN, precision, recall, F4) and a last line with
        the final weighted score.
    """
    lines = [f"{'particle_type':<22}{'weight':>7}{'TP':>7}{'FP':>7}{'FN':>7}{'precision':>11}{'recall':>9}{'F4':>8}"]
    for name, r in result.table.iterrows():
        lines.append(
            f"{name:<22}{r['weight']:>7g}{int(r['tp']):>7d}{int(r['fp']):>7d}{int(r['fn']):>7d}"
            f"{r['precision']:>11.3f}{r['recall']:>9.3f}{r['f_beta']:>8.3f}"
        )
    lines.append(f"{'final (weighted F4)':<22}{'':>48}{result.final:>8.4f}")
    return "\n".join(lines)
