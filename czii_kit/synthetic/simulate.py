"""One simulated run: phantom -> tilt series -> CTF + noise -> (phase flip) -> WBP -> denoised."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from czii_kit.catalog import PARTICLE_NAMES
from czii_kit.maps import PROCEDURAL, SHIPPED, maps_option
from czii_kit.synthetic.denoise import denoised_tomogram
from czii_kit.synthetic.imaging import (
    GOLD_POTENTIAL,
    form_images,
    phase_flip,
    project,
    project_spheres,
    reconstruction_frame,
)
from czii_kit.synthetic.params import (
    VOXEL_SIZE,
    RunParams,
    SimParamError,
    SimRanges,
    sample_params,
    shape_for_size,
)
from czii_kit.synthetic.phantom import (
    ParticleModel,
    build_phantom,
    fit_slab_to_picks,
    load_maps,
    procedural_models,
)
from czii_kit.synthetic.reconstruct import backproject, ramp_filter

TOMOGRAM_NAMES = ("denoised", "wbp")


def default_workers() -> int:
    """Threads for the heavy stages: 2, or 1 on a single-core machine."""
    return max(1, min(2, os.cpu_count() or 1))


@functools.lru_cache(maxsize=4)
def _procedural(voxel_size: float) -> dict[str, ParticleModel]:
    return procedural_models(voxel_size)


@functools.lru_cache(maxsize=1)
def _shipped() -> dict[str, ParticleModel]:
    return load_maps(SHIPPED)


def get_models(maps: str | Path | dict | None = SHIPPED, voxel_size: float = VOXEL_SIZE) -> dict[str, ParticleModel]:
    """Particle models: a dict as is, ``"shipped"`` (default) the maps shipped with czii_kit, a folder of
    MRC maps (:func:`load_maps`), or ``"procedural"`` / ``None`` the built-in procedural models."""
    if isinstance(maps, dict):
        return maps
    kind = maps_option(maps)
    if kind == PROCEDURAL:
        return _procedural(10.0)
    return _shipped() if kind == SHIPPED else load_maps(kind)


def _as_rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def simulate_run(
    shape: str | tuple[int, int, int] = "tiny",
    voxel_size: float = VOXEL_SIZE,
    seed: int | np.random.Generator | None = 0,
    params: RunParams | None = None,
    maps: str | Path | dict | None = SHIPPED,
    picks: pd.DataFrame | None = None,
    ranges: SimRanges | None = None,
    run_name: str = "TS_sim",
    workers: int | None = None,
    progress: bool = False,
    timings: dict | None = None,
    return_params: bool = False,
):
    """Simulate the tomograms and ground-truth picks of one run.

    Parameters
    ----------
    shape : str or (nz, ny, nx)
        A size preset (``"full"``, ``"small"``, ``"tiny"``) or an explicit shape.
    voxel_size : float
        Å per voxel (default the Kaggle 10.012444).
    seed : int or numpy Generator
        Everything random comes from ``np.random.default_rng(seed)``: same seed, same arrays.
    params : RunParams, optional
        Fixed parameters (their ``shape``/``voxel_size`` win); drawn from ``ranges`` otherwise.
    maps : "shipped", "procedural", path, dict or None
        The density maps shipped with czii_kit (default), the built-in procedural models
        (``"procedural"`` or ``None``), a folder of MRC maps, or models from
        :func:`czii_kit.synthetic.phantom.load_maps`.
    picks : DataFrame, optional
        ``particle_type, x, y, z`` (Å): place the particles exactly there in the specimen (e.g. a
        real run's picks); the returned picks are where they land in the tomogram.
    ranges : SimRanges, optional
        Parameter ranges when ``params`` is not given.
    run_name : str
        The ``experiment`` column of the returned picks.
    workers : int, optional
        Threads (default 2).
    timings : dict, optional
        Filled with seconds per stage.
    return_params : bool
        Also return the :class:`RunParams` used (with the realised counts).

    Returns
    -------
    tomograms : dict
        ``{"denoised": (nz, ny, nx) float32, "wbp": (nz, ny, nx) float32}`` in arbitrary units;
        protein is darker (lower) than the ice around it.
    picks : DataFrame
        ``experiment, particle_type, x, y, z`` (Å) in the tomogram's frame: the specimen turned about
        ``y`` by the run's tilt-angle error (see
        :func:`~czii_kit.synthetic.imaging.reconstruction_frame`), as an annotator would pick them.
    params : RunParams
        Only with ``return_params``.
    """
    rng = _as_rng(seed)
    workers = workers or default_workers()
    t_all = time.perf_counter()
    timings = {} if timings is None else timings

    def lap(name, t0):
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        return time.perf_counter()

    t = time.perf_counter()
    models = get_models(maps, voxel_size)
    missing = [n for n in PARTICLE_NAMES if n not in models]
    if missing:
        raise SimParamError(f"particle models missing for {missing}")
    if params is None:
        shp = shape_for_size(shape)
        biggest = max(m.radius for m in models.values()) / voxel_size
        params = sample_params(rng, shp, voxel_size, ranges, min_slab=2 * biggest + 4)
    else:
        params = dataclasses.replace(params).validate()
    if picks is not None:
        need = {"particle_type", "x", "y", "z"} - set(picks.columns)
        if need:
            raise SimParamError(f"picks table lacks columns {sorted(need)}")
        params = fit_slab_to_picks(params, picks)
    t = lap("models+params", t)

    from tqdm.auto import tqdm

    angles = params.angles
    bar = tqdm(total=len(angles) * 2 + 1, desc=f"simulate {run_name}", disable=not progress, leave=False)
    phantom = build_phantom(params, rng, models, picks=picks)
    counts = phantom.picks["particle_type"].value_counts().to_dict()
    params.counts = {n: int(counts.get(n, 0)) for n in PARTICLE_NAMES}
    bar.update(1)
    t = lap("phantom", t)

    # the microscope's actual tilts differ slightly from the nominal ones used for reconstruction
    true_angles = angles + params.tilt_angle_offset + rng.normal(0, 0.15, len(angles))
    proj = project(phantom.volume, true_angles, z_range=phantom.z_range, workers=workers, progress=bar)
    proj *= np.float32(params.voxel_size)  # V·Å
    absorption = None
    if len(phantom.gold):
        chords = project_spheres(phantom.gold, true_angles, params.shape) * np.float32(params.voxel_size)  # Å
        proj += chords * np.float32(GOLD_POTENTIAL)
        absorption = chords
    thickness = phantom.slab.thickness_a(params.voxel_size)
    del phantom.volume
    t = lap("project", t)

    clean, noise = form_images(proj, true_angles, params, rng, thickness, workers=workers, split_noise=True,
                               absorption=absorption)
    del proj
    t = lap("ctf+noise", t)
    if params.ctf_correction == "phase_flip":  # linear: the clean and noise parts separately
        clean = phase_flip(clean, angles, params, workers=workers)
        noise = phase_flip(noise, angles, params, workers=workers)
        t = lap("phase flip", t)

    filtered = ramp_filter(clean + noise, angles, workers=workers)
    rec = backproject(filtered, angles, params.shape, workers=workers, progress=bar)
    del filtered
    t = lap("wbp", t)

    den = denoised_tomogram(clean, noise, angles, params.shape, params.denoise_sigma, params.residual_noise,
                            workers=workers)
    del clean, noise
    t = lap("denoise", t)

    def scaled(v, scale, offset):
        sd = float(v.std()) or 1.0
        v *= np.float32(scale / sd)
        v += np.float32(offset * scale)
        return v

    tomos = {"denoised": scaled(den, params.denoised_scale, params.denoised_offset),
             "wbp": scaled(rec, params.wbp_scale, params.wbp_offset)}
    bar.close()
    df = phantom.picks.copy()
    # ground truth in the tomogram's frame (where an annotator would pick), not the specimen's: the
    # tilt-angle error turns the reconstruction about y (up to ~5 voxels in z at the x edges). The
    # per-tilt jitter (mean ~0.02 deg, < 0.15 voxel) is left out so sim_params.json alone gives the frame.
    xyz = reconstruction_frame(df[["x", "y", "z"]].to_numpy(float), params.tilt_angle_offset,
                               params.shape, params.voxel_size)
    df[["x", "y", "z"]] = xyz
    df.insert(0, "experiment", run_name)
    timings["total"] = time.perf_counter() - t_all
    if return_params:
        return tomos, df, params
    return tomos, df
