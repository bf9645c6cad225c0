"""Dataset root -> picks -> submission CSV: detection, 3D merging, refinement, rescoring, tuned thresholds.

Settings come from the files beside the weights: ``czii_kit_train.json`` (preprocessing) and
``czii_kit_thresholds.json`` (merging method, per-class thresholds and the inference settings they
were tuned with, written by ``czii-kit tune``). Without the latter, the default greedy merging and
a threshold of 0.5 are used (with a warning).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import pandas as pd

from czii_kit.catalog import PARTICLE_NAMES
from czii_kit.errors import CziiKitError, DataError, FileExistsNoForce
from czii_kit.infer import InferenceConfig, iter_detect_runs
from czii_kit.layout import AUTO_TOMOGRAM, TOMOGRAM_PREFERENCE, select_runs
from czii_kit.postprocess import MergeConfig, apply_thresholds, merge_detections, sort_candidates
from czii_kit.tune import DEFAULT_THRESHOLD, read_thresholds, thresholds_path

MODELS_DIR = Path(__file__).parent / "models"


def default_weights() -> Path:
    """The model shipped in ``czii_kit/models/`` (``*.pt``); a clear error when there is none."""
    found = sorted(MODELS_DIR.glob("*.pt")) if MODELS_DIR.is_dir() else []
    if not found:
        raise CziiKitError(
            f"no model is shipped in {MODELS_DIR} yet; pass --weights path/to/best.pt "
            "(train one with `czii-kit build-dataset` + `czii-kit train`)"
        )
    if len(found) > 1:
        preferred = [p for p in found if p.stem in ("default", "best")]
        if preferred:
            return preferred[0]
        raise CziiKitError(f"several models in {MODELS_DIR} ({', '.join(p.name for p in found)}); pass --weights")
    return found[0]


def settings_for(weights: str | Path, z_stride: int | None = None, batch: int | None = None,
                 tta: bool | None = None, imgsz: int | None = None, polarity: str | None = None,
                 smooth: str | float | None = None, thresholds_file: str | Path | None = None,
                 flatten: str | None = None, tilt_axis: str | None = None) -> tuple[InferenceConfig, MergeConfig, dict[str, MergeConfig], dict[str, float]]:
    """Inference config, merge config, per-type merge configs and thresholds for ``weights``
    (tuned file, then overrides). ``thresholds_file``: another tuned file than the one beside the weights."""
    doc = read_thresholds(weights, thresholds_file)
    if not doc:
        warnings.warn(f"{thresholds_path(weights)} not found: using greedy merging and a "
                      f"threshold of {DEFAULT_THRESHOLD} for every type (run `czii-kit tune`)", stacklevel=2)
    _check_tuned_for(weights, doc, thresholds_path(weights, thresholds_file))
    known = {f.name for f in fields(InferenceConfig)}
    inf = {k: v for k, v in (doc.get("inference") or {}).items() if k in known}
    overrides = {"z_stride": z_stride, "batch": batch, "tta": tta, "imgsz": imgsz, "polarity": polarity,
                 "smooth": smooth, "flatten": flatten, "tilt_axis": tilt_axis}
    for k, v in overrides.items():
        if v is not None:
            inf[k] = v
    thresholds = {n: float(doc.get("thresholds", {}).get(n, DEFAULT_THRESHOLD)) for n in PARTICLE_NAMES}
    per_type = {n: MergeConfig.from_dict(c) for n, c in (doc.get("merge_per_type") or {}).items()}
    return InferenceConfig(**inf), MergeConfig.from_dict(doc.get("merge")), per_type, thresholds


def _check_tuned_for(weights: Path, doc: dict, path: Path) -> None:
    """Warn when the thresholds file records other weights (by SHA-256) than ``weights``: its
    thresholds were tuned on another model's scores."""
    from czii_kit.checksum import file_sha256

    recorded = doc.get("weights_sha256")
    if recorded and recorded != file_sha256(weights):
        warnings.warn(f"{path}: tuned for other weights ({doc.get('weights', '?')}, sha256 {recorded[:12]}...) "
                      f"than {weights}; its thresholds may not fit this model (re-run `czii-kit tune`)", stacklevel=3)


def refine_settings(weights: str | Path, refine: bool | None = None, thresholds_file: str | Path | None = None):
    """The :class:`~czii_kit.refine.RefineConfig` tuned for ``weights`` (``"refine"`` in the thresholds
    file), or ``None``. ``refine=False`` never refines; ``True`` refines with the tuned settings, or
    the defaults when none were tuned (the thresholds were then tuned without it)."""
    if refine is False:
        return None
    from czii_kit.refine import RefineConfig

    tuned = read_thresholds(weights, thresholds_file).get("refine")
    if tuned:
        return RefineConfig.from_dict(tuned)
    return RefineConfig() if refine else None


def _recorded_file(weights: str | Path, record: dict) -> tuple[Path, str | None]:
    """The file a thresholds-file record names (``file`` relative to the weights' folder, ``sha256``)
    and what is wrong with it (``None``: there, and the very file tuned)."""
    from czii_kit.checksum import file_sha256

    path = Path(record.get("file", ""))
    path = path if path.is_absolute() else Path(weights).parent / path
    if not path.is_file():
        return path, "is missing"
    if record.get("sha256") and file_sha256(path) != record["sha256"]:
        return path, "differs from the one the thresholds were tuned with"
    return path, None


def rescore_settings(weights: str | Path, rescore: bool | None = None,
                     thresholds_file: str | Path | None = None) -> tuple[Path, dict] | None:
    """The rescorer file and the ``"rescore"`` section tuned for ``weights``, or ``None`` (no rescoring).

    ``rescore=None`` rescores when ``czii-kit tune`` recorded a rescorer and that very file (same
    SHA-256) is there, and warns when it was recorded but is missing or changed; ``True`` requires
    it; ``False`` never rescores (the detector-only thresholds).
    """
    if rescore is False:
        return None
    weights = Path(weights)
    section = read_thresholds(weights, thresholds_file).get("rescore")
    where = thresholds_path(weights, thresholds_file)
    if not section:
        if rescore:
            raise DataError(where, "was tuned without a rescorer (run `czii-kit tune` with czii_kit_rescorer.pt "
                                   "beside the weights)")
        return None
    path, problem = _recorded_file(weights, section)
    if problem:
        if rescore:
            raise DataError(path, f"rescorer {problem}")
        warnings.warn(f"{path}: rescorer {problem}; using the detector-only thresholds", stacklevel=2)
        return None
    return path, section


def template_settings(weights: str | Path, section: dict | None, templates: bool | None = None,
                      wedge: str | None = None):
    """``(TemplateMatcher or None, RescoreConfig)`` for the ``"rescore"`` section tuned for ``weights``.

    Template matching runs when the tuned ``template_weight`` is > 0 and the recorded template file
    (same SHA-256) is there; when it is missing or changed this warns (``templates=True``: raises)
    and rescores without it. ``templates=False`` never matches (``template_weight`` 0). ``wedge``
    (``"auto"`` or ``"none"``) replaces the recorded :attr:`~czii_kit.templates.TemplateConfig.wedge`.
    """
    from czii_kit.rescore import RescoreConfig

    cfg = RescoreConfig.from_dict((section or {}).get("config"))
    record = (section or {}).get("templates")
    if cfg.template_weight <= 0 or not record or templates is False:
        return None, RescoreConfig(**{**cfg.to_dict(), "template_weight": 0.0})
    from czii_kit.templates import TemplateConfig, TemplateMatcher

    path, problem = _recorded_file(weights, record)
    if problem:
        if templates:
            raise DataError(path, f"template file {problem}")
        warnings.warn(f"{path}: template file {problem}; rescoring without template matching", stacklevel=2)
        return None, RescoreConfig(**{**cfg.to_dict(), "template_weight": 0.0})
    conf = dict(record.get("config") or {})
    if wedge is not None:
        if wedge not in ("auto", "none"):
            raise ValueError(f"template wedge must be 'auto' or 'none', got {wedge!r}")
        conf["wedge"] = None if wedge == "none" else wedge
    return TemplateMatcher(path, TemplateConfig.from_dict(conf)), cfg


def predict(root: str | Path, split: str | None = "test", runs: Sequence[str] | None = None,
            weights: str | Path | None = None, backend: str = "openvino", tomogram: str = "auto",
            z_stride: int | None = None, batch: int | None = None, tta: bool | None = None,
            thresholds: dict[str, float] | None = None, polarity: str | None = None,
            smooth: str | float | None = None, rescore: bool | None = None, refine: bool | None = None,
            templates: bool | None = None, template_wedge: str | None = None,
            thresholds_file: str | Path | None = None,
            flatten: str | None = None, tilt_axis: str | None = None, progress: bool = True) -> pd.DataFrame:
    """Picks ``experiment, particle_type, x, y, z`` (Å) for every run of ``split`` under ``root``.

    Parameters
    ----------
    root : path-like
        Dataset root (or split / run folder: anything :func:`czii_kit.layout.find_runs` takes).
    split : str or None
        Split to predict (``None``: all runs found).
    runs : sequence of str, optional
        Only these runs.
    weights : path-like, optional
        Default :func:`default_weights`.
    backend : {"openvino", "onnx", "torch"}
    tomogram : str
        Tomogram to pick in (``"denoised"``, ``"wbp"``, ...); ``"auto"`` (default): per run, the
        denoised one, else the best other it has (:func:`czii_kit.layout.choose_tomogram`, with a
        warning naming the runs and what they use).
    z_stride, batch, tta : optional
        Override the inference settings recorded by ``tune``.
    thresholds : dict, optional
        Override the tuned per-type thresholds.
    polarity : {"auto", "dark", "bright"}, optional
        Contrast of the tomograms (default ``"auto"``: see :class:`czii_kit.infer.InferenceConfig`).
    smooth : "auto", "off" or float, optional
        Low-pass of the tomograms before detection, refinement and rescoring (default as tuned, else
        ``"auto"``: noisy tomograms only; see :class:`czii_kit.infer.InferenceConfig`).
    flatten : {"auto", "on", "off"}, optional
        Subtract a strong slow lateral background variation first (default as tuned, else ``"auto"``:
        uneven tomograms only; see :class:`czii_kit.infer.InferenceConfig`).
    tilt_axis : {"auto", "y", "x"}, optional
        Direction of the tilt axis (default as tuned, else ``"auto"``: read from the missing wedge;
        see :class:`czii_kit.infer.InferenceConfig`).
    rescore : bool, optional
        Second-stage 3D rescoring (:mod:`czii_kit.rescore`; see :func:`rescore_settings`): default
        when it was tuned, ``False`` to skip it.
    refine : bool, optional
        Centre refinement of shell-shaped particles (:mod:`czii_kit.refine`; see
        :func:`refine_settings`): default when it was tuned, ``False`` to skip it.
    templates : bool, optional
        Template matching in the rescored score (:mod:`czii_kit.templates`; see
        :func:`template_settings`): default when it was tuned, ``False`` to skip it.
    template_wedge : {"auto", "none"}, optional
        Whether the templates get each tomogram's missing wedge (:mod:`czii_kit.wedge`); default as
        tuned (the shipped thresholds: ``"auto"``).
    thresholds_file : path-like, optional
        The tuned settings and thresholds to use (a file written by ``czii-kit tune --out``, e.g.
        thresholds tuned on your own validation runs for the shipped model) instead of
        ``czii_kit_thresholds.json`` beside the weights. The rescorer and template files it names are
        looked up beside the weights, as for that file.
    """
    weights = Path(weights) if weights is not None else default_weights()
    if not weights.is_file():
        raise DataError(weights, "no such weights file")
    chosen = select_runs(root, split, runs)
    if tomogram == AUTO_TOMOGRAM:
        _warn_fallback(chosen)
    inf, merge, per_type, thr = settings_for(weights, z_stride, batch, tta, polarity=polarity, smooth=smooth,
                                             thresholds_file=thresholds_file, flatten=flatten, tilt_axis=tilt_axis)
    plan = rescore_settings(weights, rescore, thresholds_file)
    refine_cfg = refine_settings(weights, refine, thresholds_file)
    if plan is not None:
        thr.update({n: float(v) for n, v in plan[1].get("thresholds", {}).items() if n in thr})
    if thresholds:
        thr.update(thresholds)
    rescorer = matcher = rcfg = None
    if plan is not None:
        from czii_kit.rescore import Rescorer, combine_scores, rescore_volume

        rescorer = Rescorer(plan[0])
        matcher, rcfg = template_settings(weights, plan[1], templates, template_wedge)
    if refine_cfg is not None:
        from czii_kit.refine import refine_volume
    frames = []
    # one pass per tomogram: read, low-pass and window it once for detection, refinement and rescoring
    stage = ", ".join(n for n, on in (("refine", refine_cfg is not None), ("rescore", plan is not None)) if on)
    for done in iter_detect_runs(weights, chosen, tomogram, backend, inf, progress, stage or None):
        cands = merge_detections(done.detections, {done.run.name: done.voxel_size}, merge, per_type)
        if stage:
            vol = done.normalised(release=True)
            if refine_cfg is not None:
                cands = refine_volume(cands, vol, done.voxel_size, refine_cfg)
            if plan is not None:
                cands = rescore_volume(cands, vol, done.voxel_size, rescorer, rcfg, raw=True, templates=matcher)
            del vol
        frames.append(cands)
        del done  # its volume, before the next tomogram is read
    cands = pd.concat(frames, ignore_index=True)  # select_runs gave at least one run
    # runs come in (split, name) order: sort as merge_detections / combine_scores do for several runs
    cands = combine_scores(cands, rcfg) if plan is not None else sort_candidates(cands)
    return apply_thresholds(cands, thr)


def _warn_fallback(runs) -> None:
    """Warn once, naming the runs, when ``tomogram="auto"`` picks in other than the denoised tomogram."""
    preferred = TOMOGRAM_PREFERENCE[0]
    used = {r.name: r.tomogram_name(AUTO_TOMOGRAM) for r in runs}
    other = {n: t for n, t in used.items() if t not in (preferred, AUTO_TOMOGRAM)}  # AUTO: none at all (an error)
    if other:
        shown = ", ".join(f"{n}: {t}" for n, t in list(other.items())[:5]) + (" ..." if len(other) > 5 else "")
        warnings.warn(f"{len(other)} of {len(used)} run(s) have no {preferred} tomogram; picking in the best "
                      f"other one ({shown})", stacklevel=3)


def predict_to_csv(root: str | Path, out: str | Path, force: bool = False, **kwargs) -> tuple[Path, pd.DataFrame]:
    """Run :func:`predict` and write the submission atomically; refuses an existing ``out`` unless ``force``."""
    from czii_kit.submission import write_submission

    out = Path(out)
    if out.exists() and not force:
        raise FileExistsNoForce(f"{out}: already exists (use --force to replace it)")
    picks = predict(root, **kwargs)
    return write_submission(picks, out, overwrite=force), picks


def summary(picks: pd.DataFrame) -> pd.DataFrame:
    """Counts per run and particle type (all catalog types as columns)."""
    if picks.empty:
        return pd.DataFrame(columns=list(PARTICLE_NAMES))
    t = picks.groupby(["experiment", "particle_type"]).size().unstack(fill_value=0)
    t = t.reindex(columns=list(PARTICLE_NAMES), fill_value=0)
    t.loc["total"] = t.sum()
    return t
