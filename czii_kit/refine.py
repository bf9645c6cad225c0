"""Centre refinement: move candidates of hollow, spherical particles to the best local template match.

The 2.5D detector places a particle's centre from 2D boxes; for apo-ferritin (hit radius 30 Å, 3
voxels) that is often not close enough, above all where two of them touch and the boxes of the pair
pull the merged centre between them. Apo-ferritin is a spherical protein cage (outer diameter
about 12 nm, inner 8 nm), so a shell template needs no orientation search: the normalised cross-
correlation of the tomogram with that shell, evaluated in a small cube around each candidate,
peaks at the particle's centre. Each candidate moves to that peak (with a parabolic sub-voxel
step), then candidates of the same type that converged are merged by 3D NMS.

Pure numpy / scipy; the volume is the normalised tomogram of :func:`czii_kit.volumes.normalised_volume`
(indexed ``[z, y, x]``, particles dark), points are ``x, y, z`` in Å.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from czii_kit.catalog import get_particle
from czii_kit.config import StrictConfig
from czii_kit.coords import nearest_voxel, voxel_to_angstrom
from czii_kit.postprocess import nms_3d
from czii_kit.volumes import VolumeReading, extract_patches, run_volumes

SHELLS: dict[str, tuple[float, float]] = {"apo-ferritin": (40.0, 60.0)}
"""Inner and outer radius (Å) of the particles that are spherical shells."""


@dataclass
class RefineConfig(StrictConfig):
    """Which candidates are refined and how.

    Attributes
    ----------
    types : sequence of str
        Particle types to refine (each must be in :data:`SHELLS`); empty = no refinement.
    window : int
        Half-side (voxels) of the cube searched around each candidate.
    nms_frac : float
        After moving, per type 3D NMS at this many particle radii (as the merge's ``nms_frac``).
    """

    types: Sequence[str] = field(default_factory=lambda: ("apo-ferritin",))
    window: int = 3
    nms_frac: float = 0.8

    def __post_init__(self):
        self.types = tuple(self.types)
        unknown = [t for t in self.types if t not in SHELLS]
        if unknown:
            raise ValueError(f"no refinement template for {unknown}; known: {sorted(SHELLS)}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")



def shell_template(inner: float, outer: float, voxel_size: float, soft: float = 0.5) -> np.ndarray:
    """A spherical shell ``inner``..``outer`` Å as a zero-mean, unit-norm cube of odd side (float32).

    Dense matter is positive; the edges are smoothed over ``soft`` voxels (logistic).
    """
    if not 0 <= inner < outer:
        raise ValueError(f"need 0 <= inner < outer, got {inner}, {outer}")
    half = int(np.ceil(outer / voxel_size + 2 * soft)) + 1
    grid = np.arange(-half, half + 1, dtype=np.float64) * voxel_size
    r = np.sqrt(grid[:, None, None] ** 2 + grid[None, :, None] ** 2 + grid[None, None, :] ** 2)
    width = max(soft, 1e-3) * voxel_size
    t = 1.0 / (1.0 + np.exp((r - outer) / width)) - 1.0 / (1.0 + np.exp((r - inner) / width))
    t -= t.mean()
    return (t / np.linalg.norm(t)).astype(np.float32)


def local_correlation(volume: np.ndarray, centres_zyx, template: np.ndarray, window: int,
                      batch: int = 256) -> np.ndarray:
    """Normalised cross-correlation of ``template`` with ``volume`` at every offset of a cube.

    ``volume [z, y, x]`` with particles dark; ``centres_zyx (N, 3)`` integer voxels. Returns float32
    ``(N, 2w+1, 2w+1, 2w+1)``: entry ``[n, w+dz, w+dy, w+dx]`` is the correlation (-1..1, dense =
    positive) of the template centred on ``centre + (dz, dy, dx)`` with the volume under it.
    """
    centres = np.asarray(centres_zyx, np.int64).reshape(-1, 3)
    t = template.shape[0]
    side = t + 2 * window
    n_off = 2 * window + 1
    out = np.empty((len(centres), n_off, n_off, n_off), np.float32)
    shape = (side, side, side)
    f_tpl = np.conj(np.fft.rfftn(template, shape, axes=(0, 1, 2)))
    f_box = np.conj(np.fft.rfftn(np.ones_like(template), shape, axes=(0, 1, 2)))
    for b in range(0, len(centres), batch):
        blocks = -extract_patches(volume, centres[b:b + batch], side)  # dense positive
        f_blk = np.fft.rfftn(blocks, shape, axes=(1, 2, 3))
        num = np.fft.irfftn(f_blk * f_tpl, shape, axes=(1, 2, 3))[:, :n_off, :n_off, :n_off]
        s1 = np.fft.irfftn(f_blk * f_box, shape, axes=(1, 2, 3))[:, :n_off, :n_off, :n_off]
        s2 = np.fft.irfftn(np.fft.rfftn(blocks**2, shape, axes=(1, 2, 3)) * f_box, shape,
                           axes=(1, 2, 3))[:, :n_off, :n_off, :n_off]
        var = np.maximum(s2 - s1**2 / template.size, 1e-12)  # sum of squared deviations under the template
        out[b:b + batch] = num / np.sqrt(var)  # the template has zero mean and unit norm
    return out


def _subvoxel(cc: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """Parabolic sub-voxel offsets (N, 3) around integer ``peak`` indices of ``cc (N, s, s, s)``."""
    n, s = len(cc), cc.shape[1]
    step = np.zeros((n, 3))
    rows = np.arange(n)
    for ax in range(3):
        lo, hi = peak.copy(), peak.copy()
        lo[:, ax] -= 1
        hi[:, ax] += 1
        inside = (lo[:, ax] >= 0) & (hi[:, ax] < s)
        lo[~inside, ax] = peak[~inside, ax]
        hi[~inside, ax] = peak[~inside, ax]
        c0 = cc[rows, peak[:, 0], peak[:, 1], peak[:, 2]]
        cm = cc[rows, lo[:, 0], lo[:, 1], lo[:, 2]]
        cp = cc[rows, hi[:, 0], hi[:, 1], hi[:, 2]]
        denom = cm - 2 * c0 + cp
        ok = inside & (denom < 0)
        step[ok, ax] = np.clip(0.5 * (cm[ok] - cp[ok]) / denom[ok], -0.5, 0.5)
    return step


def refine_volume(candidates: pd.DataFrame, volume: np.ndarray, voxel_size: float,
                  config: RefineConfig | None = None) -> pd.DataFrame:
    """Refined copy of one run's candidates ``experiment, particle_type, x, y, z (Å), score, ...``.

    Candidates of ``config.types`` move to the correlation peak within ``config.window`` voxels,
    then per type NMS (``config.nms_frac`` radii) keeps the best-scoring of those that met. Others
    are returned unchanged. Row order: as the input, less the candidates NMS removed.
    """
    config = config or RefineConfig()
    out = candidates.copy()
    if out.empty or not config.types:
        return out
    drop = []
    for name in config.types:
        sel = np.flatnonzero((out["particle_type"] == name).to_numpy())
        if not len(sel):
            continue
        template = shell_template(*SHELLS[name], voxel_size)
        pts = out.iloc[sel][["x", "y", "z"]].to_numpy(float)
        vox = nearest_voxel(pts, voxel_size)
        vox = np.clip(vox, 0, np.array(volume.shape) - 1)
        cc = local_correlation(volume, vox, template, config.window)
        flat = cc.reshape(len(cc), -1).argmax(1)
        peak = np.stack(np.unravel_index(flat, cc.shape[1:]), 1)
        moved = np.clip(vox + peak - config.window + _subvoxel(cc, peak), 0, np.array(volume.shape) - 1)
        xyz = voxel_to_angstrom(moved, voxel_size)
        out.iloc[sel, [out.columns.get_loc(c) for c in ("x", "y", "z")]] = xyz
        keep = nms_3d(xyz, out.iloc[sel]["score"].to_numpy(float), config.nms_frac * get_particle(name).radius)
        drop.extend(sel[np.setdiff1d(np.arange(len(sel)), keep)].tolist())
    kept = np.ones(len(out), bool)
    kept[np.asarray(drop, int)] = False
    return out[kept].reset_index(drop=True)


def refine_runs(candidates: pd.DataFrame, runs, reading=None, config: RefineConfig | None = None,
                progress: bool = True, volumes=None) -> pd.DataFrame:
    """:func:`refine_volume` for the candidates of every run (``czii_kit.layout.Run``), one tomogram at a time.

    ``reading``: how to read them, a :class:`czii_kit.volumes.VolumeReading` (default: the
    ``denoised`` tomogram as stored; pass ``VolumeReading.like_detector(...)`` to see the
    detector's volume); ``volumes``: normalised volumes already at hand
    (:func:`czii_kit.volumes.run_volumes`), not read again.
    """
    config = config or RefineConfig()
    if candidates.empty or not config.types:
        return candidates.copy()
    frames, done = [], set()
    names = candidates["experiment"].astype(str)
    runs = [r for r in runs if (names == r.name).any()]
    for run, vs, vol in run_volumes(runs, reading or VolumeReading(), volumes, progress, "refine"):
        frames.append(refine_volume(candidates[names == run.name], vol, vs, config))
        done.add(run.name)
        del vol
    frames.append(candidates[~names.isin(done)])
    return pd.concat(frames, ignore_index=True)


__all__ = ["SHELLS", "RefineConfig", "shell_template", "local_correlation", "refine_volume", "refine_runs"]
