"""Group per-slice 2D detections into 3D particles, score them, threshold them, NMS them (numpy/scipy).

Detections table (from :mod:`czii_kit.infer`): ``run, z, x, y, w, h, conf, class`` where ``z`` is
the slice index, ``x, y`` the box centre as fractional voxel indices (voxel ``i``'s centre is ``i``)
and ``w, h`` the box size in voxels.

Merging methods, per run and class:

``"greedy"`` (default)
    Confidence-ordered clustering: take the most confident unassigned detection, absorb every
    unassigned detection inside an ellipsoid around it (``xy_frac * r`` across, ``z_frac * r`` in
    depth), optionally re-centre on the confidence-weighted mean and absorb again (``refine``
    passes), repeat. Touching or stacked particles stay separate because each seed claims only
    its own neighbourhood.
``"components"``
    Connected components of the graph linking detections on nearby slices (``|dz| <= link_dz``)
    whose centres are within ``link_frac * r``: simple, but chains touching/stacked particles.

Each particle type may use its own configuration (``per_type``): a small particle whose detections
form a long column in z (apo-ferritin under the missing wedge) gains recall from tight clusters that
give several candidates along the column, where a large one is better merged whole.

A particle's centre is the confidence-weighted mean of its detections; its score is the mean of
its ``top_k`` best confidences times ``min(1, n_slices / top_k)`` (a particle seen on one slice
only is penalised). Candidates then pass a 3D NMS per class (``nms_frac * r``) and per-class score
thresholds. Output coordinates are Å ``(x, y, z)`` via :mod:`czii_kit.coords`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from czii_kit.catalog import PARTICLE_NAMES, get_particle
from czii_kit.config import StrictConfig
from czii_kit.coords import voxel_to_angstrom

DETECTION_COLUMNS = ["run", "z", "x", "y", "w", "h", "conf", "class"]
CANDIDATE_COLUMNS = ["experiment", "particle_type", "x", "y", "z", "score", "n_slices", "max_conf"]
METHODS = ("greedy", "components")


@dataclass(frozen=True)
class MergeConfig(StrictConfig):
    """Parameters of :func:`merge_detections` (radii as fractions of the particle radius)."""

    method: str = "greedy"
    xy_frac: float = 0.6
    z_frac: float = 1.0
    refine: int = 1
    link_frac: float = 0.5
    link_dz: float = 2.0
    top_k: int = 3
    nms_frac: float = 0.8
    min_conf: float = 0.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"merge method must be one of {METHODS}, got {self.method!r}")
        if self.top_k < 1:
            raise ValueError("top_k must be >= 1")



def empty_detections() -> pd.DataFrame:
    """An empty detections table with the right columns."""
    return pd.DataFrame({c: pd.Series(dtype=str if c == "run" else (int if c in ("z", "class") else float))
                         for c in DETECTION_COLUMNS})


def empty_candidates() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=str if c in ("experiment", "particle_type") else float)
                         for c in CANDIDATE_COLUMNS})


def greedy_clusters(zyx: np.ndarray, conf: np.ndarray, radius: float, xy_frac: float = 0.6,
                    z_frac: float = 1.0, refine: int = 1) -> np.ndarray:
    """Confidence-ordered clustering of points ``(N, 3)`` ``(z, y, x)`` voxels; returns labels ``(N,)``.

    The most confident unassigned point seeds a cluster that takes every unassigned point with
    ``(dxy / (xy_frac r))^2 + (dz / (z_frac r))^2 <= 1``; with ``refine`` the window is re-centred on
    the members' confidence-weighted mean and the absorption repeated.
    """
    pts = np.asarray(zyx, dtype=float).reshape(-1, 3)
    n = len(pts)
    labels = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return labels
    scale = np.array([1.0 / (z_frac * radius), 1.0 / (xy_frac * radius), 1.0 / (xy_frac * radius)])
    sp = pts * scale
    tree = cKDTree(sp)
    w = np.asarray(conf, dtype=float)
    order = np.argsort(-w, kind="stable")
    k = 0
    for i in order:
        if labels[i] >= 0:
            continue
        centre = sp[i]
        members = np.array([i])
        for _ in range(1 + max(0, int(refine))):
            near = np.asarray(tree.query_ball_point(centre, 1.0 + 1e-9), dtype=np.int64)
            near = near[(labels[near] < 0)]
            if near.size == 0:
                break
            members = near
            centre = np.average(sp[members], axis=0, weights=np.maximum(w[members], 1e-9))
        if i not in members:
            members = np.append(members, i)
        labels[members] = k
        k += 1
    return labels


def linked_components(zyx: np.ndarray, radius: float, link_frac: float = 0.5, link_dz: float = 2.0) -> np.ndarray:
    """Connected components of points ``(N, 3)`` ``(z, y, x)`` linked when ``|dz| <= link_dz`` and
    ``dxy <= link_frac * r``; returns labels ``(N,)``."""
    pts = np.asarray(zyx, dtype=float).reshape(-1, 3)
    n = len(pts)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    dxy = link_frac * radius
    # scale z so that the cylinder fits in a ball of radius sqrt(2)*dxy, then filter exactly
    sp = pts * np.array([dxy / max(link_dz, 1e-9), 1.0, 1.0])
    pairs = cKDTree(sp).query_pairs(np.sqrt(2.0) * dxy, output_type="ndarray")
    if len(pairs):
        d = pts[pairs[:, 0]] - pts[pairs[:, 1]]
        ok = (np.abs(d[:, 0]) <= link_dz + 1e-9) & (np.hypot(d[:, 1], d[:, 2]) <= dxy + 1e-9)
        pairs = pairs[ok]
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n)) if len(pairs) else \
        coo_matrix((n, n))
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


def aggregate_clusters(zyx: np.ndarray, conf: np.ndarray, labels: np.ndarray, top_k: int = 3
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per cluster: ``(centres (K,3) zyx, score (K,), n_slices (K,), max_conf (K,))``.

    Centre = confidence-weighted mean; score = mean of the ``top_k`` best confidences x
    ``min(1, n_slices / top_k)`` where ``n_slices`` counts distinct slices.
    """
    pts = np.asarray(zyx, dtype=float).reshape(-1, 3)
    w = np.asarray(conf, dtype=float)
    labels = np.asarray(labels)
    uniq = np.unique(labels[labels >= 0])
    centres = np.empty((len(uniq), 3))
    score = np.empty(len(uniq))
    nsl = np.empty(len(uniq))
    mx = np.empty(len(uniq))
    order = np.argsort(labels, kind="stable")
    sl = labels[order]
    starts = np.searchsorted(sl, uniq, "left")
    ends = np.searchsorted(sl, uniq, "right")
    for j, (a, b) in enumerate(zip(starts, ends, strict=True)):
        idx = order[a:b]
        ww = np.maximum(w[idx], 1e-9)
        centres[j] = np.average(pts[idx], axis=0, weights=ww)
        n = len(np.unique(pts[idx, 0]))
        best = np.sort(w[idx])[::-1][:top_k]
        score[j] = best.mean() * min(1.0, n / top_k)
        nsl[j] = n
        mx[j] = best[0]
    return centres, score, nsl, mx


def nms_3d(centres: np.ndarray, score: np.ndarray, radius: float) -> np.ndarray:
    """Indices kept by greedy 3D NMS: drop any point within ``radius`` of a higher-scoring kept one."""
    pts = np.asarray(centres, dtype=float).reshape(-1, 3)
    if len(pts) == 0 or radius <= 0:
        return np.arange(len(pts))
    tree = cKDTree(pts)
    order = np.argsort(-np.asarray(score), kind="stable")
    removed = np.zeros(len(pts), bool)
    keep = []
    for i in order:
        if removed[i]:
            continue
        keep.append(i)
        removed[tree.query_ball_point(pts[i], radius)] = True
    return np.sort(np.array(keep, dtype=np.int64))


def _as_config(config: MergeConfig | Mapping | None) -> MergeConfig:
    if isinstance(config, MergeConfig):
        return config
    return MergeConfig.from_dict({k: v for k, v in (config or {}).items() if k != "name"})  # name: tune's record


def merge_detections(detections: pd.DataFrame, voxel_size: float | Mapping[str, float],
                     config: MergeConfig | Mapping | None = None,
                     per_type: Mapping[str, MergeConfig | Mapping] | None = None) -> pd.DataFrame:
    """Detections of any number of runs -> 3D candidates (all scores, no threshold).

    Parameters
    ----------
    detections : DataFrame
        ``run, z, x, y, w, h, conf, class`` (see module docstring).
    voxel_size : float or mapping run -> float
        Å per voxel of the tomogram the detections come from.
    config : MergeConfig or dict
        Configuration of every type not in ``per_type``.
    per_type : mapping particle name -> MergeConfig or dict, optional
        Configurations of particular types.

    Returns
    -------
    DataFrame
        ``experiment, particle_type, x, y, z`` (Å), ``score, n_slices, max_conf``, sorted by
        experiment, type and descending score.
    """
    base = _as_config(config)
    special = {get_particle(k).name: _as_config(v) for k, v in (per_type or {}).items()}
    missing = [c for c in DETECTION_COLUMNS if c not in detections.columns]
    if missing:
        raise ValueError(f"detections table lacks columns {missing}")
    frames = []
    for (run, cls), g in detections.groupby(["run", "class"], sort=True):
        p = get_particle(int(cls))
        cfg = special.get(p.name, base)
        g = g[g["conf"] >= cfg.min_conf]
        if g.empty:
            continue
        vs = float(voxel_size[run] if isinstance(voxel_size, Mapping) else voxel_size)
        r = p.radius / vs
        zyx = g[["z", "y", "x"]].to_numpy(float)
        conf = g["conf"].to_numpy(float)
        if cfg.method == "greedy":
            labels = greedy_clusters(zyx, conf, r, cfg.xy_frac, cfg.z_frac, cfg.refine)
        else:
            labels = linked_components(zyx, r, cfg.link_frac, cfg.link_dz)
        centres, score, nsl, mx = aggregate_clusters(zyx, conf, labels, cfg.top_k)
        keep = nms_3d(centres, score, cfg.nms_frac * r)
        xyz = voxel_to_angstrom(centres[keep], vs)
        frames.append(pd.DataFrame({
            "experiment": str(run), "particle_type": p.name,
            "x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2],
            "score": score[keep], "n_slices": nsl[keep], "max_conf": mx[keep],
        }))
    if not frames:
        return empty_candidates()
    return sort_candidates(pd.concat(frames, ignore_index=True))


def sort_candidates(candidates: pd.DataFrame) -> pd.DataFrame:
    """Candidates sorted by experiment, particle type and descending score (stable; index reset)."""
    return candidates.sort_values(["experiment", "particle_type", "score"], ascending=[True, True, False],
                                  kind="stable").reset_index(drop=True)


def apply_thresholds(candidates: pd.DataFrame, thresholds: float | Mapping[str, float] | None = None
                     ) -> pd.DataFrame:
    """Keep candidates with ``score >= threshold[particle_type]``; return ``experiment, particle_type, x, y, z``.

    A missing type in ``thresholds`` uses 0.5; a float applies to every type.
    """
    if thresholds is None:
        thresholds = 0.5
    if isinstance(thresholds, Mapping):
        unknown = set(thresholds) - set(PARTICLE_NAMES)
        if unknown:
            raise ValueError(f"thresholds for unknown particle types {sorted(unknown)}")
        t = candidates["particle_type"].map(lambda n: float(thresholds.get(n, 0.5)))
    else:
        t = float(thresholds)
    kept = candidates[candidates["score"] >= t]
    return kept[["experiment", "particle_type", "x", "y", "z"]].reset_index(drop=True)


def postprocess(detections: pd.DataFrame, voxel_size: float | Mapping[str, float],
                thresholds: float | Mapping[str, float] | None = None,
                config: MergeConfig | Mapping | None = None,
                per_type: Mapping[str, MergeConfig | Mapping] | None = None) -> pd.DataFrame:
    """Detections -> picks ``experiment, particle_type, x, y, z`` (Å): merge, NMS, threshold."""
    return apply_thresholds(merge_detections(detections, voxel_size, config, per_type), thresholds)
