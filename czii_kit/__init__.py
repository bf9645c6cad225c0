"""czii_kit: pick protein complexes in cryo-electron tomograms (CZII CryoET Object Identification).

Arrays are indexed ``[z, y, x]``; points are ``(x, y, z)`` in Ångström. The conversion between
the two lives in :mod:`czii_kit.coords` and nowhere else.
"""

__version__ = "0.1.0"

from czii_kit.catalog import PARTICLE_NAMES, PARTICLES, SCORED_PARTICLES, Particle, get_particle
from czii_kit.coords import angstrom_to_voxel, voxel_to_angstrom
from czii_kit.errors import CziiKitError, DataError, UnknownParticleError

__all__ = [
    "__version__",
    "PARTICLES",
    "PARTICLE_NAMES",
    "SCORED_PARTICLES",
    "Particle",
    "get_particle",
    "angstrom_to_voxel",
    "voxel_to_angstrom",
    "CziiKitError",
    "DataError",
    "UnknownParticleError",
]
