"""The specimen: particle density models, random placement in an ice slab, and distractors.

The phantom is a ``[z, y, x]`` float32 volume of electrostatic potential in volts *relative to
vitreous ice* (ice = 0): proteins are positive (``protein_dv`` x the local protein volume fraction),
lipid head groups positive, lipid tails slightly negative. Gold beads are listed apart and projected
analytically (strong phase shift and absorption).

Particle models come from real density maps (the polnet maps shipped with czii_kit, or a folder of
MRC maps; :func:`load_maps`) or from built-in procedural approximations
(:func:`procedural_models`): hollow shells for apo-ferritin and the virus-like particle, a two-lobed
ribosome, an elongated thyroglobulin dimer, a four-lobed beta-galactosidase, a small beta-amylase.
Each copy gets a uniformly random 3D orientation (random unit quaternion) and is resampled onto the
tomogram grid (trilinear ``affine_transform``), so maps at any voxel size are rescaled on the fly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from czii_kit.catalog import PARTICLE_NAMES, get_particle
from czii_kit.coords import angstrom_to_voxel, voxel_to_angstrom
from czii_kit.maps import (  # noqa: F401 (re-exported)
    DISTRACTOR,
    SHIPPED,
    ParticleModel,
    finish_model,
    load_map_model,
    load_models,
    map_file,
    maps_option,
    read_map,
)
from czii_kit.rotations import random_rotations  # noqa: F401 (re-exported)
from czii_kit.synthetic.denoise import upsample2
from czii_kit.synthetic.params import RunParams


# ------------------------------------------------------------------------------------------------ models
def load_maps(maps_dir: str | Path = SHIPPED, distractor: bool = True) -> dict[str, ParticleModel]:
    """Load the six particle maps and the distractor map: the shipped ones, or a folder's MRC files.

    Parameters
    ----------
    maps_dir : path-like or "shipped"
        :data:`~czii_kit.maps.SHIPPED` (default: the maps in ``czii_kit/assets``), or a folder with
        ``8cpv.mrc``, ``1fa2.mrc``, ... (file names from :mod:`czii_kit.catalog`).
    distractor : bool
        Also load ``8vaf.mrc`` as :data:`DISTRACTOR` (from a folder without it: a procedural one).

    Raises
    ------
    DataError
        The folder or a particle's map is missing or unreadable (the file is named).
    """
    kind = maps_option(maps_dir)
    models = load_models(kind, PARTICLE_NAMES)
    if distractor:
        if kind == SHIPPED or (Path(kind) / map_file(DISTRACTOR)).is_file():
            models.update(load_models(kind, [DISTRACTOR]))
        else:
            models[DISTRACTOR] = procedural_models(10.0)[DISTRACTOR]
    return models


def _smooth_in(d: np.ndarray, width: float) -> np.ndarray:
    """Soft indicator of ``d < 0`` with an edge ``width`` Å wide."""
    return 0.5 * (1.0 - np.tanh(d / width))


def _ellipsoid(p: np.ndarray, centre, axes, rot: np.ndarray | None = None, edge: float = 4.0) -> np.ndarray:
    """Soft ellipsoid on points ``p`` ``(3, ...)`` in Å (``(z, y, x)`` order), semi-axes in Å."""
    q = p - np.asarray(centre, float).reshape(3, *([1] * (p.ndim - 1)))
    if rot is not None:
        q = np.tensordot(rot.T, q, axes=1)
    a = np.asarray(axes, float).reshape(3, *([1] * (p.ndim - 1)))
    r = np.sqrt(((q / a) ** 2).sum(0))
    return _smooth_in((r - 1.0) * float(np.min(axes)), edge)


def _axis_rot(axis: int, deg: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _icosahedron() -> np.ndarray:
    g = (1 + 5**0.5) / 2
    v = []
    for a in (-1, 1):
        for b in (-g, g):
            v += [(0, a, b), (a, b, 0), (b, 0, a)]
    v = np.asarray(v, float)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _bumps(p, rng, n, radius_range, shell_r, amp):
    """``n`` Gaussian bumps on a sphere of radius ``shell_r`` (fixed by ``rng``)."""
    out = np.zeros(p.shape[1:])
    for _ in range(n):
        d = rng.standard_normal(3)
        d /= np.linalg.norm(d)
        r = rng.uniform(*radius_range)
        c = d * shell_r
        q = p - c.reshape(3, 1, 1, 1)
        out += amp * np.exp(-(q**2).sum(0) / (2 * r * r))
    return out


def procedural_models(voxel_size: float = 10.0) -> dict[str, ParticleModel]:
    """Built-in approximations of the six proteins and a small distractor, as volume fractions.

    Shapes (Å): apo-ferritin a shell 38-62; virus-like particle a 108-135 shell with 32 capsomer
    bumps; ribosome a dense large subunit plus an offset small subunit; thyroglobulin two elongated
    lobes side by side; beta-galactosidase four lobes in a D2 arrangement; beta-amylase a small
    ellipsoid with a domain bump. Built at half the voxel size and smoothed, then resampled on use.
    """
    vs = voxel_size / 2.0
    rng = np.random.default_rng(1234)  # fixed: the structure is the same in every run

    def grid(radius_a: float) -> np.ndarray:
        n = int(np.ceil(radius_a / vs)) * 2 + 5
        c = (n - 1) / 2.0
        return (np.indices((n, n, n)) - c) * vs

    def finish(name, dens):
        dens = ndimage.gaussian_filter(np.clip(dens, 0, None).astype(np.float32), 0.8)
        return finish_model(name, dens, vs, "procedural")

    models = {}
    p = grid(75)
    r = np.sqrt((p**2).sum(0))
    shell = _smooth_in(r - 62, 3) * (1 - _smooth_in(r - 38, 3))
    models["apo-ferritin"] = finish("apo-ferritin", shell * (1 + 0.15 * np.cos(4 * np.arctan2(p[1], p[2]))))

    p = grid(150)
    r = np.sqrt((p**2).sum(0))
    shell = 0.8 * _smooth_in(r - 132, 3) * (1 - _smooth_in(r - 108, 3))
    ico = _icosahedron()
    caps = np.zeros_like(r)
    for d in ico:
        q = p - (d * 128).reshape(3, 1, 1, 1)
        caps += 0.6 * np.exp(-(q**2).sum(0) / (2 * 16.0**2))
    faces = []
    for i in range(len(ico)):
        for j in range(i + 1, len(ico)):
            for k in range(j + 1, len(ico)):
                if min(ico[i] @ ico[j], ico[i] @ ico[k], ico[j] @ ico[k]) > 0.4:
                    faces.append(ico[i] + ico[j] + ico[k])
    for f in faces:
        q = p - (f / np.linalg.norm(f) * 128).reshape(3, 1, 1, 1)
        caps += 0.45 * np.exp(-(q**2).sum(0) / (2 * 18.0**2))
    models["virus-like-particle"] = finish("virus-like-particle", shell + caps * _smooth_in(r - 140, 3))

    p = grid(160)
    lsu = 1.2 * _ellipsoid(p, (-25, 0, 0), (95, 110, 118), _axis_rot(0, 15))
    ssu = 1.1 * _ellipsoid(p, (85, 10, -5), (50, 62, 98), _axis_rot(0, -20))
    cleft = _ellipsoid(p, (45, 40, 0), (25, 30, 60))
    dens = np.clip(lsu + ssu - 0.9 * cleft, 0, 1.25) + _bumps(p, rng, 14, (12, 22), 105, 0.5) * (lsu > 0.5)
    models["ribosome"] = finish("ribosome", dens)

    p = grid(130)
    lobe1 = _ellipsoid(p, (0, 0, -36), (35, 32, 95), _axis_rot(1, 8))
    lobe2 = _ellipsoid(p, (0, 0, 36), (35, 32, 95), _axis_rot(1, -8) @ _axis_rot(2, 12))
    dens = np.clip(lobe1 + lobe2, 0, 1) + _bumps(p, rng, 8, (10, 16), 45, 0.4) * ((lobe1 + lobe2) > 0.5)
    models["thyroglobulin"] = finish("thyroglobulin", dens)

    p = grid(100)
    dens = np.zeros(p.shape[1:])
    for sy in (-1, 1):
        for sx in (-1, 1):
            dens += _ellipsoid(p, (8 * sy * sx, 36 * sy, 42 * sx), (30, 32, 38), _axis_rot(0, 20 * sy * sx))
    models["beta-galactosidase"] = finish("beta-galactosidase", np.clip(dens, 0, 1))

    p = grid(70)
    dens = _ellipsoid(p, (0, 0, 0), (26, 32, 40)) + 0.9 * _ellipsoid(p, (10, 24, 30), (16, 18, 20))
    models["beta-amylase"] = finish("beta-amylase", np.clip(dens, 0, 1))

    p = grid(50)
    dens = _ellipsoid(p, (0, 0, 0), (22, 26, 32)) + 0.8 * _ellipsoid(p, (-12, 18, -14), (13, 14, 15))
    models[DISTRACTOR] = finish(DISTRACTOR, np.clip(dens, 0, 1))
    return models


# ------------------------------------------------------------------------------------------------ insert
class _ZExtent:
    def __init__(self, nz: int):
        self.lo, self.hi, self.nz = nz, 0, nz

    def add(self, z0: int, z1: int) -> None:
        self.lo, self.hi = min(self.lo, max(0, z0)), max(self.hi, min(self.nz, z1))

    def range(self) -> tuple[int, int]:
        return (self.lo, self.hi) if self.hi > self.lo else (0, 0)


def _add_box(volume: np.ndarray, box: np.ndarray, origin, extent: _ZExtent | None = None) -> None:
    """Add ``box`` into ``volume`` with its ``[0, 0, 0]`` at integer ``origin`` (clipped at the borders)."""
    o = np.asarray(origin, int)
    lo = np.maximum(o, 0)
    hi = np.minimum(o + box.shape, volume.shape)
    if np.any(hi <= lo):
        return
    b0, b1 = lo - o, hi - o
    volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] += box[b0[0] : b1[0], b0[1] : b1[1], b0[2] : b1[2]]
    if extent is not None:
        extent.add(int(lo[0]), int(hi[0]))


def insert_model(
    volume: np.ndarray,
    model: ParticleModel,
    center_zyx,
    rotation: np.ndarray,
    voxel_size: float,
    scale: float = 1.0,
    extent: _ZExtent | None = None,
) -> None:
    """Add a rotated copy of ``model`` (times ``scale``) to ``volume`` with its centre of mass at ``center_zyx``.

    Parameters
    ----------
    volume : ndarray ``(nz, ny, nx)`` float32, modified in place
    center_zyx : (3,) float
        Fractional voxel index of the particle centre.
    rotation : ndarray (3, 3)
        Rotation acting on ``(z, y, x)`` vectors.
    voxel_size : float
        Å per voxel of ``volume``; the model is resampled from its own voxel size.
    """
    c = np.asarray(center_zyx, float)
    zoom = voxel_size / model.voxel_size  # model voxels per volume voxel
    half = int(np.ceil(model.radius / voxel_size)) + 1
    origin = np.floor(c).astype(int) - half
    shape = (2 * half + 2,) * 3
    mat = rotation.T * zoom
    offset = model.center + mat @ (origin - c)
    box = ndimage.affine_transform(model.density, mat, offset=offset, output_shape=shape, order=1,
                                   mode="constant", cval=0.0, prefilter=False, output=np.float32)
    if scale != 1.0:
        box *= np.float32(scale)
    _add_box(volume, box, origin, extent)


# -------------------------------------------------------------------------------------------------- slab
@dataclass
class Slab:
    """The ice layer: bottom and top surfaces ``z(y, x)`` in voxels (``(ny, nx)`` arrays)."""

    bottom: np.ndarray
    top: np.ndarray

    def thickness_a(self, voxel_size: float) -> np.ndarray:
        """Ice thickness along z in Å, ``(ny, nx)``."""
        return (self.top - self.bottom) * voxel_size

    def z_limits(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        yi = np.clip(np.rint(y), 0, self.bottom.shape[0] - 1).astype(int)
        xi = np.clip(np.rint(x), 0, self.bottom.shape[1] - 1).astype(int)
        return self.bottom[yi, xi], self.top[yi, xi]


def make_slab(params: RunParams, rng: np.random.Generator) -> Slab:
    """Slab surfaces from the run's thickness, centre, tilts and undulation."""
    nz, ny, nx = params.shape
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    plane = (params.slab_center + np.tan(np.deg2rad(params.slab_tilt_x)) * (x - (nx - 1) / 2)
             + np.tan(np.deg2rad(params.slab_tilt_y)) * (y - (ny - 1) / 2))

    def undulation():
        out = np.zeros((ny, nx))
        for _ in range(3):
            kx, ky = rng.uniform(0.5, 2.0, 2) * 2 * np.pi / np.array([nx, ny])
            out += np.cos(kx * x + ky * y + rng.uniform(0, 2 * np.pi))
        return out * params.slab_bump / 3.0

    half = params.slab_thickness / 2.0
    bottom = np.clip(plane - half + undulation(), 0, nz - 1)
    top = np.clip(plane + half + undulation(), 0, nz - 1)
    top = np.maximum(top, bottom + 1)
    return Slab(bottom, top)


# --------------------------------------------------------------------------------------------- membranes
def bilayer_profile(d_a: np.ndarray, voxel_size: float) -> np.ndarray:
    """Lipid bilayer potential (protein-fraction units) at signed distance ``d_a`` Å from the mid-plane.

    Two dense head-group leaflets 40 Å apart and a slightly less-than-ice hydrocarbon core, each
    Gaussian widened by the voxel sampling so the 10 Å grid does not alias the 5 Å features.
    """
    sh = np.sqrt(5.0**2 + (voxel_size / 2.5) ** 2)
    st = np.sqrt(7.0**2 + (voxel_size / 2.5) ** 2)
    head = 0.9 * (5.0 / sh)
    tail = 0.25 * (7.0 / st)
    return (head * (np.exp(-((d_a - 20) ** 2) / (2 * sh * sh)) + np.exp(-((d_a + 20) ** 2) / (2 * sh * sh)))
            - tail * np.exp(-(d_a**2) / (2 * st * st)))


@dataclass
class Membrane:
    """A spherical membrane (vesicle) or a cap of a large sphere (sheet fragment), in voxels."""

    center: np.ndarray  # (z, y, x)
    radius: float
    axis: np.ndarray | None = None  # cap direction (unit, z y x) for a sheet
    cos_max: float = -1.0  # cap half-angle (cosine); -1 = whole sphere

    def distance(self, p: np.ndarray) -> np.ndarray:
        """Distance (voxels) of points ``(N, 3)`` to the membrane; inf outside a cap."""
        v = p - self.center
        r = np.linalg.norm(v, axis=1)
        d = np.abs(r - self.radius)
        if self.axis is not None:
            cosang = (v @ self.axis) / np.maximum(r, 1e-9)
            d = np.where(cosang >= self.cos_max - 0.02, d, np.inf)
        return d


def draw_membrane(volume: np.ndarray, m: Membrane, voxel_size: float, scale: float, extent: _ZExtent,
                  zlim: tuple[float, float]) -> None:
    """Add a membrane's bilayer (times ``scale``) to ``volume``, within ``zlim`` (the slab)."""
    nz, ny, nx = volume.shape
    reach = 5
    if m.axis is None:
        lo = np.floor(m.center - m.radius - reach).astype(int)
        hi = np.ceil(m.center + m.radius + reach).astype(int) + 1
    else:
        # bounding box of the cap: sample its rim and apex
        sin_max = np.sqrt(max(0.0, 1 - m.cos_max**2))
        a = m.axis / np.linalg.norm(m.axis)
        e1 = np.cross(a, [1.0, 0, 0] if abs(a[0]) < 0.9 else [0, 1.0, 0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(a, e1)
        phis = np.linspace(0, 2 * np.pi, 64)
        rim = m.center + m.radius * (m.cos_max * a + sin_max * (np.cos(phis)[:, None] * e1 + np.sin(phis)[:, None] * e2))
        pts = np.vstack([rim, m.center + m.radius * a])
        lo = np.floor(pts.min(0) - reach).astype(int)
        hi = np.ceil(pts.max(0) + reach).astype(int) + 1
    lo[0] = max(lo[0], int(np.floor(zlim[0])))
    hi[0] = min(hi[0], int(np.ceil(zlim[1])) + 1)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, (nz, ny, nx))
    if np.any(hi <= lo):
        return
    z, y, x = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    vz, vy, vx = (z - m.center[0]).astype(np.float32), (y - m.center[1]).astype(np.float32), (x - m.center[2]).astype(np.float32)
    r = np.sqrt(vz * vz + vy * vy + vx * vx)
    dens = bilayer_profile((r - m.radius) * voxel_size, voxel_size).astype(np.float32)
    if m.axis is not None:
        cosang = (vz * m.axis[0] + vy * m.axis[1] + vx * m.axis[2]) / np.maximum(r, 1e-6)
        ang_edge = (cosang - m.cos_max) * m.radius  # ~ voxels inside the rim
        dens *= np.clip(ang_edge / 4.0 + 0.5, 0, 1).astype(np.float32)
    volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] += dens * np.float32(scale)
    extent.add(int(lo[0]), int(hi[0]))


# ------------------------------------------------------------------------------------------- background
def add_background(volume: np.ndarray, slab: Slab, std: float, rng: np.random.Generator,
                   corr_voxels: float = 1.5) -> None:
    """Add a smooth random density texture (solvent, small molecules, ice density) inside the slab.

    A Gaussian random field with correlation length ~``2 * corr_voxels`` voxels (made at bin 2 and
    interpolated back, for speed), standard deviation ``std``, faded out over 2 voxels at the slab
    surfaces. Modifies ``volume`` in place.
    """

    nz, ny, nx = volume.shape
    z0 = max(0, int(np.floor(slab.bottom.min())) - 2)
    z1 = min(nz, int(np.ceil(slab.top.max())) + 3)
    if z1 <= z0 or std <= 0:
        return
    sub_shape = (z1 - z0, ny, nx)
    small = rng.standard_normal(tuple((s + 1) // 2 for s in sub_shape), dtype=np.float32)
    small = ndimage.gaussian_filter(small, corr_voxels, mode="wrap", output=np.float32)
    small *= np.float32(std / (float(small.std()) or 1.0))
    field = upsample2(small, sub_shape)
    bot, top = slab.bottom.astype(np.float32), slab.top.astype(np.float32)
    inside = np.empty((ny, nx), np.float32)
    for k, z in enumerate(range(z0, z1)):
        np.minimum(np.float32(z) - bot, top - np.float32(z), out=inside)
        inside *= np.float32(0.5)
        inside += np.float32(0.5)
        np.clip(inside, 0, 1, out=inside)
        field[k] *= inside
        volume[z] += field[k]


# ---------------------------------------------------------------------------------------------- phantom
@dataclass
class Phantom:
    """The built specimen.

    Attributes
    ----------
    volume : ndarray ``(nz, ny, nx)`` float32
        Potential in volts relative to ice.
    picks : DataFrame
        ``particle_type, x, y, z`` (Å) of the six particle types (no distractors).
    slab : Slab
    z_range : (int, int)
        Planes holding density.
    objects : list of dict
        Every inserted object (type, centre in voxels, radius) including distractors.
    gold : ndarray ``(n, 4)``
        Gold beads ``(z, y, x, radius)`` in voxels; not in ``volume`` (projected analytically).
    """

    volume: np.ndarray
    picks: pd.DataFrame
    slab: Slab
    z_range: tuple[int, int]
    objects: list = field(default_factory=list)
    gold: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))


class _Occupancy:
    """Spheres already placed, for the no-overlap test (all in voxels)."""

    def __init__(self):
        self.c = np.zeros((0, 3))
        self.r = np.zeros(0)
        self.membranes: list[Membrane] = []

    def free(self, p: np.ndarray, r: float, overlap: float = 0.75) -> np.ndarray:
        """Which candidate centres ``(N, 3)`` keep a sphere of radius ``r`` clear of everything placed."""
        ok = np.ones(len(p), bool)
        if len(self.c):
            d = np.sqrt(((p[:, None, :] - self.c[None]) ** 2).sum(-1))
            ok &= (d >= overlap * (self.r[None] + r)).all(1)
        for m in self.membranes:
            ok &= m.distance(p) >= r + 3
        return ok

    def add(self, p, r):
        self.c = np.vstack([self.c, np.asarray(p, float).reshape(1, 3)])
        self.r = np.append(self.r, r)


def _sample_in_slab(rng, slab: Slab, shape, r_vox: float, n: int, surface_bias: float = 0.0) -> np.ndarray:
    """``n`` candidate centres ``(z, y, x)`` inside the slab (at least ``r_vox`` from its surfaces when possible)."""
    nz, ny, nx = shape
    y = rng.uniform(0, ny - 1, n)
    x = rng.uniform(0, nx - 1, n)
    bot, top = slab.z_limits(y, x)
    lo, hi = bot + r_vox, top - r_vox
    mid = (bot + top) / 2
    lo, hi = np.where(lo <= hi, lo, mid), np.where(lo <= hi, hi, mid)
    u = rng.random(n)
    if surface_bias > 0:
        u = np.where(rng.random(n) < surface_bias, np.where(u < 0.5, u * 0.16, 1 - (1 - u) * 0.16), u)
    z = lo + u * (hi - lo)
    return np.stack([z, y, x], 1)


def _cluster_candidate(rng, occ: _Occupancy, slab: Slab, same: list[np.ndarray], r: float,
                       n: int = 24) -> np.ndarray | None:
    """A free centre touching an already placed particle of the same type (chains and aggregates).

    In the real runs most ribosomes and apo-ferritins touch a neighbour of their kind (nearest
    neighbour at 0.7-1.3 diameters); candidates lie 0.85-1.2 diameters from a random anchor.
    """
    anchor = same[int(rng.integers(len(same)))]
    d = rng.standard_normal((n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    cand = anchor + d * (rng.uniform(0.85, 1.2, (n, 1)) * 2 * r)
    ny, nx = slab.bottom.shape
    bot, top = slab.z_limits(cand[:, 1], cand[:, 2])
    inside = ((cand[:, 1] >= 0) & (cand[:, 1] <= ny - 1) & (cand[:, 2] >= 0) & (cand[:, 2] <= nx - 1)
              & (cand[:, 0] >= bot + 0.7 * r) & (cand[:, 0] <= top - 0.7 * r))
    ok = np.flatnonzero(inside & occ.free(cand, r))
    return cand[ok[0]] if len(ok) else None


def _junk_box(rng: np.random.Generator, voxel_size: float) -> tuple[np.ndarray, float]:
    """An irregular aggregate (1-6 fused blobs, 12-35 Å each) as a small volume-fraction box."""
    n = int(rng.integers(1, 7))
    radii = rng.uniform(12, 35, n)
    offs = rng.normal(0, 18, (n, 3))
    offs[0] = 0
    extent = float(np.max(np.linalg.norm(offs, axis=1) + radii)) + 10
    half = int(np.ceil(extent / voxel_size)) + 1
    g = (np.indices((2 * half + 1,) * 3) - half) * voxel_size + rng.uniform(-0.5, 0.5, (3, 1, 1, 1)) * voxel_size
    dens = np.zeros(g.shape[1:])
    for r, o in zip(radii, offs, strict=True):
        d = np.sqrt(((g - o.reshape(3, 1, 1, 1)) ** 2).sum(0)) - r
        dens = np.maximum(dens, _smooth_in(d, 6.0))
    return (dens * rng.uniform(0.6, 1.0)).astype(np.float32), extent


def build_phantom(
    params: RunParams,
    rng: np.random.Generator,
    models: dict[str, ParticleModel],
    picks: pd.DataFrame | None = None,
    progress=None,
) -> Phantom:
    """Place particles, membranes, gold and distractors in the slab and render the potential.

    Parameters
    ----------
    params : RunParams
        Counts, slab geometry, distractor numbers, ``protein_dv``.
    rng : numpy Generator
    models : dict
        Models of the six particle types (and optionally :data:`DISTRACTOR`).
    picks : DataFrame, optional
        ``particle_type, x, y, z`` (Å): place the six types exactly there instead of at random
        (points outside the volume are dropped). The slab is fitted to them.

    Returns
    -------
    Phantom
    """
    nz, ny, nx = params.shape
    vs = params.voxel_size
    vol = np.zeros((nz, ny, nx), np.float32)
    ext = _ZExtent(nz)
    occ = _Occupancy()
    objects: list[dict] = []
    slab = make_slab(params, rng)
    scale = params.protein_dv
    rows: list[tuple[str, np.ndarray]] = []

    # membranes first (they are large), then gold, the six particle types (largest first), distractors
    fixed = None
    if picks is not None and len(picks):
        fixed = picks.copy()
        idx = angstrom_to_voxel(fixed[["x", "y", "z"]].to_numpy(float), vs)
        inside = ((idx >= -0.5) & (idx <= np.array(params.shape) - 0.5)).all(1)
        fixed, idx = fixed[inside], idx[inside]
        for (_, row), p in zip(fixed.iterrows(), idx, strict=True):
            r = get_particle(row["particle_type"]).radius / vs
            occ.add(p, r)
    for _ in range(params.n_vesicles):
        r_max = params.slab_thickness / 2 - 3
        if r_max < 12:
            break
        for _try in range(30):
            radius = float(rng.uniform(12, min(60, r_max)))
            c = _sample_in_slab(rng, slab, params.shape, radius + 2, 1)[0]
            m = Membrane(c, radius)
            if occ.free(c[None], radius + 2, overlap=1.0)[0] and (fixed is None or (m.distance(occ.c) > occ.r + 3).all()):
                draw_membrane(vol, m, vs, scale, ext, (0, nz - 1))
                occ.membranes.append(m)
                objects.append({"type": "vesicle", "center": c.tolist(), "radius": radius})
                break
    for _ in range(params.n_sheets):
        radius = float(rng.uniform(150, 600))
        normal = rng.standard_normal(3)
        normal[0] *= 0.3  # mostly across the slab, so the membrane cuts x-y slices as a line
        normal /= np.linalg.norm(normal)
        p0 = _sample_in_slab(rng, slab, params.shape, 0, 1)[0]
        half_extent = float(rng.uniform(0.25, 0.45)) * max(ny, nx)
        m = Membrane(p0 - radius * normal, radius, normal, float(np.cos(min(half_extent / radius, np.pi / 3))))
        if fixed is not None and (m.distance(occ.c) <= occ.r + 3).any():
            continue
        zlo, zhi = float(slab.bottom.min()), float(slab.top.max())
        draw_membrane(vol, m, vs, scale, ext, (zlo, zhi))
        occ.membranes.append(m)
        objects.append({"type": "sheet", "center": m.center.tolist(), "radius": radius})
    gold: list[tuple[float, float, float, float]] = []
    if params.n_gold:
        gold_r = float(rng.choice([25.0, 50.0]))  # 5 or 10 nm beads, Å
        for _ in range(params.n_gold):
            cand = _sample_in_slab(rng, slab, params.shape, gold_r / vs, 20, surface_bias=0.9)
            ok = np.flatnonzero(occ.free(cand, gold_r / vs + 1))
            if not len(ok):
                continue
            c = cand[ok[0]]
            # gold is projected analytically (phase and absorption), see imaging.project_spheres
            gold.append((*c, gold_r / vs))
            occ.add(c, gold_r / vs)
            objects.append({"type": "gold", "center": c.tolist(), "radius": gold_r / vs})

    names = sorted(PARTICLE_NAMES, key=lambda n: -get_particle(n).radius)
    if fixed is not None:
        rots = random_rotations(rng, len(fixed))
        for (_, row), p, rot in zip(fixed.iterrows(), idx, rots, strict=True):
            insert_model(vol, models[row["particle_type"]], p, rot, vs, scale, ext)
            rows.append((row["particle_type"], p))
            objects.append({"type": row["particle_type"], "center": list(map(float, p))})
            if progress is not None:
                progress.update(1)
    else:
        for name in names:
            r = get_particle(name).radius / vs
            same: list[np.ndarray] = []
            p_cluster = params.clustering.get(name, 0.0)
            for _ in range(params.counts.get(name, 0)):
                c = None
                if same and rng.random() < p_cluster:
                    c = _cluster_candidate(rng, occ, slab, same, r)
                for _try in range(6 if c is None else 0):
                    cand = _sample_in_slab(rng, slab, params.shape, r * 0.9, 24)
                    ok = np.flatnonzero(occ.free(cand, r))
                    if len(ok):
                        c = cand[ok[0]]
                        break
                if c is None:
                    continue
                occ.add(c, r)
                same.append(c)
                insert_model(vol, models[name], c, random_rotations(rng, 1)[0], vs,
                             scale * rng.uniform(0.9, 1.1), ext)
                rows.append((name, c))
                objects.append({"type": name, "center": c.tolist()})
                if progress is not None:
                    progress.update(1)

    dmodel = models.get(DISTRACTOR)
    if dmodel is not None:
        rd = dmodel.radius / vs * 0.8
        for _ in range(params.n_distractors):
            cand = _sample_in_slab(rng, slab, params.shape, rd, 16)
            ok = np.flatnonzero(occ.free(cand, rd))
            if not len(ok):
                continue
            c = cand[ok[0]]
            occ.add(c, rd)
            insert_model(vol, dmodel, c, random_rotations(rng, 1)[0], vs, scale * rng.uniform(0.8, 1.1), ext)
            objects.append({"type": DISTRACTOR, "center": c.tolist()})
    for _ in range(params.n_junk):
        box, extent_a = _junk_box(rng, vs)
        rj = extent_a / vs * 0.7
        cand = _sample_in_slab(rng, slab, params.shape, rj, 16, surface_bias=0.35)
        ok = np.flatnonzero(occ.free(cand, rj))
        if not len(ok):
            continue
        c = cand[ok[0]]
        half = box.shape[0] // 2
        _add_box(vol, box * np.float32(scale), np.rint(c).astype(int) - half, ext)
        occ.add(c, rj)
        objects.append({"type": "junk", "center": c.tolist()})

    if params.background > 0:
        add_background(vol, slab, params.background * scale, rng)
        ext.add(int(np.floor(slab.bottom.min())), int(np.ceil(slab.top.max())) + 1)

    if rows:
        xyz = voxel_to_angstrom(np.array([p for _, p in rows]), vs)
        df = pd.DataFrame(xyz, columns=["x", "y", "z"])
        df.insert(0, "particle_type", [n for n, _ in rows])
    else:
        df = pd.DataFrame({"particle_type": pd.Series(dtype=str), "x": pd.Series(dtype=float),
                           "y": pd.Series(dtype=float), "z": pd.Series(dtype=float)})
    return Phantom(vol, df, slab, ext.range(), objects, np.array(gold, float).reshape(-1, 4))


def fit_slab_to_picks(params: RunParams, picks: pd.DataFrame, margin: float = 3.0) -> RunParams:
    """Adjust the slab of ``params`` (centre, thickness, tilts) to hold the given picks.

    A plane ``z = a x + b y + c`` is fitted to the pick centres (least squares); the slab thickness
    covers every particle (centre ± radius) around that plane plus ``margin`` voxels.
    """
    import dataclasses

    nz, ny, nx = params.shape
    vs = params.voxel_size
    if picks is None or not len(picks):
        return params
    idx = angstrom_to_voxel(picks[["x", "y", "z"]].to_numpy(float), vs)
    inside = ((idx >= -0.5) & (idx <= np.array(params.shape) - 0.5)).all(1)
    if not inside.any():
        return params
    idx = idx[inside]
    r = np.array([get_particle(n).radius / vs for n in picks["particle_type"][inside]])
    z, y, x = idx[:, 0], idx[:, 1], idx[:, 2]
    if len(idx) >= 10:
        a_mat = np.stack([x - (nx - 1) / 2, y - (ny - 1) / 2, np.ones_like(x)], 1)
        (ax, ay, c), *_ = np.linalg.lstsq(a_mat, z, rcond=None)
        ax, ay = float(np.clip(ax, -0.15, 0.15)), float(np.clip(ay, -0.15, 0.15))
    else:
        ax = ay = 0.0
        c = float(np.median(z))
    resid = z - (ax * (x - (nx - 1) / 2) + ay * (y - (ny - 1) / 2) + c)
    lo, hi = float((resid - r).min()) - margin, float((resid + r).max()) + margin
    if hi - lo >= nz - 1:  # the particles fill the whole height: the slab is the whole volume
        lo, hi, ax, ay, c = -(nz - 1) / 2.0 - 1, (nz - 1) / 2.0 + 1, 0.0, 0.0, (nz - 1) / 2.0
    thick = float(np.clip(hi - lo, 4, nz))
    centre = float(c + (lo + hi) / 2)
    return dataclasses.replace(
        params, slab_center=centre, slab_thickness=thick, slab_bump=0.0,
        slab_tilt_x=float(np.rad2deg(np.arctan(ax))), slab_tilt_y=float(np.rad2deg(np.arctan(ay))),
    )
