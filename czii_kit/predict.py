"""Dataset root -> picks -> submission CSV: detection, 3D merging, refinement, rescoring, tuned thresholds.

The pipeline is :func:`predict`: a :class:`~czii_kit.bundle.ModelBundle` (default: the shipped
model), its :class:`~czii_kit.settings.PipelineSettings` (default: the ones tuned beside the
weights) and a few overrides are resolved once into a :class:`Plan` (:func:`make_plan`), then each
run is detected, merged and put through the optional 3D stages (:func:`predict_runs`, one tomogram
read per run), and the candidates of all runs are thresholded together (:func:`finish`).

Runs go one after another here, or one Dask task each on a cluster (``client=``, :mod:`czii_kit.scaleout`),
and with ``parts=`` each finished run is checkpointed so that an interrupted job resumes (``resume=True``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import pandas as pd

from czii_kit.atomic import check_out_path
from czii_kit.bundle import MODELS_DIR, ModelBundle, default_weights  # noqa: F401 (part of this module's API)
from czii_kit.catalog import PARTICLE_NAMES
from czii_kit.errors import CziiKitError, DataError
from czii_kit.infer import ensure_export, export_batch, iter_detect_runs, native_imgsz
from czii_kit.layout import AUTO_TOMOGRAM, TOMOGRAM_PREFERENCE, select_runs
from czii_kit.postprocess import apply_thresholds, merge_detections, sort_candidates
from czii_kit.preprocess import resampled_shape
from czii_kit.refine import RefineConfig, refine_volume
from czii_kit.rescore import RescoreConfig, Rescorer, combine_scores, rescore_volume
from czii_kit.scaleout import Checkpoint, failure_message, parts_dir, process_cached, run_checkpointed
from czii_kit.settings import PipelineSettings
from czii_kit.submission import write_submission
from czii_kit.templates import TemplateMatcher
from czii_kit.tomogram import open_tomogram

STAGE_SWITCHES = ("refine", "rescore", "templates")
"""The optional 3D stages a caller may force on (``True``) or off (``False``); ``None``: as tuned."""


@dataclass
class Plan:
    """A prediction resolved once: the model, its settings after overrides and the stages that run.

    Attributes
    ----------
    model : ModelBundle
    settings : PipelineSettings
        After overrides (inference, thresholds, template wedge).
    refine : RefineConfig or None
        Centre refinement, or ``None``.
    rescorer : Rescorer or None
        The loaded 3D rescorer, or ``None`` (no rescoring).
    rescore : RescoreConfig or None
        How rescored scores combine (template weight 0 when template matching does not run).
    templates : TemplateMatcher or None
        Template matching inside rescoring, or ``None``.
    thresholds : dict
        Per-type thresholds on the final score (rescored when rescoring runs).
    """

    model: ModelBundle
    settings: PipelineSettings
    refine: RefineConfig | None
    rescorer: Rescorer | None
    rescore: RescoreConfig | None
    templates: TemplateMatcher | None
    thresholds: dict[str, float]

    @property
    def stages(self) -> str:
        """The 3D stages that run after merging, e.g. ``"refine, rescore"`` (``""``: none)."""
        return ", ".join(n for n, on in (("refine", self.refine is not None), ("rescore", self.rescorer is not None))
                         if on)


def make_plan(model: ModelBundle | str | Path | None = None, settings: PipelineSettings | str | Path | None = None,
              refine: bool | None = None, rescore: bool | None = None, templates: bool | None = None,
              **overrides) -> Plan:
    """Resolve the model, its settings and the overrides into a :class:`Plan`.

    Parameters
    ----------
    model : ModelBundle or path-like, optional
        The bundle, or its weights file (default: the shipped model).
    settings : PipelineSettings or path-like, optional
        The tuned settings, or a settings file (``czii-kit tune --out FILE``); default: the file beside
        the weights. Files they name (rescorer, templates) are looked up beside the weights.
    refine, rescore, templates : bool, optional
        Force a 3D stage on or off (``None``: as tuned). ``True`` for rescoring or template matching
        requires what they were tuned with (the very files, checked by SHA-256); ``None`` warns and
        runs without a missing or changed file.
    **overrides
        ``thresholds`` (per-type dict), ``template_wedge`` (``"auto"`` / ``"none"``) and the inference
        settings of :data:`czii_kit.settings.INFERENCE_OVERRIDES` (``z_stride``, ``smooth``, ...).

    Raises
    ------
    SettingsError
        A malformed settings file, or an unknown or bad override (the name is in the message).
    DataError
        A stage forced on whose files are missing or changed.
    """
    model = ModelBundle.load(model)
    if not isinstance(settings, PipelineSettings):
        settings = model.settings(settings)
    settings = settings.overridden(**overrides)
    refine_cfg = None
    if refine is not False:
        refine_cfg = settings.refine if settings.refine is not None else (RefineConfig() if refine else None)
    thresholds = dict(settings.thresholds)
    rescorer = rcfg = matcher = None
    section = settings.rescore if rescore is not False else None
    where = settings.source or model.settings_path
    if rescore and section is None:
        raise DataError(where, "was tuned without a rescorer (run `czii-kit tune` with czii_kit_rescorer.pt "
                               "beside the weights)")
    if section is not None:
        path, problem = model.companion(section.file)
        if problem:
            if rescore:
                raise DataError(path, f"rescorer {problem}")
            warnings.warn(f"{path}: rescorer {problem}; using the detector-only thresholds", stacklevel=2)
            section = None
    if section is not None:
        rescorer = Rescorer(path, digest=model.sha256(path))  # read once already for the manifest / record check
        thresholds.update(section.thresholds)
        matcher, rcfg = _template_stage(model, section, templates)
    return Plan(model, settings, refine_cfg, rescorer, rcfg, matcher, thresholds)


def _template_stage(model: ModelBundle, section, templates: bool | None) -> tuple[TemplateMatcher | None, RescoreConfig]:
    """Template matching as tuned in the ``rescore`` ``section`` (or not: template weight 0)."""
    cfg = section.config
    off = replace(cfg, template_weight=0.0)
    if cfg.template_weight <= 0 or section.templates is None or templates is False:
        return None, off
    path, problem = model.companion(section.templates.file)
    if problem:
        if templates:
            raise DataError(path, f"template file {problem}")
        warnings.warn(f"{path}: template file {problem}; rescoring without template matching", stacklevel=3)
        return None, off
    return TemplateMatcher(path, section.templates.config), cfg


def predict_runs(plan: Plan, runs: Iterable, tomogram: str = "auto", backend: str = "openvino",
                 progress: bool = True, export_dir: str | Path | None = None,
                 detectors: dict | None = None) -> Iterable[pd.DataFrame]:
    """Yield each run's candidates ``experiment, particle_type, x, y, z, score, ...`` (Å), before thresholds.

    ``runs``: :class:`czii_kit.layout.Run` objects. Each tomogram is read, low-passed and windowed once
    for detection, refinement and rescoring (one tomogram in memory at a time). ``detectors``: the
    loaded networks, kept across calls (:func:`czii_kit.infer.iter_detect_runs`).
    """
    s = plan.settings
    stage = plan.stages
    for done in iter_detect_runs(plan.model.weights, runs, tomogram, backend, s.inference, plan.model.preprocess,
                                 plan.model.voxel_size, progress, stage or None, export_dir, detectors):
        cands = merge_detections(done.detections, {done.run.name: done.voxel_size}, s.merge, s.merge_per_type)
        if stage:
            vol = done.normalised(release=True)
            if plan.refine is not None:
                cands = refine_volume(cands, vol, done.voxel_size, plan.refine)
            if plan.rescorer is not None:
                cands = rescore_volume(cands, vol, done.voxel_size, plan.rescorer, plan.rescore, raw=True,
                                       templates=plan.templates)
                plan.rescorer.release_memory()  # its working memory, through the next tomogram's detection
            del vol
        del done  # its volume, before the next tomogram is read
        yield cands


def predict_run(plan: Plan, run, tomogram: str = "auto", backend: str = "openvino", progress: bool = False,
                export_dir: str | Path | None = None, detectors: dict | None = None) -> pd.DataFrame:
    """One run's candidates (:func:`predict_runs` of ``[run]``): the step a job repeats, here or on a worker."""
    return list(predict_runs(plan, [run], tomogram, backend, progress, export_dir, detectors))[0]


@dataclass(frozen=True)
class RunJob:
    """What a Dask worker needs to predict runs as the driver's :class:`Plan` would: sent with each task,
    the plan itself is built once per worker process (:func:`predict_on_worker`).

    ``settings`` are the driver's after overrides; ``stages`` the ``refine, rescore, templates`` switches
    the driver's plan settled on; ``key`` tells plans apart (weights and settings checksums, stages).
    """

    weights: str
    settings: PipelineSettings
    stages: tuple[bool, bool, bool]
    tomogram: str
    backend: str
    export_dir: str | None
    verbose: bool
    key: tuple

    @classmethod
    def of(cls, plan: Plan, tomogram: str, backend: str, export_dir, verbose: bool) -> RunJob:
        stages = (plan.refine is not None, plan.rescorer is not None, plan.templates is not None)
        return cls(str(plan.model.weights), plan.settings, stages, tomogram, backend,
                   None if export_dir is None else str(export_dir), verbose,
                   (plan.model.weights_sha256, settings_sha256(plan.settings), stages, backend))


def predict_on_worker(job: RunJob, run) -> pd.DataFrame:
    """One run's candidates on a Dask worker: the plan and the loaded network are made once per process."""
    refine, rescore, templates = job.stages
    plan = process_cached(("plan", job.key), lambda: make_plan(job.weights, job.settings, refine=refine,
                                                               rescore=rescore, templates=templates))
    detectors = process_cached(("detectors", job.key), dict)
    return predict_run(plan, run, job.tomogram, job.backend, job.verbose, job.export_dir, detectors)


def export_once(plan: Plan, runs: Sequence, tomogram: str, backend: str, export_dir=None) -> None:
    """Make the ONNX / OpenVINO exports ``runs`` need (one per network input size) here, before the
    workers start, so that they do not all export the same model into the same cache at once. A run
    whose tomogram cannot be opened is left to fail on its worker."""
    if backend == "torch":
        return
    inference, sizes = plan.settings.inference, set()
    for run in runs:
        try:
            t = open_tomogram(run.tomogram_path(tomogram))
        except CziiKitError:
            continue
        shape = resampled_shape(t.shape, t.voxel_size, plan.model.voxel_size or t.voxel_size)
        sizes.add(inference.imgsz or native_imgsz(shape[1:]))
    for size in sorted(sizes):
        ensure_export(plan.model.weights, backend, size, export_batch(backend, inference), export_dir)


def settings_sha256(settings: PipelineSettings) -> str:
    """A checksum of what ``settings`` hold (not where they were read from): equal settings, equal sums."""
    doc = dataclasses.asdict(replace(settings, source=None))
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


JOB_LABELS = {"weights_sha256": "weights (SHA-256)", "settings_sha256": "settings (SHA-256)",
              "stages": "3D stages", "backend": "backend", "tomogram": "tomogram"}
"""What each compared item of a parts folder's manifest is, in a mismatch message."""


def open_checkpoint(plan: Plan, folder: str | Path, tomogram: str, backend: str, resume: bool = False,
                    force: bool = False) -> Checkpoint:
    """The parts folder of a job predicting with ``plan`` (:meth:`czii_kit.scaleout.Checkpoint.open`)."""
    manifest = {"weights_sha256": plan.model.weights_sha256, "settings_sha256": settings_sha256(plan.settings),
                "stages": plan.stages or "none", "backend": backend, "tomogram": tomogram}
    info = {"weights": str(plan.model.weights), "settings": str(plan.settings.source or "built-in defaults")}
    return Checkpoint.open(folder, manifest, resume, force, JOB_LABELS, info)


def finish(plan: Plan, candidates: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The picks of all runs: candidates from :func:`predict_runs` combined, sorted and thresholded.

    Runs are sorted as :func:`czii_kit.postprocess.merge_detections` sorts several runs, so the result
    does not depend on the order the runs were processed in.
    """
    cands = pd.concat(list(candidates), ignore_index=True)
    cands = combine_scores(cands, plan.rescore) if plan.rescorer is not None else sort_candidates(cands)
    return apply_thresholds(cands, plan.thresholds)


def predict(root: str | Path, split: str | None = "test", runs: Sequence[str] | None = None,
            model: ModelBundle | str | Path | None = None, settings: PipelineSettings | str | Path | None = None, *,
            backend: str = "openvino", tomogram: str = "auto", progress: bool = True,
            export_dir: str | Path | None = None, verbose: bool = False, client=None,
            parts: str | Path | None = None, resume: bool = False, force: bool = False,
            **overrides) -> pd.DataFrame:
    """Picks for every run of ``split`` under ``root``.

    Parameters
    ----------
    root : path-like
        Dataset root (or split / run folder: anything :func:`czii_kit.layout.find_runs` takes).
    split : str or None
        Split to predict (``None``: all runs found).
    runs : sequence of str, optional
        Only these runs.
    model : ModelBundle or path-like, optional
        The model bundle or its weights file (default: the shipped model, :func:`czii_kit.bundle.default_weights`).
    settings : PipelineSettings or path-like, optional
        Tuned settings (default: ``czii_kit_thresholds.json`` beside the weights; see :func:`make_plan`).
    backend : {"openvino", "onnx", "torch"}
    tomogram : str
        Tomogram to pick in (``"denoised"``, ``"wbp"``, ...); ``"auto"`` (default): per run, the
        denoised one, else the best other it has (:func:`czii_kit.layout.choose_tomogram`, with a
        warning naming the runs and what they use).
    progress : bool
        Show a progress bar over the runs (done / total, with an ETA).
    export_dir : path-like, optional
        Cache of ONNX / OpenVINO exports (default :func:`czii_kit.infer.export_cache`).
    verbose : bool
        Also a bar over each run's slices (on the workers' output with a ``client``).
    client : distributed.Client, optional
        Predict one Dask task per run on this cluster (:func:`czii_kit.scaleout.cluster`); the picks are
        the same as without.
    parts : path-like, optional
        Checkpoint each finished run into this folder (:class:`czii_kit.scaleout.Checkpoint`); a run
        whose tomogram cannot be read then fails alone and the others finish.
    resume : bool
        Reuse the finished runs in ``parts`` (made with the same model and settings, else an error).
    force : bool
        Start again over an existing ``parts`` folder (without it or ``resume``, one is refused).
    **overrides
        ``refine``, ``rescore``, ``templates`` (bool: force a stage on or off), ``thresholds`` (dict),
        ``template_wedge`` and inference settings (``z_stride``, ``batch``, ``tta``, ``imgsz``,
        ``polarity``, ``smooth``, ``flatten``, ``tilt_axis``): see :func:`make_plan`.

    Returns
    -------
    DataFrame
        ``experiment, particle_type, x, y, z`` (Å, the tomogram's frame) and ``score``, one row per pick.

    Raises
    ------
    CziiKitError
        With ``parts`` or ``client``: runs that failed (named, with why), after the others finished.
    """
    plan = make_plan(model, settings, **overrides)
    chosen = select_runs(root, split, runs)
    checkpoint = None if parts is None else open_checkpoint(plan, parts, tomogram, backend, resume, force)
    if tomogram == AUTO_TOMOGRAM:
        _warn_fallback(chosen)
    if client is None:
        work = partial(predict_run, plan, tomogram=tomogram, backend=backend, progress=verbose,
                       export_dir=export_dir, detectors={})
    else:
        export_once(plan, chosen, tomogram, backend, export_dir)
        work = partial(predict_on_worker, RunJob.of(plan, tomogram, backend, export_dir, verbose))
    job = run_checkpointed(chosen, work, checkpoint, client, progress)
    if job.failed:
        kept = checkpoint.folder if checkpoint is not None and job.frames else None
        if checkpoint is not None and not job.frames:
            checkpoint.remove()
        raise CziiKitError(failure_message(job.failed, len(chosen), kept))
    return finish(plan, list(job.frames.values()))


def _warn_fallback(runs) -> None:
    """Warn once, naming the runs, when ``tomogram="auto"`` picks in other than the denoised tomogram."""
    preferred = TOMOGRAM_PREFERENCE[0]
    used = {r.name: r.tomogram_name(AUTO_TOMOGRAM) for r in runs}
    other = {n: t for n, t in used.items() if t not in (preferred, AUTO_TOMOGRAM)}  # AUTO: none at all (an error)
    if other:
        shown = ", ".join(f"{n}: {t}" for n, t in list(other.items())[:5]) + (" ..." if len(other) > 5 else "")
        warnings.warn(f"{len(other)} of {len(used)} run(s) have no {preferred} tomogram; picking in the best "
                      f"other one ({shown})", stacklevel=3)


def predict_to_csv(root: str | Path, out: str | Path, force: bool = False, resume: bool = False,
                   **kwargs) -> tuple[Path, pd.DataFrame]:
    """Run :func:`predict` and write the submission atomically; before any work, refuses an existing ``out``
    unless ``force``, and a folder always (:func:`czii_kit.atomic.check_out_path`).

    Finished runs are checkpointed in ``OUT.parts`` (:func:`czii_kit.scaleout.parts_dir`) until the
    submission is written, then removed; ``resume`` reuses them, ``force`` starts again over them.
    """
    out = check_out_path(out, force)
    folder = parts_dir(out)
    picks = predict(root, parts=folder, resume=resume, force=force, **kwargs)
    path = write_submission(picks, out, overwrite=force)
    Checkpoint(folder, {}).remove()
    return path, picks


def summary(picks: pd.DataFrame) -> pd.DataFrame:
    """Counts per run and particle type (all catalog types as columns, a ``total`` row)."""
    if picks.empty:
        return pd.DataFrame(columns=list(PARTICLE_NAMES))
    t = picks.groupby(["experiment", "particle_type"]).size().unstack(fill_value=0)
    t = t.reindex(columns=list(PARTICLE_NAMES), fill_value=0)
    t.loc["total"] = t.sum()
    return t


__all__ = ["Plan", "RunJob", "make_plan", "predict_runs", "predict_run", "predict_on_worker", "export_once", "open_checkpoint",
           "settings_sha256", "finish", "predict", "predict_to_csv", "summary", "STAGE_SWITCHES"]
