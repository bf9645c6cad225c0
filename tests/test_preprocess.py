"""Robust normalisation and 2.5D stacking."""

from __future__ import annotations

import numpy as np
import pytest

from czii_kit.errors import DataError, SettingsError
from czii_kit.preprocess import (
    PreprocessConfig,
    Window,
    iter_stacks,
    resample_to,
    resampled_shape,
    robust_window,
    slice_indices,
    stack_slice,
)


def _volume(shape=(12, 20, 28), seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("scale, offset", [(1.0, 0.0), (37.0, 1000.0), (1e-3, -5.0), (250.0, -4e4)])
def test_window_is_invariant_to_scale_and_offset(scale, offset):
    vol = _volume()
    cfg = PreprocessConfig(sample_step=1)
    ref = stack_slice(vol, 5, robust_window(vol, step=1), cfg)
    moved = vol * scale + offset
    got = stack_slice(moved, 5, robust_window(moved, step=1), cfg)
    assert got.dtype == np.uint8 and got.shape == (20, 28, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1


def test_window_uses_percentiles_not_extremes():
    vol = _volume((8, 40, 40))
    vol[0, 0, 0] = 1e6  # one hot pixel must not squash the contrast
    w = robust_window(vol, 0.5, 99.5, step=1)
    assert w.vmax < 10
    img = w.apply(vol[3])
    assert img.min() == 0 and img.max() == 255
    assert 100 < img.mean() < 155


def test_window_float_output_and_invert():
    w = Window(0.0, 2.0)
    np.testing.assert_allclose(w.apply(np.array([-1.0, 1.0, 5.0]), "float32"), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(Window(0.0, 2.0, invert=True).apply(np.array([0.0, 2.0])), [255, 0])


def test_channels_are_the_offset_slices_clamped_at_the_edges():
    nz, ny, nx = 10, 6, 9
    vol = np.broadcast_to(np.arange(nz, dtype=np.float32)[:, None, None], (nz, ny, nx)).copy()
    w = Window(0.0, nz - 1.0)
    cfg = PreprocessConfig(offsets=(-3, 0, 2))
    img = stack_slice(vol, 1, w, cfg)
    expect = [w.apply(np.full(1, z, np.float32))[0] for z in (0, 1, 3)]  # z-3 clamps to 0
    assert img.shape == (ny, nx, 3)
    for c in range(3):
        assert (img[..., c] == expect[c]).all()
    img = stack_slice(vol, 9, w, cfg)
    assert (img[..., 2] == w.apply(np.full(1, 9.0, np.float32))[0]).all()  # z+2 clamps to nz-1


def test_slab_mean_channels():
    vol = np.broadcast_to(np.arange(10, dtype=np.float32)[:, None, None], (10, 4, 5)).copy()
    w = Window(0.0, 9.0)
    img = stack_slice(vol, 5, w, PreprocessConfig(offsets=(-3, 0, 3), slab=3, dtype="float32"))
    np.testing.assert_allclose(img[0, 0], np.array([2.0, 5.0, 8.0]) / 9.0, atol=1e-6)


def test_denoising_reduces_noise():
    vol = _volume((5, 64, 64))
    w = robust_window(vol)
    plain = stack_slice(vol, 2, w, PreprocessConfig(dtype="float32"))
    smooth = stack_slice(vol, 2, w, PreprocessConfig(dtype="float32", denoise_sigma=1.5))
    assert smooth.std() < 0.6 * plain.std()


def test_iter_stacks_streams_batches():
    vol = _volume((11, 8, 12))
    w = robust_window(vol)
    zs = slice_indices(11, 2)
    np.testing.assert_array_equal(zs, [0, 2, 4, 6, 8, 10])
    seen = []
    for zb, imgs in iter_stacks(vol, w, PreprocessConfig(), zs, batch=4):
        assert imgs.shape == (len(zb), 8, 12, 3) and len(zb) <= 4
        for z, im in zip(zb, imgs, strict=True):
            assert (im == stack_slice(vol, int(z), w)).all()
        seen.extend(zb.tolist())
    assert seen == zs.tolist()
    np.testing.assert_array_equal(slice_indices(10, 3), [0, 3, 6, 9])


def test_bad_volumes_raise_clear_errors():
    with pytest.raises(DataError, match="no contrast"):
        robust_window(np.ones((4, 8, 8), np.float32), source="flat.zarr")
    vol = _volume((4, 8, 8))
    vol[0, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        robust_window(vol, step=1, source="nan.zarr")
    with pytest.raises(IndexError):
        stack_slice(_volume((4, 8, 8)), 4, Window(0, 1))


def test_config_validation_and_round_trip():
    cfg = PreprocessConfig(offsets=(-1, 0, 1), slab=3, lo=1, hi=99)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert PreprocessConfig.from_dict({"offsets": [-4, 0, 4]}).offsets == (-4, 0, 4)
    with pytest.raises(SettingsError, match="unknown: unknown setting"):
        PreprocessConfig.from_dict({"offsets": [-4, 0, 4], "unknown": 1})
    with pytest.raises(ValueError):
        PreprocessConfig(slab=2)
    with pytest.raises(ValueError):
        PreprocessConfig(lo=60, hi=40)
    with pytest.raises(ValueError):
        PreprocessConfig(dtype="int16")


def test_prepare_batch_pads_reverses_channels_and_scales():
    from czii_kit.infer import prepare_batch

    imgs = np.zeros((2, 30, 50, 3), np.uint8)
    imgs[..., 0], imgs[..., 1], imgs[..., 2] = 10, 20, 30
    x, scale = prepare_batch(imgs, 64)
    assert x.shape == (2, 3, 64, 64) and x.dtype == np.float32 and scale == 1.0
    np.testing.assert_allclose(x[:, :, :30, :50].reshape(2, 3, -1)[0, :, 0], np.array([30, 20, 10]) / 255.0)
    np.testing.assert_allclose(x[:, :, 30:, :], 114 / 255.0)
    np.testing.assert_allclose(x[:, :, :30, 50:], 114 / 255.0)
    big = np.full((1, 100, 80, 3), 200, np.uint8)
    x, scale = prepare_batch(big, 64)
    assert scale == pytest.approx(0.64) and x.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(x[0, :, :64, :51], 200 / 255.0, atol=1e-6)
    np.testing.assert_allclose(x[0, :, :, 52:], 114 / 255.0)
    with pytest.raises(ValueError):
        prepare_batch(np.zeros((30, 50, 3), np.uint8), 64)


@pytest.mark.parametrize("config, z_stride, turn, imgsz, dtype", [
    (PreprocessConfig(), 1, False, 64, "float32"),
    (PreprocessConfig(), 3, True, 64, "float32"),
    (PreprocessConfig(), 1, False, 64, "int16"),
    (PreprocessConfig(offsets=(-3, 0, 3), slab=3), 2, False, 64, "float32"),
    (PreprocessConfig(dtype="float32", denoise_sigma=1.0), 1, False, 96, "float32"),
    (PreprocessConfig(invert=True), 2, True, 64, "float32"),
    (PreprocessConfig(), 1, False, 32, "float32"),  # slices larger than the input: scaled down, the plain way
])
@pytest.mark.parametrize("pooled", [False, True])
def test_iter_inputs_equals_prepare_batch_of_iter_stacks(config, z_stride, turn, imgsz, dtype, pooled):
    from czii_kit.infer import iter_inputs, prepare_batch
    from czii_kit.preprocess import to_uint8

    vol = (_volume((13, 37, 50), seed=3) * 50).astype(dtype)
    seen = vol.transpose(0, 2, 1) if turn else vol
    w = robust_window(vol, step=1, invert=config.invert)
    zs = slice_indices(len(vol), z_stride)
    free: list | None = [] if pooled else None
    got, made = [], set()
    for zb, x, scale in iter_inputs(seen, w, config, zs, 2, imgsz, free):
        got.append((zb, x.copy(), scale))
        made.add(id(x))
        if pooled:
            free.append(x)  # done with it: the next batches are written into it
    ref = [(zb, *prepare_batch(to_uint8(imgs), imgsz)) for zb, imgs in iter_stacks(seen, w, config, zs, 2)]
    assert len(got) == len(ref) > 2
    if pooled and imgsz >= 64:
        assert len(made) < len(got)  # arrays given back were filled again
    for (zb, x, scale), (zr, xr, sr) in zip(got, ref, strict=True):
        assert (zb == zr).all() and scale == sr and x.dtype == np.float32 and x.shape == xr.shape
        assert np.array_equal(x, xr)  # bit for bit: the detector sees the same input


def test_contrast_polarity_is_detected_and_undone():
    from pipeline_fixture import place_particles, sphere_volume

    from czii_kit.preprocess import BRIGHT_SKEW, contrast_skew, window_for

    rng = np.random.default_rng(0)
    shape = (32, 72, 88)
    centres, names = place_particles(shape, rng, 2)
    dark = sphere_volume(shape, centres, names, rng)  # dark spheres, like cryo-ET
    bright = np.float32(2000.0) - dark
    assert contrast_skew(dark) < -BRIGHT_SKEW and contrast_skew(bright) > BRIGHT_SKEW
    cfg = PreprocessConfig()
    w_dark, s_dark = window_for(dark, cfg)
    with pytest.warns(UserWarning, match="looks bright"):
        w_bright, s_bright = window_for(bright, cfg, source="bright.zarr")
    assert not w_dark.invert and w_bright.invert and s_dark < 0 < s_bright
    # the inverted bright volume gives the dark volume's images (to a grey level of rounding)
    a = stack_slice(dark, 16, w_dark, cfg).astype(int)
    b = stack_slice(bright, 16, w_bright, cfg).astype(int)
    assert np.abs(a - b).max() <= 1
    assert not window_for(bright, cfg, "dark")[0].invert and window_for(dark, cfg, "bright")[0].invert
    assert window_for(dark, cfg, "dark")[1] is None
    with pytest.raises(ValueError, match="polarity"):
        window_for(dark, cfg, "grey")


# --- low-pass of noisy tomograms -------------------------------------------------------------


def test_neighbour_correlation_measures_smoothness_along_x():
    from scipy.ndimage import gaussian_filter

    from czii_kit.preprocess import neighbour_correlation

    noise = _volume((20, 36, 52), seed=3)
    assert abs(neighbour_correlation(noise)) < 0.05
    assert neighbour_correlation(gaussian_filter(noise, 2.0)) > 0.9
    # scale and offset do not matter
    v = gaussian_filter(noise, 1.0)
    assert neighbour_correlation(v * 1e-4 + 7e-4) == pytest.approx(neighbour_correlation(v), abs=1e-4)
    # only x counts (the axis order is [z, y, x]): smoothing along z or y alone leaves it near 0
    assert abs(neighbour_correlation(gaussian_filter(noise, (3.0, 0, 0)))) < 0.05
    assert abs(neighbour_correlation(gaussian_filter(noise, (0, 3.0, 0)))) < 0.05
    assert neighbour_correlation(gaussian_filter(noise, (0, 0, 3.0))) > 0.9
    assert neighbour_correlation(np.full((4, 5, 6), 3.0, np.float32)) == 1.0
    with pytest.raises(ValueError, match="fewer than 2 voxels along x"):
        neighbour_correlation(np.zeros((4, 5, 1), np.float32))


def test_smoothing_sigma_is_the_smallest_that_reaches_the_target():
    from scipy.ndimage import gaussian_filter

    from czii_kit.preprocess import SMOOTH_SIGMAS, SMOOTH_TARGET, neighbour_correlation, smoothing_sigma

    noise = _volume((24, 40, 56), seed=4)
    s = smoothing_sigma(noise)
    i = SMOOTH_SIGMAS.index(s)
    assert i > 0 and neighbour_correlation(gaussian_filter(noise, s)) >= SMOOTH_TARGET
    assert neighbour_correlation(gaussian_filter(noise, SMOOTH_SIGMAS[i - 1])) < SMOOTH_TARGET
    assert smoothing_sigma(gaussian_filter(noise, 3.0)) == 0.0  # already smooth
    assert smoothing_sigma(noise, target=0.999) == SMOOTH_SIGMAS[-1]  # unreachable: the largest
    assert smoothing_sigma(noise, target=0.5) < s


def test_settle_smoothing_low_passes_noisy_volumes_only():
    import warnings

    from scipy.ndimage import gaussian_filter

    from czii_kit.preprocess import parse_smooth, settle_smoothing, smoothing_sigma

    noise = _volume((24, 40, 56), seed=5)
    smooth = gaussian_filter(noise, 1.5)  # x-neighbour correlation about 0.9, like a denoised tomogram
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same, sigma = settle_smoothing(smooth, "auto", source="denoised.zarr")
    assert same is smooth and sigma == 0.0
    with pytest.warns(UserWarning, match=r"wbp\.zarr: noisy tomogram .* sigma"):
        out, sigma = settle_smoothing(noise, "auto", source="wbp.zarr")
    assert sigma == smoothing_sigma(noise) > 0 and out.dtype == np.float32
    np.testing.assert_allclose(out, gaussian_filter(noise, sigma), atol=1e-5)
    assert settle_smoothing(noise, "auto", warn=False)[1] == sigma
    out, sigma = settle_smoothing(smooth, 1.5)
    assert sigma == 1.5 and not np.allclose(out, smooth)
    for off in (0, "0", "off", 0.0):
        assert settle_smoothing(noise, off)[0] is noise
    assert parse_smooth("auto") == "auto" and parse_smooth("1.25") == 1.25 and parse_smooth(2) == 2.0
    for bad in ("strong", -1.0, float("nan"), True, None):
        with pytest.raises(ValueError, match="smooth"):
            parse_smooth(bad)
    with pytest.raises(ValueError, match="smooth"):
        settle_smoothing(noise, "strong")
    from czii_kit.infer import InferenceConfig

    assert InferenceConfig().smooth == "auto" and InferenceConfig(smooth="off").smooth == 0.0
    with pytest.raises(ValueError, match="smooth"):
        InferenceConfig(smooth="strong")


def _blobs(shape, voxel_size, centres_xyz, sigma_a=25.0):
    """Gaussian blobs (sigma in Å) at ``centres_xyz`` (Å) in a ``[z, y, x]`` volume of ``voxel_size`` Å."""
    grids = np.meshgrid(*[np.arange(n) * voxel_size for n in shape], indexing="ij")
    vol = np.zeros(shape, np.float32)
    for x, y, z in centres_xyz:
        d2 = (grids[0] - z) ** 2 + (grids[1] - y) ** 2 + (grids[2] - x) ** 2
        vol += np.exp(-0.5 * d2 / sigma_a**2).astype(np.float32)
    return vol


@pytest.mark.parametrize("voxel_size", [7.0, 14.5])
def test_resample_to_keeps_points_where_they_are_in_angstrom(voxel_size):
    from scipy.ndimage import maximum_filter

    from czii_kit.coords import angstrom_to_voxel, voxel_to_angstrom

    target = 10.0
    extent = np.array([230.0, 410.0, 520.0])  # Å along z, y, x: unequal sides
    shape = tuple(int(n) for n in np.floor(extent / voxel_size) + 1)
    centres = np.array([[120.0, 300.0, 60.0], [400.0, 100.0, 180.0], [260.0, 210.0, 120.0]])  # (x, y, z) Å
    vol = _blobs(shape, voxel_size, centres)
    with pytest.warns(UserWarning, match=f"voxel size {voxel_size:g} Å, the model.s is 10 Å: resampled"):
        out, vs = resample_to(vol, voxel_size, target, source="t.zarr")
    assert vs == target and out.dtype == np.float32
    assert out.shape == resampled_shape(vol.shape, voxel_size, target)
    assert out.shape == tuple(int(n) for n in np.floor((np.array(shape) - 1) * voxel_size / target + 1e-9) + 1)
    # each blob's peak voxel in the output is where its Å position says (within a voxel)
    peaks = np.argwhere((out == maximum_filter(out, size=5)) & (out > 0.5))
    found = voxel_to_angstrom(peaks, vs)
    assert len(found) == len(centres)
    for c in centres:
        assert np.min(np.linalg.norm(found - c, axis=1)) <= target
    np.testing.assert_allclose(np.sort(angstrom_to_voxel(centres, vs)[:, 0]), np.sort(peaks[:, 0]), atol=1.0)


def test_resample_to_leaves_close_voxel_sizes_alone():
    vol = np.random.default_rng(0).normal(size=(6, 9, 11)).astype(np.float32)
    out, vs = resample_to(vol, 10.0, 10.012444)
    assert out is vol and vs == 10.0
    assert resampled_shape(vol.shape, 10.4, 10.0) == vol.shape
    with pytest.raises(ValueError, match="voxel sizes must be > 0"):
        resample_to(vol, 0.0, 10.0)
    with pytest.raises(DataError, match="too small to resample"):
        resample_to(vol[:1], 5.0, 20.0, source="t.zarr", warn=False)


def test_flatten_removes_a_lateral_ramp_and_leaves_even_volumes_alone():
    from czii_kit.preprocess import UNEVEN_LIMIT, coarse_background, settle_flatten, unevenness

    rng = np.random.default_rng(3)
    shape = (40, 96, 136)  # unequal sides
    centres = [(20.0, 30.0, 40.0), (20.0, 60.0, 100.0), (12.0, 48.0, 70.0)]
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    even = rng.normal(0, 0.3, shape).astype(np.float32)
    for c in centres:  # dark particles of radius 6 voxels
        even[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 36] -= 1.0
    even = even * 40.0 + 900.0  # arbitrary units
    lo, hi = np.percentile(even, [0.5, 99.5])
    ramp = ((xx / (shape[2] - 1) - 0.5) + 0.5 * (yy / (shape[1] - 1) - 0.5)) * (hi - lo)
    uneven = even + ramp.astype(np.float32)

    assert unevenness(even) < 0.03 < UNEVEN_LIMIT < unevenness(uneven)
    assert coarse_background(uneven).shape == (10, 24, 34)
    out, u = settle_flatten(even, "auto", source="even.zarr")
    assert out is even and u < UNEVEN_LIMIT
    with pytest.warns(UserWarning, match="uneven.zarr: uneven background"):
        flat, u = settle_flatten(uneven, "auto", source="uneven.zarr")
    assert u > UNEVEN_LIMIT and flat.shape == shape and flat.dtype == np.float32
    # the ramp is gone (the residual is a small fraction of it) and the particles are still there
    inner = (slice(None), slice(8, -8), slice(8, -8))
    resid = (flat - even)[inner]
    assert np.ptp(resid.mean(axis=0)) < 0.15 * np.ptp(ramp[inner].mean(axis=0))
    for c in centres:
        z, y, x = (int(v) for v in c)
        assert flat[z, y, x] < np.median(flat) - 20
    assert settle_flatten(uneven, "off") == (uneven, 0.0)
    on, _ = settle_flatten(even, "on")
    assert on is not even and np.abs(on - even).max() < 0.1 * (hi - lo)
    with pytest.raises(ValueError, match="flatten must be one of"):
        settle_flatten(even, "sometimes")
    from czii_kit.infer import InferenceConfig

    assert InferenceConfig().flatten == "auto"
    with pytest.raises(ValueError, match="flatten must be one of"):
        InferenceConfig(flatten="sometimes")


def _wedged(shape, tilt_max=60.0, seed=0):
    """Noise with the missing wedge of a tilt series about y: |kx| < tan(90 - tilt_max) |kz| removed."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftn(rng.normal(size=shape))
    kz, ky, kx = np.meshgrid(*[np.fft.fftfreq(n) for n in shape], indexing="ij")
    f[np.abs(kx) < np.tan(np.radians(90 - tilt_max)) * np.abs(kz)] = 0
    return np.real(np.fft.ifftn(f)).astype(np.float32)


def test_the_missing_wedge_tells_the_tilt_axis():
    from czii_kit.preprocess import TILT_AXIS_LIMIT, settle_tilt_axis, wedge_ratio

    about_y = _wedged((48, 96, 112))  # unequal sides
    about_x = np.ascontiguousarray(about_y.transpose(0, 2, 1))
    full = np.random.default_rng(1).normal(size=(48, 96, 112)).astype(np.float32)
    assert wedge_ratio(about_y) < 0.2 and wedge_ratio(about_x) > 5 and 0.7 < wedge_ratio(full) < 1.4
    assert wedge_ratio(about_y * 37.0 + 900.0) == pytest.approx(wedge_ratio(about_y), rel=1e-6)
    assert settle_tilt_axis(about_y) is False and settle_tilt_axis(full) is False
    with pytest.warns(UserWarning, match=f"t.zarr: the missing wedge shows a tilt axis along x .* > {TILT_AXIS_LIMIT:g}"):
        assert settle_tilt_axis(about_x, source="t.zarr") is True
    assert settle_tilt_axis(about_y, "x") is True and settle_tilt_axis(about_x, "y") is False
    with pytest.raises(ValueError, match="tilt_axis must be one of"):
        settle_tilt_axis(about_y, "z")


def test_turned_slices_give_boxes_in_the_volume_frame():
    from czii_kit.infer import InferenceConfig, detect_prepared
    class DarkestSpot:
        """A stand-in detector: one box at each image's darkest pixel, 3 wide and 7 high, class 2."""

        config = InferenceConfig(batch=4)

        def __init__(self):
            self.shapes = []

        def detect(self, images):
            out = []
            for img in images:
                self.shapes.append(img.shape[:2])
                y, x = np.unravel_index(np.argmin(img[..., 1]), img.shape[:2])
                out.append(np.array([[x + 0.5, y + 0.5, 3.0, 7.0, 0.9, 2.0]], np.float32))
            return out

    vol = np.ones((6, 20, 50), np.float32)
    vol[:, 4, 31] = 0.0  # one dark column at y=4, x=31
    window = Window(0.0, 1.0, False)
    prep = PreprocessConfig()
    det = DarkestSpot()
    plain = detect_prepared(det, vol, window, "r", prep)
    assert set(det.shapes) == {(20, 50)}
    assert (plain["x"] == 31).all() and (plain["y"] == 4).all() and (plain["w"] == 3).all() and (plain["h"] == 7).all()
    det = DarkestSpot()
    turned = detect_prepared(det, vol, window, "r", prep, turn=True)
    assert set(det.shapes) == {(50, 20)}  # the detector saw x and y exchanged
    assert (turned["x"] == 31).all() and (turned["y"] == 4).all()  # boxes back in the volume's frame
    assert (turned["w"] == 7).all() and (turned["h"] == 3).all()


def test_settle_smoothing_sharpens_over_smoothed_volumes_only():
    """Smoother than SHARPEN_LIMIT (a strong denoiser): unsharp-masked under auto, with a warning;
    as smooth as the training data: untouched; off or a fixed sigma: never sharpened."""
    import warnings

    from scipy.ndimage import gaussian_filter

    from czii_kit.preprocess import (
        SHARPEN_AMOUNT,
        SHARPEN_LIMIT,
        neighbour_correlation,
        settle_smoothing,
        sharpen,
        sharpening_amount,
    )

    noise = _volume((24, 40, 56), seed=6)  # [z, y, x], unequal sides
    over = gaussian_filter(noise, 4.0)
    denoised = gaussian_filter(noise, 1.5)
    assert neighbour_correlation(over) > SHARPEN_LIMIT > neighbour_correlation(denoised)
    assert sharpening_amount(over) == SHARPEN_AMOUNT > 0 and sharpening_amount(denoised) == 0.0
    with pytest.warns(UserWarning, match=r"strong\.zarr: over-smoothed tomogram .* sharpened"):
        out, sigma = settle_smoothing(over, "auto", source="strong.zarr")
    assert sigma == 0.0 and out.dtype == np.float32
    expect = over + SHARPEN_AMOUNT * (over - gaussian_filter(over, 2.0))
    np.testing.assert_allclose(out, expect, atol=1e-5)
    assert neighbour_correlation(out) < neighbour_correlation(over)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert settle_smoothing(denoised, "auto")[0] is denoised
        assert settle_smoothing(over, "off")[0] is over
        np.testing.assert_allclose(settle_smoothing(over, 1.0)[0], gaussian_filter(over, 1.0), atol=1e-5)
    np.testing.assert_allclose(sharpen(over, 0.0), over)
    np.testing.assert_allclose(sharpen(over, 0.5, 1.0), over + 0.5 * (over - gaussian_filter(over, 1.0)), atol=1e-5)
    with pytest.raises(ValueError, match="sharpen"):
        sharpen(over, -1.0)


@pytest.mark.parametrize("case", ["smooth", "noisy", "turned", "uneven", "bright", "fixed"])
def test_prepare_for_detection_equals_the_sequential_settling(case):
    """The wedge ratio and contrast skew measured in a second thread give what the calls one after the other give,
    also when flattening or a low-pass (in place) changes the volume first."""
    import warnings

    from scipy.ndimage import gaussian_filter

    from czii_kit.infer import InferenceConfig, prepare_for_detection
    from czii_kit.preprocess import settle_flatten, settle_smoothing, settle_tilt_axis, window_for

    shape = (40, 72, 88)
    vol = gaussian_filter(_wedged(shape), 2.0).astype(np.float32)  # denoised-looking, tilt axis along y
    cfg = InferenceConfig()
    if case == "noisy":
        vol = _wedged(shape)  # white-ish: low-passed
    elif case == "turned":
        vol = np.ascontiguousarray(vol.transpose(0, 2, 1))
    elif case == "uneven":
        vol = vol + np.linspace(0, 3 * float(vol.std()) * 8, shape[2], dtype=np.float32)  # a strong lateral ramp
    elif case == "bright":
        vol = -vol
        vol[:, 30:40, 30:40] += 20 * float(vol.std())  # bright dense matter
    elif case == "fixed":
        cfg = InferenceConfig(smooth=1.0, flatten="off", polarity="dark", tilt_axis="x")
    prep = PreprocessConfig()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f, _ = settle_flatten(vol, cfg.flatten)
        ref, sigma = settle_smoothing(f, cfg.smooth)
        window, _ = window_for(ref, prep, cfg.polarity)
        turn = settle_tilt_axis(ref, cfg.tilt_axis)
        work = vol.copy()
        got, w2, sigma2, turn2 = prepare_for_detection(work, prep, cfg, in_place=True)
    assert np.array_equal(got, ref) and sigma2 == sigma and turn2 == turn
    assert (w2.vmin, w2.vmax, w2.invert) == (window.vmin, window.vmax, window.invert)
    assert {"noisy": sigma > 0, "turned": turn, "uneven": not np.array_equal(f, vol),
            "bright": window.invert, "fixed": sigma == 1.0 and turn}.get(case, sigma == 0 and not turn)
