"""Tests of the cryo-ET simulator (czii_kit.synthetic): physics, determinism, layout, CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from czii_kit.catalog import PARTICLE_NAMES, get_particle
from czii_kit.coords import angstrom_to_voxel
from czii_kit.errors import DataError, FileExistsNoForce
from czii_kit.synthetic import (
    SIZES,
    VOXEL_SIZE,
    RunParams,
    SimParamError,
    SimRanges,
    generate_dataset,
    load_maps,
    procedural_models,
    random_rotations,
    sample_params,
    simulate_run,
)
from czii_kit.synthetic.imaging import (
    ctf_1d2d,
    dose_symmetric_order,
    electron_wavelength,
    interaction_constant,
    phase_flip,
    project,
    project_spheres,
    reconstruction_frame,
)
from czii_kit.synthetic.params import COUNT_RANGES
from czii_kit.synthetic.phantom import build_phantom, make_slab, read_map
from czii_kit.synthetic.reconstruct import wbp

TEST_SHAPE = (64, 128, 160)  # unequal sides: an axis swap changes shapes and fails loudly
CROWDED = SimRanges(crowding=(4.0, 4.0))


def _ball_mean(vol, centre, r_in, r_out):
    """Mean of ``vol`` over the shell r_in <= |p - centre| < r_out (voxels)."""
    c = np.rint(centre).astype(int)
    h = int(np.ceil(r_out)) + 1
    lo = np.maximum(c - h, 0)
    hi = np.minimum(c + h + 1, vol.shape)
    sub = vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    g = np.indices(sub.shape) + lo.reshape(3, 1, 1, 1) - np.asarray(centre).reshape(3, 1, 1, 1)
    d = np.sqrt((g**2).sum(0))
    m = (d >= r_in) & (d < r_out)
    return float(sub[m].mean()) if m.any() else np.nan


def _contrast_at_picks(den, picks, voxel_size=VOXEL_SIZE):
    """Per type: (mean over the particle's density region - background mean) / background std."""
    idx = angstrom_to_voxel(picks[["x", "y", "z"]].to_numpy(float), voxel_size)
    mask = np.zeros(den.shape, bool)
    zz, yy, xx = np.ogrid[: den.shape[0], : den.shape[1], : den.shape[2]]
    for p, t in zip(idx, picks["particle_type"], strict=True):
        r = get_particle(t).radius / voxel_size * 1.3
        mask |= (zz - p[0]) ** 2 + (yy - p[1]) ** 2 + (xx - p[2]) ** 2 < r * r
    bg = den[~mask]
    out = {}
    for t, g in picks.groupby("particle_type"):
        r = get_particle(t).radius / voxel_size
        hollow = t in ("apo-ferritin", "virus-like-particle")
        vals = [_ball_mean(den, p, 0.6 * r if hollow else 0.0, (1.0 if hollow else 0.7) * r)
                for p in angstrom_to_voxel(g[["x", "y", "z"]].to_numpy(float), voxel_size)]
        out[t] = (np.nanmean(vals) - bg.mean()) / bg.std()
    return out


# ----------------------------------------------------------------------------------------- components
def test_random_rotations_are_uniform_proper_rotations():
    r = random_rotations(np.random.default_rng(0), 20000)
    assert r.shape == (20000, 3, 3)
    np.testing.assert_allclose(np.einsum("nij,nkj->nik", r, r), np.broadcast_to(np.eye(3), r.shape), atol=1e-9)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-9)
    # Haar measure: E[R] = 0 and the rotation angle has density (1 - cos w) / pi (mean angle pi/2 + 2/pi)
    assert np.abs(r.mean(0)).max() < 0.02
    w = np.arccos(np.clip((np.trace(r, axis1=1, axis2=2) - 1) / 2, -1, 1))
    assert abs(w.mean() - (np.pi / 2 + 2 / np.pi)) < 0.02


def test_physical_constants():
    assert electron_wavelength(300) == pytest.approx(0.01969, rel=1e-3)
    assert interaction_constant(300) == pytest.approx(6.53e-4, rel=0.01)
    order = dose_symmetric_order(np.arange(-60, 61, 3.0))
    assert sorted(order) == list(range(41)) and order[0] == 20  # 0 degrees first


def test_point_reconstruction_is_in_place_and_elongated_in_z():
    shape = (40, 24, 72)
    v = np.zeros(shape, np.float32)
    v[27, 11, 50] = 1.0
    ang = np.arange(-60, 61, 3.0)
    rec = wbp(project(v, ang), ang, shape)
    assert np.unravel_index(rec.argmax(), shape) == (27, 11, 50)
    peak = rec.max()
    z_half = rec[26, 11, 50] + rec[28, 11, 50]
    x_half = rec[27, 11, 49] + rec[27, 11, 51]
    assert z_half > 1.5 * x_half  # missing wedge: blurred along the beam
    # with nearly all angles the elongation disappears
    ang_full = np.arange(-88, 89, 2.0)
    rec_f = wbp(project(v, ang_full), ang_full, shape)
    zf = (rec_f[26, 11, 50] + rec_f[28, 11, 50]) / rec_f.max()
    assert zf < 0.7 * z_half / peak


@pytest.mark.parametrize("offset", [-4.0, 4.0])
def test_tilt_angle_error_turns_the_reconstruction_as_reconstruction_frame_says(offset):
    shape = (40, 24, 96)
    v = np.zeros(shape, np.float32)
    v[30, 11, 85] = 1.0  # 37.5 voxels from the tilt axis in x: a 4 deg turn moves it 2-3 voxels in z
    ang = np.arange(-60, 61, 3.0)
    rec = wbp(project(v, ang + offset), ang, shape)  # recorded at ang + offset, reconstructed at ang
    peak = np.array(np.unravel_index(rec.argmax(), shape))
    x, y, z = reconstruction_frame([[85 * 10.0, 11 * 10.0, 30 * 10.0]], offset, shape, 10.0)[0] / 10.0
    assert abs(z - 30) > 1.5  # the error is large enough to matter ...
    np.testing.assert_allclose(peak, [z, y, x], atol=0.75)  # ... and the frame follows it


def test_simulated_picks_are_in_the_tomogram_frame():
    params = sample_params(np.random.default_rng(3), TEST_SHAPE, VOXEL_SIZE)
    params = dataclasses.replace(params, tilt_angle_offset=4.0)
    place = pd.DataFrame({"particle_type": ["ribosome", "ribosome"],
                          "x": [20 * VOXEL_SIZE, 140 * VOXEL_SIZE], "y": [64 * VOXEL_SIZE] * 2,
                          "z": [32 * VOXEL_SIZE] * 2})
    tomos, picks = simulate_run(TEST_SHAPE, seed=3, params=params, picks=place)
    got = picks.sort_values("x")[["x", "y", "z"]].to_numpy() / VOXEL_SIZE
    # x 60 voxels either side of the axis: z moves by -+60 sin(4 deg) = -+4.2 voxels
    np.testing.assert_allclose(got[:, 2] - 32, [60 * np.sin(np.deg2rad(4.0)), -60 * np.sin(np.deg2rad(4.0))],
                               atol=0.05)
    # and the dark density is there (z centroid of the darkness in a column), not at the specimen's z 32
    den = ndimage.gaussian_filter(tomos["denoised"], 1.5)
    for x, y, z in got:
        prof = den[:, int(round(y)) - 6 : int(round(y)) + 7, int(round(x)) - 6 : int(round(x)) + 7].mean((1, 2))
        w = np.clip(np.median(prof) - prof, 0, None)
        assert abs((w * np.arange(len(prof))).sum() / w.sum() - z) < 1.5, (x, z)


def test_gold_sphere_projection_matches_the_voxel_projector():
    shape, r = (40, 30, 50), 6.0
    c = np.array([22.0, 14.0, 20.0])
    g = np.indices(shape).astype(float)
    v = (np.sqrt(((g - c.reshape(3, 1, 1, 1)) ** 2).sum(0)) < r).astype(np.float32)
    ang = [-45.0, 0.0, 30.0]
    vox = project(v, ang)
    ana = project_spheres(np.array([[*c, r]]), ang, shape)
    yy, uu = np.indices(vox.shape[1:])
    for k in range(len(ang)):
        assert ana[k].sum() == pytest.approx(vox[k].sum(), rel=0.02)  # volume 4/3 pi r^3
        for grid in (yy, uu):
            assert (ana[k] * grid).sum() / ana[k].sum() == pytest.approx((vox[k] * grid).sum() / vox[k].sum(), abs=0.05)


def test_missing_wedge_is_empty_in_fourier_space():
    rng = np.random.default_rng(1)
    shape = (48, 16, 96)
    v = np.zeros(shape, np.float32)
    pts = rng.integers([12, 0, 16], [36, 16, 80], size=(200, 3))
    v[tuple(pts.T)] = 1.0
    ang = np.arange(-60, 61, 3.0)
    rec = wbp(project(v, ang), ang, shape)
    f = np.abs(np.fft.fftn(rec)) ** 2
    kz = np.fft.fftfreq(shape[0])[:, None, None]
    kx = np.fft.fftfreq(shape[2])[None, None, :]
    ang_k = np.degrees(np.arctan2(np.abs(kz), np.abs(kx)))  # 90 = along z
    k = np.sqrt(kz**2 + kx**2)
    band = (k > 0.05) & (k < 0.35)
    wedge = np.broadcast_to((ang_k > 75) & band, f.shape)
    seen = np.broadcast_to((ang_k < 20) & band, f.shape)
    assert f[wedge].mean() < 0.1 * f[seen].mean()


def test_procedural_models_have_the_right_shapes():
    m = procedural_models(10.0)
    assert set(PARTICLE_NAMES) <= set(m)
    for name in ("apo-ferritin", "virus-like-particle"):  # hollow shells: the centre is empty
        mod = m[name]
        c = np.rint(mod.center).astype(int)
        assert mod.density[tuple(c)] < 0.2 * mod.density.max()
    rib = m["ribosome"]
    assert rib.mass_fraction_volume > 5 * m["apo-ferritin"].mass_fraction_volume / 2
    assert m["beta-amylase"].radius < m["beta-galactosidase"].radius < m["ribosome"].radius


def test_bad_run_counts_are_clear_errors(tmp_path):
    with pytest.raises(SimParamError, match="at least one run"):
        generate_dataset(tmp_path / "x", n_train=0, n_test=0, size="tiny", progress=False)
    with pytest.raises(SimParamError, match="unknown size"):
        generate_dataset(tmp_path / "x", n_train=1, n_test=0, size="huge", progress=False)


def test_params_ranges_and_roundtrip():
    with pytest.raises(SimParamError, match="defocus"):
        SimRanges(defocus=(5.0, 2.0))
    with pytest.raises(SimParamError, match="dqe"):
        SimRanges(dqe=(0.5, 2.0))
    with pytest.raises(SimParamError, match="unknown"):
        SimRanges.from_dict({"not_a_range": [1, 2]})
    p = sample_params(np.random.default_rng(0), SIZES["full"])
    q = RunParams.from_dict(json.loads(p.to_json()))
    assert q == p
    assert p.angles[0] == p.tilt_min and p.angles[-1] == pytest.approx(p.tilt_max)
    fixed = sample_params(np.random.default_rng(0), SIZES["full"], ranges=SimRanges(defocus=(3.0, 3.0)))
    assert fixed.defocus == 3.0


def test_counts_drawn_like_the_real_runs():
    ranges = SimRanges()
    for seed in range(30):
        p = sample_params(np.random.default_rng(seed), SIZES["full"])
        for name, (lo, hi) in COUNT_RANGES.items():
            assert np.floor(lo * ranges.crowding[0]) <= p.counts[name] <= np.ceil(hi * ranges.crowding[1])


def test_ribosomes_and_apoferritin_cluster_like_the_real_runs():
    """In the real runs most ribosomes / apo-ferritins touch one of their kind; VLPs rarely do."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(3)
    p = sample_params(rng, SIZES["full"], ranges=SimRanges(cluster_ribosome=(0.8, 0.8),
                                                           cluster_apoferritin=(0.7, 0.7), cluster_other=(0, 0)))
    ph = build_phantom(p, rng, procedural_models(10.0))

    def touching(t):
        xyz = ph.picks.loc[ph.picks["particle_type"] == t, ["x", "y", "z"]].to_numpy()
        d, _ = cKDTree(xyz).query(xyz, k=2)
        return float((d[:, 1] < 1.3 * 2 * get_particle(t).radius).mean())

    assert touching("ribosome") > 0.5
    assert touching("apo-ferritin") > 0.4
    assert touching("virus-like-particle") < 0.35


def test_full_size_placement_counts_no_overlap_and_slab():
    rng = np.random.default_rng(7)
    p = sample_params(rng, SIZES["full"])
    ph = build_phantom(p, rng, procedural_models(10.0))
    got = ph.picks["particle_type"].value_counts().to_dict()
    for name in PARTICLE_NAMES:
        assert got.get(name, 0) == p.counts[name]  # everything found room
        lo, hi = COUNT_RANGES[name]
        assert 0.8 * lo - 1 <= got.get(name, 0) <= 1.25 * hi + 1
    idx = angstrom_to_voxel(ph.picks[["x", "y", "z"]].to_numpy(float), p.voxel_size)
    r = np.array([get_particle(t).radius / p.voxel_size for t in ph.picks["particle_type"]])
    d = np.sqrt(((idx[:, None] - idx[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    assert (d >= 0.75 * (r[:, None] + r[None]) - 1e-6).all()
    bot, top = ph.slab.z_limits(idx[:, 1], idx[:, 2])
    assert ((idx[:, 0] >= bot - 1e-6) & (idx[:, 0] <= top + 1e-6)).all()
    assert 0 < ph.z_range[0] or ph.z_range[1] < p.shape[0]  # planes outside the slab hold nothing
    assert ph.volume.shape == SIZES["full"]


# ------------------------------------------------------------------------------------------ simulation
def _ctf_image(obj, params, px):
    """``obj`` (ny, nx) seen through the run's CTF at 0 degrees (plain periodic FFT)."""
    ky = np.fft.fftfreq(obj.shape[0], d=px)
    kx = np.fft.fftfreq(obj.shape[1], d=px)
    ctf = ctf_1d2d(ky, kx, params.defocus * 1e4, params.astigmatism * 1e4, params.astigmatism_angle,
                   electron_wavelength(params.voltage_kv), params.cs_mm * 1e7, params.amplitude_contrast)
    f = np.fft.fft2(obj)
    return np.fft.ifft2(f * ctf).real, np.fft.ifft2(f * -np.abs(ctf)).real


def test_phase_flip_gives_every_band_the_sign_of_the_first_lobe():
    # 6 um underfocus: several CTF zeros below Nyquist (20 A); a few dense points on an unequal-sided image
    p = dataclasses.replace(sample_params(np.random.default_rng(0), TEST_SHAPE), defocus=6.0, astigmatism=0.0)
    rng = np.random.default_rng(3)
    obj = np.zeros((96, 150))
    pts = rng.integers([30, 40], [66, 110], size=(6, 2))
    obj[tuple(pts.T)] = 1.0
    obj = ndimage.gaussian_filter(obj, 0.7)
    img, want = _ctf_image(obj, p, p.voxel_size)
    out = phase_flip(img[None].astype(np.float32), [0.0], p)
    assert out.shape == (1, 96, 150) and out.dtype == np.float32
    inner = (slice(24, 72), slice(30, 120))  # away from the border, where padding differs from the periodic FFT
    corr = lambda a, b: float(np.corrcoef(a[inner].ravel(), b[inner].ravel())[0, 1])  # noqa: E731
    assert corr(out[0], want) > 0.98
    assert corr(img, want) < 0.9  # the uncorrected image is clearly different
    # protein stays dark, and darker than before: the bands beyond the zeros now add to the first lobe
    assert out[0][tuple(pts.T)].mean() < img[tuple(pts.T)].mean() < 0
    # flipping twice gives the image back
    back = phase_flip(out, [0.0], p)
    np.testing.assert_allclose(back[0][inner], img[inner], atol=0.02 * np.abs(img).max())
    with pytest.raises(ValueError, match="tilt angles"):
        phase_flip(out, [0.0, 3.0], p)


def test_ctf_correction_is_drawn_last_and_recorded():
    base = sample_params(np.random.default_rng(4), SIZES["full"])
    flip = sample_params(np.random.default_rng(4), SIZES["full"], ranges=SimRanges(ctf_correction=(1.0, 1.0)))
    assert base.ctf_correction == "none" and flip.ctf_correction == "phase_flip"
    assert dataclasses.replace(flip, ctf_correction="none") == base  # nothing else changes
    drawn = {sample_params(np.random.default_rng(s), SIZES["tiny"], ranges=SimRanges(ctf_correction=(0.5, 0.5)))
             .ctf_correction for s in range(20)}
    assert drawn == {"none", "phase_flip"}
    old = json.loads(base.to_json())
    del old["ctf_correction"]  # sim_params.json written before the field existed
    assert RunParams.from_dict(old).ctf_correction == "none"
    with pytest.raises(SimParamError, match="ctf_correction"):
        dataclasses.replace(base, ctf_correction="wiener").validate()
    with pytest.raises(SimParamError, match="ctf_correction"):
        SimRanges(ctf_correction=(0.0, 2.0))
    # the same seed: the same specimen and picks, different tomograms
    a, pa = simulate_run("tiny", seed=5)
    b, pb = simulate_run("tiny", seed=5, ranges=SimRanges(ctf_correction=(1.0, 1.0)))
    pd.testing.assert_frame_equal(pa, pb)
    for name in ("denoised", "wbp"):
        assert not np.array_equal(a[name], b[name])


def test_same_seed_same_arrays_different_seed_differs():
    a, pa = simulate_run("tiny", seed=5)
    b, pb = simulate_run("tiny", seed=5)
    c, _ = simulate_run("tiny", seed=6)
    for name in ("denoised", "wbp"):
        assert a[name].shape == SIZES["tiny"] and a[name].dtype == np.float32
        np.testing.assert_array_equal(a[name], b[name])
        assert not np.array_equal(a[name], c[name])
    pd.testing.assert_frame_equal(pa, pb)


def test_thread_count_does_not_change_the_result():
    a, _ = simulate_run("tiny", seed=9, workers=1)
    b, _ = simulate_run("tiny", seed=9, workers=2)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_figure_is_written_small_and_not_overwritten(tmp_path):
    from czii_kit.synthetic.figure import make_figure

    png = make_figure(tmp_path / "fig.png", size="tiny", seed=1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 500_000
    with pytest.raises(FileExistsNoForce):
        make_figure(png, size="tiny", seed=1)


def test_picks_sit_on_dark_density_procedural():
    tomos, picks = simulate_run(TEST_SHAPE, seed=0, ranges=CROWDED, maps="procedural")
    assert len(picks) >= 8
    contrast = _contrast_at_picks(tomos["denoised"], picks)
    # protein is darker than the background in the denoised map (negative contrast)
    assert np.mean(list(contrast.values())) < -1.5
    for t in ("ribosome", "apo-ferritin"):
        if t in contrast:
            assert contrast[t] < -1.0, (t, contrast)
    assert not np.isclose(tomos["denoised"].std(), 1.0, atol=0.05)  # arbitrary units, not unit variance


def test_picks_sit_on_dark_density_real_maps(shared_data):
    maps = shared_data / "density_maps"
    tomos, picks = simulate_run(TEST_SHAPE, seed=1, maps=maps, ranges=CROWDED)
    contrast = _contrast_at_picks(tomos["denoised"], picks)
    assert np.mean(list(contrast.values())) < -1.5, contrast
    assert contrast.get("ribosome", -9) < -1.0


def test_real_picks_placement(train_picks_dir):
    from czii_kit.picks import read_picks

    real = read_picks(train_picks_dir)
    run = real[real["experiment"] == "TS_5_4"].reset_index(drop=True)
    tomos, picks, params = simulate_run("small", seed=0, picks=run, return_params=True, run_name="TS_5_4")
    idx = angstrom_to_voxel(run[["x", "y", "z"]].to_numpy(float), VOXEL_SIZE)
    inside = ((idx >= -0.5) & (idx <= np.array(SIZES["small"]) - 0.5)).all(1)
    assert len(picks) == inside.sum() > 5
    a = run[inside].sort_values(["particle_type", "x"]).reset_index(drop=True)
    b = picks.sort_values(["particle_type", "x"]).reset_index(drop=True)
    # placed exactly there in the specimen; reported where they land in the tomogram
    a_rec = reconstruction_frame(a[["x", "y", "z"]].to_numpy(), params.tilt_angle_offset, params.shape,
                                 VOXEL_SIZE)
    np.testing.assert_allclose(a_rec, b[["x", "y", "z"]].to_numpy(), atol=1e-6)
    # the slab was fitted to hold the real particles
    slab = make_slab(params, np.random.default_rng(0))
    bi = idx[inside]
    bot, top = slab.z_limits(bi[:, 1], bi[:, 2])
    assert ((bi[:, 0] >= bot) & (bi[:, 0] <= top)).all()
    contrast = _contrast_at_picks(tomos["denoised"], picks)
    assert np.mean(list(contrast.values())) < -1.0


# ---------------------------------------------------------------------------------------------- maps
def test_map_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_maps(tmp_path / "nope")
    (tmp_path / "maps").mkdir()
    with pytest.raises(DataError, match="8cpv.mrc"):
        load_maps(tmp_path / "maps")
    bad = tmp_path / "bad.mrc"
    bad.write_bytes(b"this is not an MRC file at all" * 40)
    with pytest.raises(DataError, match="bad.mrc"):
        read_map(bad)
    import mrcfile

    flat = tmp_path / "flat.mrc"
    with mrcfile.new(flat) as m:
        m.set_data(np.zeros((8, 8, 8), np.float32))
        m.voxel_size = 10.0
    with pytest.raises(DataError, match="no positive density"):
        read_map(flat)


def test_real_maps_load_and_are_rescaled(shared_data):
    models = load_maps(shared_data / "density_maps")
    assert set(PARTICLE_NAMES) | {"distractor"} == set(models)
    for m in models.values():
        assert m.voxel_size == pytest.approx(10.0)
        assert 0.8 < float(np.quantile(m.density[m.density > 0.1 * m.density.max()], 0.99)) < 1.2
    # the ribosome is much heavier than beta-amylase
    assert models["ribosome"].mass_fraction_volume > 20 * models["beta-amylase"].mass_fraction_volume


# ------------------------------------------------------------------------------------- dataset + CLI
def test_generate_dataset_layout_and_readback(tmp_path):
    from czii_kit.layout import find_runs
    from czii_kit.picks import read_picks
    from czii_kit.tomogram import open_tomogram

    root = generate_dataset(tmp_path / "ds", n_train=2, n_test=1, size="tiny", seed=3, progress=False,
                            ranges=CROWDED)
    runs = find_runs(root)
    assert [(r.split, r.name) for r in runs] == [("test", "TS_sim_3_2"), ("train", "TS_sim_3_0"),
                                                  ("train", "TS_sim_3_1")]
    for r in runs:
        assert set(r.tomograms()) == {"denoised", "wbp"}
        t = open_tomogram(r.tomogram_path("denoised"))
        assert t.shape == SIZES["tiny"] and t.voxel_size == pytest.approx(VOXEL_SIZE)
        assert open_tomogram(r.tomogram_path("wbp"), 2).shape == (12, 24, 32)
        meta = json.loads((r.dirs[0] / "sim_params.json").read_text())
        assert meta["run"] == r.name and meta["split"] == r.split
    train = read_picks(root, split="train")
    assert set(train["experiment"]) <= {"TS_sim_3_0", "TS_sim_3_1"} and len(train) > 0
    assert len(list((root / "train/overlay/ExperimentRuns/TS_sim_3_0/Picks").glob("*.json"))) == 6
    assert not (root / "test" / "overlay").exists()
    sol = pd.read_csv(root / "solution.csv")
    assert list(sol.columns) == ["experiment", "particle_type", "x", "y", "z"]
    assert set(sol["experiment"]) <= {"TS_sim_3_2"}
    # the train picks are those the simulator returns for the same seed
    _, again = simulate_run("tiny", seed=np.random.default_rng([3, 0]), ranges=CROWDED)
    got = train[train["experiment"] == "TS_sim_3_0"].sort_values(["particle_type", "x"]).reset_index(drop=True)
    exp = again.sort_values(["particle_type", "x"]).reset_index(drop=True)
    np.testing.assert_allclose(got[["x", "y", "z"]].to_numpy(), exp[["x", "y", "z"]].to_numpy(), rtol=1e-9)

    with pytest.raises(FileExistsNoForce):
        generate_dataset(root, n_train=1, n_test=0, size="tiny", progress=False)
    generate_dataset(root, n_train=1, n_test=0, size="tiny", progress=False, overwrite=True)
    assert [r.name for r in find_runs(root)] == ["TS_sim_0_0"]
    other = tmp_path / "user_folder"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsNoForce, match="refusing"):
        generate_dataset(other, n_train=1, n_test=0, size="tiny", progress=False, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_generate_dataset_with_real_picks_layouts(tmp_path, train_picks_dir):
    from czii_kit.picks import read_picks

    root = generate_dataset(tmp_path / "ds", n_train=1, n_test=1, size="tiny", seed=0,
                            picks_dir=train_picks_dir, progress=False)
    meta = json.loads((root / "train/static/ExperimentRuns/TS_sim_0_0/sim_params.json").read_text())
    assert meta["layout_from"] == "TS_5_4"
    real = read_picks(train_picks_dir)
    real = real[real["experiment"] == "TS_5_4"]
    idx = angstrom_to_voxel(real[["x", "y", "z"]].to_numpy(float), VOXEL_SIZE)
    n_inside = int(((idx >= -0.5) & (idx <= np.array(SIZES["tiny"]) - 0.5)).all(1).sum())
    assert len(read_picks(root, split="train")) == n_inside


def test_cli_synth(tmp_path):
    from czii_kit.cli import main

    out = tmp_path / "cli_ds"
    assert main(["synth", "--out", str(out), "--runs", "1", "--test-runs", "1", "--size", "tiny", "--quiet"]) == 0
    assert (out / "solution.csv").is_file() and (out / "synthetic.json").is_file()
    assert main(["synth", "--out", str(out), "--runs", "1", "--size", "tiny", "--quiet"]) == 2  # exists
    assert main(["synth", "--out", str(out), "--runs", "1", "--test-runs", "0", "--size", "tiny", "--quiet",
                 "--force"]) == 0
    assert not (out / "solution.csv").exists()
    assert main(["synth", "--out", str(tmp_path / "x"), "--maps", str(tmp_path / "missing"), "--size", "tiny"]) == 2
    assert main(["synth"]) == 2



def test_other_voxel_size_keeps_the_field_of_view_and_the_density(tmp_path):
    import json

    from czii_kit.cli import main
    from czii_kit.layout import find_runs
    from czii_kit.synthetic.params import VOXEL_SIZE, volume_ratio
    from czii_kit.tomogram import open_tomogram

    # counts follow the physical volume: the full field at 20 A voxels is as crowded as at 10.012 A
    half = tuple(int(round(n * VOXEL_SIZE / 20.0)) for n in SIZES["full"])
    assert volume_ratio(half, 20.0) == pytest.approx(1.0, rel=0.02)
    assert volume_ratio(half) == pytest.approx(1 / 8, rel=0.02)
    n_full = [sum(sample_params(np.random.default_rng(s), SIZES["full"]).counts.values()) for s in range(10)]
    n_half = [sum(sample_params(np.random.default_rng(s), half, 20.0).counts.values()) for s in range(10)]
    assert np.mean(n_half) == pytest.approx(np.mean(n_full), rel=0.1)

    out = tmp_path / "vs"
    assert main(["synth", "--out", str(out), "--runs", "1", "--test-runs", "0", "--size", "tiny", "--quiet",
                 "--voxel-size", "15", "--seed", "5"]) == 0
    (run,) = find_runs(out, "train")
    tomo = open_tomogram(run.tomogram_path("denoised"))
    assert tomo.voxel_size == 15.0 and tomo.path.parent.name == "VoxelSpacing15.000"
    assert tomo.shape == tuple(int(round(n * VOXEL_SIZE / 15.0)) for n in SIZES["tiny"])
    assert json.loads((out / "synthetic.json").read_text())["voxel_size"] == 15.0
    assert main(["synth", "--out", str(tmp_path / "bad"), "--runs", "1", "--size", "tiny", "--quiet",
                 "--voxel-size", "-1"]) == 2

def test_cli_synth_ranges(tmp_path, capsys):
    from czii_kit.cli import main

    out = tmp_path / "noisy"
    assert main(["synth", "--out", str(out), "--runs", "1", "--test-runs", "0", "--size", "tiny", "--quiet",
                 "--range", "dose=20", "--range", "residual_noise=0.95,1.0"]) == 0
    meta = json.loads((out / "synthetic.json").read_text())
    assert meta["ranges"]["dose"] == [20.0, 20.0] and meta["ranges"]["residual_noise"] == [0.95, 1.0]
    assert meta["ranges"]["defocus"] == list(SimRanges().defocus)  # the others keep their defaults
    params = json.loads(next(out.rglob("sim_params.json")).read_text())
    assert params["dose"] == 20.0 and 0.95 <= params["residual_noise"] <= 1.0
    assert params["ctf_correction"] == "none"
    assert main(["synth", "--out", str(tmp_path / "flipped"), "--runs", "1", "--test-runs", "0", "--size", "tiny",
                 "--quiet", "--range", "ctf_correction=1"]) == 0
    assert json.loads(next((tmp_path / "flipped").rglob("sim_params.json")).read_text())["ctf_correction"] == "phase_flip"
    capsys.readouterr()
    for bad, msg in (("nope=1", "unknown simulation ranges"), ("dose=a", "NAME=LO,HI"), ("dose", "NAME=LO,HI"),
                     ("dose=50,20", "lo <= hi")):
        assert main(["synth", "--out", str(tmp_path / "x"), "--size", "tiny", "--quiet", "--range", bad]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_entry_point_help():
    exe = shutil.which("czii-kit")
    cmd = [exe] if exe else [sys.executable, "-m", "czii_kit"]
    res = subprocess.run([*cmd, "synth", "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert res.returncode == 0 and "--maps" in res.stdout and "--picks" in res.stdout


_COPICK_SCRIPT = r"""
import json, sys, warnings
import numpy as np
import copick

root, expect = sys.argv[1], json.loads(sys.argv[2])
config = {"config_type": "filesystem", "name": "synthetic", "description": "czii_kit synth", "version": "1.0.0",
          "pickable_objects": [{"name": "ribosome", "is_particle": True, "label": 4, "radius": 150.0}],
          "overlay_root": f"local://{root}/train/overlay", "static_root": f"local://{root}/train/static",
          "overlay_fs_args": {"auto_mkdir": True}, "static_fs_args": {"auto_mkdir": True}}
with open(f"{root}/copick.json", "w") as fh:
    json.dump(config, fh)
cp = copick.from_file(f"{root}/copick.json")
assert sorted(r.name for r in cp.runs) == sorted(expect), [r.name for r in cp.runs]
for name, sums in expect.items():
    vs = cp.get_run(name).get_voxel_spacing(10.0)
    for tomo_name, s in sums.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = vs.get_tomograms(tomo_name)[0]
        a = t.numpy()
        assert a.shape == tuple(s["shape"]), (a.shape, s["shape"])
        assert abs(float(a.astype(np.float64).sum()) - s["sum"]) <= 1e-6 * max(1.0, abs(s["sum"])) + 1e-3
        assert float(np.abs(a).max()) > 0
print("COPICK_OK")
"""


def test_copick_reads_synthetic_output(tmp_path):
    """copick (in the cached zarr-2 + copick venv, built here when absent) reads the simulated tomograms."""
    import envs

    from czii_kit.layout import find_runs
    from czii_kit.tomogram import open_tomogram

    try:
        envs.copick_python()
    except envs.EnvUnavailable as exc:
        pytest.skip(f"cannot build the copick test environment: {exc}")
    root = generate_dataset(tmp_path / "ds", n_train=2, n_test=0, size="tiny", seed=2, progress=False)
    expect = {}
    for r in find_runs(root, split="train"):
        expect[r.name] = {}
        for name, path in r.tomograms().items():
            a = open_tomogram(path).read()
            expect[r.name][name] = {"shape": list(a.shape), "sum": float(a.astype(np.float64).sum())}
    res = envs.run_copick(_COPICK_SCRIPT, str(root), json.dumps(expect))
    assert res.returncode == 0 and "COPICK_OK" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]
