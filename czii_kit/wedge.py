"""The missing wedge: which directions of Fourier space a tomogram sampled, read off the tomogram itself.

A tilt series about ``y`` over angles ``tilt_min .. tilt_max`` samples, in the ``(kz, kx)`` plane of
Fourier space, only the directions within those angles of the ``kx`` axis; the rest (a wedge around
``kz``, the same for every ``ky``) is empty, which elongates every particle along ``z`` and streaks it
in ``x-z``. (About ``x``, the same with ``y`` and ``x`` exchanged; both are tried.) Template matching compares like with like when the templates are given the same wedge
(:mod:`czii_kit.templates`), so the wedge is measured here from the tomogram's power spectrum:

- :func:`angular_profile`: power of the ``x-z`` slices (every ``y_step``-th one, Hann-windowed; the
  ``y-z`` slices for a tilt axis along ``x``),
  whitened per frequency shell, averaged in bins of the angle ``alpha = atan2(kz, kx)`` (degrees,
  ``0 .. 180``) over a band of spatial periods, as a log;
- :func:`estimate_wedge`: where that profile falls to half the level near ``kx`` (always sampled),
  on each side, provided the level near ``kz`` (never sampled for tilts below 80°) is clearly lower
  (for both tilt axes; the one with the clearer wedge is taken);
- :func:`wedge_mask`: the sampled directions of a 3D Fourier grid (for ``numpy.fft.rfftn``).

Arrays are indexed ``[z, y, x]``. A :class:`Wedge` gives the sampled directions as the two edges
``lo`` and ``hi`` (degrees): sampled are ``alpha <= lo`` and ``alpha >= 180 - hi``, so a symmetric
tilt range ``±t`` gives ``lo = hi = t`` (our simulator's ``tilt_min .. tilt_max`` gives
``lo = tilt_max``, ``hi = -tilt_min``, plus about 2°: each projection also fills a thin slab
around its plane).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

BAND_ANGSTROM = (200.0, 50.0)  # spatial periods (Å) the profile is read over: particle scale, above the noise floor
MIN_CONTRAST = 1.0  # natural-log power between the sampled and the empty directions to call it a wedge
BIN_DEGREES = 2.0


@dataclass(frozen=True)
class Wedge:
    """Sampled directions of a tilt series about ``axis``: ``alpha <= lo`` and ``alpha >= 180 - hi``
    (degrees), ``alpha = atan2(kz, kx)`` (``atan2(kz, ky)`` about ``x``) in the ``[z, y, x]`` array's
    Fourier space. ``contrast``: the log-power step (not compared)."""

    lo: float
    hi: float
    contrast: float = field(default=float("nan"), compare=False)
    axis: str = "y"

    def __post_init__(self):
        if not (0 < self.lo < 90 and 0 < self.hi < 90):
            raise ValueError(f"wedge edges must lie in (0, 90) degrees, got {self.lo}, {self.hi}")
        if self.axis not in ("y", "x"):
            raise ValueError(f"tilt axis must be 'y' or 'x', got {self.axis!r}")

    def rounded(self, step: float = 1.0) -> Wedge:
        """The same wedge with its edges rounded to ``step`` degrees (a cache key)."""
        r = lambda a: float(min(max(step * round(a / step), step), 90 - step))  # noqa: E731
        return Wedge(r(self.lo), r(self.hi), self.contrast, self.axis)

    def __str__(self) -> str:
        other = "x" if self.axis == "y" else "y"
        return (f"tilt axis {self.axis}: sampled {self.lo:.0f}° and {self.hi:.0f}° either side of {other} "
                f"(missing wedge {180 - self.lo - self.hi:.0f}°)")


def _angles(kz: np.ndarray, kx: np.ndarray) -> np.ndarray:
    return np.degrees(np.arctan2(kz, kx)) % 180.0


def angular_profile(volume: np.ndarray, voxel_size: float, y_step: int = 4,
                    band: tuple[float, float] = BAND_ANGSTROM, axis: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """``(alpha, profile)``: bin centres (degrees, ``0 .. 180``) and log of the whitened mean power of ``volume [z, y, x]``.

    ``voxel_size`` in Å; ``band``: the longest and shortest spatial period (Å) used; ``axis``: the
    tilt axis (``"x"``: ``y`` and ``x`` exchanged, ``y_step`` then steps along ``x``). Bins without a
    Fourier sample hold NaN.
    """
    from scipy import fft

    if axis not in ("y", "x"):
        raise ValueError(f"tilt axis must be 'y' or 'x', got {axis!r}")
    view = volume if axis == "y" else np.swapaxes(volume, 1, 2)
    v = np.asarray(view[:, ::max(1, int(y_step)), :], np.float32)
    nz, _, nx = v.shape
    if nz < 8 or nx < 8:
        raise ValueError(f"volume {volume.shape} too small to measure a missing wedge")
    v = v - v.mean(axis=(0, 2), keepdims=True)
    v *= np.hanning(nz)[:, None, None].astype(np.float32) * np.hanning(nx)[None, None, :].astype(np.float32)
    power = np.zeros((nz, nx), np.float64)
    for i in range(0, v.shape[1], 16):  # bounded memory
        f = fft.fft2(v[:, i:i + 16, :], axes=(0, 2), workers=-1)
        power += (np.abs(f) ** 2).sum(1)
    kz = np.fft.fftfreq(nz)[:, None] / voxel_size
    kx = np.fft.fftfreq(nx)[None, :] / voxel_size
    k = np.hypot(kz, kx)
    kmin, kmax = 1.0 / band[0], 1.0 / band[1]
    keep = (k >= kmin) & (k <= min(kmax, 0.5 / voxel_size)) & (kz >= 0)
    if not keep.any():
        raise ValueError(f"no Fourier samples between {band[0]} and {band[1]} Å at {voxel_size} Å voxels")
    p = power[keep]
    alpha = _angles(np.broadcast_to(kz, k.shape)[keep], np.broadcast_to(kx, k.shape)[keep])
    # whiten: divide by each frequency shell's median, so the angle bins compare like with like
    shells = np.minimum(((k[keep] - kmin) / (kmax - kmin) * 12).astype(int), 11)
    for s in np.unique(shells):
        p[shells == s] /= max(float(np.median(p[shells == s])), 1e-30)
    nbins = int(round(180 / BIN_DEGREES))
    idx = np.minimum((alpha / BIN_DEGREES).astype(int), nbins - 1)
    total = np.bincount(idx, p, nbins)
    count = np.bincount(idx, None, nbins)
    with np.errstate(invalid="ignore", divide="ignore"):
        prof = np.log(np.maximum(total / count, 1e-12))
    return (np.arange(nbins) + 0.5) * BIN_DEGREES, prof


def _crossing(alpha: np.ndarray, prof: np.ndarray, mid: float) -> float | None:
    """First angle along ``alpha`` (ordered) where ``prof`` falls below ``mid``, interpolated."""
    for i in range(1, len(alpha)):
        if prof[i] < mid <= prof[i - 1]:
            t = (prof[i - 1] - mid) / (prof[i - 1] - prof[i])
            return float(alpha[i - 1] + t * (alpha[i] - alpha[i - 1]))
    return None


def _estimate_about(volume, voxel_size, y_step, band, axis) -> Wedge | None:
    alpha, prof = angular_profile(volume, voxel_size, y_step, band, axis)
    ok = np.isfinite(prof)
    alpha, prof = alpha[ok], prof[ok]
    near_x = (alpha < 30) | (alpha > 150)
    near_z = np.abs(alpha - 90) < 10
    if not near_x.any() or not near_z.any():
        return None
    top, bottom = float(np.median(prof[near_x])), float(np.median(prof[near_z]))
    if top - bottom < MIN_CONTRAST:
        return None
    mid = top - np.log(2.0)  # half the sampled directions' power: the edge of a blurred step
    up = (alpha >= 30) & (alpha <= 90)
    down = (alpha <= 150) & (alpha >= 90)
    lo = _crossing(alpha[up], prof[up], mid)
    hi_a = _crossing(alpha[down][::-1], prof[down][::-1], mid)
    if lo is None or hi_a is None:
        return None
    lo, hi = min(max(lo, 1.0), 89.0), min(max(180.0 - hi_a, 1.0), 89.0)
    return Wedge(lo, hi, top - bottom, axis)


def estimate_wedge(volume: np.ndarray, voxel_size: float, y_step: int = 4,
                   band: tuple[float, float] = BAND_ANGSTROM) -> Wedge | None:
    """The missing wedge of ``volume [z, y, x]`` (``voxel_size`` Å), about ``y`` or ``x`` (the clearer),
    or None when its power spectrum shows none (less than :data:`MIN_CONTRAST` between the
    directions near the tilt plane's in-plane axis and near ``kz``) or the volume is too small (or
    its voxels too coarse) to tell."""
    try:
        found = [w for w in (_estimate_about(volume, voxel_size, y_step, band, a) for a in ("y", "x"))
                 if w is not None]
    except ValueError:  # too few voxels, or no Fourier sample in the band (see angular_profile)
        return None
    return max(found, key=lambda w: w.contrast) if found else None


def wedge_mask(shape: tuple[int, int, int], wedge: Wedge) -> np.ndarray:
    """Boolean ``(nz, ny, nx // 2 + 1)``: the Fourier samples of ``numpy.fft.rfftn`` on a ``[z, y, x]`` grid
    of ``shape`` that ``wedge`` keeps (its sampled directions, and the tilt axis ``kz = kx = 0`` or
    ``kz = ky = 0``)."""
    nz, ny, nx = shape
    kz = np.fft.fftfreq(nz)[:, None, None]
    kt = np.fft.rfftfreq(nx)[None, None, :] if wedge.axis == "y" else np.fft.fftfreq(ny)[None, :, None]
    kz, kt = np.broadcast_arrays(kz, kt)
    a = _angles(kz, kt)
    keep = (a <= wedge.lo) | (a >= 180.0 - wedge.hi) | ((kz == 0) & (kt == 0))
    return np.broadcast_to(keep, (nz, ny, nx // 2 + 1)).copy()


@lru_cache(maxsize=16)
def _mask(shape: tuple[int, int, int], wedge: Wedge) -> np.ndarray:
    return wedge_mask(shape, wedge)


def apply_wedge(boxes: np.ndarray, wedge: Wedge, pad: int = 0) -> np.ndarray:
    """``boxes (..., nz, ny, nx)`` with the directions outside ``wedge`` removed (zero-padded by at least
    ``pad`` voxels on each side first, to a fast FFT length, so the streaks do not wrap around; the
    output has the input's shape, float32)."""
    from scipy import fft

    b = np.asarray(boxes, np.float32)
    shape_in = b.shape[-3:]
    if pad:
        size = [fft.next_fast_len(n + 2 * pad, real=True) for n in shape_in]
        b = np.pad(b, [(0, 0)] * (b.ndim - 3) + [(pad, s - n - pad) for n, s in zip(shape_in, size, strict=True)])
    shape = b.shape[-3:]
    m = _mask(tuple(shape), wedge)
    axes = (-3, -2, -1)
    out = fft.irfftn(fft.rfftn(b, axes=axes, workers=-1) * m, s=shape, axes=axes, workers=-1).astype(np.float32)
    if pad:
        out = out[..., pad:pad + shape_in[0], pad:pad + shape_in[1], pad:pad + shape_in[2]]
    return out


__all__ = ["Wedge", "angular_profile", "estimate_wedge", "wedge_mask", "apply_wedge", "BAND_ANGSTROM",
           "MIN_CONTRAST"]
