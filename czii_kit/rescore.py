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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from czii_kit.atomic import atomic_dir
from czii_kit.catalog import PARTICLE_NAMES, get_particle
from czii_kit.checksum import file_sha256
from czii_kit.config import StrictConfig
from czii_kit.coords import nearest_voxel, voxel_to_angstrom
from czii_kit.errors import DataError
from czii_kit.infer import export_cache, missing_backend_modules
from czii_kit.postprocess import nms_3d, sort_candidates
from czii_kit.volumes import PATCH_SIZE, VolumeReading, extract_patches, run_volumes, standardise

RESCORER_FILE = "czii_kit_rescorer.pt"
CLASSES = (*PARTICLE_NAMES, "background")
BACKGROUND = len(PARTICLE_NAMES)


@dataclass
class RescoreConfig(StrictConfig):
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


RESCORER_ENGINES = ("auto", "openvino", "torch")
"""How :class:`Rescorer` runs its network: ``"openvino"`` (CPU, fp32: about 7x torch's speed on 2 CPUs,
probabilities within 1e-6 of torch's), ``"torch"``, or ``"auto"``: torch on a CUDA GPU when there is
one, else OpenVINO when it is installed, else torch on the CPU."""


OPENVINO_BATCH = 32
"""Patches per OpenVINO inference: per-patch logits do not depend on it; its working memory grows with it
(about 1 MB per patch)."""


def _openvino_rescorer(net, patch_size: int, digest: str):
    """The rescorer network compiled by OpenVINO for the CPU in fp32 (``(N, 1, s, s, s)`` -> logits).

    Converted once and cached as IR in :func:`czii_kit.infer.export_cache` under the rescorer file's
    SHA-256 (``rescorer_{s}_openvino/``, written atomically), so later processes only compile it.
    """
    import openvino as ov

    folder = export_cache() / digest[:16] / f"rescorer_{patch_size}_openvino"
    xml = folder / "rescorer.xml"
    if not xml.is_file():
        import torch

        model = ov.convert_model(net, example_input=torch.zeros(2, 1, patch_size, patch_size, patch_size),
                                 input=[(-1, 1, patch_size, patch_size, patch_size)])
        with atomic_dir(folder) as tmp:
            ov.save_model(model, str(tmp / "rescorer.xml"), compress_to_fp16=False)
    core = ov.Core()
    return core.compile_model(core.read_model(str(xml)), "CPU",
                              {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": ov.Type.f32})


class Rescorer:
    """A trained rescorer: ``predict_proba(patches) -> (N, 7)`` probabilities (columns :data:`CLASSES`).

    ``engine``: one of :data:`RESCORER_ENGINES` (the engine used is :attr:`engine`). ``digest``: the file's
    SHA-256 when the caller has it (a :class:`~czii_kit.bundle.ModelBundle` does), the key of the OpenVINO
    conversion's cache; else it is computed.
    """

    def __init__(self, path: str | Path, engine: str = "auto", digest: str | None = None):
        import torch

        if engine not in RESCORER_ENGINES:
            raise ValueError(f"engine must be one of {RESCORER_ENGINES}, got {engine!r}")
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
        self.device = torch.device("cpu")
        self._compiled = None
        if engine == "auto" and torch.cuda.is_available():
            self.device = torch.device("cuda:0")
            self.net.to(self.device)
        elif engine == "openvino" or (engine == "auto" and not missing_backend_modules("openvino")):
            self._compiled = _openvino_rescorer(self.net, self.patch_size, digest or file_sha256(self.path))
        self.engine = "openvino" if self._compiled is not None else "torch"

    def logits(self, x: np.ndarray):
        """Logits (a float32 CPU tensor ``(N, n_classes)``) of standardised patches ``x (N, s, s, s)``."""
        import torch

        if self._compiled is not None:  # small sub-batches: the same logits, a fraction of the working memory
            x = np.ascontiguousarray(x[:, None])  # copied into the request's own input (shared: RSS crept up)
            return torch.from_numpy(np.concatenate(
                [np.asarray(self._compiled(x[i:i + OPENVINO_BATCH], share_inputs=False)[0])
                 for i in range(0, len(x), OPENVINO_BATCH)]))
        with torch.inference_mode():
            return self.net(torch.from_numpy(x[:, None]).to(self.device)).float().cpu()

    def release_memory(self) -> None:
        """Give back OpenVINO's working memory of the network (allocated again by the next call): a process
        predicting run after run does not hold it through the next tomogram's detection."""
        if self._compiled is not None:
            self._compiled.release_memory()

    def predict_proba(self, patches: np.ndarray, batch: int = 256, tta: bool = False) -> np.ndarray:
        """Probabilities ``(N, 7)`` of raw (unstandardised) patches ``(N, s, s, s)``."""
        import torch

        x = standardise(patches)
        views = [(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)] if tta else [()]
        out = np.zeros((len(x), len(CLASSES)), np.float64)
        for axes in views:
            v = np.ascontiguousarray(np.flip(x, axes)) if axes else x
            for b in range(0, len(v), batch):
                out[b:b + batch] += torch.softmax(self.logits(v[b:b + batch]), 1).double().numpy()
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
    probs_u = np.concatenate([  # one batch of patches at a time: bounded memory
        rescorer.predict_proba(extract_patches(volume, uniq[b:b + config.batch], rescorer.patch_size), config.batch,
                               config.tta) for b in range(0, len(uniq), config.batch)])
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
                 reading: VolumeReading | None = None, config: RescoreConfig | None = None,
                 progress: bool = True, raw: bool = False, templates=None,
                 volumes: Mapping | None = None) -> pd.DataFrame:
    """Rescore the candidates of every run (``czii_kit.layout.Run``); tomograms are read one at a time.

    ``reading``: how to read them (pass :meth:`czii_kit.bundle.ModelBundle.reading` so the rescorer sees
    the detector's volume). ``raw``: as :func:`rescore_volume` (every proposal, no score
    combination), for tuning. ``templates``: a :class:`czii_kit.templates.TemplateMatcher` (as
    :func:`rescore_volume`). ``volumes``: normalised volumes already at hand (:func:`run_volumes`).
    """
    config = config or RescoreConfig()
    frames = []
    names = candidates["experiment"].astype(str)
    runs = [r for r in runs if (names == r.name).any()]
    for run, vs, vol in run_volumes(runs, reading or VolumeReading(), volumes, progress, "rescore"):
        g = candidates[names == run.name]
        frames.append(rescore_volume(g, vol, vs, rescorer, config, raw=True, templates=templates))
        del vol
    if not frames:
        return rescore_volume(candidates.iloc[:0], np.zeros((1, 1, 1), np.float32), 1.0, rescorer, config, raw,
                              templates)
    out = pd.concat(frames, ignore_index=True)
    return out if raw else combine_scores(out, config)
