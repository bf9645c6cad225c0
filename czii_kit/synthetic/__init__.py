"""Synthetic cryo-ET data: realistic simulated tomograms with ground-truth picks.

Pipeline per run (see the modules):

- :mod:`~czii_kit.synthetic.phantom`: particles (real density maps or procedural models), uniformly
  random orientations, no overlaps, counts like the real runs; distractor proteins, irregular
  aggregates, lipid membranes (vesicles, sheet fragments), gold fiducials; all in a tilted,
  undulating ice slab.
- :mod:`~czii_kit.synthetic.imaging`: tilt series about ``y`` (dose-symmetric), CTF with defocus
  gradient and astigmatism, B-factor, exposure filter, alignment error, inelastic attenuation,
  shot noise.
- :mod:`~czii_kit.synthetic.reconstruct`: weighted back-projection (missing wedge, z elongation).
- :mod:`~czii_kit.synthetic.denoise`: the smooth ``denoised`` tomogram.
- :mod:`~czii_kit.synthetic.dataset`: :func:`generate_dataset` (Kaggle layout) and :func:`benchmark`.
- :mod:`~czii_kit.synthetic.figure`: :func:`make_figure`, the figure of docs/simulator.md.
"""

from czii_kit.synthetic.dataset import benchmark, generate_dataset, run_name
from czii_kit.synthetic.figure import make_figure
from czii_kit.synthetic.params import SIZES, VOXEL_SIZE, RunParams, SimParamError, SimRanges, sample_params
from czii_kit.synthetic.phantom import load_maps, procedural_models, random_rotations
from czii_kit.synthetic.simulate import TOMOGRAM_NAMES, simulate_run

__all__ = [
    "SIZES",
    "TOMOGRAM_NAMES",
    "VOXEL_SIZE",
    "RunParams",
    "SimParamError",
    "SimRanges",
    "benchmark",
    "generate_dataset",
    "load_maps",
    "make_figure",
    "procedural_models",
    "random_rotations",
    "run_name",
    "sample_params",
    "simulate_run",
]
