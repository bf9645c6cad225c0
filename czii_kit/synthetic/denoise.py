"""The ``denoised`` tomogram: what a trained denoiser (cryoCARE / Noise2Noise style) makes of the WBP.

The Kaggle ``denoised`` tomograms are smooth: the shot noise is mostly gone (also outside the ice
slab), particles are compact dark blobs with the reconstruction's CTF fringes and missing-wedge
elongation, and a faint mottle of residual noise remains. A learned denoiser estimates the
noise-free reconstruction; since the simulator knows it, :func:`denoised_tomogram` reconstructs the
tilt series with only a fraction ``residual_noise`` of its noise, then low-passes it. Everything is
done at bin 2 (the low-pass removes what bin 2 cannot hold) and interpolated back to full size.
:func:`denoise` is the plain Gaussian low-pass for an existing reconstruction.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from czii_kit.synthetic.reconstruct import backproject, ramp_filter


def denoise(volume: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """3D Gaussian low-pass of a ``[z, y, x]`` reconstruction (``sigma`` in voxels), float32."""
    v = np.asarray(volume, dtype=np.float32)
    if sigma <= 0:
        return v.copy()
    return ndimage.gaussian_filter(v, sigma, mode="reflect", truncate=3.0, output=np.float32)


def bin2_images(images: np.ndarray) -> np.ndarray:
    """Mean-bin a tilt stack ``(n_tilts, ny, n_det)`` by 2 along ``y`` and the detector axis (odd edges padded)."""
    n_t, ny, nu = images.shape
    a = np.asarray(images, np.float32)
    if ny % 2:
        a = np.concatenate([a, a[:, -1:]], axis=1)
    if nu % 2:
        a = np.concatenate([a, a[:, :, -1:]], axis=2)
    return a.reshape(n_t, a.shape[1] // 2, 2, a.shape[2] // 2, 2).mean(axis=(2, 4), dtype=np.float32)


def _double(a: np.ndarray, axis: int) -> np.ndarray:
    """Linear upsampling by exactly 2 along ``axis`` (new samples at old positions -1/4 and +1/4), C-contiguous."""
    nb = a.shape[axis]
    out = np.empty((*a.shape[: axis + 1], 2, *a.shape[axis + 1 :]), np.float32)
    pre = (slice(None),) * axis

    def sl(i):  # a slice along `axis`
        return (*pre, i)

    for half, (dst_rng, src_rng, edge_dst, edge_src) in enumerate(
        [((slice(1, None)), slice(None, -1), 0, 0), ((slice(None, -1)), slice(1, None), -1, -1)]
    ):
        dst = out[(*pre, slice(None), half)]
        np.multiply(a, np.float32(0.75), out=dst)
        dst[sl(dst_rng)] += np.float32(0.25) * a[sl(src_rng)]
        dst[sl(edge_dst)] += np.float32(0.25) * a[sl(edge_src)]
    return out.reshape(*a.shape[:axis], 2 * nb, *a.shape[axis + 1 :])


def upsample2(volume_b: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear interpolation of a bin-2 volume back to ``shape`` (both centred on the same point)."""
    out = np.asarray(volume_b, np.float32)
    for axis, n in enumerate(shape):
        nb = out.shape[axis]
        if n == 2 * nb and nb >= 2:
            out = _double(out, axis)
            continue
        pos = (np.arange(n) - (n - 1) / 2.0) / 2.0 + (nb - 1) / 2.0
        pos = np.clip(pos, 0, nb - 1)
        i0 = np.minimum(np.floor(pos).astype(np.int64), max(nb - 2, 0))
        w = (pos - i0).astype(np.float32)
        i1 = np.minimum(i0 + 1, nb - 1)
        wshape = [1, 1, 1]
        wshape[axis] = n
        w = w.reshape(wshape)
        a0 = np.take(out, i0, axis=axis)
        a0 *= 1 - w
        a0 += np.take(out, i1, axis=axis) * w
        out = a0
    return out


def denoised_tomogram(
    clean: np.ndarray,
    noise: np.ndarray,
    angles_deg,
    shape: tuple[int, int, int],
    sigma: float = 1.5,
    residual_noise: float = 0.3,
    workers: int = 1,
) -> np.ndarray:
    """The denoised tomogram of a tilt series whose images are ``clean + noise``.

    Parameters
    ----------
    clean, noise : ndarray ``(n_tilts, ny, n_det)``
        Noise-free image contrast and the noise (from ``form_images(..., split_noise=True)``).
    angles_deg : sequence of float
        Reconstruction tilt angles.
    shape : (nz, ny, nx)
        Output shape.
    sigma : float
        Gaussian low-pass, voxels of the full-size grid.
    residual_noise : float
        Fraction of the noise amplitude left by the denoiser (0 = perfect denoiser).

    Returns
    -------
    ndarray ``shape`` float32 (arbitrary units, like the WBP).
    """
    nz, ny, nx = shape
    imgs = bin2_images(clean + np.float32(residual_noise) * noise)
    shape_b = ((nz + 1) // 2, (ny + 1) // 2, (nx + 1) // 2)
    rec_b = backproject(ramp_filter(imgs, angles_deg, workers=workers), angles_deg, shape_b, workers=workers)
    rec_b = denoise(rec_b, sigma / 2.0)
    return upsample2(rec_b, shape)
