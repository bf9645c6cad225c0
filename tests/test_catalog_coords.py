"""The particle catalog and the Å <-> voxel convention."""

from __future__ import annotations

import numpy as np
import pytest

from czii_kit import catalog
from czii_kit.coords import angstrom_to_voxel, level_origin, nearest_voxel, voxel_to_angstrom
from czii_kit.errors import CziiKitError, UnknownParticleError

VOXEL = 10.012444


def test_catalog_matches_the_competition():
    assert catalog.PARTICLE_NAMES == (
        "apo-ferritin", "beta-amylase", "beta-galactosidase", "ribosome", "thyroglobulin", "virus-like-particle",
    )
    assert catalog.radii() == {
        "apo-ferritin": 60.0, "beta-amylase": 65.0, "beta-galactosidase": 90.0,
        "ribosome": 150.0, "thyroglobulin": 130.0, "virus-like-particle": 135.0,
    }
    w = catalog.weights()
    assert sum(w.values()) == 7
    assert w["beta-amylase"] == 0 and w["beta-galactosidase"] == 2 and w["thyroglobulin"] == 2
    assert catalog.SCORED_PARTICLES == tuple(n for n in catalog.PARTICLE_NAMES if n != "beta-amylase")
    assert sorted(catalog.class_names()) == list(range(6))
    assert len({p.map_file for p in catalog.PARTICLES} | {catalog.DISTRACTOR_MAP_FILE}) == 7


def test_get_particle_by_name_and_class():
    assert catalog.get_particle("ribosome").class_id == 3
    assert catalog.get_particle(3).name == "ribosome"
    assert catalog.get_particle("apo-ferritin").hex_color == "#0075dc"
    with pytest.raises(UnknownParticleError, match="unknown particle type 'ribosom'.*apo-ferritin"):
        catalog.get_particle("ribosom")
    with pytest.raises(CziiKitError):
        catalog.get_particle(6)


def test_angstrom_to_voxel_swaps_axes_and_divides():
    pts = np.array([[10.0, 20.0, 30.0], [0.0, 0.0, 0.0]]) * VOXEL  # (x, y, z)
    idx = angstrom_to_voxel(pts, VOXEL)
    np.testing.assert_allclose(idx, [[30, 20, 10], [0, 0, 0]])  # (z, y, x)
    np.testing.assert_allclose(voxel_to_angstrom(idx, VOXEL), pts)
    # one point, given flat
    np.testing.assert_allclose(angstrom_to_voxel([VOXEL, 2 * VOXEL, 3 * VOXEL], VOXEL), [[3, 2, 1]])


def test_nearest_voxel_rounds_to_the_voxel_whose_centre_is_closest():
    # voxel i's centre is at i * voxel_size; just under half a voxel away rounds back to i
    pts = np.array([[5 * VOXEL + 0.49 * VOXEL, 7 * VOXEL - 0.49 * VOXEL, 2 * VOXEL + 0.51 * VOXEL]])
    assert nearest_voxel(pts, VOXEL).tolist() == [[3, 7, 5]]
    assert nearest_voxel(pts, VOXEL).dtype == np.int64


def test_convention_on_an_unequal_sided_volume():
    """A point placed with the convention lands in the voxel that holds the signal; an axis swap would not."""
    shape = (16, 32, 48)
    vol = np.zeros(shape, np.float32)
    iz, iy, ix = 13, 5, 41
    vol[iz, iy, ix] = 1.0
    xyz = voxel_to_angstrom([[iz, iy, ix]], VOXEL)[0]
    assert xyz.tolist() == pytest.approx([ix * VOXEL, iy * VOXEL, iz * VOXEL])
    z, y, x = nearest_voxel(xyz, VOXEL)[0]
    assert vol[z, y, x] == 1.0
    assert xyz[0] / VOXEL > shape[0]  # x index 41 would overflow z (16): swapping axes fails loudly


def test_binned_level_uses_the_doubled_voxel_size():
    xyz = np.array([[400.0, 200.0, 100.0]])
    np.testing.assert_allclose(angstrom_to_voxel(xyz, 2 * VOXEL), angstrom_to_voxel(xyz, VOXEL) / 2)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_voxel_size(bad):
    with pytest.raises(ValueError, match="voxel size"):
        angstrom_to_voxel([[1.0, 2.0, 3.0]], bad)


def test_level_origin_addresses_binned_voxels_exactly():
    # binned voxel j at level k averages level-0 voxels j*2**k .. (j+1)*2**k - 1
    assert level_origin(VOXEL, 0) == 0
    assert level_origin(VOXEL, 1) == pytest.approx(VOXEL / 2)
    assert level_origin(VOXEL, 2) == pytest.approx(1.5 * VOXEL)
    fine = np.arange(8)
    xyz = voxel_to_angstrom(np.stack([fine] * 3, axis=1), VOXEL)
    for k in (1, 2):
        got = nearest_voxel(xyz, VOXEL * 2**k, level_origin(VOXEL, k))[:, 0]
        assert got.tolist() == (fine // 2**k).tolist()
        back = voxel_to_angstrom([[1, 1, 1]], VOXEL * 2**k, level_origin(VOXEL, k))
        assert back[0, 0] == pytest.approx(np.mean(np.arange(2**k, 2 * 2**k)) * VOXEL)
