"""Centre refinement of shell-shaped particles (apo-ferritin) by local template correlation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from czii_kit.catalog import get_particle
from czii_kit.coords import voxel_to_angstrom
from czii_kit.refine import SHELLS, RefineConfig, local_correlation, refine_volume, shell_template

VS = 10.012444
SHAPE = (40, 56, 72)  # unequal sides: an axis swap moves the shells off the volume or onto noise


def _shell_volume(centres_zyx, seed=0, noise=0.15):
    """A normalised-looking volume (background ~0.6, dense matter dark) with apo-ferritin shells."""
    rng = np.random.default_rng(seed)
    vol = 0.6 + noise * rng.standard_normal(SHAPE)
    grid = np.indices(SHAPE).astype(float)
    inner, outer = SHELLS["apo-ferritin"]
    for c in centres_zyx:
        r = np.sqrt(sum((grid[a] - c[a]) ** 2 for a in range(3))) * VS
        vol -= 0.3 * ((r >= inner) & (r <= outer))
    return vol.astype(np.float32)


def _cands(points_xyz, types, scores):
    return pd.DataFrame({"experiment": "TS_1", "particle_type": types, "x": points_xyz[:, 0],
                         "y": points_xyz[:, 1], "z": points_xyz[:, 2], "score": scores})


def test_shell_template_shape_and_norm():
    t = shell_template(40.0, 60.0, VS)
    assert t.ndim == 3 and len(set(t.shape)) == 1 and t.shape[0] % 2 == 1
    assert abs(float(t.mean())) < 1e-6 and abs(float(np.linalg.norm(t)) - 1) < 1e-5
    c = t.shape[0] // 2
    assert t[c, c, c] < 0 < t[c, c, c + 5]  # hollow centre, dense wall at 50 Å
    with pytest.raises(ValueError, match="inner"):
        shell_template(60.0, 40.0, VS)


def test_local_correlation_peaks_at_the_particle():
    centre = np.array([20, 25, 40])
    vol = _shell_volume([centre], noise=0.0)
    t = shell_template(*SHELLS["apo-ferritin"], VS)
    cc = local_correlation(vol, [centre + [1, -2, 3]], t, window=3)
    assert cc.shape == (1, 7, 7, 7)
    peak = np.unravel_index(cc[0].argmax(), cc.shape[1:])
    assert tuple(np.array(peak) - 3) == (-1, 2, -3)  # (z, y, x) offset back to the centre
    assert cc.max() > 0.8 and cc.min() >= -1.0 - 1e-5


def test_refine_moves_apo_ferritin_to_its_centre_and_leaves_others():
    true_zyx = np.array([[18.0, 20.0, 24.0], [22.0, 36.0, 52.0]])
    vol = _shell_volume(true_zyx, seed=1)
    start = true_zyx + [[2, -2, 1], [-1, 3, -2]]  # 3-4 voxels off: beyond the 3-voxel hit radius
    pts = voxel_to_angstrom(np.vstack([start, [[10, 10, 10]]]), VS)
    cands = _cands(pts, ["apo-ferritin", "apo-ferritin", "ribosome"], [0.9, 0.8, 0.7])
    out = refine_volume(cands, vol, VS, RefineConfig(window=3))
    assert len(out) == 3
    apo = out[out.particle_type == "apo-ferritin"][["x", "y", "z"]].to_numpy()
    err = np.linalg.norm(apo - voxel_to_angstrom(true_zyx, VS), axis=1)
    assert (err < 0.6 * VS).all(), err
    ribo = out[out.particle_type == "ribosome"].iloc[0]
    assert (ribo.x, ribo.y, ribo.z) == tuple(pts[2])  # other types untouched
    # nothing to refine -> unchanged copy
    same = refine_volume(cands, vol, VS, RefineConfig(types=()))
    pd.testing.assert_frame_equal(same, cands)


def test_refine_merges_candidates_that_converge():
    true_zyx = np.array([[20.0, 28.0, 36.0]])
    vol = _shell_volume(true_zyx, seed=2)
    start = true_zyx + [[2, 2, 0], [-1, -2, 2]]  # two detections of one particle, 5 voxels apart
    assert np.linalg.norm(start[0] - start[1]) * VS > 0.8 * get_particle("apo-ferritin").radius
    cands = _cands(voxel_to_angstrom(start, VS), ["apo-ferritin"] * 2, [0.4, 0.6])
    out = refine_volume(cands, vol, VS)
    assert len(out) == 1 and out.score.iloc[0] == 0.6  # NMS keeps the better one


def test_refine_config_checks_and_round_trip():
    with pytest.raises(ValueError, match="no refinement template"):
        RefineConfig(types=("ribosome",))
    with pytest.raises(ValueError, match="window"):
        RefineConfig(window=-1)
    cfg = RefineConfig(window=4)
    assert RefineConfig.from_dict(cfg.to_dict()) == cfg
    assert RefineConfig.from_dict({"window": 2}).window == 2
    from czii_kit.errors import SettingsError

    with pytest.raises(SettingsError, match="refine.unknown: unknown setting"):
        RefineConfig.from_dict({"window": 2, "unknown": 1}, "f.json", "refine")


@pytest.mark.slow
def test_tune_records_refinement_and_predict_repeats_it(tmp_path):
    import json

    from pipeline_fixture import shipped_model_copy

    from czii_kit.infer import InferenceConfig
    from czii_kit.postprocess import apply_thresholds
    from czii_kit.predict import predict
    from czii_kit.tune import THRESHOLDS_FILE, tune

    root, run, weights = shipped_model_copy(tmp_path, seed=4244)
    wdir = weights.parent
    doc = tune(weights, root, split="train", runs=[run], backend="torch",
               config=InferenceConfig(multi_label=True), rescorer=False, refine=True, progress=False)
    assert doc["refine"] == RefineConfig().to_dict() and doc["refine_comparison"] is None
    cands = doc["_candidates"]
    assert (cands.particle_type == "apo-ferritin").any()

    kw = {"split": "train", "model": weights, "backend": "torch", "progress": False}
    cols = ["experiment", "particle_type", "x", "y", "z"]

    def same(a, b):
        pd.testing.assert_frame_equal(a.sort_values(cols).reset_index(drop=True)[cols],
                                      b.sort_values(cols).reset_index(drop=True)[cols])

    picks = predict(root, **kw)
    same(picks, apply_thresholds(cands, doc["thresholds"]))
    unrefined = predict(root, refine=False, **kw)
    assert unrefined[unrefined.particle_type != "apo-ferritin"].shape == picks[picks.particle_type != "apo-ferritin"].shape
    a = picks[picks.particle_type == "apo-ferritin"][["x", "y", "z"]].to_numpy()
    b = unrefined[unrefined.particle_type == "apo-ferritin"][["x", "y", "z"]].to_numpy()
    assert len(a) != len(b) or not np.allclose(np.sort(a, 0), np.sort(b, 0))  # the apo centres moved
    # a thresholds file without "refine" (older czii_kit): no refinement unless asked for
    doc_file = wdir / THRESHOLDS_FILE
    d = json.loads(doc_file.read_text())
    d.pop("refine")
    doc_file.write_text(json.dumps(d))
    same(predict(root, **kw), unrefined)
    same(predict(root, refine=True, **kw), picks)


def test_refine_stays_inside_the_volume_and_ignores_index_labels():
    from czii_kit.coords import angstrom_to_voxel

    vol = _shell_volume([[20, 28, 36]], seed=3)
    corners = np.array([[0, 0, 0], [20, 29, 35], [SHAPE[0] - 1, SHAPE[1] - 1, SHAPE[2] - 1]])
    cands = _cands(voxel_to_angstrom(corners, VS), ["apo-ferritin"] * 3, [0.5, 0.9, 0.3])
    cands.index = [7, 7, 7]  # e.g. a slice of a concatenated frame
    out = refine_volume(cands, vol, VS)
    assert len(out) == 3  # far apart: none merged, none lost to the repeated labels
    v = angstrom_to_voxel(out[["x", "y", "z"]].to_numpy(), VS)
    assert (v >= 0).all() and (v <= np.array(SHAPE) - 1).all()
