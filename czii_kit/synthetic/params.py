"""Simulation parameters: seeded ranges (:class:`SimRanges`) and the values drawn for one run (:class:`RunParams`).

Every run of a synthetic dataset draws its own imaging and sample parameters from the ranges, so a
model trained on the data does not learn one look. A range ``(lo, hi)`` with ``lo == hi`` fixes the
value. The drawn values are saved beside each run as ``sim_params.json``.

Units: angles in degrees, defocus in µm (positive = underfocus), dose in e/Å² (whole tilt series),
B-factors in Å², potentials in volts (relative to vitreous ice), lengths in voxels unless the name
says ``_a`` (Å).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np

from czii_kit.errors import CziiKitError

VOXEL_SIZE = 10.012444
"""The Kaggle tomograms' voxel size, Å."""

SIZES: dict[str, tuple[int, int, int]] = {
    "full": (184, 630, 630),
    "small": (92, 316, 316),
    "tiny": (48, 96, 128),
}
"""Volume shape ``(nz, ny, nx)`` of each size preset (all at :data:`VOXEL_SIZE`)."""

FULL_SHAPE = SIZES["full"]

COUNT_RANGES: dict[str, tuple[int, int]] = {
    "apo-ferritin": (35, 95),
    "beta-amylase": (9, 21),
    "beta-galactosidase": (11, 24),
    "ribosome": (23, 74),
    "thyroglobulin": (28, 49),
    "virus-like-particle": (9, 29),
}
"""Particles per full-size run (184 x 630 x 630), the range over the 7 real Kaggle training runs."""


class SimParamError(CziiKitError, ValueError):
    """A simulation parameter or range that makes no sense."""


def shape_for_size(size: str | tuple[int, int, int]) -> tuple[int, int, int]:
    """``(nz, ny, nx)`` of a preset name, or a validated explicit shape."""
    if isinstance(size, str):
        try:
            return SIZES[size]
        except KeyError:
            raise SimParamError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}") from None
    shape = tuple(int(s) for s in size)
    if len(shape) != 3 or min(shape) < 16:
        raise SimParamError(f"shape must be 3 sizes (nz, ny, nx), each >= 16 voxels; got {size!r}")
    return shape


@dataclass(frozen=True)
class SimRanges:
    """Ranges ``(lo, hi)`` from which each run's :class:`RunParams` are drawn uniformly.

    Set ``lo == hi`` to fix a value. Fractions of the volume (``slab_fraction``) scale with the
    volume height; counts scale with the volume (see :data:`COUNT_RANGES`).
    """

    # tilt series
    tilt_max: tuple[float, float] = (54.0, 63.0)  # |most negative| and most positive angle, each drawn
    tilt_step: tuple[float, float] = (3.0, 3.0)
    tilt_angle_offset: tuple[float, float] = (-1.0, 1.0)  # error of all tilt angles (deg), plus 0.15 deg jitter each
    # optics (300 kV, Cs 2.7 mm)
    defocus: tuple[float, float] = (2.0, 5.0)  # µm underfocus
    astigmatism: tuple[float, float] = (0.0, 0.3)  # µm (df1 - df2)
    amplitude_contrast: tuple[float, float] = (0.07, 0.07)
    bfactor: tuple[float, float] = (300.0, 1500.0)  # Å², coherence/drift/alignment envelope
    align_sigma: tuple[float, float] = (0.2, 1.0)  # px, residual per-tilt alignment error
    # exposure and detection
    dose: tuple[float, float] = (60.0, 160.0)  # e/Å², whole tilt series
    dqe: tuple[float, float] = (0.45, 0.85)
    ice_mfp: tuple[float, float] = (3000.0, 4500.0)  # Å, inelastic mean free path (energy filtered)
    # sample
    protein_dv: tuple[float, float] = (1.6, 2.6)  # V, mean inner potential protein minus ice
    slab_fraction: tuple[float, float] = (0.42, 0.80)  # slab thickness / nz
    slab_center: tuple[float, float] = (0.38, 0.55)  # slab centre / nz
    slab_tilt: tuple[float, float] = (0.0, 4.0)  # deg, each of x and y, random sign
    slab_bump: tuple[float, float] = (0.0, 6.0)  # voxels, amplitude of smooth surface undulation
    crowding: tuple[float, float] = (0.8, 1.25)  # multiplies all particle counts
    # chance that a particle is placed touching one of its kind (measured on the real runs: most
    # ribosomes and apo-ferritins touch a neighbour of their kind, the others rarely)
    cluster_ribosome: tuple[float, float] = (0.5, 0.9)
    cluster_apoferritin: tuple[float, float] = (0.2, 0.7)
    cluster_other: tuple[float, float] = (0.0, 0.08)
    background: tuple[float, float] = (0.03, 0.12)  # std of the solvent density texture (protein fractions)
    distractor_density: tuple[float, float] = (60.0, 220.0)  # other small proteins per full-size volume
    junk_density: tuple[float, float] = (80.0, 300.0)  # irregular aggregates per full-size volume
    n_vesicles: tuple[float, float] = (0.0, 3.0)  # per full-size volume
    sheet_probability: tuple[float, float] = (0.25, 0.25)  # chance of one flat membrane fragment
    gold_probability: tuple[float, float] = (0.3, 0.3)  # chance that a run has gold fiducials
    n_gold: tuple[float, float] = (1.0, 6.0)  # per full-size volume, when present
    # outputs
    denoise_sigma: tuple[float, float] = (1.1, 1.9)  # voxels, 3D low-pass of the denoised tomogram
    residual_noise: tuple[float, float] = (0.3, 0.9)  # noise fraction the denoiser leaves
    log10_scale: tuple[float, float] = (-5.0, 1.0)  # arbitrary units of the written tomograms
    offset: tuple[float, float] = (-1.0, 1.0)  # offset, in units of the tomogram's std
    # chance that the reconstruction phase-flips the images first (IMOD ctfphaseflip); 0 and 1
    # draw nothing, so a seed gives the same specimen and noise with and without the correction
    ctf_correction: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not (isinstance(v, tuple) and len(v) == 2):
                raise SimParamError(f"range {f.name} must be a (lo, hi) pair, got {v!r}")
            lo, hi = float(v[0]), float(v[1])
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
                raise SimParamError(f"range {f.name} = {v!r}: need finite lo <= hi")
        checks = {
            "tilt_max": (1.0, 89.0), "tilt_step": (0.1, 30.0), "defocus": (0.05, 20.0),
            "amplitude_contrast": (0.0, 0.5), "dose": (1.0, 10000.0), "dqe": (0.01, 1.0),
            "slab_fraction": (0.05, 1.0), "slab_center": (0.0, 1.0), "denoise_sigma": (0.0, 10.0),
            "residual_noise": (0.0, 1.0), "ctf_correction": (0.0, 1.0),
            "bfactor": (0.0, 20000.0), "protein_dv": (0.01, 50.0), "ice_mfp": (100.0, 1e6),
            "crowding": (0.0, 10.0), "background": (0.0, 2.0),
            "cluster_ribosome": (0.0, 1.0), "cluster_apoferritin": (0.0, 1.0), "cluster_other": (0.0, 1.0),
            "sheet_probability": (0.0, 1.0), "gold_probability": (0.0, 1.0),
            "align_sigma": (0.0, 20.0), "astigmatism": (0.0, 5.0), "slab_tilt": (0.0, 30.0),
        }
        for name, (a, b) in checks.items():
            lo, hi = getattr(self, name)
            if lo < a or hi > b:
                raise SimParamError(f"range {name} = {(lo, hi)} outside the sensible interval [{a}, {b}]")

    @classmethod
    def from_dict(cls, d: dict) -> SimRanges:
        """Ranges from a dict of ``name: [lo, hi]`` (unknown names are an error)."""
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise SimParamError(f"unknown simulation ranges {bad}; known: {', '.join(sorted(known))}")
        return cls(**{k: tuple(float(x) for x in v) for k, v in d.items()})

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}


CTF_CORRECTIONS = ("none", "phase_flip")
"""CTF corrections the simulated reconstruction can apply to the tilt images before back-projection."""


@dataclass
class RunParams:
    """The concrete parameters of one simulated run (drawn by :func:`sample_params`)."""

    shape: tuple[int, int, int]
    voxel_size: float
    tilt_min: float
    tilt_max: float
    tilt_step: float
    tilt_angle_offset: float
    voltage_kv: float
    cs_mm: float
    defocus: float
    astigmatism: float
    astigmatism_angle: float
    amplitude_contrast: float
    bfactor: float
    align_sigma: float
    dose: float
    dqe: float
    ice_mfp: float
    protein_dv: float
    slab_thickness: float  # voxels
    slab_center: float  # voxel z index
    slab_tilt_x: float  # deg
    slab_tilt_y: float  # deg
    slab_bump: float  # voxels
    crowding: float
    clustering: dict[str, float]
    background: float
    n_distractors: int
    n_junk: int
    n_vesicles: int
    n_sheets: int
    n_gold: int
    denoise_sigma: float
    residual_noise: float
    wbp_scale: float
    wbp_offset: float
    denoised_scale: float
    denoised_offset: float
    counts: dict[str, int] = field(default_factory=dict)
    ctf_correction: str = "none"  # what the reconstruction did to the images: one of CTF_CORRECTIONS

    @property
    def angles(self) -> np.ndarray:
        """Tilt angles in degrees, ascending (the nominal ones; the offset is an error added in imaging)."""
        n = int(round((self.tilt_max - self.tilt_min) / self.tilt_step))
        return (self.tilt_min + self.tilt_step * np.arange(n + 1)).astype(np.float64)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> RunParams:
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise SimParamError(f"unknown run parameters {bad}")
        d = dict(d)
        d["shape"] = tuple(int(s) for s in d["shape"])
        return cls(**d)

    def validate(self) -> RunParams:
        """Check the values; raises :class:`SimParamError` naming the first bad one."""
        nz = self.shape[0]
        if not (0 < self.tilt_step <= 30 and -89 <= self.tilt_min < self.tilt_max <= 89):
            raise SimParamError(f"bad tilt range {self.tilt_min}..{self.tilt_max} step {self.tilt_step}")
        if self.defocus <= 0:
            raise SimParamError(f"defocus must be > 0 µm underfocus, got {self.defocus}")
        if self.dose <= 0 or not (0 < self.dqe <= 1):
            raise SimParamError(f"dose must be > 0 and dqe in (0, 1], got {self.dose}, {self.dqe}")
        if not (4 <= self.slab_thickness <= nz):
            raise SimParamError(f"slab thickness {self.slab_thickness} voxels must be within 4..{nz}")
        if self.ctf_correction not in CTF_CORRECTIONS:
            raise SimParamError(f"ctf_correction must be one of {CTF_CORRECTIONS}, got {self.ctf_correction!r}")
        if self.voxel_size <= 0:
            raise SimParamError(f"voxel size must be > 0, got {self.voxel_size}")
        return self


def _u(rng: np.random.Generator, r: tuple[float, float]) -> float:
    lo, hi = r
    return float(lo) if lo == hi else float(rng.uniform(lo, hi))


def volume_ratio(shape: tuple[int, int, int], voxel_size: float = VOXEL_SIZE) -> float:
    """Physical volume of ``shape`` at ``voxel_size`` Å relative to the full-size Kaggle tomogram."""
    ratio = float(np.prod(shape)) / float(np.prod(FULL_SHAPE))
    return ratio if voxel_size == VOXEL_SIZE else ratio * (voxel_size / VOXEL_SIZE) ** 3


def stochastic_round(rng: np.random.Generator, x: float) -> int:
    """``floor(x)`` plus one with probability ``frac(x)`` (unbiased integer)."""
    f = np.floor(x)
    return int(f + (rng.random() < (x - f)))


def sample_params(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    voxel_size: float = VOXEL_SIZE,
    ranges: SimRanges | None = None,
    min_slab: float = 0.0,
) -> RunParams:
    """Draw one run's parameters.

    Parameters
    ----------
    rng : numpy Generator
    shape : (nz, ny, nx)
    voxel_size : float, Å
    ranges : SimRanges, optional (defaults)
    min_slab : float
        Smallest slab thickness in voxels (e.g. the largest particle's diameter plus a margin).
    """
    r = ranges or SimRanges()
    nz = shape[0]
    ratio = volume_ratio(shape, voxel_size)
    step = _u(rng, r.tilt_step)
    tmin = -step * round(_u(rng, r.tilt_max) / step)
    tmax = step * round(_u(rng, r.tilt_max) / step)
    thick = _u(rng, r.slab_fraction) * nz
    thick = float(np.clip(max(thick, min_slab), 4.0, nz - 2.0))
    centre = _u(rng, r.slab_center) * nz
    centre = float(np.clip(centre, thick / 2 + 1, nz - 1 - thick / 2 - 1)) if thick < nz - 4 else (nz - 1) / 2
    crowd = _u(rng, r.crowding)
    counts = {}
    # at the real density a tiny test volume would hold ~1 particle in all; keep one of each type there
    floor = 1 if ratio < 0.05 else 0
    for name, (lo, hi) in COUNT_RANGES.items():
        counts[name] = max(floor, stochastic_round(rng, rng.uniform(lo, hi) * crowd * ratio))
    cluster_range = {"ribosome": r.cluster_ribosome, "apo-ferritin": r.cluster_apoferritin}
    clustering = {n: _u(rng, cluster_range.get(n, r.cluster_other)) for n in COUNT_RANGES}
    sign = lambda: 1.0 if rng.random() < 0.5 else -1.0  # noqa: E731
    gold = rng.random() < _u(rng, r.gold_probability)
    p = RunParams(
        shape=tuple(int(s) for s in shape),
        voxel_size=float(voxel_size),
        tilt_min=float(tmin),
        tilt_max=float(tmax),
        tilt_step=float(step),
        tilt_angle_offset=_u(rng, r.tilt_angle_offset),
        voltage_kv=300.0,
        cs_mm=2.7,
        defocus=_u(rng, r.defocus),
        astigmatism=_u(rng, r.astigmatism),
        astigmatism_angle=float(rng.uniform(0, 180)),
        amplitude_contrast=_u(rng, r.amplitude_contrast),
        bfactor=_u(rng, r.bfactor),
        align_sigma=_u(rng, r.align_sigma),
        dose=_u(rng, r.dose),
        dqe=_u(rng, r.dqe),
        ice_mfp=_u(rng, r.ice_mfp),
        protein_dv=_u(rng, r.protein_dv),
        slab_thickness=thick,
        slab_center=centre,
        slab_tilt_x=sign() * _u(rng, r.slab_tilt),
        slab_tilt_y=sign() * _u(rng, r.slab_tilt),
        slab_bump=_u(rng, r.slab_bump) * min(1.0, nz / FULL_SHAPE[0]),
        crowding=crowd,
        clustering=clustering,
        background=_u(rng, r.background),
        n_distractors=stochastic_round(rng, _u(rng, r.distractor_density) * ratio),
        n_junk=stochastic_round(rng, _u(rng, r.junk_density) * ratio),
        n_vesicles=stochastic_round(rng, _u(rng, r.n_vesicles) * max(ratio, 0.0)),
        n_sheets=int(rng.random() < _u(rng, r.sheet_probability)),
        n_gold=stochastic_round(rng, _u(rng, r.n_gold) * ratio) if gold else 0,
        denoise_sigma=_u(rng, r.denoise_sigma),
        residual_noise=_u(rng, r.residual_noise),
        wbp_scale=float(10 ** _u(rng, r.log10_scale)),
        wbp_offset=_u(rng, r.offset),
        denoised_scale=float(10 ** _u(rng, r.log10_scale)),
        denoised_offset=_u(rng, r.offset),
        counts=counts,
    )
    # drawn last, and only for a chance strictly between 0 and 1, so that the default ranges (and a
    # fixed 0 or 1) leave every other draw of the run, and of existing seeds, unchanged
    chance = _u(rng, r.ctf_correction)
    if chance >= 1.0 or (chance > 0.0 and rng.random() < chance):
        p.ctf_correction = "phase_flip"
    return p.validate()
