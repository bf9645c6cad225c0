"""The imaging augmentations (blur + correlated noise; intensity window) baked into training images."""

from __future__ import annotations

import numpy as np
import pytest

from czii_kit.augment import DegradeConfig, WindowConfig, degrade, rewindow


def _image(shape=(60, 90, 3), seed=0) -> np.ndarray:
    """Smooth blobs on a grey background, uint8 ``(ny, nx, C)``, unequal sides."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    f = gaussian_filter(rng.standard_normal(shape), (3, 3, 0))
    f = (f - f.min()) / (f.max() - f.min())
    return (40 + 170 * f).astype(np.uint8)


def test_degrade_is_seeded_and_keeps_shape_and_dtype():
    img = _image()
    cfg = DegradeConfig(prob=1.0)
    a = degrade(img, np.random.default_rng(1), cfg)
    b = degrade(img, np.random.default_rng(1), cfg)
    c = degrade(img, np.random.default_rng(2), cfg)
    assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert degrade(img[..., 0], np.random.default_rng(1), cfg).shape == img.shape[:2]


def test_degrade_noise_level_follows_the_config():
    img = _image()
    std = img.astype(float).std(axis=(0, 1))
    quiet = degrade(img, np.random.default_rng(0), DegradeConfig(blur=(0, 0), noise=(0.1, 0.1), grain=(0, 0)))
    loud = degrade(img, np.random.default_rng(0), DegradeConfig(blur=(0, 0), noise=(0.8, 0.8), grain=(0, 0)))
    for out, k in ((quiet, 0.1), (loud, 0.8)):
        resid = (out.astype(float) - img.astype(float)).std(axis=(0, 1))
        np.testing.assert_allclose(resid, k * std, rtol=0.15)
    # channels (z-slices) get independent noise
    r = loud.astype(float) - img.astype(float)
    assert abs(np.corrcoef(r[..., 0].ravel(), r[..., 1].ravel())[0, 1]) < 0.1


def test_degrade_blur_and_grain_remove_high_frequencies():
    rng = np.random.default_rng(0)
    img = rng.integers(60, 200, size=(64, 96, 3), dtype=np.uint8)  # white: all power at high frequency

    def hf(x):  # mean squared difference of neighbours
        return float(np.mean(np.diff(x.astype(float), axis=1) ** 2))

    blurred = degrade(img, np.random.default_rng(1), DegradeConfig(blur=(1.5, 1.5), noise=(0, 0)))
    assert hf(blurred) < 0.2 * hf(img)
    flat = np.full((64, 96, 3), 128, np.uint8)
    flat[::2] = 140  # some contrast, so the noise has a scale
    white = degrade(flat, np.random.default_rng(1), DegradeConfig(blur=(0, 0), noise=(1, 1), grain=(0, 0)))
    grainy = degrade(flat, np.random.default_rng(1), DegradeConfig(blur=(0, 0), noise=(1, 1), grain=(2, 2)))
    assert hf(grainy - flat.astype(float)) < 0.3 * hf(white - flat.astype(float))


def test_degrade_config_validation():
    with pytest.raises(ValueError, match="probability"):
        DegradeConfig(prob=1.5)
    with pytest.raises(ValueError, match="noise"):
        DegradeConfig(noise=(0.5, 0.1))
    with pytest.raises(ValueError, match="uint8"):
        degrade(np.zeros((4, 4, 3), np.float32), np.random.default_rng(0))
    assert DegradeConfig(prob=0.3).to_dict()["blur"] == [0.0, 1.2]


def test_rewindow_clips_the_dark_end_like_a_narrower_window():
    ramp = np.tile(np.arange(256, dtype=np.uint8), (3, 1))[..., None].repeat(2, axis=2)  # (3, 256, 2)
    cfg = WindowConfig(prob=1.0, dark=(0.1, 0.1), light=(0.0, 0.0))
    out = rewindow(ramp, np.random.default_rng(0), cfg)
    assert out.shape == ramp.shape and out.dtype == np.uint8
    lo = 25.5  # the new window starts at 10 % of the old one and ends where it ended
    assert (out[0, : int(lo), 0] == 0).all() and out[0, 255, 0] == 255
    expected = np.clip(np.rint((np.arange(256) - lo) * 255 / (255 - lo)), 0, 255)
    np.testing.assert_array_equal(out[0, :, 0], expected)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])  # channels share the window
    # a negative end widens the window: nothing clips, the contrast drops
    wide = rewindow(ramp, np.random.default_rng(0), WindowConfig(dark=(-0.1, -0.1), light=(-0.1, -0.1)))
    assert wide.min() > 0 and wide.max() < 255 and np.all(np.diff(wide[0, :, 0].astype(int)) >= 0)


def test_rewindow_is_seeded_and_checks_its_config():
    img = _image()
    a = rewindow(img, np.random.default_rng(1))
    assert np.array_equal(a, rewindow(img, np.random.default_rng(1)))
    assert not np.array_equal(a, rewindow(img, np.random.default_rng(2)))
    assert rewindow(img[..., 0], np.random.default_rng(1)).shape == img.shape[:2]
    with pytest.raises(ValueError, match="probability"):
        WindowConfig(prob=-0.1)
    with pytest.raises(ValueError, match="dark"):
        WindowConfig(dark=(0.3, 0.1))
    with pytest.raises(ValueError, match="light"):
        WindowConfig(light=(0.0, 0.6))
    with pytest.raises(ValueError, match="uint8"):
        rewindow(np.zeros((4, 4), np.float32), np.random.default_rng(0))
    assert WindowConfig(prob=0.5).to_dict() == {"prob": 0.5, "dark": [-0.1, 0.2], "light": [-0.1, 0.2]}
