"""Imaging augmentation baked into training images (pure numpy/scipy).

Ultralytics augments geometry and brightness, but not the imaging itself. Tomograms from other
microscopes, reconstructions or denoisers differ in resolution and in the amount and grain of noise,
so :func:`degrade` blurs a 2.5D image and adds spatially correlated Gaussian noise, each channel
(= z-slice) with its own noise. The percentile window that maps a tomogram to 0..255 depends on the
shape of its intensity histogram (how much dense matter, junk and vacuum it holds), so another
simulator or microscope puts the same particles at another contrast and clips their dense cores
differently: :func:`rewindow` narrows or widens the window of an image already made.
Images are ``(ny, nx, channels)`` uint8 in and out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import gaussian_filter


def _check_ranges(config, what: str, names: tuple[str, ...], valid, rule: str) -> None:
    """Check a frozen augmentation config: ``prob`` in [0, 1] and each ``(low, high)`` range of ``names``
    ``valid``; store the ranges as float pairs. ``what`` and ``rule`` word the errors."""
    if not 0.0 <= config.prob <= 1.0:
        raise ValueError(f"{what} probability must be in [0, 1], got {config.prob}")
    for name in names:
        lo, hi = getattr(config, name)
        if not valid(lo, hi):
            raise ValueError(f"{what} {name} range must satisfy {rule}, got ({lo}, {hi})")
        object.__setattr__(config, name, (float(lo), float(hi)))


def _ranges_dict(config) -> dict:
    """A config as a JSON-ready dict (ranges as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def _uint8_image(image, what: str) -> np.ndarray:
    """``image`` as an array, or a :class:`ValueError` naming ``what`` unless it is uint8."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"{what} expects a uint8 image, got {img.dtype}")
    return img


@dataclass(frozen=True)
class DegradeConfig:
    """Ranges of :func:`degrade`, each drawn uniformly per image.

    Attributes
    ----------
    prob : float
        Fraction of the images degraded (0 = off).
    blur : (float, float)
        Gaussian blur sigma of the image, pixels.
    noise : (float, float)
        Added noise standard deviation, as a fraction of the image's own standard deviation.
    grain : (float, float)
        Gaussian sigma (pixels) correlating the noise (0 = white noise).
    """

    prob: float = 0.0
    blur: tuple[float, float] = (0.0, 1.2)
    noise: tuple[float, float] = (0.2, 1.0)
    grain: tuple[float, float] = (0.0, 1.5)

    def __post_init__(self):
        _check_ranges(self, "degrade", ("blur", "noise", "grain"), lambda lo, hi: 0.0 <= lo <= hi,
                      "0 <= low <= high")

    def to_dict(self) -> dict:
        return _ranges_dict(self)


def degrade(image: np.ndarray, rng: np.random.Generator, config: DegradeConfig = DegradeConfig(prob=1.0)
            ) -> np.ndarray:
    """Blur ``image`` and add correlated noise (parameters drawn from ``config``'s ranges with ``rng``).

    Parameters
    ----------
    image : ndarray ``(ny, nx, C)`` or ``(ny, nx)`` uint8
    rng : numpy Generator
        Source of the parameters and the noise (same state, same output).
    config : DegradeConfig
        Ranges; ``config.prob`` is not consulted here (the caller decides which images to degrade).

    Returns
    -------
    ndarray, same shape, uint8.
    """
    img = _uint8_image(image, "degrade")
    f = img.astype(np.float32)
    if f.ndim == 2:
        f = f[..., None]
    blur = rng.uniform(*config.blur)
    noise = rng.uniform(*config.noise)
    grain = rng.uniform(*config.grain)
    out = np.empty_like(f)
    for c in range(f.shape[-1]):
        ch = f[..., c]
        std = float(ch.std())
        sig = gaussian_filter(ch, blur) if blur > 0 else ch
        n = rng.standard_normal(ch.shape).astype(np.float32)
        if grain > 0:
            n = gaussian_filter(n, grain)
        ns = float(n.std())
        if ns > 0 and std > 0:
            n *= np.float32(noise * std / ns)
        out[..., c] = sig + n
    np.clip(out + 0.5, 0, 255.49, out=out)
    return out.astype(np.uint8).reshape(img.shape)


@dataclass(frozen=True)
class WindowConfig:
    """Ranges of :func:`rewindow`, each drawn uniformly per image.

    Attributes
    ----------
    prob : float
        Fraction of the images re-windowed (0 = off).
    dark, light : (float, float)
        How far the window's dark and light ends move inwards, as a fraction of 0..255: ``0.1``
        clips the darkest 10 % of the range (a narrower window, as a lighter-tailed histogram gives),
        ``-0.1`` leaves a margin (a wider window).
    """

    prob: float = 0.0
    dark: tuple[float, float] = (-0.1, 0.2)
    light: tuple[float, float] = (-0.1, 0.2)

    def __post_init__(self):
        _check_ranges(self, "window", ("dark", "light"), lambda lo, hi: -0.5 < lo <= hi < 0.5,
                      "-0.5 < low <= high < 0.5")

    def to_dict(self) -> dict:
        return _ranges_dict(self)


def rewindow(image: np.ndarray, rng: np.random.Generator, config: WindowConfig = WindowConfig(prob=1.0)
             ) -> np.ndarray:
    """Map ``image`` through a narrower or wider intensity window (ends drawn from ``config`` with ``rng``).

    The new window runs from ``255 * dark`` to ``255 * (1 - light)`` of the old one and is stretched to
    0..255 (values beyond it clipped); all channels share it, as they share the tomogram's window.

    Parameters
    ----------
    image : ndarray ``(ny, nx, C)`` or ``(ny, nx)`` uint8
    rng : numpy Generator
    config : WindowConfig
        Ranges; ``config.prob`` is not consulted here (the caller decides which images to re-window).

    Returns
    -------
    ndarray, same shape, uint8.
    """
    img = _uint8_image(image, "rewindow")
    lo = 255.0 * rng.uniform(*config.dark)
    hi = 255.0 * (1.0 - rng.uniform(*config.light))
    lut = (np.arange(256, dtype=np.float64) - lo) * (255.0 / (hi - lo))
    lut = np.clip(np.rint(lut), 0, 255).astype(np.uint8)
    return lut[img]
