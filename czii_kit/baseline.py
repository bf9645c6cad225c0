"""A classical baseline picker: scale-normalised Laplacian-of-Gaussian blobs at each particle's scale.

For a solid ball of radius ``r`` the scale-normalised LoG response peaks at ``sigma = r / sqrt(3)``. For
each particle type the tomogram (optionally a binned level, for speed) is filtered at that scale and
the local maxima become candidates of that type, with the response as confidence. Thresholds are
then tuned per type exactly as for the YOLO picker. Protein is darker than ice in cryo-ET
reconstructions (``polarity="dark"``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from czii_kit.catalog import PARTICLE_NAMES, get_particle
from czii_kit.coords import voxel_to_angstrom
from czii_kit.layout import find_runs
from czii_kit.picks import read_picks
from czii_kit.tomogram import open_tomogram
from czii_kit.tune import tune_thresholds

CANDIDATE_COLUMNS = ["experiment", "particle_type", "x", "y", "z", "score"]


def robust_standardise(volume: np.ndarray, sample: int = 1_000_000, seed: int = 0) -> np.ndarray:
    """``(v - median) / (1.4826 * MAD)`` from a seeded subsample; float32 ``[z, y, x]``."""
    v = np.asarray(volume, dtype=np.float32)
    flat = v.ravel()
    if flat.size > sample:
        flat = np.random.default_rng(seed).choice(flat, sample, replace=False)
    med = float(np.median(flat))
    mad = float(np.median(np.abs(flat - med))) * 1.4826
    return (v - med) / (mad if mad > 0 else 1.0)


def log_blobs(
    volume: np.ndarray,
    voxel_size: float,
    experiment: str,
    particle_types: Iterable[str] = PARTICLE_NAMES,
    polarity: str = "dark",
    min_response: float = 0.05,
    max_per_type: int = 3000,
    edge: float = 0.5,
    progress: bool = False,
) -> pd.DataFrame:
    """Candidates ``experiment, particle_type, x, y, z (Å), score`` from LoG blobs at each type's scale.

    ``score = R / (1 + R)`` in ``(0, 1)`` for the scale-normalised response ``R`` (same order as ``R``).

    Parameters
    ----------
    volume : ndarray ``(nz, ny, nx)``
        A tomogram level in any intensity units.
    voxel_size : float
        Å per voxel of ``volume``.
    polarity : {"dark", "bright"}
        Whether particles are darker (cryo-ET convention) or brighter than the background.
    min_response : float
        Discard maxima whose scale-normalised response is below this.
    max_per_type : int
        Keep at most this many strongest maxima per type.
    edge : float
        Discard maxima closer than ``edge * radius`` to the x-y border of the volume.
    """
    if polarity not in ("dark", "bright"):
        raise ValueError(f"polarity must be 'dark' or 'bright', got {polarity!r}")
    v = robust_standardise(volume)
    if polarity == "bright":
        v = -v
    frames = []
    types = list(particle_types)
    for name in tqdm(types, desc=f"LoG {experiment}", disable=not progress, leave=False):
        r = get_particle(name).radius / voxel_size
        sigma = r / np.sqrt(3.0)
        # dark blob -> negative intensity -> positive sigma^2 * LoG response
        resp = (sigma**2) * ndimage.gaussian_laplace(v, sigma=sigma)
        size = max(3, 2 * int(np.ceil(0.6 * r)) + 1)
        peaks = (resp == ndimage.maximum_filter(resp, size=size, mode="nearest")) & (resp > min_response)
        zyx = np.argwhere(peaks)
        if len(zyx) == 0:
            continue
        m = edge * r
        keep = ((zyx[:, 1] >= m) & (zyx[:, 1] <= v.shape[1] - 1 - m)
                & (zyx[:, 2] >= m) & (zyx[:, 2] <= v.shape[2] - 1 - m))
        zyx = zyx[keep]
        conf = resp[tuple(zyx.T)]
        order = np.argsort(-conf, kind="stable")[:max_per_type]
        xyz = voxel_to_angstrom(zyx[order], voxel_size)
        frames.append(pd.DataFrame({"experiment": experiment, "particle_type": name, "x": xyz[:, 0],
                                    "y": xyz[:, 1], "z": xyz[:, 2],
                                    "score": (conf[order] / (1.0 + conf[order])).astype(float)}))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=float if c in ("x", "y", "z", "score") else str)
                             for c in CANDIDATE_COLUMNS})
    return pd.concat(frames, ignore_index=True)


def predict_baseline(root, split: str = "test", runs: Iterable[str] | None = None, tomogram: str = "denoised",
                     level: int = 1, progress: bool = True, **kwargs) -> pd.DataFrame:
    """LoG candidates for every run of ``split`` under the dataset ``root`` (see :func:`log_blobs`)."""

    keep = None if runs is None else set(runs)
    frames = []
    selected = [r for r in find_runs(root, split) if keep is None or r.name in keep]
    for run in tqdm(selected, desc="baseline", disable=not progress):
        t = open_tomogram(run.tomogram_path(tomogram), level)
        frames.append(log_blobs(t.read(), t.voxel_size, run.name, progress=False, **kwargs))
    return pd.concat(frames, ignore_index=True) if frames else log_blobs(np.zeros((1, 1, 1)), 1.0, "", [])


def tune_baseline(root, split: str = "train", runs: Iterable[str] | None = None, progress: bool = True,
                  **kwargs) -> tuple[dict[str, float], pd.DataFrame]:
    """Per-type score thresholds maximising F4 on runs with picks (as for the YOLO picker).

    Returns ``(thresholds, table)`` from :func:`czii_kit.tune.tune_thresholds`.
    """

    cands = predict_baseline(root, split, runs, progress=progress, **kwargs)
    solution = read_picks(root, split=split, runs=runs)
    return tune_thresholds(cands, solution)
