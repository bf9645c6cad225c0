"""Choose the 3D merging method and per-class score thresholds that maximise F4 on validation runs.

The competition score is a weighted sum of per-type F-beta, so each type's threshold is tuned on
its own: for every candidate threshold ``t`` we count, exactly as :mod:`czii_kit.metric` does,
TP(t) = references with a candidate of score >= t within ``0.5 * radius``, FP(t) = candidates
>= t minus TP(t), FN(t) = references minus TP(t) (summed over runs). The chosen threshold is the
lowest whose F4 is within :data:`THRESHOLD_TOLERANCE` of the best (placed midway to the next lower
candidate score): F4 curves are flat near their optimum, and on tomograms unlike the tuning runs
the detector is usually less confident, so the low end of the plateau keeps recall (beta = 4
weighs recall 16 times precision) where the high end loses it.

Merging: every configuration of :data:`CANDIDATE_MERGES` is tuned and the best weighted F4 wins.
With ``per_type=True`` a particle type whose own F4 is higher under another configuration by more
than :data:`PER_TYPE_MARGIN` uses that one (the types are scored independently, so the choices
combine without interfering); off by default, since it has not helped on tomograms unlike the
tuning runs (README, "Tuning").

The result is saved beside the weights as ``czii_kit_thresholds.json`` and used by
:mod:`czii_kit.predict`.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from czii_kit import __version__
from czii_kit.atomic import atomic_write_text
from czii_kit.bundle import MANIFEST_FILE, ModelBundle
from czii_kit.catalog import PARTICLES, get_particle
from czii_kit.checksum import file_sha256
from czii_kit.errors import DataError
from czii_kit.infer import InferenceConfig, detect_keeping_volumes
from czii_kit.layout import select_runs
from czii_kit.metric import BETA, DISTANCE_MULTIPLIER, f_beta, score
from czii_kit.picks import read_picks
from czii_kit.postprocess import MergeConfig, apply_thresholds, merge_detections
from czii_kit.refine import RefineConfig, refine_runs
from czii_kit.rescore import RESCORER_FILE, RescoreConfig, Rescorer, combine_scores, rescore_runs
from czii_kit.settings import DEFAULT_THRESHOLD, SETTINGS_FILE, PipelineSettings
from czii_kit.templates import TEMPLATES_FILE, TemplateMatcher

THRESHOLDS_FILE = SETTINGS_FILE
THRESHOLD_TOLERANCE = 0.01
"""F-beta a tuned threshold may give up on the validation runs to sit lower (see the module docstring)."""

CANDIDATE_MERGES: dict[str, MergeConfig] = {
    "greedy": MergeConfig(method="greedy", xy_frac=0.6, z_frac=1.0, refine=1),
    "greedy-tight": MergeConfig(method="greedy", xy_frac=0.5, z_frac=0.8, refine=1),
    "greedy-sphere": MergeConfig(method="greedy", xy_frac=1.0, z_frac=1.0, refine=0),
    "components": MergeConfig(method="components", link_frac=0.5, link_dz=2.0),
    # many small clusters: a long column of detections gives several candidates along z
    "greedy-split": MergeConfig(method="greedy", xy_frac=0.6, z_frac=0.8, refine=0, top_k=1),
}
"""Merging configurations compared by :func:`tune` (``link_dz`` is scaled by the z-stride); on a tie
the first listed (the default) wins."""

RESCORE_MIXES = (1.0, 0.75, 0.5)
"""Exponents of the rescorer's probability compared by :func:`tune` (``det ** (1 - mix) * p ** mix``)."""

TEMPLATE_WEIGHTS = (0.0, 10.0, 20.0, 40.0, 80.0)
"""Weights of the template-matching margin compared by :func:`tune` when a template file is found
(:class:`~czii_kit.rescore.RescoreConfig`'s ``template_weight``; 0 = without)."""

KEEP_VOLUMES_BYTES = 4 * 2**30
"""Memory :func:`tune` may spend keeping the validation runs' normalised tomograms from its detection
pass for refinement and rescoring (float32: about 290 MB per full-size run); runs beyond it are read
again."""

PER_TYPE_MARGIN = 0.01
"""F4 gain on the validation runs a particle type needs to leave the default merging configuration."""


def threshold_curve(candidates: pd.DataFrame, solution: pd.DataFrame, particle: str,
                    beta: float = BETA, distance_multiplier: float = DISTANCE_MULTIPLIER) -> pd.DataFrame:
    """TP/FP/FN/F-beta of one particle type for every distinct score threshold (descending).

    Parameters
    ----------
    candidates : DataFrame
        ``experiment, particle_type, x, y, z, score`` (Å).
    solution : DataFrame
        Reference picks; its experiments define the runs scored.
    """
    radius = get_particle(particle).radius * distance_multiplier
    exps = sorted(set(solution["experiment"].astype(str)))
    cand = candidates[(candidates["particle_type"] == particle) & candidates["experiment"].astype(str).isin(exps)]
    sol = solution[solution["particle_type"] == particle]
    ref_best = []
    for exp in exps:
        ref = sol[sol["experiment"].astype(str) == exp][["x", "y", "z"]].to_numpy(float)
        c = cand[cand["experiment"].astype(str) == exp]
        if len(ref) == 0:
            continue
        best = np.full(len(ref), -np.inf)
        if len(c):
            cpts = c[["x", "y", "z"]].to_numpy(float)
            cs = c["score"].to_numpy(float)
            for j, hits in enumerate(cKDTree(cpts).query_ball_point(ref, radius)):
                if hits:
                    best[j] = cs[hits].max()
        ref_best.append(best)
    ref_best = np.concatenate(ref_best) if ref_best else np.empty(0)
    scores = np.sort(cand["score"].to_numpy(float))[::-1]
    thresholds = np.unique(scores)[::-1]
    thresholds = np.concatenate([[np.inf], thresholds])
    n_ref = len(ref_best)
    rb = np.sort(ref_best)
    tp = n_ref - np.searchsorted(rb, thresholds, side="left")
    n_cand = len(scores) - np.searchsorted(np.sort(scores), thresholds, side="left")
    fp = n_cand - tp
    fn = n_ref - tp
    f = np.array([f_beta(a, b, c, beta)[2] for a, b, c in zip(tp, fp, fn, strict=True)])
    return pd.DataFrame({"threshold": thresholds, "tp": tp, "fp": fp, "fn": fn, "f_beta": f})


def tune_thresholds(candidates: pd.DataFrame, solution: pd.DataFrame, beta: float = BETA,
                    tolerance: float = THRESHOLD_TOLERANCE) -> tuple[dict[str, float], pd.DataFrame]:
    """Per-type thresholds, each the lowest whose F-beta is within ``tolerance`` of the type's best.

    Returns ``(thresholds, table)``.

    ``table`` (index particle_type): threshold, tp, fp, fn, f_beta (at the chosen threshold),
    f_beta_max, weight, n_reference. A type without reference points keeps :data:`DEFAULT_THRESHOLD`.
    """
    if not tolerance >= 0:
        raise ValueError(f"threshold tolerance must be >= 0, got {tolerance!r}")
    out, rows = {}, {}
    for p in PARTICLES:
        curve = threshold_curve(candidates, solution, p.name, beta)
        n_ref = int(curve["tp"].iloc[0] + curve["fn"].iloc[0])
        if n_ref == 0:
            out[p.name] = DEFAULT_THRESHOLD
            rows[p.name] = {"threshold": DEFAULT_THRESHOLD, "tp": 0, "fp": 0, "fn": 0, "f_beta": 0.0,
                            "f_beta_max": 0.0, "weight": p.weight, "n_reference": 0}
            continue
        f = curve["f_beta"].to_numpy()
        # the curve runs from high to low thresholds; a type never found keeps its highest (nothing passes)
        i = int(np.nonzero(f >= f.max() - tolerance)[0][-1]) if f.max() > 0 else 0
        t = float(curve["threshold"].iloc[i])
        if np.isinf(t):
            thr = float(np.nextafter(curve["threshold"].iloc[1], np.inf)) if len(curve) > 1 else 1.0
        elif i + 1 < len(curve):
            thr = 0.5 * (t + float(curve["threshold"].iloc[i + 1]))
        else:
            thr = t
        out[p.name] = float(min(max(thr, 0.0), 1.0))
        r = curve.iloc[i]
        rows[p.name] = {"threshold": out[p.name], "tp": int(r["tp"]), "fp": int(r["fp"]), "fn": int(r["fn"]),
                        "f_beta": float(r["f_beta"]), "f_beta_max": float(f.max()), "weight": p.weight,
                        "n_reference": n_ref}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "particle_type"
    return out, table


def weighted_final(table: pd.DataFrame) -> float:
    """Weighted F-beta of a per-type table (``f_beta``, ``weight`` columns)."""
    return float((table["f_beta"] * table["weight"]).sum() / table["weight"].sum())


def compare_merges(detections: pd.DataFrame, voxel_sizes, solution: pd.DataFrame,
                   merges: dict[str, MergeConfig] | None = None, z_stride: int = 1,
                   tolerance: float = THRESHOLD_TOLERANCE) -> pd.DataFrame:
    """Tune thresholds for each merging configuration; one row per configuration.

    Columns: ``name, final`` (weighted F4 at tuned thresholds) and ``F4`` per particle type, sorted
    best first. ``link_dz`` of connected components is multiplied by ``z_stride``.
    """
    merges = merges or CANDIDATE_MERGES
    rows = []
    for name, cfg in merges.items():
        if cfg.method == "components":
            cfg = replace(cfg, link_dz=cfg.link_dz * z_stride)
        cands = merge_detections(detections, voxel_sizes, cfg)
        thr, table = tune_thresholds(cands, solution, tolerance=tolerance)
        row = {"name": name, "final": weighted_final(table), "n_candidates": len(cands)}
        row.update({f"F4 {k}": float(v) for k, v in table["f_beta"].items()})
        row["config"] = cfg.to_dict()
        row["thresholds"] = thr
        rows.append(row)
    return pd.DataFrame(rows).sort_values("final", ascending=False, kind="stable").reset_index(drop=True)


def choose_per_type(comparison: pd.DataFrame, margin: float = PER_TYPE_MARGIN) -> dict[str, str]:
    """Particle types whose F4 beats the best overall configuration's by more than ``margin``.

    ``comparison`` is :func:`compare_merges`' table (best first); returns ``{particle name: merge name}``.
    """
    best = comparison.iloc[0]
    out = {}
    for p in PARTICLES:
        col = f"F4 {p.name}"
        if col not in comparison.columns:
            continue
        i = int(np.argmax(comparison[col].to_numpy()))  # first max: ties keep the better overall configuration
        if comparison[col].iloc[i] > best[col] + margin:
            out[p.name] = str(comparison["name"].iloc[i])
    return out


def tune(model: ModelBundle | str | Path, root: str | Path | Sequence[str | Path], split: str = "train",
         runs: Sequence[str] | None = None,
         backend: str = "torch", tomogram: str = "denoised", config=None,
         merges: dict[str, MergeConfig] | None = None, out: str | Path | None = None,
         overwrite: bool = True, progress: bool = True, tolerance: float = THRESHOLD_TOLERANCE,
         per_type: bool = False, rescorer: str | Path | bool | None = None, rescore_config=None,
         rescore_mixes: Sequence[float] | None = RESCORE_MIXES, refine=None, templates=None,
         template_weights: Sequence[float] = TEMPLATE_WEIGHTS, template_config=None) -> dict:
    """Detect on validation runs, compare merging methods, tune thresholds, save them beside ``weights``.

    Parameters
    ----------
    model : ModelBundle or path-like
        The model bundle (or its weights file) to tune; the settings are written beside its weights.
    root : path-like or sequence of path-like
        Dataset root(s) holding the validation runs and their picks.
    runs : sequence of str, optional
        Validation runs; default the ``val_runs`` recorded in ``czii_kit_train.json`` (else all
        runs of ``split`` that have picks).
    config : InferenceConfig, optional
        Inference settings (recorded so that ``predict`` repeats them).
    out : path-like, optional
        Output JSON (default ``czii_kit_thresholds.json`` beside the weights).
    tolerance : float
        F4 a threshold may give up to sit lower (:func:`tune_thresholds`).
    per_type : bool
        Let a particle type use its own merging configuration (:func:`choose_per_type`).
    rescorer : path-like or bool, optional
        3D rescorer (:mod:`czii_kit.rescore`) whose rescored candidates get thresholds of their own
        (saved under ``"rescore"``; ``predict`` then uses them). Default: ``czii_kit_rescorer.pt``
        beside the weights if there is one; ``False``: none.
    rescore_config : RescoreConfig, optional
        How the rescorer runs (and, with ``rescore_mixes=None``, the one mix used).
    rescore_mixes : sequence of float, optional
        Exponents compared on the validation runs (:func:`tune_rescored`), with and without
        cross-type proposals (:class:`~czii_kit.rescore.RescoreConfig`).
    refine : RefineConfig or bool, optional
        Centre refinement of shell-shaped particles after merging (:mod:`czii_kit.refine`). Default:
        kept when it raises the validation F4 (both recorded under ``"refine_comparison"``); ``True``
        always (default :class:`~czii_kit.refine.RefineConfig`); ``False`` never. Saved as ``"refine"``.
    templates : path-like or bool, optional
        Template file (:mod:`czii_kit.templates`) whose matching margin may enter the rescored score
        (weights :data:`TEMPLATE_WEIGHTS` compared, 0 among them). Default: ``czii_kit_templates.npz``
        beside the weights if there is one; ``False``: none. Only with a rescorer.
    template_weights : sequence of float
        The weights compared when there is a template file.
    template_config : TemplateConfig, optional
        How candidates are matched (default :class:`~czii_kit.templates.TemplateConfig`; e.g. its
        ``wedge="auto"`` gives the templates each tomogram's missing wedge); saved with the template file.

    Returns
    -------
    dict
        The saved document: ``thresholds``, ``merge``, ``inference``, ``comparison``, ``table``, ...
    """
    config = config or InferenceConfig()
    model = ModelBundle.load(model)
    weights = model.weights
    if runs is None:
        runs = model.val_runs or None
    chosen = select_runs(root, split, runs)
    solution = read_picks(root, split=split, runs=[r.name for r in chosen])
    if solution.empty:
        raise DataError(root, "the validation runs have no picks to tune against")
    dets, voxel_sizes, volumes = detect_keeping_volumes(weights, chosen, tomogram, backend, config, progress,
                                                        KEEP_VOLUMES_BYTES, model.preprocess, model.voxel_size)
    comparison = compare_merges(dets, voxel_sizes, solution, merges, config.z_stride, tolerance)
    best = comparison.iloc[0]
    merge_cfg = MergeConfig.from_dict(best["config"])
    configs = comparison.set_index("name")["config"]
    chosen_types = choose_per_type(comparison) if per_type else {}
    merge_per_type = {t: {"name": n, **configs[n]} for t, n in chosen_types.items()}
    cands = merge_detections(dets, voxel_sizes, merge_cfg, merge_per_type)
    reading = model.reading(config, tomogram)
    cands, refine_cfg, refine_comparison = choose_refine(cands, chosen, solution, reading, refine, tolerance,
                                                         progress, volumes)
    thresholds, table = tune_thresholds(cands, solution, tolerance=tolerance)
    check = score(solution, apply_thresholds(cands, thresholds))
    doc = {
        "czii_kit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "weights": weights.name,
        "weights_sha256": model.weights_sha256,
        "val_runs": [r.name for r in chosen],
        "backend": backend,
        "inference": config.to_dict(),
        "merge_name": str(best["name"]),
        "merge": merge_cfg.to_dict(),
        "merge_per_type": merge_per_type,
        "refine": None if refine_cfg is None else refine_cfg.to_dict(),
        "refine_comparison": refine_comparison,
        "thresholds": thresholds,
        "threshold_tolerance": tolerance,
        "final_f4": float(check.final),
        "table": _table_dict(table),
        "comparison": [
            {k: (v if k in ("name", "config", "thresholds") else float(v)) for k, v in row.items()}
            for row in comparison.to_dict(orient="records")
        ],
        "n_detections": len(dets),
    }
    rescorer_path = _beside(model, rescorer, RESCORER_FILE)
    if rescorer_path is not None:
        doc["rescore"], rescored = tune_rescored(cands, chosen, solution, rescorer_path, reading, weights,
                                                 rescore_config, tolerance, progress, rescore_mixes,
                                                 templates=_beside(model, templates, TEMPLATES_FILE),
                                                 template_weights=template_weights, volumes=volumes,
                                                 template_config=template_config)
    else:
        rescored = None
    dest = Path(out) if out else model.settings_path
    PipelineSettings.from_doc(doc, dest)  # what predict will read back: checked before it is written
    atomic_write_text(dest, json.dumps(doc, indent=1), overwrite=overwrite)
    if dest.resolve() == model.settings_path.resolve() and (model.folder / MANIFEST_FILE).is_file():
        model.write_manifest()  # the bundle's manifest follows its new settings
    doc["path"] = str(dest)
    doc["_detections"] = dets
    doc["_candidates"] = cands
    doc["_rescored"] = rescored
    doc["_solution"] = solution
    return doc


def choose_refine(cands: pd.DataFrame, runs, solution: pd.DataFrame, reading, refine=None,
                  tolerance: float = THRESHOLD_TOLERANCE, progress: bool = True, volumes=None):
    """Refine the merged validation candidates (:mod:`czii_kit.refine`) if asked, or if it pays.

    ``refine=None`` tunes thresholds with and without refinement and keeps the better validation
    F4; ``True`` / a :class:`~czii_kit.refine.RefineConfig` always refines; ``False`` never.
    ``reading``: how the tomograms are read, a :class:`~czii_kit.volumes.VolumeReading` (as the
    detector saw them); ``volumes``: normalised volumes already at hand (:func:`czii_kit.infer.detect_keeping_volumes`).
    Returns ``(candidates, RefineConfig or None, {"none": F4, "refined": F4} or None)``.
    """
    if refine is False:
        return cands, None, None
    cfg = refine if isinstance(refine, RefineConfig) else RefineConfig()
    refined = refine_runs(cands, runs, reading, cfg, progress, volumes)
    if refine is not None:
        return refined, cfg, None
    plain = weighted_final(tune_thresholds(cands, solution, tolerance=tolerance)[1])
    better = weighted_final(tune_thresholds(refined, solution, tolerance=tolerance)[1])
    comparison = {"none": plain, "refined": better}
    return (refined, cfg, comparison) if better > plain else (cands, None, comparison)


def _table_dict(table: pd.DataFrame) -> dict:
    """:func:`tune_thresholds`' table as JSON-able ``{type: {column: number}}``."""
    return {k: {c: (float(v) if isinstance(v, float) else int(v)) for c, v in row.items()}
            for k, row in table.iterrows()}


def _beside(model: ModelBundle, given, file_name: str) -> Path | None:
    """A bundle file of ``model``: ``given`` if a path, the file ``file_name`` beside the weights (or
    None) if ``None``, the same but required if ``True``, none if ``False``."""
    if given is False:
        return None
    if given is None or given is True:
        found = model.file(file_name)
        if found is None and given is True:
            raise DataError(model.folder, f"no {file_name} beside the weights")
        return found
    return Path(given)




def tune_rescored(cands: pd.DataFrame, runs, solution: pd.DataFrame, rescorer_path: Path, reading,
                  weights: Path, rescore_config=None, tolerance: float = THRESHOLD_TOLERANCE,
                  progress: bool = True, mixes: Sequence[float] | None = RESCORE_MIXES,
                  cross_types: Sequence[bool] | None = (False, True), templates: Path | None = None,
                  template_weights: Sequence[float] = TEMPLATE_WEIGHTS, volumes=None,
                  template_config=None) -> tuple[dict, pd.DataFrame]:
    """Rescore the validation candidates and tune thresholds on the rescored score.

    Every combination of ``cross_types``, ``mixes`` (``None``: only ``rescore_config``'s) and, with a
    ``templates`` file (:mod:`czii_kit.templates`), ``template_weights`` is tried and the one with the
    best validation F4 kept (the first on a tie); ``template_config``: how they are matched.

    Returns the ``"rescore"`` section of the thresholds file (rescorer file name and SHA-256, the
    :class:`~czii_kit.rescore.RescoreConfig`, thresholds, table, final F4 and, when the chosen
    template weight is > 0, the template file's name, SHA-256 and :class:`~czii_kit.templates.TemplateConfig`)
    and the rescored candidates. ``reading``: how the tomograms are read
    (:class:`~czii_kit.volumes.VolumeReading`, as the detector saw them); ``volumes``: normalised
    volumes already at hand (:func:`czii_kit.infer.detect_keeping_volumes`).
    """
    rcfg = rescore_config or RescoreConfig()
    mixes = [rcfg.mix] if mixes is None else list(mixes)
    cross = [rcfg.cross_type] if cross_types is None else list(cross_types)
    matcher = None
    if templates is not None:
        matcher = TemplateMatcher(templates, template_config)
    weights_tm = list(template_weights) if matcher is not None else [0.0]
    model = Rescorer(rescorer_path)
    raw = rescore_runs(cands, runs, model, reading, RescoreConfig(**{**rcfg.to_dict(), "cross_type": any(cross)}),
                       progress, raw=True, templates=matcher, volumes=volumes)
    best, comparison = None, []
    for cross_type in cross:
        for mix in mixes:
            for w in weights_tm:
                trial_cfg = RescoreConfig(**{**rcfg.to_dict(), "mix": float(mix), "cross_type": bool(cross_type),
                                             "template_weight": float(w)})
                trial = combine_scores(raw, trial_cfg)
                thr, tab = tune_thresholds(trial, solution, tolerance=tolerance)
                final = weighted_final(tab)
                comparison.append({"mix": float(mix), "cross_type": bool(cross_type), "template_weight": float(w),
                                   "final": final})
                if best is None or final > best[0]:
                    best = (final, trial_cfg, trial, thr, tab)
    _, rcfg, rescored, thresholds, table = best
    check = score(solution, apply_thresholds(rescored, thresholds))
    section = {
        **_file_record(rescorer_path, weights),
        "config": rcfg.to_dict(),
        "comparison": comparison,
        "thresholds": thresholds,
        "final_f4": float(check.final),
        "table": _table_dict(table),
    }
    if rcfg.template_weight > 0:
        section["templates"] = {**_file_record(templates, weights), "config": matcher.config.to_dict()}
    return section, rescored


def _file_record(path: Path, weights: Path) -> dict:
    """``{"file", "sha256"}`` of a companion file as the thresholds file records it: its name when it
    lies beside ``weights``, else its path (read back by :meth:`czii_kit.bundle.ModelBundle.companion`)."""
    same_dir = path.resolve().parent == weights.resolve().parent
    return {"file": path.name if same_dir else str(path), "sha256": file_sha256(path)}
