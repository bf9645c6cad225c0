"""3D merging of per-slice detections, scoring, NMS, thresholds and threshold tuning."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from czii_kit.catalog import get_particle
from czii_kit.coords import voxel_to_angstrom
from czii_kit.metric import score
from czii_kit.postprocess import (
    MergeConfig,
    aggregate_clusters,
    apply_thresholds,
    greedy_clusters,
    linked_components,
    merge_detections,
    nms_3d,
    postprocess,
)
from czii_kit.tune import threshold_curve, tune_thresholds

VS = 10.012444


def particle_detections(run, cls, centre_zyx, slices, conf=0.8, jitter=0.3, seed=0):
    """Detections of one sphere on the given slices (box side from the cross-section)."""
    rng = np.random.default_rng(seed)
    r = get_particle(cls).radius / VS
    z0, y0, x0 = centre_zyx
    rows = []
    for z in slices:
        half = np.sqrt(max(r**2 - (z - z0) ** 2, 0.0))
        c = conf * (0.5 + 0.5 * half / r)  # most confident near the equator
        rows.append({"run": run, "z": int(z), "x": x0 + rng.normal(0, jitter), "y": y0 + rng.normal(0, jitter),
                     "w": 2 * half, "h": 2 * half, "conf": c, "class": get_particle(cls).class_id})
    return pd.DataFrame(rows)


def test_one_particle_on_ten_slices_becomes_one_centre_in_angstrom():
    # unequal-sided volume: x, y, z centres all different so an axis swap shows
    centre = (20.4, 37.0, 81.0)  # z, y, x voxels
    det = particle_detections("TS_1", "ribosome", centre, range(16, 26), jitter=0.0)
    for method in ("greedy", "components"):
        cands = merge_detections(det, VS, MergeConfig(method=method))
        assert len(cands) == 1
        row = cands.iloc[0]
        expect = voxel_to_angstrom([centre], VS)[0]
        # conf-weighted mean over slices 16..25 (symmetric weights around 20.5)
        assert row.x == pytest.approx(expect[0], abs=1e-6)
        assert row.y == pytest.approx(expect[1], abs=1e-6)
        assert row.z == pytest.approx(20.5 * VS, abs=0.05 * VS)
        assert row.particle_type == "ribosome" and row.n_slices == 10 and row.experiment == "TS_1"


def test_touching_particles_side_by_side_stay_two():
    r = get_particle("apo-ferritin").radius / VS  # ~6 voxels
    a = particle_detections("TS_1", "apo-ferritin", (30.0, 50.0, 40.0), range(26, 35), seed=1)
    b = particle_detections("TS_1", "apo-ferritin", (30.0, 50.0, 40.0 + 2 * r), range(26, 35), seed=2)
    det = pd.concat([a, b], ignore_index=True)
    for method in ("greedy", "components"):
        cands = merge_detections(det, VS, MergeConfig(method=method))
        assert len(cands) == 2, method
        xs = np.sort(cands["x"].to_numpy()) / VS
        np.testing.assert_allclose(xs, [40.0, 40.0 + 2 * r], atol=0.5)


def test_stacked_particles_chain_in_components_but_not_in_greedy():
    r = get_particle("ribosome").radius / VS  # ~15 voxels
    z1, z2 = 20.0, 20.0 + 2 * r
    a = particle_detections("TS_1", "ribosome", (z1, 60.0, 70.0), np.arange(int(z1 - r) + 1, int(z1 + r) + 1), seed=3)
    b = particle_detections("TS_1", "ribosome", (z2, 60.0, 70.0), np.arange(int(z2 - r) + 1, int(z2 + r) + 1), seed=4)
    det = pd.concat([a, b], ignore_index=True)
    greedy = merge_detections(det, VS, MergeConfig(method="greedy"))
    # a stray pole slice may survive as a weak single-slice candidate; thresholds remove it
    assert (greedy["score"] < 0.3).sum() == len(greedy) - 2
    greedy = greedy[greedy["score"] >= 0.3]
    np.testing.assert_allclose(np.sort(greedy["z"].to_numpy()) / VS, [z1, z2], atol=1.0)
    chained = merge_detections(det, VS, MergeConfig(method="components"))
    assert len(chained) == 1  # the failure mode greedy fixes


def test_classes_and_runs_are_merged_separately():
    a = particle_detections("TS_1", "ribosome", (20.0, 40.0, 50.0), range(15, 26))
    b = particle_detections("TS_1", "thyroglobulin", (20.0, 40.0, 50.0), range(15, 26))
    c = particle_detections("TS_2", "ribosome", (20.0, 40.0, 50.0), range(15, 26))
    cands = merge_detections(pd.concat([a, b, c]), {"TS_1": VS, "TS_2": 2 * VS})
    assert sorted(zip(cands.experiment, cands.particle_type, strict=True)) == [
        ("TS_1", "ribosome"), ("TS_1", "thyroglobulin"), ("TS_2", "ribosome")]
    ts2 = cands[cands.experiment == "TS_2"].iloc[0]
    assert ts2.x == pytest.approx(50.0 * 2 * VS, abs=0.5 * VS)  # per-run voxel size used


def test_score_penalises_particles_seen_on_few_slices():
    pts = np.array([[10, 5, 5], [11, 5, 5], [12, 5, 5], [30, 40, 40]], float)
    conf = np.array([0.9, 0.8, 0.7, 0.9])
    centres, sc, n, mx = aggregate_clusters(pts, conf, np.array([0, 0, 0, 1]), top_k=3)
    assert n.tolist() == [3, 1] and mx.tolist() == [0.9, 0.9]
    assert sc[0] == pytest.approx(0.8) and sc[1] == pytest.approx(0.9 / 3)
    np.testing.assert_allclose(centres[0], [(10 * 0.9 + 11 * 0.8 + 12 * 0.7) / 2.4, 5, 5])


def test_greedy_and_components_low_level():
    pts = np.array([[0, 0, 0], [1, 0, 0.5], [0, 10, 0], [5, 0, 0]], float)
    lab = greedy_clusters(pts, [0.9, 0.5, 0.8, 0.7], radius=4.0, xy_frac=1.0, z_frac=1.0, refine=0)
    assert lab[0] == lab[1] and len(set(lab.tolist())) == 3
    lab = linked_components(pts, radius=4.0, link_frac=0.5, link_dz=2.0)
    assert lab[0] == lab[1] and len(set(lab.tolist())) == 3
    assert greedy_clusters(np.empty((0, 3)), [], 3.0).shape == (0,)


def test_nms_3d_keeps_the_best_of_close_points():
    pts = np.array([[0, 0, 0], [0, 0, 3], [0, 0, 10]], float)
    assert nms_3d(pts, np.array([0.5, 0.9, 0.4]), radius=4.0).tolist() == [1, 2]
    assert nms_3d(pts, np.array([0.5, 0.9, 0.4]), radius=0.0).tolist() == [0, 1, 2]


def test_thresholds_per_class():
    cands = pd.DataFrame({"experiment": "TS_1", "particle_type": ["ribosome", "ribosome", "apo-ferritin"],
                          "x": [1.0, 2, 3], "y": 0.0, "z": 0.0, "score": [0.9, 0.3, 0.3]})
    out = apply_thresholds(cands, {"ribosome": 0.5, "apo-ferritin": 0.2})
    assert out.columns.tolist() == ["experiment", "particle_type", "x", "y", "z"]
    assert out.x.tolist() == [1.0, 3.0]
    assert len(apply_thresholds(cands, 0.95)) == 0
    with pytest.raises(ValueError, match="unknown"):
        apply_thresholds(cands, {"ribosme": 0.5})
    with pytest.raises(ValueError):
        MergeConfig(method="dbscan")


def test_postprocess_end_to_end_on_detections():
    det = pd.concat([particle_detections("TS_1", "ribosome", (20.0, 40.0, 90.0), range(8, 33)),
                     particle_detections("TS_1", "ribosome", (60.0, 40.0, 10.0), [60], conf=0.2)])
    picks = postprocess(det, VS, {"ribosome": 0.3})
    assert len(picks) == 1 and picks.iloc[0].x == pytest.approx(90 * VS, abs=VS)


def test_threshold_tuning_matches_the_metric():
    rng = np.random.default_rng(0)
    ref = pd.DataFrame({"experiment": np.repeat(["A", "B"], 10), "particle_type": "thyroglobulin",
                        "x": rng.uniform(0, 5000, 20), "y": rng.uniform(0, 5000, 20), "z": rng.uniform(0, 1500, 20)})
    good = ref.copy()
    good["x"] += 20.0
    good["score"] = rng.uniform(0.4, 0.9, 20)
    good.loc[:2, "score"] = 0.1  # three true particles with low scores
    bad = pd.DataFrame({"experiment": "A", "particle_type": "thyroglobulin", "x": rng.uniform(6000, 9000, 15),
                        "y": 100.0, "z": 100.0, "score": rng.uniform(0.0, 0.35, 15)})
    cands = pd.concat([good, bad], ignore_index=True)
    thr, table = tune_thresholds(cands, ref, tolerance=0.0)
    t = thr["thyroglobulin"]
    res = score(ref, apply_thresholds(cands, thr))
    assert res.table.loc["thyroglobulin", "f_beta"] == pytest.approx(table.loc["thyroglobulin", "f_beta"])
    curve = threshold_curve(cands, ref, "thyroglobulin")
    for _, row in curve.iterrows():  # every point of the curve agrees with the metric
        sub = apply_thresholds(cands, {"thyroglobulin": row.threshold})
        r = score(ref, sub).table.loc["thyroglobulin"]
        assert (r.tp, r.fp, r.fn) == (row.tp, row.fp, row.fn)
    assert table.loc["thyroglobulin", "f_beta"] == pytest.approx(curve["f_beta"].max())
    assert 0 < t < 1
    assert thr["ribosome"] == 0.5 and table.loc["ribosome", "n_reference"] == 0


def test_greedy_beats_connected_components_on_real_particle_layouts(train_picks_dir):
    """Real Kaggle pick layouts (touching and stacked particles) with simulated per-slice detections."""
    from pipeline_fixture import VOXEL, simulate_detections

    from czii_kit.picks import read_picks
    from czii_kit.tune import compare_merges

    picks = read_picks(train_picks_dir)
    picks = picks[picks["experiment"].isin(sorted(set(picks["experiment"]))[:3])]
    dets = simulate_detections(picks, seed=0, jitter_frac=0.15, miss=0.3, fp_per_slice=1.0)
    cmp = compare_merges(dets, VOXEL, picks).set_index("name")
    assert cmp.loc["greedy", "final"] > 0.97
    assert cmp.loc["greedy", "final"] > cmp.loc["components", "final"] + 0.03
    assert cmp.loc["greedy", "F4 ribosome"] > cmp.loc["components", "F4 ribosome"]


def test_per_type_merge_config_applies_to_its_type_only():
    # stacked ribosomes (chained by components) next to stacked apo-ferritins; components for apo-ferritin only
    def column(cls, yx, seed):
        r = get_particle(cls).radius / VS
        z1, z2 = 30.0, 30.0 + 2 * r
        return pd.concat([particle_detections("TS_1", cls, (z, *yx), np.arange(int(z - r) + 1, int(z + r) + 1),
                                              seed=seed + i) for i, z in enumerate((z1, z2))], ignore_index=True)

    det = pd.concat([column("ribosome", (60.0, 70.0), 0), column("apo-ferritin", (20.0, 130.0), 5)])
    strong = lambda c, t: (c[c.particle_type == t]["score"] >= 0.3).sum()  # noqa: E731
    base = merge_detections(det, VS, MergeConfig(method="greedy"))
    mixed = merge_detections(det, VS, MergeConfig(method="greedy"),
                             per_type={"apo-ferritin": {"name": "components", "method": "components"}})
    assert strong(base, "ribosome") == 2 and strong(base, "apo-ferritin") == 2
    assert strong(mixed, "ribosome") == 2 and (mixed.particle_type == "apo-ferritin").sum() == 1
    pd.testing.assert_frame_equal(base[base.particle_type == "ribosome"].reset_index(drop=True),
                                  mixed[mixed.particle_type == "ribosome"].reset_index(drop=True))
    # a per-type minimum confidence filters that type only
    floor = merge_detections(det, VS, per_type={"ribosome": MergeConfig(min_conf=2.0)})
    assert set(floor.particle_type) == {"apo-ferritin"}
    from czii_kit.errors import UnknownParticleError

    with pytest.raises(UnknownParticleError, match="ferritin-x"):
        merge_detections(det, VS, per_type={"ferritin-x": MergeConfig()})


def test_choose_per_type_needs_a_clear_gain():
    from czii_kit.tune import choose_per_type

    cmp = pd.DataFrame({
        "name": ["greedy-sphere", "greedy", "greedy-split"], "final": [0.84, 0.83, 0.80],
        "F4 apo-ferritin": [0.65, 0.65, 0.71], "F4 ribosome": [0.995, 1.0, 0.99],
        "F4 thyroglobulin": [0.90, 0.93, 0.88], "F4 beta-galactosidase": [0.7, 0.7, 0.7],
    })
    # apo-ferritin +0.06 and thyroglobulin +0.03 switch; ribosome +0.005 stays (margin 0.01); ties stay
    assert choose_per_type(cmp) == {"apo-ferritin": "greedy-split", "thyroglobulin": "greedy"}
    assert choose_per_type(cmp, margin=0.05) == {"apo-ferritin": "greedy-split"}
    assert choose_per_type(cmp, margin=0.0) == {"apo-ferritin": "greedy-split", "ribosome": "greedy",
                                                "thyroglobulin": "greedy"}


def test_predict_settings_repeat_the_tuned_per_type_merges(tmp_path):
    import json

    from czii_kit.bundle import ModelBundle

    weights = tmp_path / "m.pt"
    weights.write_bytes(b"")
    doc = {"thresholds": {"ribosome": 0.4}, "inference": {"z_stride": 2, "multi_label": True},
           "merge": MergeConfig(method="greedy", xy_frac=1.0, refine=0).to_dict(),
           "merge_per_type": {"apo-ferritin": {"name": "greedy-split", "method": "greedy", "z_frac": 0.8,
                                               "top_k": 1}}}
    (tmp_path / "czii_kit_thresholds.json").write_text(json.dumps(doc))
    s = ModelBundle(weights).settings().overridden(batch=4)
    assert s.inference.z_stride == 2 and s.inference.multi_label and s.inference.batch == 4
    assert s.merge.xy_frac == 1.0 and s.merge.refine == 0
    assert s.merge_per_type == {"apo-ferritin": MergeConfig(method="greedy", z_frac=0.8, top_k=1)}
    assert s.thresholds["ribosome"] == 0.4 and s.thresholds["apo-ferritin"] == 0.5


def test_tuned_threshold_sits_at_the_low_end_of_the_f4_plateau():
    # 10 references found with scores 0.9..0.5; false candidates at 0.45 and 0.3 (cheap under beta=4)
    ref = pd.DataFrame({"experiment": "A", "particle_type": "ribosome", "x": np.arange(10) * 1000.0,
                        "y": 0.0, "z": 0.0})
    good = ref.assign(score=np.linspace(0.9, 0.5, 10))
    bad = pd.DataFrame({"experiment": "A", "particle_type": "ribosome", "x": [20000.0, 30000.0], "y": 0.0,
                        "z": 0.0, "score": [0.45, 0.3]})
    cands = pd.concat([good, bad], ignore_index=True)
    curve = threshold_curve(cands, ref, "ribosome").set_index("threshold")
    assert curve.loc[0.5, "f_beta"] == 1.0 and 0.99 < curve.loc[0.45, "f_beta"] < 1.0
    assert tune_thresholds(cands, ref, tolerance=0.0)[0]["ribosome"] == pytest.approx(0.475)
    thr, table = tune_thresholds(cands, ref, tolerance=0.01)  # gives up < 0.01 F4 for the lower threshold
    assert thr["ribosome"] == pytest.approx(0.375) and table.loc["ribosome", "fp"] == 1
    assert table.loc["ribosome", "f_beta_max"] == 1.0 and table.loc["ribosome", "f_beta"] == curve.loc[0.45, "f_beta"]
    assert tune_thresholds(cands, ref, tolerance=1.0)[0]["ribosome"] == 0.3  # lowest candidate score
    # a type that is never found keeps a threshold above all its candidates, whatever the tolerance
    far = cands.assign(x=cands["x"] + 50000.0)
    thr, table = tune_thresholds(far, ref, tolerance=0.01)
    assert thr["ribosome"] > 0.9 and len(apply_thresholds(far, thr)) == 0 and table.loc["ribosome", "fp"] == 0
    with pytest.raises(ValueError, match="tolerance"):
        tune_thresholds(cands, ref, tolerance=-0.1)
