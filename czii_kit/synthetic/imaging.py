"""Image formation: tilt-series projection about y, CTF, exposure, detector noise.

Geometry
--------
Volumes are ``[z, y, x]``; the tilt axis is ``y`` through the volume centre; the beam is along ``z``
at 0°. At tilt ``θ`` the voxel ``(x, z)`` (relative to the centre) lands on detector column
``u = x cos θ + z sin θ``. Projection shears each ``x``-``z`` plane: the plane at height ``z`` is
shifted along ``x`` by ``z tan θ`` (linear interpolation, vectorised over ``y``) and summed, then the
sheared axis ``x' = u / cos θ`` is resampled onto the detector grid and multiplied by the path length
``1 / cos θ``. The detector has as many columns as the volume is wide, so at high tilt the edges of
the volume leave the field of view, as in a real tilt series.

Image formation follows the weak-phase approximation: the projected potential (V·Å, relative to ice)
times the interaction constant gives the phase ``φ``; the image is ``exp(2 F⁻¹[Φ · CTF · E])``
(``≈ 1 + 2 F⁻¹[...]`` for proteins; the exponential keeps gold dark rather than negative) with
``CTF = -(√(1-A²) sin χ + A cos χ)``, ``χ = π λ Δf k² - π/2 Cs λ³ k⁴`` (``Δf > 0`` underfocus), so
protein is dark. ``E`` is the envelope: a B-factor, the exposure (radiation damage) filter of
Grant & Grigorieff for the dose received before each tilt (dose-symmetric order), the 10 Å pixel's
box MTF, and a random residual alignment shift. Counts are Poisson-like (Gaussian with variance =
counts) for ``dose x DQE`` electrons per pixel, attenuated by inelastic scattering in an ice slab of
varying thickness (``exp(-t / (λ_in cos θ))``); each image is normalised by its mean, as in
reconstruction software. The images keep their CTF; :func:`phase_flip` is the correction that
reconstruction software may apply before back-projection (``RunParams.ctf_correction``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.fft as sfft

from czii_kit.coords import voxel_to_angstrom
from czii_kit.synthetic.params import RunParams


def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    v = voltage_kv * 1e3
    return 12.2643 / np.sqrt(v * (1.0 + 0.978466e-6 * v))


def interaction_constant(voltage_kv: float) -> float:
    """σ in rad / (V·Å): phase shift per volt of potential per Å of path (6.53e-4 at 300 kV)."""
    lam = electron_wavelength(voltage_kv)
    mc2 = 510.99895  # keV
    return float(2 * np.pi / (lam * voltage_kv * 1e3) * (mc2 + voltage_kv) / (2 * mc2 + voltage_kv))


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, max(1, min(parts, n)) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _run_chunks(fn, n: int, workers: int) -> None:
    parts = _chunks(n, workers)
    if len(parts) == 1:
        fn(*parts[0])
        return
    with ThreadPoolExecutor(len(parts)) as ex:
        for f in [ex.submit(fn, a, b) for a, b in parts]:
            f.result()


def shear_pad(nz: int, angles_deg) -> int:
    """Margin (columns) the sheared axis needs on each side for these tilts."""
    t = np.max(np.abs(np.tan(np.deg2rad(np.asarray(angles_deg, float))))) if len(angles_deg) else 0.0
    return int(np.ceil((nz - 1) / 2 * t)) + 2


def _detector_to_sheared(n_det: int, nx: int, pad: int, cos_t: float) -> tuple[np.ndarray, np.ndarray]:
    """For each detector column: index (floor) into the sheared axis, and the interpolation weight."""
    u = np.arange(n_det) - (n_det - 1) / 2.0
    j = u / cos_t + (nx - 1) / 2.0 + pad
    j0 = np.floor(j).astype(np.int64)
    w = (j - j0).astype(np.float32)
    return j0, w


def project(
    volume: np.ndarray,
    angles_deg,
    n_det: int | None = None,
    z_range: tuple[int, int] | None = None,
    workers: int = 1,
    progress=None,
) -> np.ndarray:
    """Line integrals of ``volume`` along the beam for each tilt about ``y``.

    Parameters
    ----------
    volume : ndarray ``(nz, ny, nx)`` float32
    angles_deg : sequence of float
        Tilt angles (degrees).
    n_det : int, optional
        Detector columns (default ``nx``); the detector is centred on the tilt axis.
    z_range : (z0, z1), optional
        Only planes ``z0 <= z < z1`` hold density (others are skipped).
    workers : int
        Threads (the work is split along ``y``).

    Returns
    -------
    ndarray ``(n_tilts, ny, n_det)`` float32
        Path integrals in voxel lengths (multiply by the voxel size for Å).
    """
    vol = np.asarray(volume, dtype=np.float32)
    nz, ny, nx = vol.shape
    n_det = nx if n_det is None else int(n_det)
    z0, z1 = (0, nz) if z_range is None else (max(0, int(z_range[0])), min(nz, int(z_range[1])))
    angles = np.asarray(angles_deg, dtype=np.float64)
    out = np.zeros((len(angles), ny, n_det), dtype=np.float32)
    zc = (nz - 1) / 2.0

    for k, a in enumerate(angles):
        t, c = np.tan(np.deg2rad(a)), np.cos(np.deg2rad(a))
        pad = shear_pad(nz, [a])
        width = nx + 2 * pad + 2
        j0, w = _detector_to_sheared(n_det, nx, pad, c)
        valid = (j0 >= 0) & (j0 + 1 < width)
        j0c = np.clip(j0, 0, width - 2)

        def work(y0, y1, t=t, c=c, pad=pad, width=width, j0c=j0c, w=w, valid=valid, k=k):
            acc = np.zeros((y1 - y0, width), np.float32)
            accf = np.zeros((y1 - y0, width), np.float32)
            tmp = np.empty((y1 - y0, nx), np.float32)
            for z in range(z0, z1):
                s = (z - zc) * t + pad
                i = int(np.floor(s))
                f = np.float32(s - i)
                plane = vol[z, y0:y1]
                acc[:, i : i + nx] += plane
                if f:
                    np.multiply(plane, f, out=tmp)
                    accf[:, i : i + nx] += tmp
            acc -= accf
            acc[:, 1:] += accf[:, :-1]
            res = acc[:, j0c] * (1.0 - w) + acc[:, j0c + 1] * w
            res[:, ~valid] = 0.0
            out[k, y0:y1] = res / np.float32(c)

        _run_chunks(work, ny, workers)
        if progress is not None:
            progress.update(1)
    return out


def reconstruction_frame(points_xyz, rotation_deg: float, shape, voxel_size: float) -> np.ndarray:
    """Where specimen points appear in a tomogram reconstructed with tilt angles that are off.

    A tilt series recorded at ``θ + δ`` and back-projected at the nominal ``θ`` (see the module's
    geometry) gives the specimen turned by ``δ`` about the tilt axis ``y`` through the volume centre:
    ``x' = x cos δ + z sin δ``, ``z' = -x sin δ + z cos δ`` (relative to the centre). Annotations of a
    tomogram live in this frame, so the simulator's ground truth is written in it.

    Parameters
    ----------
    points_xyz : array ``(N, 3)``
        ``(x, y, z)`` in Å, voxel ``i`` centred at ``i * voxel_size``.
    rotation_deg : float
        ``δ``: mean of (recorded - nominal) tilt angle, degrees.
    shape : (nz, ny, nx)
        The tomogram's shape (voxels).
    voxel_size : float
        Å per voxel.

    Returns
    -------
    ndarray ``(N, 3)`` float64, ``(x, y, z)`` Å.
    """
    p = np.array(points_xyz, dtype=np.float64).reshape(-1, 3)
    nz, _, nx = (int(n) for n in shape)
    d = np.deg2rad(float(rotation_deg))
    cx, _, cz = voxel_to_angstrom([((nz - 1) / 2.0, 0.0, (nx - 1) / 2.0)], voxel_size)[0]  # tilt axis
    x, z = p[:, 0] - cx, p[:, 2] - cz
    p[:, 0] = x * np.cos(d) + z * np.sin(d) + cx
    p[:, 2] = -x * np.sin(d) + z * np.cos(d) + cz
    return p


GOLD_POTENTIAL = 22.0
"""Mean inner potential of gold minus that of ice, V."""
GOLD_ABSORPTION_LENGTH = 150.0
"""Å of gold that scatter ``1 - 1/e`` of the electrons out of the objective aperture (amplitude contrast)."""


def project_spheres(spheres: np.ndarray, angles_deg, shape: tuple[int, int, int], n_det: int | None = None,
                    supersample: int = 3) -> np.ndarray:
    """Chord lengths (voxels) through solid spheres for each tilt, on the detector of :func:`project`.

    Parameters
    ----------
    spheres : ndarray ``(n, 4)``
        ``(z, y, x, radius)`` in voxels of a volume of ``shape``.
    angles_deg : sequence of float
    shape : (nz, ny, nx)
    supersample : int
        Sub-pixel samples per axis (anti-aliasing of the sphere edge).

    Returns
    -------
    ndarray ``(n_tilts, ny, n_det)`` float32
    """
    nz, ny, nx = shape
    n_det = nx if n_det is None else int(n_det)
    angles = np.asarray(angles_deg, float)
    out = np.zeros((len(angles), ny, n_det), np.float32)
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    for k, a in enumerate(np.deg2rad(angles)):
        for z, y, x, r in np.asarray(spheres, float).reshape(-1, 4):
            u = (x - (nx - 1) / 2) * np.cos(a) + (z - (nz - 1) / 2) * np.sin(a) + (n_det - 1) / 2
            h = int(np.ceil(r)) + 1
            ys = np.arange(max(0, int(y) - h), min(ny, int(y) + h + 2))
            us = np.arange(max(0, int(u) - h), min(n_det, int(u) + h + 2))
            if not len(ys) or not len(us):
                continue
            dy = ys[:, None, None, None] + sub[None, None, :, None] - y
            du = us[None, :, None, None] + sub[None, None, None, :] - u
            chord = 2 * np.sqrt(np.clip(r * r - dy * dy - du * du, 0, None))
            out[k, ys[0] : ys[-1] + 1, us[0] : us[-1] + 1] += chord.mean(axis=(2, 3)).astype(np.float32)
    return out


def dose_symmetric_order(angles_deg) -> np.ndarray:
    """Acquisition order of the tilts (indices): 0° first, then alternating sides in pairs (Hagen scheme)."""
    a = np.asarray(angles_deg, float)
    start = int(np.argmin(np.abs(a)))
    order = [start]
    pos = [i for i in np.argsort(a) if a[i] > a[start]]
    neg = [i for i in np.argsort(-a) if a[i] < a[start]]
    side = 0
    while pos or neg:
        src = (pos, neg)[side] if (pos, neg)[side] else (neg, pos)[side]
        order.extend(src[:2])
        del src[:2]
        side ^= 1
    return np.asarray(order, dtype=np.int64)


def critical_exposure(k: np.ndarray) -> np.ndarray:
    """Critical exposure (e/Å²) at spatial frequency ``k`` (1/Å), Grant & Grigorieff 2015, 300 kV."""
    kk = np.maximum(k, 1e-4)
    return 0.245 * kk ** (-1.665) + 2.81


def ctf_1d2d(
    ky: np.ndarray,
    kx: np.ndarray,
    defocus_a: float,
    astig_a: float,
    astig_angle: float,
    wavelength: float,
    cs_a: float,
    amp: float,
) -> np.ndarray:
    """The CTF on a grid of frequencies ``ky[:, None]``, ``kx[None, :]`` (1/Å); defocus in Å, underfocus > 0."""
    k2 = ky[:, None] ** 2 + kx[None, :] ** 2
    phi = np.arctan2(ky[:, None], kx[None, :])
    df = defocus_a + 0.5 * astig_a * np.cos(2 * (phi - np.deg2rad(astig_angle)))
    chi = np.pi * wavelength * df * k2 - 0.5 * np.pi * cs_a * wavelength**3 * k2**2
    return -(np.sqrt(1 - amp**2) * np.sin(chi) + amp * np.cos(chi))


_PAD = 16
"""Pixels of zero padding around each tilt image before its FFT (both axes)."""


def _padded_grid(ny: int, n_det: int, px: float):
    """``(fy, fu, ky, kx)``: the padded FFT shape of a ``(ny, n_det)`` image and its frequencies (1/Å)."""
    fy, fu = sfft.next_fast_len(ny + 2 * _PAD), sfft.next_fast_len(n_det + 2 * _PAD, real=True)
    return fy, fu, sfft.fftfreq(fy, d=px).astype(np.float64), sfft.rfftfreq(fu, d=px).astype(np.float64)


def _strip_ctfs(params: RunParams, angle_deg: float, ky: np.ndarray, kx: np.ndarray, n_det: int, n_strips: int):
    """``(CTF (len(ky), len(kx)), weights (n_det,))`` of each strip across the tilt axis of one tilt image.

    The specimen height at detector column ``u`` is ``u * px * sin(angle)``, so the defocus varies
    across the tilt axis; each strip has its own, blended with linear (hat) weights that sum to one.
    """
    a = np.deg2rad(angle_deg)
    u = np.arange(n_det) - (n_det - 1) / 2.0
    strips = max(1, n_strips if abs(angle_deg) > 1e-6 else 1)
    if strips == 1:
        found = [(params.defocus * 1e4, np.ones(n_det))]
    else:
        centres = np.linspace(u[0], u[-1], strips + 2)[1:-1]
        found = []
        for s in range(strips):
            e = np.zeros(strips)
            e[s] = 1.0
            found.append((params.defocus * 1e4 + centres[s] * params.voxel_size * np.sin(a), np.interp(u, centres, e)))
    lam = electron_wavelength(params.voltage_kv)
    return [(ctf_1d2d(ky, kx, df, params.astigmatism * 1e4, params.astigmatism_angle, lam, params.cs_mm * 1e7,
                      params.amplitude_contrast), w) for df, w in found]


def phase_flip(images: np.ndarray, angles_deg, params: RunParams, n_strips: int = 3, workers: int = 1) -> np.ndarray:
    """CTF correction by phase flipping, as reconstruction software does before back-projection.

    Each tilt image's spectrum is multiplied by ``-sign(CTF)`` of its defocus strips (the nominal
    angles, the run's defocus and astigmatism, the same strips as :func:`form_images`), so every
    frequency band gets the sign of the CTF's first lobe: protein stays dark and the bands beyond
    the CTF's zeros no longer cancel the first. Amplitudes are not restored (no Wiener filter).

    Parameters
    ----------
    images : ndarray ``(n_tilts, ny, n_det)``
        Mean-normalised image contrast (or its noise part: the operation is linear).
    angles_deg : sequence of float
        The tilt of each image (degrees), as the reconstruction knows them.
    params : RunParams
        Defocus (µm), astigmatism, Cs, amplitude contrast, voltage, voxel size (Å).

    Returns
    -------
    ndarray ``(n_tilts, ny, n_det)`` float32
    """
    n_t, ny, n_det = images.shape
    angles = np.asarray(angles_deg, float)
    if len(angles) != n_t:
        raise ValueError(f"{n_t} images but {len(angles)} tilt angles")
    fy, fu, ky, kx = _padded_grid(ny, n_det, params.voxel_size)
    inner = (slice(_PAD, _PAD + ny), slice(_PAD, _PAD + n_det))
    out = np.empty((n_t, ny, n_det), np.float32)

    def one(k: int) -> None:
        buf = np.zeros((fy, fu), np.float32)
        buf[inner] = images[k]
        spec = sfft.rfft2(buf)
        acc = np.zeros((ny, n_det), np.float64)
        for ctf, w in _strip_ctfs(params, angles[k], ky, kx, n_det, n_strips):
            flip = -np.sign(ctf)
            flip[flip == 0] = 1.0
            acc += sfft.irfft2(spec * flip, s=(fy, fu))[inner] * w[None, :]
        out[k] = acc.astype(np.float32)

    _map_indices(one, n_t, workers)
    return out


def _map_indices(fn, n: int, workers: int) -> None:
    if workers > 1:
        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(fn, range(n)))
    else:
        for k in range(n):
            fn(k)


def form_images(
    proj: np.ndarray,
    angles_deg,
    params: RunParams,
    rng: np.random.Generator,
    thickness_a: np.ndarray | None = None,
    workers: int = 1,
    n_strips: int = 3,
    split_noise: bool = False,
    absorption: np.ndarray | None = None,
    progress=None,
):
    """Turn projected potentials into noisy, CTF-modulated, mean-normalised tilt images.

    Parameters
    ----------
    proj : ndarray ``(n_tilts, ny, n_det)``
        Projected potential in V·Å relative to ice.
    angles_deg : sequence of float
        The tilt of each image (degrees).
    params : RunParams
        Optics, dose, DQE, B-factor, alignment error, inelastic mean free path.
    rng : numpy Generator
        For noise and alignment errors.
    thickness_a : ndarray ``(ny, nx)``, optional
        Ice thickness in Å along z at each ``(y, x)`` (for inelastic attenuation); default uniform.
    n_strips : int
        Strips across the tilt axis with their own defocus (the defocus gradient of a tilted specimen).
    split_noise : bool
        Return the noise-free images and the noise separately (their sum is the noisy image).
    absorption : ndarray ``(n_tilts, ny, n_det)``, optional
        Path length in Å through strong scatterers (gold); the intensity is multiplied by
        ``exp(-absorption / GOLD_ABSORPTION_LENGTH)`` (electrons scattered out of the aperture).

    Returns
    -------
    ndarray ``(n_tilts, ny, n_det)`` float32, or a pair of them with ``split_noise``
        Image contrast ``I / mean(I) - 1`` with noise; protein is negative (dark).
    """
    n_t, ny, n_det = proj.shape
    px = params.voxel_size
    sigma = interaction_constant(params.voltage_kv)
    angles = np.asarray(angles_deg, float)
    fy, fu, ky, kx = _padded_grid(ny, n_det, px)
    inner = (slice(_PAD, _PAD + ny), slice(_PAD, _PAD + n_det))
    kk = np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    env = np.exp(-params.bfactor * kk**2 / 4.0) * np.sinc(ky[:, None] * px) * np.sinc(kx[None, :] * px)
    ne = critical_exposure(kk)
    dose_tilt = params.dose / n_t
    order = dose_symmetric_order(angles)
    prior = np.empty(n_t)
    prior[order] = np.arange(n_t) * dose_tilt
    counts0 = dose_tilt * px * px * params.dqe  # electrons per pixel at zero thickness
    out = np.empty((n_t, ny, n_det), np.float32)
    noise_out = np.empty((n_t, ny, n_det), np.float32)
    shifts = rng.normal(0.0, params.align_sigma, size=(n_t, 2))
    noise_seeds = rng.integers(0, 2**63 - 1, size=n_t)
    if thickness_a is None:
        thickness_a = np.zeros((ny, n_det))
    nx_vol = thickness_a.shape[1]

    def one(k: int) -> None:
        a = np.deg2rad(angles[k])
        c = np.cos(a)
        buf = np.zeros((fy, fu), np.float32)
        buf[inner] = proj[k] * np.float32(sigma)
        spec = sfft.rfft2(buf)
        dy, du = shifts[k]
        phase = np.exp(-2j * np.pi * (ky[:, None] * dy * px + kx[None, :] * du * px))
        base = spec * (env * np.exp(-prior[k] / (2 * ne)) * phase)
        u = np.arange(n_det) - (n_det - 1) / 2.0
        img = np.zeros((ny, n_det), np.float64)
        for ctf, w in _strip_ctfs(params, angles[k], ky, kx, n_det, n_strips):
            img += sfft.irfft2(base * ctf, s=(fy, fu))[inner] * w[None, :]
        # 1 + 2x for weak objects; the exponential keeps strong scatterers (gold) dark instead of clipping
        intensity = np.exp(np.clip(2.0 * img, -6.0, 3.0))
        if absorption is not None:
            intensity *= np.exp(-absorption[k] / GOLD_ABSORPTION_LENGTH)
        # inelastic attenuation by the ice along the tilted path (thickness at the column's x)
        xcol = np.clip(np.rint(u / max(c, 1e-3) + (nx_vol - 1) / 2.0), 0, nx_vol - 1).astype(int)
        path = thickness_a[:, xcol] / max(c, 1e-3)
        mean_counts = counts0 * np.exp(-path / params.ice_mfp)
        n = intensity * mean_counts
        g = np.random.default_rng(int(noise_seeds[k]))
        noise = np.sqrt(n) * g.standard_normal(n.shape, dtype=np.float32)
        norm = float((n + noise).mean())
        out[k] = (n / norm - 1.0).astype(np.float32)
        noise_out[k] = (noise / norm).astype(np.float32)
        if progress is not None:
            progress.update(1)

    _map_indices(one, n_t, workers)
    return (out, noise_out) if split_noise else out + noise_out
