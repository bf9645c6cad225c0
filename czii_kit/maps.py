"""Density maps (MRC): read, normalise and crop a protein's density to its support.

A map is a ``[z, y, x]`` float32 array with a voxel size in Å (isotropic). :func:`read_map` is the
one strict MRC reader of the package; :func:`load_map_model` turns a map into a
:class:`ParticleModel` (solid protein ~1, cropped, centre of mass and bounding radius), which the
simulator places in its phantoms and :mod:`czii_kit.templates` matches against tomograms.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from czii_kit.errors import DataError


@dataclass
class ParticleModel:
    """A density model on its own grid.

    Attributes
    ----------
    name : str
        Particle type (catalog name) or ``"distractor"`` (the simulator's unrelated protein).
    density : ndarray ``(n, n, n)`` float32
        Protein volume fraction (1 = solid protein), cropped to its support.
    voxel_size : float
        Å per voxel of ``density``.
    center : ndarray (3,)
        Centre of mass in ``density`` index coordinates ``(z, y, x)``: this point lands on the pick.
    radius : float
        Bounding radius around ``center`` in Å.
    source : str
        File it came from, or ``"procedural"``.
    """

    name: str
    density: np.ndarray
    voxel_size: float
    center: np.ndarray
    radius: float
    source: str = "procedural"

    @property
    def mass_fraction_volume(self) -> float:
        """Total protein volume in Å³ (sum of the volume fraction)."""
        return float(self.density.sum() * self.voxel_size**3)


def finish_model(name: str, dens: np.ndarray, voxel_size: float, source: str, rel_threshold: float = 0.02):
    dens = np.asarray(dens, np.float32)
    mask = dens > rel_threshold * float(dens.max())
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - 2, 0)
    hi = np.minimum(idx.max(0) + 3, dens.shape)
    dens = np.ascontiguousarray(dens[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
    dens = np.where(dens > 0, dens, 0).astype(np.float32)
    grid = np.indices(dens.shape).reshape(3, -1).astype(np.float64)
    w = dens.reshape(-1).astype(np.float64)
    center = (grid * w).sum(1) / w.sum()
    sup = dens.reshape(-1) > rel_threshold * float(dens.max())
    radius = float(np.sqrt(((grid[:, sup] - center[:, None]) ** 2).sum(0).max()) + 1.0) * voxel_size
    return ParticleModel(name, dens, float(voxel_size), center, radius, source)


def read_map(path: str | Path) -> tuple[np.ndarray, float]:
    """Read an MRC density map: ``(array [z, y, x] float32, voxel size Å)``.

    Raises
    ------
    DataError
        Missing file, unreadable MRC, not 3D, not finite, constant, or without positive density.
    """
    import mrcfile

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "density map not found")
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if len(head) < 1024 or head[208:211] != b"MAP":
        raise DataError(path, "not an MRC density map (no 'MAP' signature in a 1024-byte header)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # permissive mode warns about what it then reports as None
            with mrcfile.open(path, permissive=True) as m:
                if m.data is None:
                    raise DataError(path, "not a readable MRC file (no data block)")
                data = np.asarray(m.data, dtype=np.float32).copy()
                vs = m.voxel_size
                vsz = [float(vs.x), float(vs.y), float(vs.z)]
    except DataError:
        raise
    except Exception as exc:  # mrcfile raises ValueError / OSError on corrupt headers
        raise DataError(path, f"not a readable MRC density map ({exc})") from exc
    if data.ndim != 3 or min(data.shape) < 4:
        raise DataError(path, f"expected a 3D density map, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise DataError(path, "density map contains NaN or infinite values")
    if float(data.max()) <= 0 or float(data.max()) == float(data.min()):
        raise DataError(path, "density map has no positive density (constant or all <= 0)")
    if not (max(vsz) > 0):
        raise DataError(path, "the MRC header gives no voxel size (0 Å); cannot rescale the map")
    if max(vsz) - min(vsz) > 1e-3 * max(vsz):
        raise DataError(path, f"anisotropic voxel size {vsz} is not supported")
    return data, vsz[0]


def load_map_model(name: str, path: str | Path) -> ParticleModel:
    """A :class:`ParticleModel` from an MRC map; density is normalised so solid protein is ~1.

    The scale is the 99th percentile of the voxels above 10 % of the maximum (solid-protein voxels of a
    density map proportional to mass), so maps of different proteins keep their relative masses.
    """
    data, vs = read_map(path)
    if data.mean() > 0.5 * data.max():
        raise DataError(path, "map looks inverted or has a large positive background (mean > half of max)")
    core = data[data > 0.1 * data.max()]
    scale = float(np.quantile(core, 0.99))
    return finish_model(name, data / scale, vs, str(path))
