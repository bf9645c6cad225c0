"""Weighted back-projection (WBP) of a tilt series about ``y``.

Each image is ramp-filtered along the detector axis (``|k|`` times the angular step, with a Gaussian
roll-off near Nyquist as in IMOD's radial filter), then smeared back through the volume along its
beam direction: the mirror of :func:`czii_kit.synthetic.imaging.project` (resample the detector onto
the sheared axis ``x' = u / cos θ``, then shift each ``z``-plane by ``z tan θ`` with linear
interpolation). With a limited tilt range this gives the missing wedge and the elongation along ``z``
of real tomograms.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.fft as sfft

from czii_kit.synthetic.imaging import _chunks, shear_pad


def ramp_filter(
    images: np.ndarray,
    angles_deg,
    cutoff: float = 0.35,
    falloff: float = 0.05,
    workers: int = 1,
) -> np.ndarray:
    """Ramp-filter each image along its last axis (the detector axis perpendicular to the tilt axis).

    Parameters
    ----------
    images : ndarray ``(n_tilts, ny, n_det)``
    angles_deg : sequence of float
        Used for the angular weight (the spacing around each tilt, in radians).
    cutoff, falloff : float
        Gaussian roll-off beyond ``cutoff`` cycles/pixel with this width (IMOD ``-RADIAL`` style).

    Returns
    -------
    ndarray, same shape, float32
    """
    n_t, ny, n = images.shape
    a = np.deg2rad(np.sort(np.asarray(angles_deg, float)))
    order = np.argsort(np.asarray(angles_deg, float))
    if n_t > 1:
        gaps = np.diff(a)
        w_sorted = np.empty(n_t)
        w_sorted[1:-1] = (gaps[:-1] + gaps[1:]) / 2
        w_sorted[0], w_sorted[-1] = gaps[0], gaps[-1]
    else:
        w_sorted = np.array([np.pi])
    dtheta = np.empty(n_t)
    dtheta[order] = w_sorted
    nf = sfft.next_fast_len(2 * n, real=True)
    k = sfft.rfftfreq(nf)
    ramp = np.abs(k)
    ramp[0] = 0.25 / nf  # the DC weight of a discrete ramp filter
    ramp *= np.where(k > cutoff, np.exp(-((k - cutoff) ** 2) / (2 * falloff**2)), 1.0)
    out = np.empty_like(images, dtype=np.float32)
    for t in range(n_t):
        spec = sfft.rfft(images[t], n=nf, axis=-1, workers=workers)
        spec *= (ramp * dtheta[t] * 2.0).astype(np.float32)
        out[t] = sfft.irfft(spec, n=nf, axis=-1, workers=workers)[:, :n]
    return out


def backproject(
    filtered: np.ndarray,
    angles_deg,
    shape: tuple[int, int, int],
    workers: int = 1,
    progress=None,
) -> np.ndarray:
    """Back-project filtered images into a ``(nz, ny, nx)`` volume (float32).

    Parameters
    ----------
    filtered : ndarray ``(n_tilts, ny, n_det)``
        Ramp-filtered images (:func:`ramp_filter`).
    angles_deg : sequence of float
        Tilt angles assumed for reconstruction.
    shape : (nz, ny, nx)
    workers : int
        Threads (the volume is split along ``y``).
    """
    nz, ny, nx = (int(s) for s in shape)
    n_t, ny_i, n_det = filtered.shape
    if ny_i != ny:
        raise ValueError(f"images have {ny_i} rows but the volume has ny={ny}")
    vol = np.zeros((nz, ny, nx), np.float32)
    zc = (nz - 1) / 2.0
    angles = np.asarray(angles_deg, float)
    geo = []
    for a in angles:
        t, c = np.tan(np.deg2rad(a)), np.cos(np.deg2rad(a))
        pad = shear_pad(nz, [a])
        width = nx + 2 * pad + 2
        # sheared column j sits at detector column u = (j - pad - xc) * cos(a) + (n_det - 1) / 2
        j = np.arange(width)
        kcol = (j - pad - (nx - 1) / 2.0) * c + (n_det - 1) / 2.0
        k0 = np.floor(kcol).astype(np.int64)
        w = (kcol - k0).astype(np.float32)
        valid = (k0 >= 0) & (k0 + 1 < n_det)
        geo.append((t, pad, width, np.clip(k0, 0, n_det - 2), w, valid))

    def work(y0: int, y1: int) -> None:
        tmp = np.empty((y1 - y0, nx), np.float32)
        for ti, (t, pad, _width, k0, w, valid) in enumerate(geo):
            p = filtered[ti, y0:y1]
            q = p[:, k0] * (1.0 - w) + p[:, k0 + 1] * w
            q[:, ~valid] = 0.0
            dq = np.diff(q, axis=1)
            for z in range(nz):
                s = (z - zc) * t + pad
                i = int(np.floor(s))
                f = np.float32(s - i)
                dst = vol[z, y0:y1]
                dst += q[:, i : i + nx]
                if f:
                    np.multiply(dq[:, i : i + nx], f, out=tmp)
                    dst += tmp
            if progress is not None and y0 == 0:
                progress.update(1)

    parts = _chunks(ny, workers)
    if len(parts) == 1:
        work(*parts[0])
    else:
        with ThreadPoolExecutor(len(parts)) as ex:
            for fut in [ex.submit(work, a, b) for a, b in parts]:
                fut.result()
    return vol


def wbp(images: np.ndarray, angles_deg, shape: tuple[int, int, int], workers: int = 1, progress=None) -> np.ndarray:
    """Weighted back-projection: :func:`ramp_filter` then :func:`backproject`."""
    return backproject(ramp_filter(images, angles_deg, workers=workers), angles_deg, shape, workers, progress)

