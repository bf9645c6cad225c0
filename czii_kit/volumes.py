"""Tomogram volumes for the 3D stages: read a whole level, resample, normalise, cut patches.

Pure numpy / scipy (plus zarr through :mod:`czii_kit.tomogram`). The detector
(:mod:`czii_kit.infer`), centre refinement (:mod:`czii_kit.refine`), the rescorer
(:mod:`czii_kit.rescore`) and template matching (:mod:`czii_kit.templates`) all read a tomogram as
:func:`normalised_volume` gives it: flattened, low-passed and windowed exactly as the detector sees
it, float32 in 0..1 with dense matter dark.

Arrays are indexed ``[z, y, x]``; patch centres are integer voxel indices ``(z, y, x)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from czii_kit.errors import DataError
from czii_kit.preprocess import PreprocessConfig, resample_to, settle_flatten, settle_smoothing, window_for
from czii_kit.tomogram import VoxelCheck, open_tomogram

PATCH_SIZE = 32
"""Side (voxels) of the rescorer's patches: 320 Å, just wider than the largest particle."""


READ_THREADS = 2
"""Chunk columns :func:`read_volume` decompresses at once (each chunk is decompressed on one core): 0.48 ->
0.31 s for a full-size tomogram of 9 columns on 2 cores, for about one more column of transient memory."""


def read_volume(tomo, threads: int | None = None) -> np.ndarray:
    """The whole level of a :class:`~czii_kit.tomogram.Tomogram` as float32 ``(nz, ny, nx)``.

    Reads chunk columns (all z, one y/x chunk), ``threads`` at a time (default :data:`READ_THREADS`, at most
    the CPUs), each decompressed straight into a preallocated array
    (:meth:`~czii_kit.tomogram.Tomogram.read_into`), so each chunk is decompressed once and the transient
    memory stays at about ``threads`` chunks.
    """
    from concurrent.futures import ThreadPoolExecutor

    arr = tomo.array
    nz, ny, nx = tomo.shape
    chunks = getattr(arr, "chunks", None) or (nz, ny, nx)
    cy, cx = int(chunks[1]), int(chunks[2])
    out = np.empty((nz, ny, nx), np.float32)
    check = VoxelCheck(tomo.path / tomo.level)  # NaN / inf voxels, counted per chunk column
    keys = [(slice(None), slice(y0, y0 + cy), slice(x0, x0 + cx)) for y0 in range(0, ny, cy) for x0 in range(0, nx, cx)]

    def read(key) -> np.ndarray:
        tomo.read_into(out[key], key)
        return out[key]

    n = max(1, min(threads or READ_THREADS, os.cpu_count() or 1, len(keys)))
    try:
        with ThreadPoolExecutor(n, thread_name_prefix="czii_kit-read") as pool:
            for block in pool.map(read, keys):
                check.count(block)
    except Exception as exc:  # corrupt chunk, missing codec, ...
        raise DataError(tomo.path / tomo.level, f"cannot read voxels: {exc}") from exc
    return check.settle(out)


def load_volume(tomo, voxel_size: float | None = None, warn: bool = True) -> tuple[np.ndarray, float]:
    """:func:`read_volume`, resampled to ``voxel_size`` Å when the tomogram's differs by more than
    :data:`czii_kit.preprocess.RESAMPLE_TOLERANCE` (:func:`czii_kit.preprocess.resample_to`; a warning
    names it). Returns ``(volume [z, y, x], its voxel size Å)``; ``voxel_size=None`` never resamples."""
    volume = read_volume(tomo)
    if voxel_size is None:
        return volume, float(tomo.voxel_size)
    return resample_to(volume, tomo.voxel_size, voxel_size, source=tomo.path, warn=warn)


def normalised_volume(volume: np.ndarray, preprocess: PreprocessConfig | None = None, polarity: str = "auto",
                      source=None, smooth: str | float = "auto", flatten: str = "auto") -> np.ndarray:
    """``volume [z, y, x]`` flattened, low-passed and windowed as for the detector: float32 in 0..1, particles dark.

    ``smooth``, ``flatten``: as :class:`czii_kit.infer.InferenceConfig` (``"auto"``: noisy /
    uneven tomograms only).
    """
    volume, _ = settle_flatten(volume, flatten, source=source, warn=False)
    volume, _ = settle_smoothing(volume, smooth, source=source, warn=False)
    window, _ = window_for(volume, preprocess or PreprocessConfig(), polarity, source=source)
    return window.apply(volume, "float32")


@dataclass(frozen=True)
class VolumeReading:
    """How the 3D stages (refinement, rescoring) read a run's tomogram: as the detector saw it.

    Attributes
    ----------
    tomogram : str
        Tomogram name (``"auto"``: :func:`czii_kit.layout.choose_tomogram`).
    preprocess : PreprocessConfig, optional
        The model's preprocessing (its intensity window).
    polarity, smooth, flatten : str
        As :class:`czii_kit.infer.InferenceConfig`.
    voxel_size : float, optional
        Resample tomograms whose voxel size differs to this one (Å), as the detector does
        (:func:`czii_kit.infer.load_volume`); ``None``: as stored.
    """

    tomogram: str = "denoised"
    preprocess: PreprocessConfig | None = None
    polarity: str = "auto"
    smooth: str | float = "auto"
    flatten: str = "auto"
    voxel_size: float | None = None


def normalised_runs(runs: Iterable, reading: VolumeReading = VolumeReading(), progress: bool = True,
                    desc: str = "tomograms"):
    """Yield ``(run, voxel_size, volume)`` for each run (``czii_kit.layout.Run``): its tomogram read
    as ``reading`` says and normalised by :func:`normalised_volume`, one at a time (drop ``volume``
    before the next). The voxel size is the volume's (after any resampling)."""
    r = reading
    for run in tqdm(list(runs), desc=desc, unit="run", disable=not progress):
        tomo = open_tomogram(run.tomogram_path(r.tomogram))
        vol, vs = load_volume(tomo, r.voxel_size, warn=False)
        yield run, vs, normalised_volume(vol, r.preprocess, r.polarity, tomo.path, r.smooth, r.flatten)


def run_volumes(runs: Iterable, reading: VolumeReading = VolumeReading(), cache: Mapping | None = None,
                progress: bool = True, desc: str = "tomograms"):
    """:func:`normalised_runs`, taking the runs in ``cache`` (``{run name: (voxel_size, normalised
    volume)}``, e.g. kept by ``tune`` from its detection pass) instead of reading them again."""
    runs = list(runs)
    cache = cache or {}
    read = normalised_runs([r for r in runs if r.name not in cache], reading, progress, desc)
    for run in runs:
        yield (run, *cache[run.name]) if run.name in cache else next(read)


def extract_patches(volume: np.ndarray, centres_zyx, size: int = PATCH_SIZE) -> np.ndarray:
    """Cubes of side ``size`` centred on integer voxel indices ``centres_zyx (N, 3)``.

    Voxel ``c - size // 2 ... c + size // 2 - 1`` along each axis; beyond the volume the edge voxel
    is repeated. Returns float32 ``(N, size, size, size)`` indexed ``[n, z, y, x]``.
    """
    starts = np.asarray(centres_zyx, dtype=np.int64).reshape(-1, 3) - size // 2
    shape = np.array(volume.shape)
    out = np.empty((len(starts), size, size, size), np.float32)
    offs = np.arange(size)
    for i, lo in enumerate(starts):
        if (lo >= 0).all() and (lo + size <= shape).all():
            out[i] = volume[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size]
        else:  # over an edge: repeat the edge voxel
            out[i] = volume[np.ix_(*(np.clip(lo[a] + offs, 0, shape[a] - 1) for a in range(3)))]
    return out


def standardise(patches: np.ndarray) -> np.ndarray:
    """Each patch to zero mean and unit variance (float32, same shape)."""
    x = np.asarray(patches, np.float32)
    axes = tuple(range(1, x.ndim))
    return (x - x.mean(axes, keepdims=True)) / (x.std(axes, keepdims=True) + 1e-3)


def centre_crop(patches: np.ndarray, size: int = PATCH_SIZE) -> np.ndarray:
    """The central ``size``³ of patches ``(N, S, S, S)`` (S >= size)."""
    o = (patches.shape[1] - size) // 2
    return patches[:, o:o + size, o:o + size, o:o + size]
