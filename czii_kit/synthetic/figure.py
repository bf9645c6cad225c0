"""The figure of docs/simulator.md: one simulated run, an x-y slice with picks circled by type and x-z slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from czii_kit.atomic import atomic_write
from czii_kit.catalog import PARTICLE_NAMES, get_particle
from czii_kit.coords import angstrom_to_voxel
from czii_kit.synthetic.simulate import simulate_run


def _best_slice(idx: np.ndarray, radii: np.ndarray, n: int, axis: int) -> int:
    """The index along ``axis`` whose plane cuts the most particles (within 60 % of their radius)."""
    if not len(idx):
        return n // 2
    hits = [(np.abs(idx[:, axis] - k) < 0.6 * radii).sum() for k in range(n)]
    return int(np.argmax(hits))


def make_figure(
    out_png: str | Path,
    maps_dir: str | Path | None = "shipped",
    size: str = "full",
    seed: int = 0,
    overwrite: bool = False,
    workers: int | None = None,
    dpi: int = 72,
) -> Path:
    """Simulate one run and draw it: denoised x-y slice with picks, denoised and WBP x-z slices.

    Parameters
    ----------
    out_png : path-like
        PNG to write (atomically; an existing file needs ``overwrite``).
    maps_dir : path-like, "shipped" or "procedural"
        Density maps (see :func:`czii_kit.maps.maps_option`; default the shipped ones).
    size : str
        Size preset of the simulated run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D


    tomos, picks, params = simulate_run(size, seed=seed, maps=maps_dir, workers=workers, return_params=True)
    den, wbp = tomos["denoised"], tomos["wbp"]
    nz, ny, nx = den.shape
    vs = params.voxel_size
    idx = angstrom_to_voxel(picks[["x", "y", "z"]].to_numpy(float), vs) if len(picks) else np.zeros((0, 3))
    radii = np.array([get_particle(t).radius / vs for t in picks["particle_type"]])
    z = _best_slice(idx, radii, nz, 0)
    big = (picks["particle_type"] == "ribosome").to_numpy() if len(picks) else np.zeros(0, bool)
    y = _best_slice(idx[big] if big.any() else idx, radii[big] if big.any() else radii, ny, 1)

    def clim(a):
        lo, hi = np.percentile(a, [0.5, 99.5])
        return {"vmin": lo, "vmax": hi, "cmap": "gray"}

    fig = plt.figure(figsize=(9.0, 12.4))
    gs = fig.add_gridspec(3, 1, height_ratios=[nx, nz * 1.15, nz * 1.15])
    ax = fig.add_subplot(gs[0])
    sl = den[z]
    ax.imshow(sl, **clim(sl), interpolation="bilinear")
    for (_, row), p, r in zip(picks.iterrows(), idx, radii, strict=True):
        dz = abs(p[0] - z)
        if dz < r:
            rr = np.sqrt(r * r - dz * dz)
            ax.add_patch(plt.Circle((p[2], p[1]), rr, fill=False, lw=1.3,
                                    color=get_particle(row["particle_type"]).hex_color))
    ax.set_title(f"denoised, x-y slice z={z}  (synthetic run, {nz}x{ny}x{nx} voxels of {vs:.3f} Å, seed {seed})",
                 fontsize=9)
    handles = [Line2D([], [], marker="o", ls="", mfc="none", mec=get_particle(n).hex_color, mew=1.5,
                      label=f"{n} ({int((picks['particle_type'] == n).sum())})") for n in PARTICLE_NAMES]
    ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.85)
    ax.set_xlabel("x (voxels)")
    ax.set_ylabel("y (voxels)")
    for k, (vol, label) in enumerate(((den, "denoised"), (wbp, "wbp"))):
        a = fig.add_subplot(gs[k + 1])
        xz = vol[:, y, :]
        a.imshow(xz, **clim(xz), interpolation="bilinear", aspect=1.0)
        a.axhline(z, color="#ffcc00", lw=0.6, ls="--")
        sb = params.slab_center
        a.set_title(f"{label}, x-z slice y={y}: ice slab ~{params.slab_thickness:.0f} voxels thick around z={sb:.0f}; "
                    f"tilts {params.tilt_min:+.0f}..{params.tilt_max:+.0f}° about y (missing wedge: z-elongation)",
                    fontsize=8)
        a.set_xlabel("x (voxels)")
        a.set_ylabel("z")
    fig.tight_layout()

    def save(p: Path) -> None:
        import io

        from PIL import Image

        buf = io.BytesIO()
        fig.savefig(buf, dpi=dpi, format="png")
        buf.seek(0)
        # a 256-colour palette keeps the file small (grey slices + a few pick colours)
        Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            p, format="PNG", optimize=True)

    try:
        return atomic_write(out_png, save, overwrite=overwrite)
    finally:
        plt.close(fig)
