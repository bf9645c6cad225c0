"""A tiny synthetic dataset for the pipeline tests: dark spheres of the catalog radii in noise.

Volumes are unequal-sided (z != y != x) and carry an arbitrary intensity scale and offset, so an
axis swap or a normalisation that assumes a fixed range fails loudly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from czii_kit.catalog import PARTICLES
from czii_kit.coords import voxel_to_angstrom
from czii_kit.picks import write_picks
from czii_kit.tomogram import write_tomogram

VOXEL = 10.012444


def place_particles(shape, rng, per_type=2, types=None, max_tries=2000):
    """Non-overlapping centres ``(z, y, x)`` voxels + type names, fully inside in y/x."""
    types = types or [p.name for p in PARTICLES]
    radius = {p.name: p.radius / VOXEL for p in PARTICLES}
    centres, names = [], []
    for name in types:
        r = radius[name]
        for _ in range(per_type):
            for _try in range(max_tries):
                zlo = min(r * 0.6, (shape[0] - 1) / 2)
                c = np.array([rng.uniform(zlo, shape[0] - 1 - zlo),
                              rng.uniform(r + 1, shape[1] - 2 - r),
                              rng.uniform(r + 1, shape[2] - 2 - r)])
                if all(np.linalg.norm(c - o) > r + radius[n] + 1 for o, n in zip(centres, names, strict=True)):
                    centres.append(c)
                    names.append(name)
                    break
    return np.array(centres).reshape(-1, 3), names


def sphere_volume(shape, centres, names, rng, noise=0.35, scale=37.0, offset=1000.0):
    """Dark spheres (value -1) on 0 background plus Gaussian noise, then ``* scale + offset``."""
    radius = {p.name: p.radius / VOXEL for p in PARTICLES}
    zz, yy, xx = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    vol = np.zeros(shape, np.float32)
    for c, n in zip(centres, names, strict=True):
        d2 = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2
        vol[d2 <= radius[n] ** 2] = -1.0
    vol += rng.normal(0, noise, shape).astype(np.float32)
    return vol * scale + offset


def make_root(root: Path, runs=("TS_a", "TS_b", "TS_c"), shape=(40, 96, 112), per_type=2, seed=0,
              split="train", with_picks=True) -> pd.DataFrame:
    """Write tomograms (denoised) and picks of ``runs`` under ``root``; return the picks table."""
    rng = np.random.default_rng(seed)
    rows = []
    for run in runs:
        centres, names = place_particles(shape, rng, per_type)
        vol = sphere_volume(shape, centres, names, rng)
        path = Path(root) / split / "static" / "ExperimentRuns" / run / "VoxelSpacing10.000" / "denoised.zarr"
        write_tomogram(path, vol, VOXEL, n_levels=2, chunks=(32, 64, 64))
        xyz = voxel_to_angstrom(centres, VOXEL)
        for (x, y, z), n in zip(xyz, names, strict=True):
            rows.append({"experiment": run, "particle_type": n, "x": x, "y": y, "z": z})
    picks = pd.DataFrame(rows)
    if with_picks:
        write_picks(picks, Path(root) / split / "overlay", runs=runs)
    return picks


def simulate_detections(picks: pd.DataFrame, shape=(184, 630, 630), seed=0, z_stride=1, min_frac=0.3,
                        jitter_frac=0.08, miss=0.15, fp_per_slice=0.3, confuse=0.05) -> pd.DataFrame:
    """Plausible per-slice 2D detections of the particles in ``picks`` (a detector stand-in).

    Each particle gives a box on every visited slice where its cross-section half-side is at least
    ``min_frac * r``, with centre jitter ``jitter_frac * r`` (voxels), confidence highest at the
    equator, a ``miss`` chance per slice, a ``confuse`` chance of the wrong class; plus
    ``fp_per_slice`` random false boxes per slice. Columns as :mod:`czii_kit.infer` returns them.
    """
    from czii_kit.catalog import get_particle

    rng = np.random.default_rng(seed)
    rows = []
    zs = np.arange(0, shape[0], z_stride)
    for run, g in picks.groupby("experiment"):
        for _, p in g.iterrows():
            part = get_particle(p.particle_type)
            r = part.radius / VOXEL
            z0, y0, x0 = p.z / VOXEL, p.y / VOXEL, p.x / VOXEL
            for z in zs[(zs > z0 - r) & (zs < z0 + r)]:
                half = np.sqrt(max(r * r - (z - z0) ** 2, 0.0))
                if half < min_frac * r or rng.random() < miss:
                    continue
                cls = part.class_id if rng.random() > confuse else int(rng.integers(0, 6))
                conf = float(np.clip(0.25 + 0.6 * half / r + rng.normal(0, 0.1), 0.01, 1.0))
                rows.append((run, int(z), x0 + rng.normal(0, jitter_frac * r), y0 + rng.normal(0, jitter_frac * r),
                             2 * half, 2 * half, conf, cls))
        n_fp = rng.poisson(fp_per_slice * len(zs))
        for _ in range(n_fp):
            cls = int(rng.integers(0, 6))
            rows.append((run, int(rng.choice(zs)), rng.uniform(0, shape[2]), rng.uniform(0, shape[1]), 20.0, 20.0,
                         float(rng.uniform(0.05, 0.5)), cls))
    return pd.DataFrame(rows, columns=["run", "z", "x", "y", "w", "h", "conf", "class"])


def shipped_model_copy(tmp_path: Path, seed: int):
    """A small simulated dataset (one training run) and a copy of the shipped detector in its own folder.

    Returns ``(dataset root, run name, weights path)``; skips the test when no model is shipped.
    Tuning then writes its thresholds beside the copy, not into the package.
    """
    import shutil

    import pytest

    from czii_kit.bundle import MODELS_DIR
    from czii_kit.synthetic import generate_dataset

    if not (MODELS_DIR / "default.pt").is_file():
        pytest.skip("no model shipped")
    root = generate_dataset(tmp_path / "d", n_train=1, n_test=0, size="small", seed=seed, progress=False)
    wdir = tmp_path / "w"
    wdir.mkdir()
    weights = Path(shutil.copy(MODELS_DIR / "default.pt", wdir / "default.pt"))
    shutil.copy(MODELS_DIR / "czii_kit_train.json", wdir)
    return root, f"TS_sim_{seed}_0", weights
