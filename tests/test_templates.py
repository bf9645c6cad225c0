"""Template matching at candidate positions (czii_kit.templates) and its place in the rescored score."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from czii_kit.catalog import PARTICLE_NAMES
from czii_kit.coords import voxel_to_angstrom
from czii_kit.errors import DataError, FileExistsNoForce, SettingsError
from czii_kit.preprocess import block_mean
from czii_kit.templates import (
    Template,
    TemplateConfig,
    TemplateMatcher,
    load_templates,
    save_templates,
    sphere_mask,
)

VS = 10.012444
SHAPE = (44, 72, 100)  # unequal sides: an axis swap puts the patches on noise or off the volume
BLOBS = {  # two made-up "proteins" of the same size, Gaussian blobs (Å from the centre, z, y, x)
    "beta-galactosidase": 38.0 * np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3),
    "thyroglobulin": np.array([[0, 0, -66.0], [0, 0, 0], [0, 0, 66.0], [0, 30.0, 0]]),
}
SIGMA = 16.0  # Å


def _density(grid_zyx_A, centre_A, rot, kind):
    d = np.zeros(grid_zyx_A.shape[1:], np.float64)
    for b in BLOBS[kind] @ rot.T + centre_A:
        d += np.exp(-sum((grid_zyx_A[a] - b[a]) ** 2 for a in range(3)) / (2 * SIGMA ** 2))
    return d


def _templates(voxel=20.0):
    side = 17
    g = (np.indices((side,) * 3) - side // 2) * voxel
    return {k: Template(k, _density(g, np.zeros(3), np.eye(3), k).astype(np.float32), voxel,
                        np.full(3, side // 2, float)) for k in BLOBS}


def _volume(seed=0, noise=0.05, vs=VS):
    """Normalised-looking volume (background 0.6, dense matter dark) with 3 rotated copies of each kind;
    ``vs`` Å per voxel (the particles keep their size in Å)."""
    from czii_kit.rotations import random_rotations

    rng = np.random.default_rng(seed)
    shape = tuple(int(round(n * VS / vs)) for n in SHAPE)
    grid = np.indices(shape).astype(float) * vs
    vol = 0.6 + noise * rng.standard_normal(shape)
    centres, kinds = [], []
    slots = [(z, y, x) for z in (14, 30) for y in (18, 52) for x in (20, 50, 80)]
    rng.shuffle(slots)
    for i, rot in enumerate(random_rotations(rng, 6)):
        kind = list(BLOBS)[i % 2]
        c = np.array(slots[i], float) * VS / vs
        vol -= 0.3 * _density(grid, c * vs, rot, kind)
        centres.append(c)
        kinds.append(kind)
    return vol.astype(np.float32), np.array(centres), kinds


def test_block_mean_and_mask():
    v = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    b = block_mean(v, 2)
    assert b.shape == (2, 3, 3)
    assert b[1, 2, 0] == pytest.approx(v[2:4, 4:6, 0:2].mean())
    m = sphere_mask(2.5)
    assert m.shape == (7, 7, 7) and m[3, 3, 3] and not m[0, 0, 0] and m.sum() == m[::-1, ::-1, ::-1].sum()


def test_block_mean_is_numpys_reshape_mean_bit_for_bit():
    """The slab-wise block mean gives numpy's ``reshape(...).mean((1, 3, 5))`` exactly (the same float32
    sums in the same order, zeros' signs included), for uneven shapes (trailing voxels dropped), every
    factor, wide-ranging values and volumes of another dtype."""
    rng = np.random.default_rng(7)
    shapes = [(20, 33, 47), (9, 10, 11), (16, 17, 3), (5, 40, 9), (14, 14, 14)]
    for i, shape in enumerate(shapes):
        v = (rng.standard_normal(shape) * np.exp(rng.uniform(-9, 9, shape))).astype(np.float32)
        v[rng.random(shape) < 0.3] = (-0.0, 0.0)[i % 2]
        if i == 4:
            v[:4, :4, :4] = -0.0  # whole blocks of -0.0: numpy's sum starts at +0.0
        for f in range(2, 10):
            if min(shape) < f:
                continue
            z, y, x = (n // f * f for n in shape)
            ref = v[:z, :y, :x].reshape(z // f, f, y // f, f, x // f, f).mean((1, 3, 5))
            got = block_mean(v, f)
            assert got.dtype == np.float32 and got.shape == ref.shape, (shape, f)
            assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), (shape, f)
    d = rng.standard_normal((12, 14, 16))  # float64 in: numpy's mean of its float32 copy
    np.testing.assert_array_equal(block_mean(d, 2),
                                  d.astype(np.float32).reshape(6, 2, 7, 2, 8, 2).mean((1, 3, 5)))


def _straightforward_match(tm, vol, pts, vs):
    """Best NCC per point and template computed plainly: numpy's block mean, each neighbourhood by
    clipped indices, one template and one shift at a time, all points in one matrix product (the rows
    cut as ``cubes[:, mask]``, whose memory order sets the float32 sums of the normalisation)."""
    from czii_kit.coords import angstrom_to_voxel

    cfg = tm.config
    f = cfg.bin
    z, y, x = (n // f * f for n in vol.shape)
    binned = -vol[:z, :y, :x].reshape(z // f, f, y // f, f, x // f, f).mean((1, 3, 5))
    centre = np.rint((angstrom_to_voxel(pts, vs) - (f - 1) / 2) / f).astype(int)
    out = np.empty((len(pts), len(tm.types)), np.float32)
    for t, name in enumerate(tm.types):
        mask, mat = tm._matrices(vs * f, None)[name]
        r = mask.shape[0] // 2
        best = None
        for axis, step in [(0, 0)] + [(a, s) for a in range(3) for s in (1, -1)]:
            cubes = []
            for c in centre:
                c = c.copy()
                c[axis] += step
                idx = [np.clip(np.arange(c[a] - r, c[a] + r + 1), 0, binned.shape[a] - 1) for a in range(3)]
                cubes.append(binned[np.ix_(*idx)])
            rows = np.array(cubes)[:, mask]  # (points, mask voxels), in numpy's memory order for a mask
            rows = rows - rows.mean(1, keepdims=True)
            rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-8)
            ncc = (rows @ mat.T).max(1)
            best = ncc if best is None else np.maximum(best, ncc)
        out[:, t] = best
    return out


@pytest.mark.parametrize("mask_radius", [110.0, None])  # one mask shared by the templates / one each
def test_match_equals_the_straightforward_computation(mask_radius):
    """Bit for bit, in one batch and in several (200 orientations x 739+ mask voxels x 8+ rows: OpenBLAS's
    blocked product, whose sums do not depend on the rows around; below 1e6 multiply-adds it takes
    another kernel, which rounds differently)."""
    vol, centres, _ = _volume(seed=6)
    pts = voxel_to_angstrom(centres, VS)
    pts = np.concatenate([pts, [[5.0, 5.0, 5.0], [990.0, 700.0, 430.0]],  # at the corners: clipped / padded
                          pts[2:3] + 2.0])  # in the binned voxel of another point: matched once, given to both
    cfg = dict(n_rotations=200, mask_radius=mask_radius)
    tm = TemplateMatcher(_templates(), TemplateConfig(**cfg), cache=False)
    ref = _straightforward_match(tm, vol, pts, VS)
    got = tm.match(vol, pts, VS)
    assert np.array_equal(got, ref) and np.array_equal(got[-1], got[2])  # every point in one batch
    tm.config = TemplateConfig(**cfg, batch=3)  # batches of 3, 3 and 2 binned voxels
    assert np.array_equal(tm.match(vol, pts, VS), ref)


def test_matcher_tells_the_shapes_apart_at_their_centres():
    vol, centres, kinds = _volume()
    tm = TemplateMatcher(_templates(), TemplateConfig(n_rotations=400, mask_radius=110.0))
    pts = voxel_to_angstrom(centres, VS)  # x, y, z Å
    ncc = tm.match(vol, pts, VS)
    assert ncc.shape == (6, 2) and np.isfinite(ncc).all()
    own = np.array([tm.types.index(k) for k in kinds])
    assert (ncc[np.arange(6), own] > 0.6).all()
    m = tm.margins(vol, pts, VS)
    assert m.shape == (6, len(PARTICLE_NAMES))
    idx = [PARTICLE_NAMES.index(k) for k in kinds]
    assert (m[np.arange(6), idx] > 0.03).all()  # each particle matches its own shape best
    assert (m[:, [PARTICLE_NAMES.index(n) for n in PARTICLE_NAMES if n not in BLOBS]] == 0).all()
    # the same points read as (z, y, x) land on noise: the own-type match collapses
    swapped = tm.match(vol, pts[:, ::-1], VS)
    assert np.median(swapped[np.arange(6), own]) < 0.5 * np.median(ncc[np.arange(6), own])


def test_matching_follows_the_voxel_size():
    """The same particles sampled at 14 Å per voxel: templates and masks are rescaled (sizes are in Å)."""
    vs = 14.0
    vol, centres, kinds = _volume(seed=1, vs=vs)
    tm = TemplateMatcher(_templates(), TemplateConfig(n_rotations=400, mask_radius=110.0))
    m = tm.margins(vol, voxel_to_angstrom(centres, vs), vs)
    assert (m[np.arange(6), [PARTICLE_NAMES.index(k) for k in kinds]] > 0.03).all()


def test_per_template_masks():
    """``mask_radius=None``: each template cut to its own radius (+ pad); still tells the shapes apart."""
    vol, centres, kinds = _volume(seed=2)
    t = _templates()
    assert t["thyroglobulin"].radius > t["beta-galactosidase"].radius > 60.0
    tm = TemplateMatcher(t, TemplateConfig(n_rotations=400, mask_radius=None, mask_pad=20.0))
    m = tm.margins(vol, voxel_to_angstrom(centres, VS), VS)
    assert (m[np.arange(6), [PARTICLE_NAMES.index(k) for k in kinds]] > 0.0).all()


def test_template_file_round_trip_and_errors(tmp_path):
    t = _templates()
    path = save_templates(t, tmp_path / "t.npz", {"bin": 2})
    back, meta = load_templates(path)
    assert list(back) == list(t) and meta["bin"] == 2
    for k in t:
        np.testing.assert_array_equal(back[k].density, t[k].density)
        np.testing.assert_allclose(back[k].center, t[k].center)
        assert back[k].voxel_size == t[k].voxel_size
    with pytest.raises(FileExistsNoForce):
        save_templates(t, path)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.npz.*not a czii_kit template file"):
        load_templates(bad)
    with pytest.raises(DataError, match="not found"):
        load_templates(tmp_path / "none.npz")
    with pytest.raises(ValueError):
        TemplateConfig(mask_radius=0)
    assert TemplateConfig.from_dict({"n_rotations": 7}).n_rotations == 7
    with pytest.raises(SettingsError, match="unknown: unknown setting"):
        TemplateConfig.from_dict({"n_rotations": 7, "unknown": 1})


def test_shipped_templates_built_from_the_maps(shared_data, tmp_path):
    """The shipped file is what `czii-kit templates` makes of the reference maps."""
    from czii_kit.bundle import MODELS_DIR
    from czii_kit.cli import main
    from czii_kit.templates import TEMPLATES_FILE

    maps = shared_data / "density_maps"
    if not maps.is_dir():
        pytest.skip("no density maps in the shared data")
    shipped, meta = load_templates(MODELS_DIR / TEMPLATES_FILE)
    assert main(["templates", str(maps), "--out", str(tmp_path / "t.npz")]) == 0
    built, meta2 = load_templates(tmp_path / "t.npz")
    assert main(["templates", str(maps), "--out", str(tmp_path / "t.npz")]) == 2  # no silent overwrite
    assert main(["templates", str(tmp_path / "nowhere"), "--out", str(tmp_path / "u.npz")]) == 2
    assert list(built) == list(shipped) == ["beta-galactosidase", "thyroglobulin"]
    for k in built:
        np.testing.assert_allclose(built[k].density, shipped[k].density, rtol=1e-6)
    assert meta["sources"] == meta2["sources"]


def test_combine_scores_applies_the_template_margin():
    from czii_kit.rescore import RescoreConfig, combine_scores

    raw = pd.DataFrame({"experiment": "TS_1", "particle_type": ["thyroglobulin", "beta-galactosidase"],
                        "x": [0.0, 5000.0], "y": 0.0, "z": 0.0, "score": 0.5, "det_score": 0.5,
                        "p_type": 0.5, "p_background": 0.1, "proposed": False, "tm_margin": [0.05, -0.05]})
    plain = combine_scores(raw, RescoreConfig(mix=0.5)).set_index("particle_type")["score"]
    tm = combine_scores(raw, RescoreConfig(mix=0.5, template_weight=20.0)).set_index("particle_type")["score"]
    assert plain["thyroglobulin"] == plain["beta-galactosidase"] == pytest.approx(0.5)
    assert tm["thyroglobulin"] == pytest.approx(0.5)  # fits its own template best: kept
    assert tm["beta-galactosidase"] == pytest.approx(1 / (1 + np.exp(1.0)))  # another fits better: lowered
    with pytest.raises(ValueError, match="tm_margin"):
        combine_scores(raw.drop(columns="tm_margin"), RescoreConfig(template_weight=1.0))
    with pytest.raises(ValueError):
        RescoreConfig(template_weight=-1)


@pytest.mark.slow
def test_tune_records_template_matching_and_predict_repeats_it(tmp_path):
    import shutil

    import torch
    from pipeline_fixture import shipped_model_copy

    from czii_kit.bundle import MODELS_DIR
    from czii_kit.infer import InferenceConfig
    from czii_kit.postprocess import apply_thresholds
    from czii_kit.predict import predict
    from czii_kit.rescore import RESCORER_FILE, build_network
    from czii_kit.rescore_train import save_rescorer
    from czii_kit.templates import TEMPLATES_FILE
    from czii_kit.tune import THRESHOLDS_FILE, tune

    root, run, weights = shipped_model_copy(tmp_path, seed=4245)
    wdir = weights.parent
    torch.manual_seed(0)
    save_rescorer(build_network(), wdir / RESCORER_FILE)
    shutil.copy(MODELS_DIR / TEMPLATES_FILE, wdir)
    doc = tune(weights, root, split="train", runs=[run], backend="torch", config=InferenceConfig(multi_label=True),
               progress=False, refine=False, rescore_mixes=None, template_weights=(20.0,))
    section = doc["rescore"]
    assert section["config"]["template_weight"] == 20.0
    assert section["templates"]["file"] == TEMPLATES_FILE and len(section["templates"]["sha256"]) == 64
    rescored = doc["_rescored"]
    assert "tm_margin" in rescored and (rescored["tm_margin"] != 0).any()
    others = ~rescored.particle_type.isin(["beta-galactosidase", "thyroglobulin"])
    assert (rescored.loc[others, "tm_margin"] == 0).all()

    kw = {"split": "train", "model": weights, "backend": "torch", "progress": False}
    cols = ["experiment", "particle_type", "x", "y", "z"]

    def sort(df):
        return df.sort_values(cols).reset_index(drop=True)[cols]

    picks = predict(root, **kw)
    pd.testing.assert_frame_equal(sort(picks), sort(apply_thresholds(rescored, section["thresholds"])))
    without = predict(root, templates=False, **kw)
    assert not sort(without).equals(sort(picks))
    # templates given the missing wedge: recorded in the thresholds file, and predict follows it
    wdoc = tune(weights, root, split="train", runs=[run], backend="torch", config=InferenceConfig(multi_label=True),
                progress=False, refine=False, rescore_mixes=None, template_weights=(20.0,),
                template_config=TemplateConfig(wedge=(40.0, 45.0)), out=tmp_path / "wedge.json")
    assert json.loads((tmp_path / "wedge.json").read_text())["rescore"]["templates"]["config"]["wedge"] == [40.0, 45.0]
    assert not np.allclose(wdoc["_rescored"]["tm_margin"], rescored["tm_margin"])
    wpicks = predict(root, settings=tmp_path / "wedge.json", **kw)
    pd.testing.assert_frame_equal(sort(wpicks), sort(apply_thresholds(wdoc["_rescored"], wdoc["rescore"]["thresholds"])))
    # predict's override: the same file with the templates left without a wedge scores like the first tuning
    nowedge = predict(root, settings=tmp_path / "wedge.json", template_wedge="none", **kw)
    pd.testing.assert_frame_equal(sort(nowedge), sort(apply_thresholds(rescored, wdoc["rescore"]["thresholds"])))
    with pytest.raises(ValueError, match="template wedge"):
        predict(root, template_wedge="sideways", **kw)
    # a changed template file: a warning and rescoring without it; templates=True refuses
    shutil.copy(wdir / TEMPLATES_FILE, tmp_path / "keep.npz")
    save_templates(_templates(), wdir / TEMPLATES_FILE, overwrite=True)
    with pytest.warns(UserWarning, match="template file differs"):
        changed = predict(root, **kw)
    pd.testing.assert_frame_equal(sort(changed), sort(without))
    with pytest.raises(DataError, match="template file differs"):
        predict(root, templates=True, **kw)
    # a thresholds file of an older czii_kit (no template_weight): rescored without templates
    d = json.loads((wdir / THRESHOLDS_FILE).read_text())
    d["rescore"]["config"].pop("template_weight")
    d["rescore"].pop("templates")
    (wdir / THRESHOLDS_FILE).write_text(json.dumps(d))
    pd.testing.assert_frame_equal(sort(predict(root, **kw)), sort(without))


def test_templates_given_the_missing_wedge():
    """In a tomogram with a wide missing wedge, templates given the same wedge fit each particle better
    than plain ones; ``wedge="auto"`` reads the wedge off the tomogram itself."""
    from czii_kit.wedge import Wedge, apply_wedge

    vol, centres, kinds = _volume(seed=4, noise=0.05)
    vol = 0.6 + apply_wedge(vol - 0.6, Wedge(35.0, 40.0))  # reconstructed noise has the wedge too
    pts = voxel_to_angstrom(centres, VS)
    own = np.array([list(BLOBS).index(k) for k in kinds])
    cfg = dict(n_rotations=300, mask_radius=110.0)
    plain = TemplateMatcher(_templates(), TemplateConfig(**cfg)).match(vol, pts, VS)[np.arange(6), own]
    given = TemplateMatcher(_templates(), TemplateConfig(**cfg, wedge=(35, 40)))
    fit = given.match(vol, pts, VS)[np.arange(6), own]
    assert given.last_wedge == Wedge(35.0, 40.0)
    assert (fit > plain + 0.05).all(), (fit, plain)
    auto = TemplateMatcher(_templates(), TemplateConfig(**cfg, wedge="auto"))
    m = auto.margins(vol, pts, VS)
    assert auto.last_wedge is not None
    assert abs(auto.last_wedge.lo - 35) <= 6 and abs(auto.last_wedge.hi - 40) <= 6, auto.last_wedge
    assert (m[np.arange(6), [PARTICLE_NAMES.index(k) for k in kinds]] > 0.03).all()
    # no wedge in the plain volume: "auto" leaves the templates as they are
    flat, c2, _ = _volume(seed=4)
    auto.match(flat, voxel_to_angstrom(c2, VS), VS)
    assert auto.last_wedge is None
    tiny = np.full((12, 20, 24), 0.6, np.float32)  # binned: 6 slices, too few to read a wedge off
    assert np.isfinite(auto.match(tiny, [[100.0, 100.0, 60.0]], VS)).all() and auto.last_wedge is None
    with pytest.raises(ValueError, match="wedge"):
        TemplateConfig(wedge=(0, 50))
    with pytest.raises(ValueError, match="wedge"):
        TemplateConfig(wedge="sometimes")
    assert TemplateConfig.from_dict(TemplateConfig(wedge=(35, 40)).to_dict()).wedge == (35.0, 40.0)


def test_another_wedge_reuses_the_rotated_templates(monkeypatch):
    """Without the disk cache a matcher rotates each template once per voxel size: a second wedge costs
    only its filter, and gives the same rows as a matcher built for that wedge alone."""
    import czii_kit.templates as templates
    from czii_kit.wedge import Wedge

    calls = []
    real = templates.rotated_boxes
    monkeypatch.setattr(templates, "rotated_boxes", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    cfg = TemplateConfig(n_rotations=50, mask_radius=110.0)
    tm = TemplateMatcher(_templates(), cfg, cache=False)
    none, w1, w2 = tm._matrices(20.0), tm._matrices(20.0, Wedge(35.0, 40.0)), tm._matrices(20.0, Wedge(50.0, 50.0))
    assert calls == [20.0, 20.0]  # the two templates, once
    fresh = TemplateMatcher(_templates(), cfg, cache=False)._matrices(20.0, Wedge(50.0, 50.0))
    for name in BLOBS:
        np.testing.assert_array_equal(w2[name][1], fresh[name][1])
        assert w2[name][1].shape == none[name][1].shape == (50, int(none[name][0].sum()))
        assert not np.allclose(w1[name][1], none[name][1]) and not np.allclose(w1[name][1], w2[name][1])
    tm._matrices(10.0)  # another voxel size rotates again (the fresh matcher rotated its own)
    assert calls == [20.0] * 4 + [10.0] * 2


def test_rotated_templates_cached_on_disk(monkeypatch, tmp_path):
    """Rotated templates (and their masked rows per wedge) are computed once per template and configuration
    and read back by later matchers (another process), with the same matches; another configuration or
    wedge is a new entry, a damaged entry is rebuilt, and the folder comes from CZII_KIT_TEMPLATE_CACHE."""
    import czii_kit.templates as templates
    from czii_kit.wedge import Wedge

    calls = []
    real = templates.rotated_boxes
    monkeypatch.setattr(templates, "rotated_boxes", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    monkeypatch.setenv(templates.TEMPLATE_CACHE_ENV, str(tmp_path / "rot"))
    assert templates.template_cache() == tmp_path / "rot"
    files = lambda: len(list((tmp_path / "rot").glob("*.npy")))  # noqa: E731
    cfg = TemplateConfig(n_rotations=40, mask_radius=110.0)
    vol, centres, _ = _volume(seed=5)
    pts = voxel_to_angstrom(centres, VS)
    first = TemplateMatcher(_templates(), cfg).match(vol, pts, VS)
    assert len(calls) == 2 and files() == 4  # each template's rotated boxes and its rows
    assert not [p for p in (tmp_path / "rot").iterdir() if p.suffix != ".npy"]  # no temporary left behind
    again = TemplateMatcher(_templates(), cfg)
    np.testing.assert_array_equal(again.match(vol, pts, VS), first)
    wedged = again._matrices(VS * cfg.bin, Wedge(40.0, 40.0))  # another wedge: boxes read, not rotated
    assert len(calls) == 2 and files() == 6
    plain = TemplateMatcher(_templates(), cfg, cache=False)
    np.testing.assert_array_equal(plain.match(vol, pts, VS), first)
    for name, (_mask, rows) in plain._matrices(VS * cfg.bin, Wedge(40.0, 40.0)).items():
        np.testing.assert_array_equal(wedged[name][1], rows)
    assert len(calls) == 4  # cache=False: rotated in memory
    TemplateMatcher(_templates(), TemplateConfig(n_rotations=41, mask_radius=110.0)).match(vol, pts, VS)
    assert len(calls) == 6 and files() == 10
    for f in (tmp_path / "rot").glob("*.npy"):
        f.write_bytes(b"damaged")
    np.testing.assert_array_equal(TemplateMatcher(_templates(), cfg).match(vol, pts, VS), first)
    assert len(calls) == 8


def test_a_matcher_with_the_disk_cache_keeps_one_wedge_in_memory(monkeypatch, tmp_path):
    """Each tomogram's estimated wedge is a new key: with the disk cache a matcher holds only the last
    one's matrices (a process predicting run after run does not grow), and a wedge met again is read
    back from the disk, the same rows, not rotated again."""
    import czii_kit.templates as templates
    from czii_kit.wedge import Wedge

    calls = []
    real = templates.rotated_boxes
    monkeypatch.setattr(templates, "rotated_boxes", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    cfg = TemplateConfig(n_rotations=30, mask_radius=110.0)
    tm = TemplateMatcher(_templates(), cfg, cache=tmp_path / "rot")
    first = {n: rows.copy() for n, (_m, rows) in tm._matrices(20.0, Wedge(35.0, 40.0)).items()}
    for w in (Wedge(50.0, 50.0), Wedge(60.0, 60.0), None):
        tm._matrices(20.0, w)
        assert len(tm._cache) == 1
    again = tm._matrices(20.0, Wedge(35.0, 40.0))
    assert list(tm._cache) == [(20.0, Wedge(35.0, 40.0))] and len(calls) == 2  # rotated once, read back since
    for name in BLOBS:
        np.testing.assert_array_equal(again[name][1], first[name])
    plain = TemplateMatcher(_templates(), cfg, cache=False)
    for w in (Wedge(35.0, 40.0), Wedge(50.0, 50.0), None):
        plain._matrices(20.0, w)
    assert len(plain._cache) == 3  # in memory only: kept, each costs its filter again otherwise
