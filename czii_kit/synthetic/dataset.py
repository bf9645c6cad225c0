"""Write simulated runs as a dataset root in the Kaggle layout, and benchmark the simulator.

::

    {root}/train/static/ExperimentRuns/{run}/VoxelSpacing10.000/{denoised,wbp}.zarr
    {root}/train/static/ExperimentRuns/{run}/sim_params.json
    {root}/train/overlay/ExperimentRuns/{run}/Picks/{particle}.json     (all six types; or copick's
                                                                         {user}_{session}_{particle}.json)
    {root}/test/static/ExperimentRuns/{run}/...                          (no picks)
    {root}/solution.csv      experiment,particle_type,x,y,z of the test runs (Å)
    {root}/synthetic.json    how the dataset was made (seed, size, maps, runs)

Run ``i`` (train runs first, then test runs) is named ``TS_sim_{seed}_{i}`` and draws everything
from ``np.random.default_rng([seed, i])``, so one run does not depend on how many others are made.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from czii_kit import __version__
from czii_kit.atomic import atomic_dir, atomic_write, atomic_write_text
from czii_kit.catalog import PARTICLE_NAMES
from czii_kit.errors import DataError, FileExistsNoForce
from czii_kit.layout import RUNS_DIR, spacing_folder
from czii_kit.maps import SHIPPED, describe_maps
from czii_kit.picks import check_naming, read_picks, write_picks
from czii_kit.synthetic.params import VOXEL_SIZE, SimParamError, SimRanges, shape_for_size
from czii_kit.synthetic.simulate import TOMOGRAM_NAMES, get_models, simulate_run
from czii_kit.tomogram import write_tomogram

SPACING_DIR = "VoxelSpacing10.000"
"""Voxel-spacing folder name, as in the Kaggle download (the true spacing is in the zarr metadata)."""
MARKER = "synthetic.json"
PARAMS_FILE = "sim_params.json"


def run_name(seed: int, i: int) -> str:
    """Name of simulated run ``i`` of a dataset made with ``seed``."""
    return f"TS_sim_{seed}_{i}"


def write_run(root: Path, split: str, name: str, tomograms: dict, picks: pd.DataFrame | None,
              params_json: str, voxel_size: float, overwrite: bool = False, naming: dict | None = None) -> Path:
    """Write one run's tomograms (3-level zarr), ``sim_params.json`` and, when given, its picks
    (``naming``: keyword arguments of :func:`czii_kit.picks.write_picks`, e.g. ``{"naming": "copick"}``)."""
    run_dir = Path(root) / split / "static" / RUNS_DIR / name
    # the folder name is nominal, as Kaggle's (VoxelSpacing10.000 for 10.012444 A voxels)
    spacing = SPACING_DIR if abs(voxel_size - VOXEL_SIZE) < 0.05 else spacing_folder(voxel_size)
    for tname, vol in tomograms.items():
        write_tomogram(run_dir / spacing / f"{tname}.zarr", vol, voxel_size, n_levels=3, overwrite=overwrite)
    atomic_write_text(run_dir / PARAMS_FILE, params_json, overwrite=overwrite)
    if picks is not None:
        write_picks(picks, Path(root) / split / "overlay", runs=[name], particle_types=PARTICLE_NAMES,
                    overwrite=overwrite, **(naming or {}))
    return run_dir


def _layouts(picks_dir: str | Path | None) -> list[tuple[str, pd.DataFrame]]:
    if picks_dir is None:
        return []
    df = read_picks(picks_dir)
    if not len(df):
        raise DataError(picks_dir, "holds no picks to place particles at")
    return [(str(k), g.reset_index(drop=True)) for k, g in df.groupby("experiment", sort=True)]


def _prepare_out(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsNoForce(f"{out_dir}: exists and is not a folder")
        if any(out_dir.iterdir()):
            if not overwrite:
                raise FileExistsNoForce(f"{out_dir}: exists and is not empty (use --force / overwrite=True)")
            if not (out_dir / MARKER).is_file():
                raise FileExistsNoForce(
                    f"{out_dir}: not a czii_kit synthetic dataset (no {MARKER}); refusing to replace it"
                )


def generate_dataset(
    out_dir: str | Path,
    n_train: int = 7,
    n_test: int = 3,
    size: str | tuple[int, int, int] = "full",
    seed: int = 0,
    maps_dir: str | Path | None = SHIPPED,
    picks_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    ranges: SimRanges | None = None,
    threads: int | None = None,
    voxel_size: float = VOXEL_SIZE,
    naming: str = "kaggle",
    user_id: str = "curation",
    session_id: str = "0",
    workers: int | None = None,
) -> Path:
    """Simulate ``n_train + n_test`` runs and write them as a dataset root (Kaggle layout).

    Parameters
    ----------
    out_dir : path-like
        The dataset root to create. Written in a temporary sibling and renamed into place at the end.
    n_train, n_test : int
        Runs with picks (``train``) and without (``test``, ground truth in ``solution.csv``).
    size : {"full", "small", "tiny"} or (nz, ny, nx)
        Volume size (see :data:`czii_kit.synthetic.params.SIZES`).
    seed : int
        Master seed; run ``i`` uses ``default_rng([seed, i])``.
    maps_dir : path-like, "shipped" or "procedural"
        ``"shipped"`` (default): the density maps shipped with czii_kit; a folder of MRC density maps
        (catalog file names); ``"procedural"`` (or ``None``): the built-in procedural models.
    picks_dir : path-like, optional
        Picks (any layout :func:`czii_kit.picks.read_picks` reads, e.g. the real Kaggle
        ``train/overlay``): run ``i`` takes the layout of the ``i``-th experiment there (cycling),
        so the simulated tomograms reproduce those runs' particle positions (points outside a
        smaller volume are dropped; the ice slab is fitted to the points kept).
    overwrite : bool
        Replace an existing dataset made by this function (a folder without ``synthetic.json`` is
        never replaced).
    progress : bool
        Show a tqdm bar over runs.
    ranges : SimRanges, optional
        Parameter ranges (defaults otherwise).
    threads : int, optional
        Threads for the heavy stages (default 2). ``workers`` is its old, deprecated name.
    voxel_size : float
        Å per voxel (default the Kaggle 10.012444). Another size keeps the physical field of view:
        the shape of ``size`` is scaled by ``10.012444 / voxel_size`` (rounded), and the density maps
        are resampled to it; the simulator's parameters in voxels (e.g. the denoiser's sigma) stay in
        voxels. Tomograms go under ``VoxelSpacing{voxel_size:.3f}``.
    naming : {"kaggle", "copick"}
        Picks file names: Kaggle's ``{particle}.json`` or copick's ``{user_id}_{session_id}_{particle}.json``.
    user_id, session_id : str
        The picks' user and session (in the files, and in their names with ``naming="copick"``).

    Returns
    -------
    Path
        ``out_dir``: ``train/`` and ``test/`` in the Kaggle layout (per run ``denoised`` and ``wbp``
        float32 zarr tomograms, arrays ``[z, y, x]`` of the ``size`` shape, 3 levels; picks of the
        train runs as copick JSON, points in Å), ``solution.csv`` (``experiment, particle_type, x, y,
        z`` in Å, the test runs' truth) and ``synthetic.json`` (seed, size, maps, ranges, runs).
    """
    from tqdm.auto import tqdm

    threads = threads_arg(threads, workers)
    out_dir = Path(out_dir)
    n_train, n_test = int(n_train), int(n_test)
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise SimParamError(f"need at least one run (n_train={n_train}, n_test={n_test})")
    if not (voxel_size > 0 and np.isfinite(voxel_size)):
        raise SimParamError(f"voxel size must be > 0 A, got {voxel_size!r}")
    shape = shape_for_size(size)
    if voxel_size != VOXEL_SIZE:
        shape = shape_for_size(tuple(int(round(n * VOXEL_SIZE / voxel_size)) for n in shape))
    names = {"naming": naming, "user_id": user_id, "session_id": session_id}
    check_naming(naming, user_id, session_id)
    _prepare_out(out_dir, overwrite)
    models = get_models(maps_dir, voxel_size)
    layouts = _layouts(picks_dir)
    with atomic_dir(out_dir) as tmp:
        solution = []
        summary = []
        jobs = [("train", i) for i in range(n_train)] + [("test", n_train + j) for j in range(n_test)]
        for split, i in tqdm(jobs, desc="synth runs", disable=not progress):
            name = run_name(seed, i)
            layout = layouts[i % len(layouts)] if layouts else None
            timings: dict = {}
            tomos, picks, params = simulate_run(
                shape, voxel_size, seed=np.random.default_rng([seed, i]), maps=models,
                picks=None if layout is None else layout[1], ranges=ranges, run_name=name,
                workers=threads, timings=timings, return_params=True,
            )
            meta = params.to_dict()
            meta.update({"run": name, "split": split, "seed": [seed, i],
                         "layout_from": None if layout is None else layout[0],
                         "models": describe_maps(maps_dir)})
            t = time.perf_counter()
            write_run(tmp, split, name, tomos, picks if split == "train" else None,
                      json.dumps(meta, indent=1), voxel_size, naming=names)
            timings["write"] = time.perf_counter() - t
            if split == "test":
                solution.append(picks)
            summary.append({"run": name, "split": split, "n_picks": int(len(picks)),
                            "seconds": round(sum(v for k, v in timings.items() if k != "total"), 2)})
        if n_test:
            sol = pd.concat(solution, ignore_index=True)[["experiment", "particle_type", "x", "y", "z"]]
            atomic_write(tmp / "solution.csv", lambda p: sol.to_csv(p, index=False))
        info = {"generator": f"czii_kit {__version__}", "seed": seed, "size": list(shape),
                "voxel_size": voxel_size, "maps_dir": describe_maps(maps_dir), "picks_naming": names,
                "picks_dir": None if picks_dir is None else str(Path(picks_dir).resolve()),
                "ranges": (ranges or SimRanges()).to_dict(), "runs": summary,
                "tomograms": list(TOMOGRAM_NAMES)}
        atomic_write_text(tmp / MARKER, json.dumps(info, indent=1))
    return out_dir


def threads_arg(threads: int | None, workers: int | None) -> int | None:
    """``threads``, or the deprecated ``workers`` (its old name, with a :class:`FutureWarning`)."""
    if workers is not None:
        warnings.warn("the synthetic data's 'workers' setting is now called 'threads' (--threads); 'workers' "
                      "will be removed", FutureWarning, stacklevel=3)
        threads = workers if threads is None else threads
    return threads


def benchmark(size="full", seed: int = 0, maps_dir=SHIPPED, threads: int | None = None, write: bool = True,
              echo=print, workers: int | None = None) -> dict:
    """Time one simulated run stage by stage and print the seconds (``threads``: as :func:`generate_dataset`).

    Stages: ``models+params``, ``phantom`` (placement and rendering), ``project`` (tilt series),
    ``ctf+noise``, ``wbp`` (ramp filter and back-projection), ``denoise``, ``write`` (both tomograms,
    3 zarr levels each, to a temporary folder).

    Returns
    -------
    dict
        Stage -> wall-clock seconds, plus ``total`` and ``cpu`` (CPU seconds of this process).
    """
    threads = threads_arg(threads, workers)
    shape = shape_for_size(size)
    models = get_models(maps_dir)
    timings: dict = {}
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    tomos, picks = simulate_run(shape, seed=seed, maps=models, workers=threads, timings=timings)
    if write:
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="czii_synth_bench_") as d:
            for name, vol in tomos.items():
                write_tomogram(Path(d) / f"{name}.zarr", vol, VOXEL_SIZE, n_levels=3)
        timings["write"] = time.perf_counter() - t
    timings.pop("total", None)
    timings["total"] = time.perf_counter() - t0
    timings["cpu"] = time.process_time() - cpu0
    echo(f"synthetic run {shape[0]}x{shape[1]}x{shape[2]} ({len(picks)} particles, "
         f"{describe_maps(maps_dir)}, threads={threads or 'auto'}):")
    for k, v in timings.items():
        if k != "cpu":
            echo(f"  {k:<14s} {v:7.2f} s")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    echo(f"  (CPU time of this process {timings['cpu']:.2f} s on {os.cpu_count()} cores; "
         f"load average {load:.1f}: other jobs share the machine when it exceeds the core count)")
    return timings
