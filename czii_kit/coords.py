"""Conversion between points in Ångström and voxel indices: the only place it happens.

Convention
----------
Arrays are indexed ``[z, y, x]``. Points are ``(x, y, z)`` in Å in the tomogram's frame. The centre
of voxel ``(iz, iy, ix)`` lies at ``(x, y, z) = (ix, iy, iz) * voxel_size``: a point's (fractional)
voxel index is its coordinate divided by the voxel size, and the voxel that holds it is that index
rounded to the nearest integer. This is the convention of the Kaggle data (coordinate / 10.012444).

At a mean-binned multiscale level ``k`` the voxel size is ``voxel_size * 2**k`` and binned voxel
``j`` averages level-0 voxels ``j * 2**k ... (j + 1) * 2**k - 1``, so its centre is shifted by
``origin = (2**k - 1) / 2 * voxel_size`` (:func:`level_origin`). Pass that ``origin`` to the
functions below to address a binned level exactly (leaving it 0 is off by up to half a level-0
voxel, e.g. 5 Å at level 1, 15 Å at level 2).
"""

from __future__ import annotations

import numpy as np

KAGGLE_VOXEL_SIZE = 10.012444
"""Å per voxel of the Kaggle tomograms (their folders say ``VoxelSpacing10.000``)."""


def angstrom_to_voxel(points_xyz, voxel_size: float, origin: float = 0.0) -> np.ndarray:
    """Points ``(N, 3)`` as ``(x, y, z)`` in Å -> fractional voxel indices ``(N, 3)`` as ``(z, y, x)``.

    ``origin`` is the Å position of voxel 0's centre (0 at level 0; see :func:`level_origin`).
    """
    pts = np.asarray(points_xyz, dtype=np.float64).reshape(-1, 3)
    _check_voxel_size(voxel_size)
    return (pts[:, ::-1] - float(origin)) / float(voxel_size)


def voxel_to_angstrom(index_zyx, voxel_size: float, origin: float = 0.0) -> np.ndarray:
    """Voxel indices ``(N, 3)`` as ``(z, y, x)`` -> points ``(N, 3)`` as ``(x, y, z)`` in Å."""
    idx = np.asarray(index_zyx, dtype=np.float64).reshape(-1, 3)
    _check_voxel_size(voxel_size)
    return idx[:, ::-1] * float(voxel_size) + float(origin)


def nearest_voxel(points_xyz, voxel_size: float, origin: float = 0.0) -> np.ndarray:
    """Points ``(N, 3)`` ``(x, y, z)`` Å -> integer indices ``(N, 3)`` ``(z, y, x)`` of the voxels holding them."""
    return np.rint(angstrom_to_voxel(points_xyz, voxel_size, origin)).astype(np.int64)


def level_origin(voxel_size: float, level: int) -> float:
    """Å position of voxel 0's centre at mean-binned level ``level`` of a level-0 grid of ``voxel_size`` Å."""
    _check_voxel_size(voxel_size)
    return (2 ** int(level) - 1) / 2 * float(voxel_size)


def _check_voxel_size(voxel_size: float) -> None:
    if not np.isfinite(voxel_size) or voxel_size <= 0:
        raise ValueError(f"voxel size must be a positive number of Å, got {voxel_size!r}")
