"""Second stage: rescore merged 3D candidates with a small 3D CNN that sees the whole particle.

The 2.5D detector sees five slices at a time, so it cannot tell a beta-galactosidase from a
thyroglobulin seen from one side, nor a particle from a dense blob of junk. The rescorer looks at a
cube of ``PATCH_SIZE`` voxels (32³ = 320 Å a side, just wider than the largest particle, the
ribosome, 300 Å across) centred on each candidate and gives the probability of each particle type
and of "nothing here" (class :data:`BACKGROUND`). A candidate's score becomes
``det ** (1 - mix) * p ** mix``, with ``det`` the detector's merged score and ``p`` the rescorer's
probability of the candidate's type; the per-type thresholds are then tuned on that score
(:func:`czii_kit.tune.tune`). With cross-type proposals (:class:`RescoreConfig`) every candidate
location is also offered as every other type, so a particle the detector gave the wrong type can
still be picked.

Patches are cut from the tomogram normalised exactly as for the detector (intensity window, dark
particles) and standardised one by one (zero mean, unit variance), so intensity units do not matter.

The network (``build_network``: four 3x3x3 conv blocks, 74 k parameters) is trained by
:func:`train_rescorer` on patches from :func:`collect_patches`: the reference picks of training runs,
random background, and the detector's own candidates on those runs labelled by the nearest reference
(the hard negatives that matter). Its file, ``czii_kit_rescorer.pt`` beside the detector weights,
holds the state dict and a ``meta`` dict (classes, patch size, how it was trained).

Arrays are indexed ``[z, y, x]``; candidate positions are ``(x, y, z)`` in Å and converted with
:mod:`czii_kit.coords` only.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from czii_kit import __version__
from czii_kit.catalog import PARTICLE_NAMES, get_particle
from czii_kit.coords import nearest_voxel, voxel_to_angstrom
from czii_kit.errors import DataError
from czii_kit.metric import DISTANCE_MULTIPLIER
from czii_kit.postprocess import nms_3d, sort_candidates
from czii_kit.preprocess import PreprocessConfig, settle_flatten, settle_smoothing, window_for

RESCORER_FILE = "czii_kit_rescorer.pt"
PATCH_SIZE = 32
STORE_SIZE = 36
"""Side of the stored training patches: random 32³ crops of them shift the centre by up to 2 voxels."""
CLASSES = (*PARTICLE_NAMES, "background")
BACKGROUND = len(PARTICLE_NAMES)


@dataclass
class RescoreConfig:
    """How rescored candidates are scored.

    Attributes
    ----------
    mix : float
        Exponent of the rescorer's probability in ``det ** (1 - mix) * p ** mix`` (0 = detector
        only, 1 = rescorer only).
    cross_type : bool
        Propose every particle type at every candidate location: a type the detector did not
        propose there gets the location's best detector score as ``det`` and its own probability
        as ``p`` (then per-type 3D NMS), so the rescorer can recover a particle the detector
        labelled with the wrong type.
    nms_frac : float
        Radius of that NMS in particle radii (as :class:`czii_kit.postprocess.MergeConfig`).
    tta : bool
        Average the probabilities over the 8 flips of the patch (8x the time).
    batch : int
        Patches per forward pass.
    template_weight : float
        Weight ``w`` of the template-matching margin ``m`` (:mod:`czii_kit.templates`: the NCC of the
        candidate's own type minus the best other template type's; 0 for types without a template):
        ``score = sigmoid(logit(score) + w * min(m, 0))``, so a candidate that another template fits
        better loses score and one that fits its own best keeps it. 0 = no template matching.
    """

    mix: float = 0.5
    cross_type: bool = False
    nms_frac: float = 0.8
    tta: bool = False
    batch: int = 256
    template_weight: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"mix must lie in [0, 1], got {self.mix}")
        if self.template_weight < 0:
            raise ValueError(f"template_weight must be >= 0, got {self.template_weight}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping | None) -> RescoreConfig:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in (d or {}).items() if k in known})


# --- patches (pure numpy) -------------------------------------------------------------------


def normalised_volume(volume: np.ndarray, preprocess: PreprocessConfig | None = None, polarity: str = "auto",
                      source=None, smooth: str | float = "auto", flatten: str = "auto") -> np.ndarray:
    """``volume [z, y, x]`` flattened, low-passed and windowed as for the detector: float32 in 0..1, particles dark.

    ``smooth``, ``flatten``: as :class:`czii_kit.infer.InferenceConfig` (``"auto"``: noisy /
    uneven tomograms only).
    """
    volume, _ = settle_flatten(volume, flatten, source=source, warn=False)
    volume, _ = settle_smoothing(volume, smooth, source=source, warn=False)
    window, _ = window_for(volume, preprocess or PreprocessConfig(), polarity, source=source)
    return window.apply(volume, "float32")


@dataclass(frozen=True)
class VolumeReading:
    """How the 3D stages (refinement, rescoring) read a run's tomogram: as the detector saw it.

    Attributes
    ----------
    tomogram : str
        Tomogram name (``"auto"``: :func:`czii_kit.layout.choose_tomogram`).
    preprocess : PreprocessConfig, optional
        The model's preprocessing (its intensity window).
    polarity, smooth, flatten : str
        As :class:`czii_kit.infer.InferenceConfig`.
    voxel_size : float, optional
        Resample tomograms whose voxel size differs to this one (Å), as the detector does
        (:func:`czii_kit.infer.load_volume`); ``None``: as stored.
    """

    tomogram: str = "denoised"
    preprocess: PreprocessConfig | None = None
    polarity: str = "auto"
    smooth: str | float = "auto"
    flatten: str = "auto"
    voxel_size: float | None = None

    @classmethod
    def like_detector(cls, weights, config=None, tomogram: str = "denoised") -> VolumeReading:
        """What the detector ``weights`` run with ``config`` (an ``InferenceConfig``) sees."""
        from czii_kit.infer import InferenceConfig, model_voxel_size, preprocess_config_for

        config = config or InferenceConfig()
        return cls(tomogram, preprocess_config_for(weights), config.polarity, config.smooth, config.flatten,
                   model_voxel_size(weights))


def normalised_runs(runs: Iterable, reading: VolumeReading = VolumeReading(), progress: bool = True,
                    desc: str = "tomograms"):
    """Yield ``(run, voxel_size, volume)`` for each run (``czii_kit.layout.Run``): its tomogram read
    as ``reading`` says and normalised by :func:`normalised_volume`, one at a time (drop ``volume``
    before the next). The voxel size is the volume's (after any resampling)."""
    from tqdm.auto import tqdm

    from czii_kit.infer import load_volume
    from czii_kit.tomogram import open_tomogram

    r = reading
    for run in tqdm(list(runs), desc=desc, unit="run", disable=not progress):
        tomo = open_tomogram(run.tomogram_path(r.tomogram))
        vol, vs = load_volume(tomo, r.voxel_size, warn=False)
        yield run, vs, normalised_volume(vol, r.preprocess, r.polarity, tomo.path, r.smooth, r.flatten)


def run_volumes(runs: Iterable, reading: VolumeReading = VolumeReading(), cache: Mapping | None = None,
                progress: bool = True, desc: str = "tomograms"):
    """:func:`normalised_runs`, taking the runs in ``cache`` (``{run name: (voxel_size, normalised
    volume)}``, e.g. kept by ``tune`` from its detection pass) instead of reading them again."""
    runs = list(runs)
    cache = cache or {}
    read = normalised_runs([r for r in runs if r.name not in cache], reading, progress, desc)
    for run in runs:
        yield (run, *cache[run.name]) if run.name in cache else next(read)


def extract_patches(volume: np.ndarray, centres_zyx, size: int = PATCH_SIZE) -> np.ndarray:
    """Cubes of side ``size`` centred on integer voxel indices ``centres_zyx (N, 3)``.

    Voxel ``c - size // 2 ... c + size // 2 - 1`` along each axis; beyond the volume the edge voxel
    is repeated. Returns float32 ``(N, size, size, size)`` indexed ``[n, z, y, x]``.
    """
    starts = np.asarray(centres_zyx, dtype=np.int64).reshape(-1, 3) - size // 2
    shape = np.array(volume.shape)
    out = np.empty((len(starts), size, size, size), np.float32)
    offs = np.arange(size)
    for i, lo in enumerate(starts):
        if (lo >= 0).all() and (lo + size <= shape).all():
            out[i] = volume[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size]
        else:  # over an edge: repeat the edge voxel
            out[i] = volume[np.ix_(*(np.clip(lo[a] + offs, 0, shape[a] - 1) for a in range(3)))]
    return out


def standardise(patches: np.ndarray) -> np.ndarray:
    """Each patch to zero mean and unit variance (float32, same shape)."""
    x = np.asarray(patches, np.float32)
    axes = tuple(range(1, x.ndim))
    return (x - x.mean(axes, keepdims=True)) / (x.std(axes, keepdims=True) + 1e-3)


def centre_crop(patches: np.ndarray, size: int = PATCH_SIZE) -> np.ndarray:
    """The central ``size``³ of patches ``(N, S, S, S)`` (S >= size)."""
    o = (patches.shape[1] - size) // 2
    return patches[:, o:o + size, o:o + size, o:o + size]


def augment(patches: np.ndarray, rng: np.random.Generator, size: int = PATCH_SIZE) -> np.ndarray:
    """Random crop (centre shift), flips of each axis, a quarter turn in y/x, contrast and noise.

    ``patches (N, S, S, S)`` with ``S >= size`` -> float32 ``(N, size, size, size)``, not standardised.
    The whole batch shares crop offset and orientation (cheap); contrast and noise are per patch.
    """
    s = patches.shape[1]
    oz, oy, ox = rng.integers(0, s - size + 1, 3)
    x = patches[:, oz:oz + size, oy:oy + size, ox:ox + size]
    x = np.rot90(x, int(rng.integers(4)), axes=(2, 3))
    for ax in (1, 2, 3):
        if rng.random() < 0.5:
            x = np.flip(x, ax)
    x = np.ascontiguousarray(x, dtype=np.float32)
    mean = x.mean((1, 2, 3), keepdims=True)
    gain = rng.uniform(0.7, 1.3, (len(x), 1, 1, 1)).astype(np.float32)
    noise = rng.normal(0.0, 1.0, x.shape).astype(np.float32)
    noise *= (x.std((1, 2, 3), keepdims=True) * rng.uniform(0.0, 0.5, (len(x), 1, 1, 1))).astype(np.float32)
    return (x - mean) * gain + mean + noise


# --- the network -----------------------------------------------------------------------------


def build_network(n_classes: int = len(CLASSES)):
    """The 3D CNN: ``(N, 1, 32, 32, 32)`` float -> logits ``(N, n_classes)``."""
    import torch.nn as nn

    def block(i: int, o: int):
        return nn.Sequential(nn.Conv3d(i, o, 3, padding=1, bias=False), nn.BatchNorm3d(o), nn.ReLU(inplace=True))

    return nn.Sequential(
        block(1, 8), nn.MaxPool3d(2), block(8, 16), nn.MaxPool3d(2), block(16, 32), nn.MaxPool3d(2),
        block(32, 64), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, n_classes),
    )


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Rescorer:
    """A trained rescorer: ``predict_proba(patches) -> (N, 7)`` probabilities (columns :data:`CLASSES`)."""

    def __init__(self, path: str | Path):
        import torch

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(self.path, "no such rescorer file")
        try:
            doc = torch.load(self.path, map_location="cpu", weights_only=True)
            meta = doc["meta"]
            self.net = build_network(len(meta["classes"]))
            self.net.load_state_dict(doc["state_dict"])
        except Exception as exc:  # not a torch file, wrong layout, ...
            raise DataError(self.path, f"not a czii_kit rescorer ({type(exc).__name__}: {exc})") from exc
        if tuple(meta["classes"]) != CLASSES:
            raise DataError(self.path, f"classes {meta['classes']} differ from this czii_kit's {list(CLASSES)}")
        self.meta = dict(meta)
        self.patch_size = int(meta.get("patch_size", PATCH_SIZE))
        self.net.eval()

    def predict_proba(self, patches: np.ndarray, batch: int = 256, tta: bool = False) -> np.ndarray:
        """Probabilities ``(N, 7)`` of raw (unstandardised) patches ``(N, s, s, s)``."""
        import torch

        x = standardise(patches)
        views = [(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)] if tta else [()]
        out = np.zeros((len(x), len(CLASSES)), np.float64)
        with torch.inference_mode():
            for axes in views:
                v = np.ascontiguousarray(np.flip(x, axes)) if axes else x
                for b in range(0, len(v), batch):
                    t = torch.from_numpy(v[b:b + batch][:, None])
                    out[b:b + batch] += torch.softmax(self.net(t), 1).double().numpy()
        return out / len(views)


# --- rescoring candidates --------------------------------------------------------------------


def rescore_volume(candidates: pd.DataFrame, volume: np.ndarray, voxel_size: float, rescorer: Rescorer,
                   config: RescoreConfig | None = None, raw: bool = False, templates=None) -> pd.DataFrame:
    """Rescore one run's candidates ``experiment, particle_type, x, y, z (Å), score``.

    ``volume`` is the normalised tomogram (:func:`normalised_volume`). Returns a copy with the
    detector's score kept as ``det_score``, the rescorer's probability of the candidate's type as
    ``p_type``, that of no particle as ``p_background``, ``proposed`` (True for the cross-type
    proposals of ``config.cross_type``) and ``score`` from :func:`combine_scores`. ``raw=True``
    returns every proposal and skips :func:`combine_scores` (``score`` = ``det_score``).
    ``templates``: a :class:`czii_kit.templates.TemplateMatcher`; adds ``tm_margin`` (its margin of
    the candidate's type) for :class:`RescoreConfig`'s ``template_weight``.
    """
    config = config or RescoreConfig()
    out = candidates.copy()
    if out.empty:
        for c in ("det_score", "p_type", "p_background") + (("tm_margin",) if templates is not None else ()):
            out[c] = pd.Series(dtype=float)
        out["proposed"] = pd.Series(dtype=bool)
        return out
    vox = nearest_voxel(out[["x", "y", "z"]].to_numpy(float), voxel_size)
    uniq, inverse = np.unique(vox, axis=0, return_inverse=True)  # multi-label candidates share a patch
    inverse = inverse.ravel()
    probs_u = rescorer.predict_proba(extract_patches(volume, uniq, rescorer.patch_size), config.batch, config.tta)
    margins_u = None
    if templates is not None:
        margins_u = templates.margins(volume, voxel_to_angstrom(uniq, voxel_size), voxel_size)
    cls = out["particle_type"].map({n: i for i, n in enumerate(PARTICLE_NAMES)}).to_numpy()
    out["det_score"] = out["score"].to_numpy(float)
    out["p_type"] = probs_u[inverse, cls]
    out["p_background"] = probs_u[inverse, BACKGROUND]
    if margins_u is not None:
        out["tm_margin"] = margins_u[inverse, cls].astype(float)
    out["proposed"] = False
    if config.cross_type:
        out = pd.concat([out, _cross_type_proposals(out, inverse, cls, probs_u, margins_u)], ignore_index=True)
    return out if raw else combine_scores(out, config)


def _cross_type_proposals(cands: pd.DataFrame, loc: np.ndarray, cls: np.ndarray, probs_u: np.ndarray,
                          margins_u: np.ndarray | None = None) -> pd.DataFrame:
    """Candidates of every type missing at each location, at its best candidate's position and score."""
    n_loc, n_types = len(probs_u), len(PARTICLE_NAMES)
    det = cands["det_score"].to_numpy(float)
    order = np.lexsort((-det, loc))  # by location, best detector score first
    first = order[np.r_[True, loc[order][1:] != loc[order][:-1]]]  # best candidate of location 0, 1, ...
    missing = np.ones((n_loc, n_types), bool)
    missing[loc, cls] = False
    u, t = np.nonzero(missing)
    best = cands.iloc[first[u]]
    out = pd.DataFrame({
        "experiment": best["experiment"].to_numpy(), "particle_type": np.array(PARTICLE_NAMES)[t],
        "x": best["x"].to_numpy(), "y": best["y"].to_numpy(), "z": best["z"].to_numpy(),
        "score": det[first[u]], "det_score": det[first[u]], "p_type": probs_u[u, t],
        "p_background": probs_u[u, BACKGROUND],
    })
    if margins_u is not None:
        out["tm_margin"] = margins_u[u, t].astype(float)
    out["proposed"] = True
    return out


def combine_scores(rescored: pd.DataFrame, config: RescoreConfig) -> pd.DataFrame:
    """``score = det_score ** (1 - mix) * p_type ** mix`` of raw rescored candidates (:func:`rescore_volume`),
    then, with ``config.template_weight`` ``w`` > 0, ``sigmoid(logit(score) + w * min(tm_margin, 0))``.

    Without ``config.cross_type`` the proposals are dropped; with it, per run and type, 3D NMS
    (``config.nms_frac`` radii) on the new score. Sorted by experiment, type and descending score.
    """
    out = rescored if config.cross_type else rescored[~rescored["proposed"].astype(bool)]
    score = out["det_score"].to_numpy(float) ** (1.0 - config.mix) * out["p_type"].to_numpy(float) ** config.mix
    if config.template_weight > 0:
        if "tm_margin" not in out.columns:
            raise ValueError("template_weight > 0 needs candidates rescored with templates (no 'tm_margin' column)")
        score = np.clip(score, 1e-6, 1 - 1e-6)
        penalty = np.minimum(out["tm_margin"].to_numpy(float), 0.0)  # only "another type fits better" counts
        logit = np.log(score / (1 - score)) + config.template_weight * penalty
        score = 1.0 / (1.0 + np.exp(-logit))
    out = out.assign(score=score)
    if config.cross_type and len(out):
        keep = []
        for (_, name), g in out.groupby(["experiment", "particle_type"], sort=False):
            radius = config.nms_frac * get_particle(name).radius  # Å, like the points
            idx = nms_3d(g[["x", "y", "z"]].to_numpy(float), g["score"].to_numpy(float), radius)
            keep.append(g.index.to_numpy()[idx])
        out = out.loc[np.sort(np.concatenate(keep))]
    return sort_candidates(out)


def rescore_runs(candidates: pd.DataFrame, runs: Iterable, rescorer: Rescorer,
                 reading: VolumeReading = VolumeReading(), config: RescoreConfig | None = None,
                 progress: bool = True, raw: bool = False, templates=None,
                 volumes: Mapping | None = None) -> pd.DataFrame:
    """Rescore the candidates of every run (``czii_kit.layout.Run``); tomograms are read one at a time.

    ``reading``: how to read them (pass :meth:`VolumeReading.like_detector` so the rescorer sees
    the detector's volume). ``raw``: as :func:`rescore_volume` (every proposal, no score
    combination), for tuning. ``templates``: a :class:`czii_kit.templates.TemplateMatcher` (as
    :func:`rescore_volume`). ``volumes``: normalised volumes already at hand (:func:`run_volumes`).
    """
    config = config or RescoreConfig()
    frames = []
    names = candidates["experiment"].astype(str)
    runs = [r for r in runs if (names == r.name).any()]
    for run, vs, vol in run_volumes(runs, reading, volumes, progress, "rescore"):
        g = candidates[names == run.name]
        frames.append(rescore_volume(g, vol, vs, rescorer, config, raw=True, templates=templates))
        del vol
    if not frames:
        return rescore_volume(candidates.iloc[:0], np.zeros((1, 1, 1), np.float32), 1.0, rescorer, config, raw,
                              templates)
    out = pd.concat(frames, ignore_index=True)
    return out if raw else combine_scores(out, config)


# --- training data ---------------------------------------------------------------------------


def label_points(points_xyz, experiment: str, solution: pd.DataFrame,
                 distance_multiplier: float = DISTANCE_MULTIPLIER) -> np.ndarray:
    """Class index of what lies at each point ``(N, 3)`` (x, y, z Å) of one run.

    The type of the nearest reference within ``distance_multiplier * radius`` of that type (the
    metric's hit rule), else :data:`BACKGROUND`.
    """
    pts = np.asarray(points_xyz, float).reshape(-1, 3)
    labels = np.full(len(pts), BACKGROUND, np.int64)
    best = np.full(len(pts), np.inf)
    sol = solution[solution["experiment"].astype(str) == str(experiment)]
    for name, g in sol.groupby("particle_type"):
        p = get_particle(name)
        d, _ = cKDTree(g[["x", "y", "z"]].to_numpy(float)).query(pts)
        rel = d / p.radius
        hit = (rel <= distance_multiplier) & (rel < best)
        labels[hit] = PARTICLE_NAMES.index(p.name)
        best[hit] = rel[hit]
    return labels


def background_points(shape_zyx: Sequence[int], reference_zyx: np.ndarray, n: int, rng: np.random.Generator,
                      min_distance: float = 8.0) -> np.ndarray:
    """``n`` random voxel indices ``(n, 3)`` (z, y, x) at least ``min_distance`` voxels from every reference."""
    tree = cKDTree(reference_zyx) if len(reference_zyx) else None
    found: list[np.ndarray] = []
    have = 0
    for _ in range(100):
        q = rng.uniform([0, 0, 0], np.asarray(shape_zyx) - 1, (max(4 * n, 16), 3))
        if tree is not None:
            q = q[tree.query(q)[0] >= min_distance]
        found.append(q[: n - have])
        have += len(found[-1])
        if have >= n:
            break
    return np.rint(np.concatenate(found)).astype(np.int64) if found else np.zeros((0, 3), np.int64)


def collect_patches(runs: Sequence, solution: pd.DataFrame, candidates: pd.DataFrame | None = None,
                    tomograms: Sequence[str] = ("denoised",), background_ratio: float = 1.0,
                    preprocess: PreprocessConfig | None = None, seed: int = 0, progress: bool = True,
                    smooth: str | float = "auto", voxel_size: float | None = None, flatten: str = "auto") -> dict:
    """Training patches of ``runs``: references, random background and (optionally) detector candidates.

    Parameters
    ----------
    runs : sequence of czii_kit.layout.Run
    solution : DataFrame
        Reference picks of those runs (``experiment, particle_type, x, y, z`` Å).
    candidates : DataFrame, optional
        Detector candidates (``experiment, x, y, z``), labelled with :func:`label_points`; one patch
        per distinct voxel.
    tomograms : sequence of str
        Tomogram kinds to cut from (each run's missing kinds are skipped).
    background_ratio : float
        Random background patches per reference.
    smooth : "auto" or float
        Low-pass of each tomogram before cutting, as at inference (:class:`czii_kit.infer.InferenceConfig`;
        the shipped rescorer's patches were cut with 0, before the option existed).
    voxel_size : float, optional
        Resample tomograms whose voxel size differs to this one (Å; :func:`czii_kit.infer.load_volume`).
    flatten : {"auto", "on", "off"}
        Background flattening, as at inference (:class:`czii_kit.infer.InferenceConfig`).

    Returns
    -------
    dict
        ``X`` float16 ``(N, 36, 36, 36)``, ``y`` int64 class indices, ``run`` and ``source``
        (``"reference"``, ``"background"``, ``"candidate"``) and ``tomogram`` per patch.
    """
    from tqdm.auto import tqdm

    from czii_kit.infer import load_volume
    from czii_kit.tomogram import open_tomogram

    rng = np.random.default_rng(seed)
    X, y, run_of, source, kind_of = [], [], [], [], []
    jobs = [(r, k) for r in runs for k in tomograms if k in r.tomograms()]
    if not jobs:
        raise DataError([str(d) for r in runs for d in r.dirs[:1]] or None,
                        f"no tomograms {list(tomograms)} in these runs")
    for run, kind in tqdm(jobs, desc="patches", unit="tomogram", disable=not progress):
        tomo = open_tomogram(run.tomogram_path(kind))
        vol, vs = load_volume(tomo, voxel_size)
        vol = normalised_volume(vol, preprocess, "dark", tomo.path, smooth, flatten)
        sol = solution[solution["experiment"].astype(str) == run.name]
        ref_xyz = sol[["x", "y", "z"]].to_numpy(float)
        ref = nearest_voxel(ref_xyz, vs)
        ref_labels = np.array([PARTICLE_NAMES.index(get_particle(n).name) for n in sol["particle_type"]], np.int64)
        parts = [(ref, ref_labels, "reference")]
        nb = int(round(background_ratio * max(len(ref), 1)))
        parts.append((background_points(vol.shape, ref.astype(float), nb, rng), None, "background"))
        if candidates is not None:
            c = candidates[candidates["experiment"].astype(str) == run.name]
            if len(c):
                vox = np.unique(nearest_voxel(c[["x", "y", "z"]].to_numpy(float), vs), axis=0)
                parts.append((vox, label_points(voxel_to_angstrom(vox, vs), run.name, solution), "candidate"))
        for vox, labels, src in parts:
            if len(vox) == 0:
                continue
            if labels is None:
                labels = np.full(len(vox), BACKGROUND, np.int64)
            X.append(extract_patches(vol, vox, STORE_SIZE).astype(np.float16))
            y.append(labels)
            run_of += [run.name] * len(vox)
            source += [src] * len(vox)
            kind_of += [kind] * len(vox)
        del vol
    return {"X": np.concatenate(X), "y": np.concatenate(y), "run": np.array(run_of), "source": np.array(source),
            "tomogram": np.array(kind_of)}


def save_patches(data: dict, path: str | Path, overwrite: bool = False) -> Path:
    """Write :func:`collect_patches` output as an ``.npz`` (atomically)."""
    from czii_kit.atomic import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **data)

    return atomic_write(path, write, overwrite=overwrite)


def load_patches(paths: str | Path | Sequence[str | Path]) -> dict:
    """Read and concatenate one or more patch files written by :func:`save_patches`."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    parts = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise DataError(p, "no such patch file")
        if not zipfile.is_zipfile(p):
            raise DataError(p, "not a czii_kit patch file (not an .npz archive)")
        try:
            with np.load(p) as d:
                parts.append({k: d[k] for k in ("X", "y", "run", "source", "tomogram")})
        except (KeyError, ValueError, OSError) as exc:
            raise DataError(p, f"not a czii_kit patch file ({exc})") from exc
        if parts[-1]["X"].ndim != 4 or len(parts[-1]["X"]) != len(parts[-1]["y"]):
            raise DataError(p, f"patches of shape {parts[-1]['X'].shape} do not match {len(parts[-1]['y'])} labels")
    return {k: np.concatenate([q[k] for q in parts]) for k in parts[0]}


# --- training --------------------------------------------------------------------------------

MIN_TRAIN_PATCHES = 8
TRAIN_DEFAULTS = {"epochs": 6, "batch": 64, "lr": 2e-3, "weight_decay": 1e-4, "label_smoothing": 0.05,
                  "seed": 0, "threads": None, "init": None}
"""Rescorer training arguments; ``init`` is a rescorer file whose weights training starts from (fine-tuning)."""


def train_rescorer(patches: str | Path | Sequence[str | Path], out: str | Path, val_runs: Sequence[str] = (),
                   overwrite: bool = False, progress: bool = True, **kwargs) -> dict:
    """Train the rescorer on patch files; save it to ``out`` (usually beside the detector weights).

    Resumable: a checkpoint ``out + '.ckpt'`` is written after every epoch and picked up by the next
    call with the same arguments. Patches of ``val_runs`` are held out and scored after each epoch.
    Keyword arguments override :data:`TRAIN_DEFAULTS`. Same seed and threads -> same weights.

    Returns
    -------
    dict
        The ``meta`` saved with the weights (``history`` holds loss / validation accuracy per epoch).
    """
    import torch
    from tqdm.auto import tqdm

    from czii_kit.errors import FileExistsNoForce

    args = {**TRAIN_DEFAULTS, **kwargs}
    unknown = set(args) - set(TRAIN_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown training arguments {sorted(unknown)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsNoForce(f"{out}: already exists (use --force to replace it)")
    data = load_patches(patches)
    is_val = np.isin(data["run"], list(val_runs))
    if val_runs and not is_val.any():
        raise DataError(patches, f"no patches of the validation runs {list(val_runs)}")
    X, y = data["X"][~is_val], data["y"][~is_val]
    Xv, yv = centre_crop(data["X"][is_val]), data["y"][is_val]
    if len(X) < MIN_TRAIN_PATCHES:
        raise DataError(patches, f"only {len(X)} training patches (at least {MIN_TRAIN_PATCHES} needed)")
    if len(X) < args["batch"]:
        import warnings

        warnings.warn(f"only {len(X)} training patches: batch {args['batch']} -> {len(X)}", stacklevel=2)
        args["batch"] = len(X)
    if args["threads"]:
        torch.set_num_threads(int(args["threads"]))
    torch.manual_seed(int(args["seed"]))
    net = build_network()
    base = None
    if args["init"] is not None:
        args["init"] = str(args["init"])
        net.load_state_dict(Rescorer(args["init"]).net.state_dict())
        base = {"file": args["init"], "sha256": file_sha256(args["init"])}
    opt = torch.optim.AdamW(net.parameters(), args["lr"], weight_decay=args["weight_decay"])
    steps = len(X) // args["batch"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args["lr"], total_steps=args["epochs"] * steps)
    lossf = torch.nn.CrossEntropyLoss(label_smoothing=args["label_smoothing"])
    ckpt = Path(str(out) + ".ckpt")
    fingerprint = {"n": int(len(X)), "counts": np.bincount(y, minlength=len(CLASSES)).tolist(),
                   **{k: args[k] for k in ("epochs", "batch", "lr", "seed")}, "init": base}
    start, history = 0, []
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("fingerprint") == fingerprint:
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            start, history = int(state["epoch"]), list(state["history"])
    for epoch in range(start, args["epochs"]):
        rng = np.random.default_rng([int(args["seed"]), epoch])
        torch.manual_seed(int(args["seed"]) * 1000 + epoch)  # dropout: a resumed epoch repeats exactly
        net.train()
        perm = rng.permutation(len(X))
        total = 0.0
        bar = tqdm(range(steps), desc=f"rescorer epoch {epoch + 1}/{args['epochs']}", unit="batch",
                   disable=not progress)
        for b in bar:
            idx = np.sort(perm[b * args["batch"]:(b + 1) * args["batch"]])
            xb = torch.from_numpy(standardise(augment(X[idx].astype(np.float32), rng))[:, None])
            loss = lossf(net(xb), torch.from_numpy(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            bar.set_postfix(loss=f"{total / (b + 1):.3f}")
        rec = {"epoch": epoch + 1, "loss": total / steps}
        if len(Xv):
            net.eval()
            with torch.inference_mode():
                pred = np.concatenate([
                    net(torch.from_numpy(standardise(Xv[i:i + 256])[:, None])).argmax(1).numpy()
                    for i in range(0, len(Xv), 256)])
            rec["val_accuracy"] = float((pred == yv).mean())
        history.append(rec)
        torch.save({"fingerprint": fingerprint, "net": net.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "epoch": epoch + 1, "history": history}, ckpt)
    meta = {
        "classes": list(CLASSES), "patch_size": PATCH_SIZE, "czii_kit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "patches": [str(p) for p in ([patches] if isinstance(patches, (str, Path)) else patches)],
        "n_train": int(len(X)), "n_val": int(len(Xv)), "val_runs": list(val_runs),
        "class_counts": fingerprint["counts"], "train_args": args, "history": history, "base_rescorer": base,
    }

    save_rescorer(net, out, meta, overwrite=overwrite)
    ckpt.unlink(missing_ok=True)
    return meta


def save_rescorer(net, path: str | Path, meta: Mapping | None = None, overwrite: bool = False) -> Path:
    """Write a network from :func:`build_network` as a rescorer file (atomically); ``meta`` must be JSON-able."""
    import torch

    from czii_kit.atomic import atomic_write

    meta = {"classes": list(CLASSES), "patch_size": PATCH_SIZE, **(meta or {})}

    def write(tmp: Path) -> None:
        torch.save({"state_dict": net.state_dict(), "meta": json.loads(json.dumps(meta))}, tmp)

    return atomic_write(path, write, overwrite=overwrite)


def rescorer_for(weights: str | Path) -> Path | None:
    """The rescorer file beside ``weights``, or ``None``."""
    p = Path(weights).parent / RESCORER_FILE
    return p if p.is_file() else None


def detector_candidates(weights: str | Path, runs: Sequence, tomogram: str = "denoised", backend: str = "openvino",
                        floor: float = 0.5, progress: bool = True) -> pd.DataFrame:
    """The detector's merged candidates on ``runs`` whose score is >= ``floor`` x the tuned threshold.

    Uses the inference, merging and thresholds tuned beside ``weights`` (as ``predict`` does).
    """
    from czii_kit.infer import detect_runs
    from czii_kit.postprocess import merge_detections
    from czii_kit.predict import settings_for

    inf, merge, per_type, thr = settings_for(weights)
    dets, voxel_sizes = detect_runs(weights, runs, tomogram, backend, inf, progress)
    cands = merge_detections(dets, voxel_sizes, merge, per_type)
    keep = cands["score"] >= cands["particle_type"].map(thr).astype(float) * floor
    return cands[keep].reset_index(drop=True)
