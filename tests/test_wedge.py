"""The missing wedge read off a tomogram (czii_kit.wedge) and given to the templates (czii_kit.templates)."""

from __future__ import annotations

import numpy as np
import pytest

from czii_kit.wedge import Wedge, angular_profile, apply_wedge, estimate_wedge, wedge_mask

VS = 10.012444


def _noise(shape=(96, 40, 160), seed=0):
    """Unequal sides: a z/x swap would put the wedge around the other axis."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("lo, hi, axis", [(45.0, 45.0, "y"), (40.0, 62.0, "y"), (60.0, 50.0, "y"), (40.0, 55.0, "x")])
def test_estimate_recovers_a_wedge_applied_to_noise(lo, hi, axis):
    shape = (96, 40, 160) if axis == "y" else (96, 160, 40)
    vol = apply_wedge(_noise(shape), Wedge(lo, hi, axis=axis))
    est = estimate_wedge(vol, VS, y_step=1)
    assert est is not None
    assert est.axis == axis
    assert abs(est.lo - lo) < 3 and abs(est.hi - hi) < 3, est
    assert est.contrast > 3
    assert est.rounded(2.0) == Wedge(2 * round(est.lo / 2), 2 * round(est.hi / 2), axis=axis)


def test_isotropic_noise_has_no_wedge():
    assert estimate_wedge(_noise(), VS, y_step=1) is None


def test_wedge_is_about_y_and_mask_shape():
    m = wedge_mask((8, 6, 10), Wedge(30.0, 30.0))
    assert m.shape == (8, 6, 6)
    # the kx axis (kz = 0) is sampled, the kz axis (kx = 0) is not, for every ky; the ky axis is kept
    assert m[0, :, 1:].all()
    assert not m[1:, :, 0].any()
    assert m[0, :, 0].all()
    mx = wedge_mask((8, 6, 10), Wedge(30.0, 30.0, axis="x"))  # about x: the same in (kz, ky), for every kx
    assert mx[0, 1:, :].all() and not mx[1:, 0, :].any() and mx[0, 0, :].all()
    # a wedge around kz in the [z, y, x] array: the streak of a point runs along z
    g = np.indices((33, 9, 33)) - np.array([16, 4, 16])[:, None, None, None]
    blob = np.exp(-(g ** 2).sum(0) / (2 * 2.0 ** 2)).astype(np.float32)
    psf = apply_wedge(blob, Wedge(40.0, 40.0))
    e = (psf ** 2).sum(1)  # energy in the x-z plane
    d = np.arange(33) - 16
    spread_z, spread_x = (e * d[:, None] ** 2).sum(), (e * d[None, :] ** 2).sum()
    assert spread_z > 2 * spread_x, (spread_z, spread_x)


def test_profile_bins_and_bad_input():
    alpha, prof = angular_profile(_noise(), VS, y_step=2)
    assert alpha.shape == prof.shape == (90,)
    assert alpha[0] == 1.0 and alpha[-1] == 179.0
    with pytest.raises(ValueError, match="too small"):
        angular_profile(np.zeros((4, 4, 4), np.float32), VS)
    with pytest.raises(ValueError):
        Wedge(0.0, 45.0)
    with pytest.raises(ValueError, match="tilt axis"):
        Wedge(40.0, 45.0, axis="z")


def test_estimate_on_simulated_tomograms():
    """The simulator's tilt range (about y) comes back from its WBP and denoised tomograms."""
    import dataclasses

    from czii_kit.synthetic.params import SimRanges, sample_params
    from czii_kit.synthetic.simulate import simulate_run

    shape = (64, 96, 128)
    base = sample_params(np.random.default_rng(3), shape, VS, SimRanges())
    for tmin, tmax in [(-45.0, 45.0), (-60.0, 42.0)]:
        params = dataclasses.replace(base, tilt_min=tmin, tilt_max=tmax, tilt_step=3.0)
        out = simulate_run(shape, VS, seed=3, params=params)
        tomos = out[0]
        for kind in ("wbp", "denoised"):
            est = estimate_wedge(tomos[kind], VS, y_step=1)
            assert est is not None, kind
            # the simulator's positive tilts sample alpha <= tilt_max, its negative ones alpha >= 180 + tilt_min
            assert est.lo == pytest.approx(tmax, abs=3) and est.hi == pytest.approx(-tmin, abs=3), (kind, est)
