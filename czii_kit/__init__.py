"""czii_kit: pick protein complexes in cryo-electron tomograms (CZII CryoET Object Identification).

Arrays are indexed ``[z, y, x]``; points are ``(x, y, z)`` in Ångström. The conversion between
the two lives in :mod:`czii_kit.coords` and nowhere else.

The public API, loaded on first use (``import czii_kit`` stays light)::

    from czii_kit.predict import predict       # picks with the shipped model: predict(root, split="test")
    czii_kit.load_model(path=None)             # a ModelBundle (czii_kit.bundle)
    czii_kit.read_picks(root, split="train")   # reference picks (czii_kit.picks)
    czii_kit.score(solution, submission)       # the Kaggle metric (czii_kit.metric)
    czii_kit.write_submission(picks, path)     # the CSV Kaggle wants (czii_kit.submission)
    czii_kit.generate_dataset(out, ...)        # simulated tomograms with ground truth (czii_kit.synthetic)
"""

import importlib

__version__ = "0.1.0"

from czii_kit.catalog import PARTICLE_NAMES, PARTICLES, SCORED_PARTICLES, Particle, get_particle
from czii_kit.coords import angstrom_to_voxel, voxel_to_angstrom
from czii_kit.errors import CziiKitError, DataError, SettingsError, UnknownParticleError

_LAZY = {
    "load_model": ("czii_kit.bundle", "ModelBundle.load"),
    "ModelBundle": ("czii_kit.bundle", "ModelBundle"),
    "PipelineSettings": ("czii_kit.settings", "PipelineSettings"),
    "read_picks": ("czii_kit.picks", "read_picks"),
    "score": ("czii_kit.metric", "score"),
    "write_submission": ("czii_kit.submission", "write_submission"),
    "generate_dataset": ("czii_kit.synthetic", "generate_dataset"),
}
"""Public names loaded from their modules on first use (``predict`` is the module :mod:`czii_kit.predict`,
so its function is imported from there)."""


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'czii_kit' has no attribute {name!r}")
    module, attr = _LAZY[name]
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    globals()[name] = obj
    return obj


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
    "SettingsError",
    "UnknownParticleError",
    *_LAZY,
]
