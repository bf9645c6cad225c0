"""Conversion between points in Ångström and voxel indices: the only place it happens.

Convention
----------
Arrays are indexed ``[z, y, x]``. Points are ``(x, y, z)`` in Å in the tomogram's frame. The centre
of voxel ``(iz, iy, ix)`` lies at ``(x, y, z) = (ix, iy, iz) * voxel_size``: a point's (fractional)
voxel index is its coordinate divided by the voxel size, and the voxel that holds it is that index
rounded to the nearest integer. This is the convention of the Kaggle data (coordinate / 10.012444).
At a binned multiscale level ``k`` the voxel size is ``voxel_size * 2**k`` with the same rule.
"""

from __future__ import annotations

import numpy as np


def angstrom_to_voxel(points_xyz, voxel_size: float) -> np.ndarray:
    """Points ``(N, 3)`` as ``(x, y, z)`` in Å -> fractional voxel indices ``(N, 3)`` as ``(z, y, x)``."""
    pts = np.asarray(points_xyz, dtype=np.float64).reshape(-1, 3)
    _check_voxel_size(voxel_size)
    return pts[:, ::-1] / float(voxel_size)


def voxel_to_angstrom(index_zyx, voxel_size: float) -> np.ndarray:
    """Voxel indices ``(N, 3)`` as ``(z, y, x)`` -> points ``(N, 3)`` as ``(x, y, z)`` in Å."""
    idx = np.asarray(index_zyx, dtype=np.float64).reshape(-1, 3)
    _check_voxel_size(voxel_size)
    return idx[:, ::-1] * float(voxel_size)


def nearest_voxel(points_xyz, voxel_size: float) -> np.ndarray:
    """Points ``(N, 3)`` ``(x, y, z)`` Å -> integer indices ``(N, 3)`` ``(z, y, x)`` of the voxels holding them."""
    return np.rint(angstrom_to_voxel(points_xyz, voxel_size)).astype(np.int64)


def _check_voxel_size(voxel_size: float) -> None:
    if not np.isfinite(voxel_size) or voxel_size <= 0:
        raise ValueError(f"voxel size must be a positive number of Å, got {voxel_size!r}")
