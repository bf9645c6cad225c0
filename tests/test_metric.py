"""The competition metric: hand-counted cases, Kaggle's quirks, and the real picks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from czii_kit.catalog import PARTICLE_NAMES, radii
from czii_kit.errors import CziiKitError, DataError, UnknownParticleError
from czii_kit.metric import f_beta, format_table, match_counts, score
from czii_kit.picks import read_picks

R = 100.0  # matching radius in these unit cases


def frame(rows):
    return pd.DataFrame(rows, columns=["experiment", "particle_type", "x", "y", "z"])


def test_match_counts_basic():
    ref = np.array([[0, 0, 0], [1000, 0, 0], [0, 1000, 0]], float)
    cand = np.array([[10, 0, 0], [1000, 90, 0], [5000, 0, 0]], float)
    assert match_counts(ref, cand, R) == (2, 1, 1)


def test_one_candidate_near_two_references_counts_two_true_positives():
    """Kaggle's quirk: TP counts distinct references hit, so FP = candidates - TP can go negative."""
    ref = np.array([[0, 0, 0], [120, 0, 0]], float)
    cand = np.array([[60, 0, 0]], float)
    assert match_counts(ref, cand, R) == (2, -1, 0)


def test_two_candidates_on_one_reference_give_one_tp_one_fp():
    ref = np.array([[0, 0, 0]], float)
    cand = np.array([[5, 0, 0], [-5, 0, 0]], float)
    assert match_counts(ref, cand, R) == (1, 1, 0)


def test_radius_is_inclusive_and_sharp():
    ref = np.array([[0, 0, 0]], float)
    assert match_counts(ref, [[0, 0, R]], R) == (1, 0, 0)
    assert match_counts(ref, [[0, 0, R * 1.001]], R) == (0, 1, 1)
    assert match_counts(ref, [[R * 0.6, R * 0.6, R * 0.6]], R) == (0, 1, 1)  # 1.04 R along a diagonal


def test_empty_inputs():
    pts = np.array([[0, 0, 0], [500, 0, 0]], float)
    assert match_counts(np.empty((0, 3)), pts, R) == (0, 2, 0)
    assert match_counts(pts, np.empty((0, 3)), R) == (0, 0, 2)
    assert match_counts(np.empty((0, 3)), np.empty((0, 3)), R) == (0, 0, 0)
    assert f_beta(0, 0, 0) == (0.0, 0.0, 0.0)
    assert f_beta(0, 5, 0) == (0.0, 0.0, 0.0)
    empty = frame([])
    res = score(frame([("A", "ribosome", 0, 0, 0)]), empty)
    assert res.final == 0.0 and res.table.loc["ribosome", "fn"] == 1
    assert score(empty, empty).final == 0.0


def test_f_beta_formula():
    p, r, f = f_beta(1, 1, 2, beta=4)
    assert (p, r) == (0.5, pytest.approx(1 / 3))
    assert f == pytest.approx(17 * 0.5 * (1 / 3) / (16 * 0.5 + 1 / 3))  # = 17/50
    assert f == pytest.approx(0.34)
    assert f_beta(3, 0, 0)[2] == 1.0


def test_score_hand_counted():
    rib = radii()["ribosome"]  # 150 Å -> matching within 75 Å
    solution = frame([
        ("A", "ribosome", 1000, 1000, 500),
        ("A", "ribosome", 3000, 1000, 500),
        ("A", "apo-ferritin", 2000, 2000, 300),
        ("B", "ribosome", 500, 500, 500),
    ])
    submission = frame([
        ("A", "ribosome", 1000 + 0.49 * rib, 1000, 500),  # TP
        ("A", "ribosome", 5000, 5000, 500),  # FP; the second A ribosome is a FN
        ("A", "apo-ferritin", 2000, 2000 + 29.9, 300),  # TP (apo-ferritin matches within 30 Å)
        ("A", "thyroglobulin", 100, 100, 100),  # FP of a type absent from the solution: F stays 0
        ("C", "ribosome", 500, 500, 500),  # experiment not in the solution: ignored
        ("C", "not-a-protein", 0, 0, 0),  # ignored too, as on Kaggle
    ])  # B's ribosome: FN
    res = score(solution, submission)
    t = res.table
    assert t.loc["ribosome", ["tp", "fp", "fn"]].tolist() == [1, 1, 2]
    assert t.loc["ribosome", "f_beta"] == pytest.approx(0.34)
    assert t.loc["apo-ferritin", ["tp", "fp", "fn", "f_beta"]].tolist() == [1, 0, 0, 1.0]
    assert t.loc["thyroglobulin", ["tp", "fp", "fn", "f_beta"]].tolist() == [0, 1, 0, 0.0]
    assert res.final == pytest.approx((1 * 1.0 + 1 * 0.34) / 7)
    d = res.to_dict()
    assert d["final"] == pytest.approx(1.34 / 7) and d["particles"]["ribosome"]["tp"] == 1
    text = format_table(res)
    assert "ribosome" in text and f"{res.final:.4f}" in text


def test_sums_over_experiments_before_f_beta():
    """TP/FP/FN are summed over experiments per type; F is not averaged per experiment."""
    solution = frame([("A", "ribosome", 0, 0, 0)] + [("B", "ribosome", 1000 * i, 0, 0) for i in range(4)])
    submission = frame([("A", "ribosome", 0, 0, 0), ("A", "ribosome", 5000, 5000, 5000)])
    t = score(solution, submission).table.loc["ribosome"]
    assert (t.tp, t.fp, t.fn) == (1, 1, 4)
    assert t.f_beta == pytest.approx(f_beta(1, 1, 4)[2])


def test_unknown_particle_type_is_an_error():
    solution = frame([("A", "ribosome", 0, 0, 0)])
    with pytest.raises(UnknownParticleError, match="submission has unknown particle types \\['ribozome'\\]"):
        score(solution, frame([("A", "ribozome", 0, 0, 0)]))
    with pytest.raises(UnknownParticleError, match="solution"):
        score(frame([("A", "Ribosome", 0, 0, 0)]), solution)


def test_bad_tables():
    solution = frame([("A", "ribosome", 0, 0, 0)])
    with pytest.raises(DataError, match="lacks columns \\['z'\\]"):
        score(solution, solution.drop(columns="z"))
    with pytest.raises(CziiKitError, match="NaN"):
        score(solution, frame([("A", "ribosome", 0, np.nan, 0)]))


def _brute_force(ref, cand, r):
    if len(ref) == 0 or len(cand) == 0:
        return 0, len(cand), len(ref)
    d = np.linalg.norm(ref[:, None, :] - cand[None, :, :], axis=2)
    tp = int((d <= r).any(axis=1).sum())
    return tp, len(cand) - tp, len(ref) - tp


@pytest.mark.parametrize("seed", range(5))
def test_match_counts_agrees_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    ref = rng.uniform(0, 2000, size=(rng.integers(0, 60), 3))
    near = ref[: len(ref) // 2] + rng.normal(0, 40, size=(len(ref) // 2, 3))  # ~half match, some twice
    cand = np.vstack([near, rng.uniform(0, 2000, size=(rng.integers(0, 40), 3))])
    assert match_counts(ref, cand, R) == _brute_force(ref, cand, R)


def _moved(df, fraction, seed=0):
    """Every point moved by ``fraction * radius`` of its type in a random direction."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(len(df), 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    dist = df["particle_type"].map(radii()).to_numpy() * fraction
    out = df.copy()
    out[["x", "y", "z"]] = df[["x", "y", "z"]].to_numpy() + v * dist[:, None]
    return out


def test_real_picks_against_themselves(train_picks_dir):
    truth = read_picks(train_picks_dir)
    assert len(truth) == 1269
    res = score(truth, truth)
    assert res.final == 1.0
    assert res.table["fp"].sum() == 0 and res.table["fn"].sum() == 0
    assert res.table["tp"].sum() == 1269


def test_real_picks_moved_within_and_beyond_half_radius(train_picks_dir):
    # (directions are seeded: one real apo-ferritin pair is 29.5 Å apart, so a point moved 36 Å
    # straight towards its partner would still match it)
    truth = read_picks(train_picks_dir)
    inside = score(truth, _moved(truth, 0.4))
    assert inside.final == 1.0
    assert inside.table["tp"].sum() == 1269
    outside = score(truth, _moved(truth, 0.6))
    assert outside.final == 0.0
    assert outside.table["tp"].sum() == 0 and outside.table["fp"].sum() == 1269


def test_real_picks_half_missing_scores_as_the_formula_says(train_picks_dir):
    truth = read_picks(train_picks_dir)
    kept = truth[truth.groupby(["experiment", "particle_type"]).cumcount() % 2 == 0]
    res = score(truth, kept)
    for name in PARTICLE_NAMES:
        totals = np.zeros(3, int)
        for exp in sorted(set(truth.experiment)):
            ref, cand = (df[(df.experiment == exp) & (df.particle_type == name)][["x", "y", "z"]].to_numpy()
                         for df in (truth, kept))
            totals += _brute_force(ref, cand, 0.5 * radii()[name])
        assert res.table.loc[name, ["tp", "fp", "fn"]].tolist() == totals.tolist(), name
        assert res.table.loc[name, "f_beta"] == pytest.approx(f_beta(*totals)[2])
    # the real data has one apo-ferritin pair 29.5 Å apart (< 30 Å): a kept point hits both -> FP = -1
    apo = res.table.loc["apo-ferritin"]
    assert apo.fp == -1 and apo.tp == int((kept.particle_type == "apo-ferritin").sum()) + 1
