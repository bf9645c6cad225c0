"""Figures: slices with picks, orthogonal views, intensity histograms, particle galleries, TP/FP/FN maps.

Every function takes a ``[z, y, x]`` volume (ndarray or :class:`czii_kit.tomogram.Tomogram`) and picks
in Å (``x, y, z``); conversion goes through :mod:`czii_kit.coords`. Matplotlib is imported lazily and
the Agg backend is used when no display is available.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from czii_kit.atomic import atomic_write
from czii_kit.catalog import PARTICLES, get_particle
from czii_kit.coords import angstrom_to_voxel


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg",) and not _has_display():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _has_display() -> bool:
    import os

    return bool(os.environ.get("DISPLAY")) or "inline" in os.environ.get("MPLBACKEND", "")



def display_range(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> tuple[float, float]:
    """Percentile grey levels ``(vmin, vmax)`` for showing ``image``."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [low, high])
    return float(lo), float(hi if hi > lo else lo + 1e-6)


def _circles_on_slice(picks: pd.DataFrame, voxel_size: float, axis: int, index: int):
    """Yield ``(u, v, radius_px, particle)`` for picks whose sphere cuts plane ``axis = index``.

    ``axis`` 0 -> an x-y slice (u = x, v = y); 1 -> an x-z slice (u = x, v = z).
    """
    if picks is None or len(picks) == 0:
        return
    zyx = angstrom_to_voxel(picks[["x", "y", "z"]].to_numpy(float), voxel_size)
    for (pz, py, px), name in zip(zyx, picks["particle_type"], strict=True):
        r = get_particle(name).radius / voxel_size
        d = (pz if axis == 0 else py) - index
        if abs(d) < r:
            yield (px, py if axis == 0 else pz, float(np.sqrt(r * r - d * d)), name)


def show_slice(ax, volume, index: int, picks: pd.DataFrame | None = None, voxel_size: float = 10.012444,
               axis: int = 0, title: str | None = None, legend: bool = True, linewidth: float = 1.2):
    """Draw slice ``index`` of ``volume`` along ``axis`` (0: x-y at z, 1: x-z at y) with picks circled by type.

    Circles have the radius of the particle's cross-section on that slice.
    """
    image = np.asarray(volume[index] if axis == 0 else volume[:, index, :], dtype=np.float32)
    vmin, vmax = display_range(image)
    ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, origin="upper", interpolation="nearest")
    plt = _plt()
    seen = set()
    for u, v, r, name in _circles_on_slice(picks, voxel_size, axis, index):
        p = get_particle(name)
        ax.add_patch(plt.Circle((u, v), r, fill=False, color=p.hex_color, lw=linewidth,
                                label=None if name in seen else name))
        seen.add(name)
    if legend and seen:
        ax.legend(loc="upper right", fontsize=6, framealpha=0.7)
    ax.set_title(title or (f"x-y slice z={index}" if axis == 0 else f"x-z slice y={index}"), fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def orthogonal_views(volume, center_zyx=None, picks: pd.DataFrame | None = None, voxel_size: float = 10.012444,
                     figsize=(12, 5)):
    """Figure with x-y, x-z and y-z sections through ``center_zyx`` (default: the volume centre)."""
    plt = _plt()
    shape = tuple(volume.shape)
    cz, cy, cx = (s // 2 for s in shape) if center_zyx is None else (int(round(c)) for c in center_zyx)
    fig, axes = plt.subplots(1, 3, figsize=figsize, gridspec_kw={"width_ratios": [shape[2], shape[2], shape[1]]})
    show_slice(axes[0], volume, cz, picks, voxel_size, axis=0)
    show_slice(axes[1], volume, cy, picks, voxel_size, axis=1, legend=False)
    yz = np.asarray(volume[:, :, cx], dtype=np.float32)
    vmin, vmax = display_range(yz)
    axes[2].imshow(yz, cmap="gray", vmin=vmin, vmax=vmax)
    axes[2].set_title(f"y-z slice x={cx}", fontsize=8)
    axes[2].set_xticks([])
    axes[2].set_yticks([])
    fig.tight_layout()
    return fig


def intensity_histogram(ax, volume, bins: int = 200, label: str | None = None, max_voxels: int = 2_000_000,
                        seed: int = 0):
    """Histogram of voxel intensities (a seeded subsample of at most ``max_voxels``)."""
    v = np.asarray(volume, dtype=np.float32).ravel()
    if v.size > max_voxels:
        v = np.random.default_rng(seed).choice(v, max_voxels, replace=False)
    ax.hist(v, bins=bins, histtype="step", label=label, density=True)
    ax.set_xlabel("intensity (reconstruction units)")
    ax.set_ylabel("density")
    if label:
        ax.legend(fontsize=7)
    return ax


def particle_gallery(volume, picks: pd.DataFrame, voxel_size: float = 10.012444, per_type: int = 6,
                     seed: int = 0, figsize_per_cell: float = 1.3):
    """Grid of central x-y crops, one row per particle type present in ``picks`` (up to ``per_type`` each)."""
    plt = _plt()
    types = [p for p in PARTICLES if (picks["particle_type"] == p.name).any()]
    rng = np.random.default_rng(seed)
    nrows = max(len(types), 1)
    fig, axes = plt.subplots(nrows, per_type, figsize=(per_type * figsize_per_cell, nrows * figsize_per_cell),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    shape = tuple(volume.shape)
    for row, p in enumerate(types):
        sel = picks[picks["particle_type"] == p.name]
        sel = sel.iloc[rng.permutation(len(sel))[:per_type]]
        half = int(np.ceil(1.6 * p.radius / voxel_size))
        for col, (_, pk) in enumerate(sel.iterrows()):
            z, y, x = np.rint(angstrom_to_voxel([[pk.x, pk.y, pk.z]], voxel_size)[0]).astype(int)
            z = int(np.clip(z, 0, shape[0] - 1))
            y0, y1 = max(y - half, 0), min(y + half + 1, shape[1])
            x0, x1 = max(x - half, 0), min(x + half + 1, shape[2])
            crop = np.asarray(volume[z, y0:y1, x0:x1], dtype=np.float32)
            ax = axes[row, col]
            if crop.size:
                vmin, vmax = display_range(crop)
                ax.imshow(crop, cmap="gray", vmin=vmin, vmax=vmax)
            if col == 0:
                ax.set_title(p.name, fontsize=7, loc="left", color=p.hex_color)
    fig.tight_layout()
    return fig


def match_labels(solution: pd.DataFrame, submission: pd.DataFrame, distance_multiplier: float = 0.5) -> pd.DataFrame:
    """Label every point TP, FP or FN by the metric's radius rule.

    Returns a DataFrame ``experiment, particle_type, x, y, z, status`` where submission points within
    ``distance_multiplier * radius`` of a reference of the same type and run are ``"TP"`` (else ``"FP"``),
    and reference points with no such candidate are ``"FN"``.
    """
    rows = []
    keys = set(map(tuple, solution[["experiment", "particle_type"]].drop_duplicates().to_numpy())) | set(
        map(tuple, submission[["experiment", "particle_type"]].drop_duplicates().to_numpy()))
    for exp, name in sorted(keys):
        ref = solution[(solution.experiment == exp) & (solution.particle_type == name)][["x", "y", "z"]].to_numpy(float)
        cand = submission[(submission.experiment == exp) & (submission.particle_type == name)][["x", "y", "z"]]
        cand = cand.to_numpy(float)
        r = get_particle(name).radius * distance_multiplier
        cand_hit = np.zeros(len(cand), bool)
        ref_hit = np.zeros(len(ref), bool)
        if len(ref) and len(cand):
            d_c, _ = cKDTree(ref).query(cand, distance_upper_bound=r)
            cand_hit = np.isfinite(d_c)
            d_r, _ = cKDTree(cand).query(ref, distance_upper_bound=r)
            ref_hit = np.isfinite(d_r)
        for p, hit in zip(cand, cand_hit, strict=True):
            rows.append((exp, name, *p, "TP" if hit else "FP"))
        for p, hit in zip(ref, ref_hit, strict=True):
            if not hit:
                rows.append((exp, name, *p, "FN"))
    return pd.DataFrame(rows, columns=["experiment", "particle_type", "x", "y", "z", "status"])


_STATUS_STYLE = {"TP": ("#2ca02c", "-"), "FP": ("#d62728", "--"), "FN": ("#ff7f0e", ":")}


def show_matches(ax, volume, index: int, labels: pd.DataFrame, voxel_size: float = 10.012444,
                 title: str | None = None):
    """Draw x-y slice ``index`` with :func:`match_labels` output circled green (TP), red (FP), orange (FN)."""
    show_slice(ax, volume, index, None, voxel_size, legend=False, title=title)
    plt = _plt()
    seen = set()
    for status, (color, ls) in _STATUS_STYLE.items():
        sub = labels[labels["status"] == status]
        for u, v, r, _ in _circles_on_slice(sub, voxel_size, 0, index):
            ax.add_patch(plt.Circle((u, v), r, fill=False, color=color, ls=ls, lw=1.3,
                                    label=None if status in seen else status))
            seen.add(status)
    if seen:
        ax.legend(loc="upper right", fontsize=7, framealpha=0.7)
    return ax


def save_figure(fig, path, dpi: int = 110, overwrite: bool = True):
    """Save ``fig`` as PNG atomically and close it; returns the path."""

    def _write(tmp):
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")

    out = atomic_write(path, _write, overwrite=overwrite)
    _plt().close(fig)
    return out


def slice_browser(volume, picks: pd.DataFrame | None = None, voxel_size: float = 10.012444, figsize=(7, 7)):
    """An ipywidgets z-slider over x-y slices with picks circled; ``None`` when ipywidgets is unavailable.

    In a notebook, display the returned widget; outside one, fall back to :func:`show_slice`.
    """
    try:
        import ipywidgets
    except ImportError:
        return None
    plt = _plt()
    out = ipywidgets.Output()
    slider = ipywidgets.IntSlider(value=volume.shape[0] // 2, min=0, max=volume.shape[0] - 1, description="z")

    def _draw(change=None):
        with out:
            out.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=figsize)
            show_slice(ax, volume, slider.value, picks, voxel_size)
            plt.show()

    slider.observe(_draw, names="value")
    _draw()
    return ipywidgets.VBox([slider, out])
