"""The imaging augmentation (blur + correlated noise) baked into training images."""

from __future__ import annotations

import numpy as np
import pytest

from czii_kit.augment import DegradeConfig, degrade


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
