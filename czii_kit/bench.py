"""Benchmark inference on a full-size tomogram (184 x 630 x 630): the whole pipeline against the model's
own forward passes, each backend's detection, the naive loop, the 3D stages, startup, peak RSS.

Each measurement runs in a fresh Python process (``python -m czii_kit.bench --worker ...``) so that
its peak RSS (``ru_maxrss``) is that of one job alone, with nothing else loaded. The machine's speed
drifts (shared CPUs), so the pipeline is measured against a limit timed in the same run, in rounds
interleaved with it (the limit in a process of its own while the pipeline's waits: see
:func:`_pipeline_worker`).

Figures
-------
pipeline
    The whole ``predict`` of one tomogram with every stage its bundle has (shipped: refinement,
    rescorer, template matching), after a short warm-up tomogram (compiled models, caches):
    ``forward_limit_s`` (``slices`` plain forward passes of the same model, batch 1, same backend:
    :func:`forward_limit`, timed before and after, the mean), ``detect_s`` (reading, preparing, the
    2.5D slices, forward passes, 2D NMS, 3D merge) and ``e2e_s`` (everything, thresholds included),
    their ratios to the limit (``detect_ratio``, ``e2e_ratio``), ``speedup_vs_naive``, ``peak_rss_mb``
    (of that process), ``stages_s`` (the breakdown of a further, profiled pass: :data:`STAGES`) and
    ``startup`` (a fresh process: imports, the bundle, the detector from its cached export, the rotated
    templates from their cache).
predict_s
    Per backend and z-stride: seconds of detection alone for one tomogram (read, prepare, stack,
    forward, 2D NMS, 3D merge; one-off export and compilation excluded).
forward_s
    Model-only time: the network's forward passes for the same number of slices (pre-made input
    tensors, no pre/post-processing; up to 6 batches timed and scaled to the slice count).
naive_s
    The naive loop a user would write: ``YOLO(weights).predict(image)`` once per slice (torch, every
    slice, one image per call), including the same reading and stacking.
rescore_s
    The second-stage 3D rescorer (:mod:`czii_kit.rescore`) on :data:`RESCORE_CANDIDATES` candidates
    at random places, as a stage of its own: a read of the tomogram, normalisation, 32³ patches and the
    forward passes (the shipped rescorer, else an untrained one; timing does not depend on the weights).
    ``predict`` rescores on the volume the detector has read, so it pays the patches and passes only.
refine_s
    Centre refinement (:mod:`czii_kit.refine`) of the same candidates taken as apo-ferritin, on the
    volume already normalised for the rescorer (``predict`` refines on the detector's volume).
templates_s, templates_setup_s
    Template matching (:mod:`czii_kit.templates`) at the same candidates, on the same volume, with
    the shipped template file (``templates_setup_s``: the rotated templates, read from their disk cache
    once it exists, else rotated); absent when no template file is shipped.
smooth_check_s, smooth_s
    The low-pass of noisy tomograms (:func:`czii_kit.preprocess.settle_smoothing`): deciding whether
    and how much to smooth (``smooth_check_s``, paid on every tomogram; a denoised one stops there),
    and the Gaussian filter of the whole volume at sigma 1.75 (``smooth_s``, paid once per noisy
    tomogram: ``predict`` prepares each tomogram once for detection, refinement and rescoring).
peak_rss_mb
    Peak resident memory of the worker process.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from czii_kit.bundle import MODELS_DIR, ModelBundle, default_weights
from czii_kit.catalog import PARTICLES
from czii_kit.coords import voxel_to_angstrom
from czii_kit.infer import (
    Detector,
    InferenceConfig,
    detect_volume,
    iter_detect_runs,
    loaded_detector,
    native_imgsz,
)
from czii_kit.layout import select_runs, tomogram_location
from czii_kit.offline import configure_offline
from czii_kit.postprocess import merge_detections
from czii_kit.predict import finish, make_plan, predict, predict_runs
from czii_kit.preprocess import (
    PreprocessConfig,
    robust_window,
    settle_smoothing,
    slice_indices,
    smoothing_sigma,
    stack_slice,
)
from czii_kit.refine import refine_volume
from czii_kit.rescore import RESCORER_FILE, Rescorer, build_network, rescore_volume
from czii_kit.rescore_train import save_rescorer
from czii_kit.scaleout import bench_workers, cluster
from czii_kit.templates import TEMPLATES_FILE, TemplateMatcher
from czii_kit.tomogram import open_tomogram, write_tomogram
from czii_kit.volumes import normalised_volume, read_volume

FULL_SHAPE = (184, 630, 630)
RESCORE_CANDIDATES = 1000
"""Candidates rescored by the benchmark: about what the shipped model merges on a full-size run."""
VOXEL_SIZE = 10.012444


SMOOTH_SIGMA = 1.5
"""Gaussian sigma (voxels) of the bench tomogram's noise: x-neighbour correlation about 0.89, within the
range of the denoised tomograms the shipped model reads (0.86-0.96), so ``smooth="auto"`` leaves it as
is, as it leaves the Kaggle tomograms (``0``: white noise, which it low-passes)."""


def synthetic_tomogram(path: str | Path, shape=FULL_SHAPE, n_per_type: int = 25, seed: int = 0,
                       smooth: float = SMOOTH_SIGMA) -> Path:
    """Write a tomogram of dark spheres (catalog radii) in noise, float32, like the Kaggle files.

    ``smooth``: Gaussian sigma (voxels) of the noise (:data:`SMOOTH_SIGMA`: as smooth as a denoised
    tomogram; 0: white noise, like a raw reconstruction).
    """
    rng = np.random.default_rng(seed)
    vol = rng.normal(0.0, 1.0, size=shape).astype(np.float32)
    if smooth > 0:
        from scipy.ndimage import gaussian_filter

        vol = gaussian_filter(vol, smooth, output=np.float32)
        vol /= vol.std()
    for p in PARTICLES:
        r = p.radius / VOXEL_SIZE
        ri = int(np.ceil(r))
        g = np.arange(-ri, ri + 1, dtype=np.float32)
        ball = (g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2) <= r * r
        for _ in range(n_per_type):
            c = [int(rng.integers(ri, s - ri)) for s in shape]
            sl = tuple(slice(ci - ri, ci + ri + 1) for ci in c)
            vol[sl][ball] -= 1.5
    vol = vol * 1e-5 + 3e-4  # arbitrary scale, like reconstructed densities
    return write_tomogram(path, vol, VOXEL_SIZE, n_levels=1, chunks=(256, 256, 256), overwrite=True)


ROUNDS = 3
"""Rounds of the pipeline measurement (end to end, the forward-pass limit, detection alone, interleaved);
each figure is the best of its rounds: on a shared machine whose speed drifts within seconds, two were
not enough to catch both sides of a ratio in a quiet moment."""

BENCH_RUN, WARMUP_RUN = "bench", "warmup"
WARMUP_SHAPE = (40, FULL_SHAPE[1], FULL_SHAPE[2])
"""A short tomogram of the same slice size, predicted first (untimed): compiles the models and fills the
caches a long-running process has filled after its first tomogram."""


def bench_dataset(root: str | Path, smooth: float = SMOOTH_SIGMA) -> Path:
    """A dataset root holding the full-size synthetic tomogram (run ``bench``) and a short warm-up one
    (run ``warmup``) as ``denoised.zarr``; returns the full-size tomogram's path."""
    static = Path(root) / "static"
    synthetic_tomogram(tomogram_location(static, WARMUP_RUN), WARMUP_SHAPE, n_per_type=2, seed=1, smooth=smooth)
    return synthetic_tomogram(tomogram_location(static, BENCH_RUN), smooth=smooth)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker(args) -> dict:
    """One measurement in this (fresh) process; returns the figures as a dict."""

    if args.mode == "pipeline":
        return _pipeline_worker(args)
    if args.mode == "limit":
        return {"forward_limit_s": forward_limit(args.weights or default_weights(), args.backend, args.imgsz or 640,
                                                 args.slices, args.device)}
    if args.mode == "startup":
        return _startup_worker(args)
    tomo = open_tomogram(args.tomogram)
    imgsz = args.imgsz or native_imgsz(tomo.shape[1:])
    prep = PreprocessConfig()
    out: dict = {"backend": args.backend, "mode": args.mode, "imgsz": imgsz, "batch": args.batch,
                 "z_stride": args.z_stride, "shape": list(tomo.shape)}
    if args.mode == "rescore":
        import pandas as pd

        rng = np.random.default_rng(0)
        zyx = rng.uniform(0, np.array(tomo.shape) - 1, (RESCORE_CANDIDATES, 3))
        xyz = voxel_to_angstrom(zyx, tomo.voxel_size)
        cands = pd.DataFrame({"experiment": "bench", "particle_type": "ribosome", "x": xyz[:, 0],
                              "y": xyz[:, 1], "z": xyz[:, 2], "score": 0.5})
        model = Rescorer(args.weights)
        model.predict_proba(np.zeros((8, 32, 32, 32), np.float32))  # first-call overhead excluded

        raw = read_volume(tomo)
        t0 = time.perf_counter()
        smoothing_sigma(raw)
        t1 = time.perf_counter()
        settle_smoothing(raw, 1.75)
        out.update(smooth_check_s=t1 - t0, smooth_s=time.perf_counter() - t1)
        del raw
        t0 = time.perf_counter()
        vol = normalised_volume(read_volume(tomo), prep, "auto")
        rescore_volume(cands, vol, tomo.voxel_size, model)
        out.update(rescore_s=time.perf_counter() - t0, candidates=RESCORE_CANDIDATES)

        t0 = time.perf_counter()
        refine_volume(cands.assign(particle_type="apo-ferritin"), vol, tomo.voxel_size)
        out.update(refine_s=time.perf_counter() - t0)

        if (MODELS_DIR / TEMPLATES_FILE).is_file():
            t0 = time.perf_counter()
            matcher = TemplateMatcher(MODELS_DIR / TEMPLATES_FILE)
            matcher.match(vol, xyz[:1], tomo.voxel_size)  # builds the rotated templates
            t1 = time.perf_counter()
            matcher.margins(vol, xyz, tomo.voxel_size)
            out.update(templates_setup_s=t1 - t0, templates_s=time.perf_counter() - t1)
    elif args.mode == "naive":
        configure_offline()
        from ultralytics import YOLO

        model = YOLO(str(args.weights))
        warm = np.zeros((tomo.shape[1], tomo.shape[2], 3), np.uint8)
        model.predict(warm, imgsz=imgsz, verbose=False)
        t0 = time.perf_counter()
        vol = read_volume(tomo)
        window = robust_window(vol)
        n = 0
        for z in range(tomo.shape[0]):
            r = model.predict(stack_slice(vol, z, window, prep), imgsz=imgsz, conf=0.05, verbose=False)
            n += len(r[0].boxes)
        out.update(naive_s=time.perf_counter() - t0, slices=tomo.shape[0], boxes=n)
    else:
        cfg = InferenceConfig(batch=args.batch, z_stride=args.z_stride, imgsz=imgsz)
        det = Detector(args.weights, args.backend, cfg, imgsz)
        warm = np.zeros((args.batch, tomo.shape[1], tomo.shape[2], 3), np.uint8)
        det.detect(warm)  # compile / first-call overhead excluded
        t0 = time.perf_counter()
        vol = read_volume(tomo)
        t_read = time.perf_counter() - t0
        dets = detect_volume(det, vol, "bench", prep, args.z_stride)
        cands = merge_detections(dets, tomo.voxel_size)
        out.update(predict_s=time.perf_counter() - t0, read_s=t_read, detections=len(dets),
                   candidates=len(cands), slices=len(slice_indices(tomo.shape[0], args.z_stride)))
        out["peak_rss_mb"] = _peak_rss_mb()  # the predict job's peak (before the model-only timing)
        del vol
        # model-only forward on pre-made tensors, same number of slices and batch size
        x, _ = det.to_tensor(warm)
        det.forward(x)
        n_batches = min(int(np.ceil(out["slices"] / args.batch)), 6)  # extrapolated to all slices
        t0 = time.perf_counter()
        for _ in range(n_batches):
            det.forward(x)
        out["forward_s"] = (time.perf_counter() - t0) * out["slices"] / (n_batches * args.batch)
    out.setdefault("peak_rss_mb", _peak_rss_mb())
    return out


STAGES = {
    "read": ("volumes.py", "read_volume"),
    "prepare": ("infer.py", "prepare_for_detection"),
    "input_wait": ("infer.py", "prefetch"),
    "forward": ("infer.py", "start"),
    "forward_wait": ("infer.py", "model_outputs"),
    "nms_wait": ("infer.py", "nms_result"),
    "merge": ("postprocess.py", "merge_detections"),
    "normalise": ("infer.py", "normalised"),
    "refine": ("refine.py", "refine_volume"),
    "rescore": ("rescore.py", "rescore_volume"),
    "rescorer_network": ("rescore.py", "predict_proba"),
    "templates": ("templates.py", "margins"),
    "thresholds": ("predict.py", "finish"),
}
"""Stages of the end-to-end breakdown: the czii_kit function (file, name) whose cumulative time (cProfile)
each is. ``input_wait``: the detector waiting for its next batch from the prefetch thread (whose own
work, the 2.5D images, overlaps the forward passes); ``forward``: handing a batch to the model (OpenVINO
streams: queuing its images, which waits while the streams run earlier ones; other backends: the whole
forward pass); ``forward_wait``: waiting for the last images of the previous batch, while the next are
queued; ``nms_wait``: waiting for the NMS thread's boxes of a batch (NMS itself runs beside the next
batch's forward pass, outside the profile); ``rescore`` includes ``rescorer_network`` and ``templates``."""


def stage_seconds(profile: cProfile.Profile) -> dict[str, float]:
    """Cumulative seconds of each of :data:`STAGES` in ``profile`` (0 for a stage that did not run)."""
    stats = pstats.Stats(profile).stats
    out = dict.fromkeys(STAGES, 0.0)
    for (filename, _, name), (_, _, _, cumulative, _) in stats.items():
        for stage, (file, func) in STAGES.items():
            if name == func and filename.replace(os.sep, "/").endswith(f"czii_kit/{file}"):
                out[stage] += cumulative
    return out


def forward_limit(weights: str | Path, backend: str, imgsz: int, n: int = FULL_SHAPE[0],
                  device: str | None = None) -> float:
    """Seconds of ``n`` plain forward passes of ``weights`` at batch 1 on ``backend`` (ultralytics' own
    setup of the exported model: OpenVINO in latency mode, no streams; a pre-made input tensor): the
    limit the whole pipeline is measured against."""
    det = Detector(weights, backend, InferenceConfig(batch=1, device=device), imgsz, streams=False)
    img = np.random.default_rng(0).integers(0, 256, (1, imgsz, imgsz, 3), dtype=np.uint8)
    x, _ = det.to_tensor(img)
    det.forward(x)
    det.forward(x)
    t0 = time.perf_counter()
    for _ in range(n):
        det.forward(x)
    return time.perf_counter() - t0


def _pipeline_worker(args) -> dict:
    """The whole predict (all the bundle's stages) on one full-size tomogram, against the forward-pass limit.

    After a warm-up tomogram: end to end (peak RSS taken right after it, before anything else is loaded),
    detection alone, the limit, then all three again, ``args.rounds`` rounds in all; each figure is the best
    of its rounds, so a burst of load from elsewhere on a shared machine spoils neither side of a ratio alone.
    The limit runs in a fresh process of its own (``--mode limit``) while this one waits: a second,
    latency-mode compilation of the model in this process slowed the next detection here by 0.6-0.7 s
    (side by side, after ``gc`` and a pause too), which no ``predict`` ever does. After that wait each
    round first predicts the tomogram once untimed: on a VM that takes back memory a process has left
    free for a few seconds, the next tomogram would otherwise pay for touching it again (0.5-0.7 s here,
    docs/performance.md), which a ``predict`` over many tomograms does not, tomogram after tomogram.
    """
    backend = args.backend
    t0 = time.perf_counter()
    plan = make_plan(args.weights or None)
    out: dict = {"backend": backend, "plan_s": time.perf_counter() - t0, "stages_run": plan.stages}
    runs = {r.name: r for r in select_runs(args.root, None)}
    full = [runs[BENCH_RUN]]
    t0 = time.perf_counter()
    finish(plan, list(predict_runs(plan, [runs[WARMUP_RUN]], "denoised", backend, False)))
    out["warmup_s"] = time.perf_counter() - t0
    inf = plan.settings.inference
    shape = open_tomogram(full[0].tomogram_path("denoised")).shape
    imgsz = inf.imgsz or native_imgsz(shape[1:])

    def e2e() -> float:
        t0 = time.perf_counter()
        out["picks"] = len(finish(plan, list(predict_runs(plan, full, "denoised", backend, False))))
        return time.perf_counter() - t0

    def detect() -> float:
        t0 = time.perf_counter()
        n = 0
        for done in iter_detect_runs(plan.model.weights, full, "denoised", backend, inf, plan.model.preprocess,
                                     plan.model.voxel_size, False):
            n += len(merge_detections(done.detections, {done.run.name: done.voxel_size}, plan.settings.merge,
                                      plan.settings.merge_per_type))
            del done
        out["detect_candidates"] = n
        return time.perf_counter() - t0

    def limit() -> float:  # in a fresh process, while this one waits (see the docstring)
        r = _run_worker(None, plan.model.weights, backend, "limit", imgsz=imgsz, slices=shape[0], device=inf.device)
        return r["forward_limit_s"]

    times: dict[str, list[float]] = {"e2e": [], "forward_limit": [], "detect": []}
    for r in range(max(1, args.rounds)):
        if r:
            e2e()  # untimed, after the limit's process: see the docstring
        times["e2e"].append(e2e())
        if not r:
            out["peak_rss_mb"] = _peak_rss_mb()
        times["detect"].append(detect())
        times["forward_limit"].append(limit())
    best = {k: min(v) for k, v in times.items()}
    out.update(forward_limit_s=best["forward_limit"], detect_s=best["detect"], e2e_s=best["e2e"],
               runs_s=times, slices=shape[0], imgsz=imgsz, detect_ratio=best["detect"] / best["forward_limit"],
               e2e_ratio=best["e2e"] / best["forward_limit"])
    if args.profile:
        e2e()  # untimed, after the limit's process (as in the rounds)
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        finish(plan, list(predict_runs(plan, full, "denoised", backend, False)))
        prof.disable()
        out["profiled_e2e_s"] = time.perf_counter() - t0
        out["stages_s"] = stage_seconds(prof)
    return out


def _startup_worker(args) -> dict:
    """What a fresh process pays before its first tomogram: the bundle (settings, rescorer, template file),
    the detector from its cached export, the rotated templates from their cache."""
    t0 = time.perf_counter()
    plan = make_plan(args.weights or None)
    t1 = time.perf_counter()
    inf = plan.settings.inference
    loaded_detector(plan.model.weights, args.backend, inf, args.imgsz or 640)
    t2 = time.perf_counter()
    if plan.templates is not None:
        vs = plan.model.voxel_size or VOXEL_SIZE
        plan.templates.match(np.full((16, 64, 64), 0.5, np.float32), [[320.0, 320.0, 80.0]], vs)
    t3 = time.perf_counter()
    return {"plan_s": t1 - t0, "detector_s": t2 - t1, "templates_s": t3 - t2}


def _rss_mb() -> float:
    """Resident memory of this process now (Linux; else the peak)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024.0
    except (OSError, StopIteration):
        return _peak_rss_mb()


def _run_worker(tomogram: Path | None, weights: Path | None, backend: str, mode: str, batch: int = 8,
                z_stride: int = 1, imgsz: int | None = None, root: Path | None = None, profile: bool = False,
                rounds: int = 0, slices: int = 0, device: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "czii_kit.bench", "--worker", "--backend", backend, "--mode", mode, "--batch",
           str(batch), "--z-stride", str(z_stride)]
    for flag, value in (("--tomogram", tomogram), ("--weights", weights), ("--imgsz", imgsz), ("--root", root),
                        ("--rounds", rounds), ("--slices", slices), ("--device", device)):
        if value:
            cmd += [flag, str(value)]
    if profile:
        cmd.append("--profile")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker failed ({backend}/{mode}):\n{proc.stderr[-3000:]}")
    last = [line for line in proc.stdout.splitlines() if line.startswith("{")][-1]
    return {**json.loads(last), "process_s": wall}


def run_pipeline(root: Path, weights: Path | None, backend: str, naive_s: float | None, progress=print,
                 profile: bool = True, rounds: int = 0) -> dict:
    """The end-to-end figures (:func:`_pipeline_worker`) plus startup, each in a fresh process; with the
    naive loop's seconds ``naive_s``, the speed-up over it."""
    r = _run_worker(None, weights, backend, "pipeline", root=root, profile=profile, rounds=rounds)
    progress(f"pipeline ({backend}, all stages: {r['stages_run'] or 'detection only'}): forward-pass limit "
             f"{r['forward_limit_s']:.2f} s ({r['slices']} passes, batch 1), detection {r['detect_s']:.2f} s "
             f"({r['detect_ratio']:.2f}x), end to end {r['e2e_s']:.2f} s ({r['e2e_ratio']:.2f}x), peak RSS "
             f"{r['peak_rss_mb']:.0f} MB")
    if naive_s:
        r["naive_s"] = naive_s
        r["speedup_vs_naive"] = naive_s / r["e2e_s"]
    s = _run_worker(None, weights, backend, "startup", root=root)
    r["startup"] = {"total_s": s["process_s"], "imports_s": s["process_s"] - s["plan_s"] - s["detector_s"]
                    - s["templates_s"], "bundle_s": s["plan_s"], "detector_s": s["detector_s"],
                    "templates_s": s["templates_s"]}
    progress(f"startup (fresh process: imports, bundle, cached export, rotated templates): {s['process_s']:.2f} s")
    return r


def machine() -> dict:
    """The CPU this runs on: model name, logical CPUs, and the GPU torch sees (``None``: none)."""
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": model, "cpu_count": os.cpu_count(), "gpu": gpu}


def run_bench(weights: str | Path | None = None, backends=("openvino", "onnx", "torch"), batch: int = 8,
              z_strides=(1, 2), imgsz: int | None = 640, naive: bool = True, workdir: str | Path | None = None,
              progress=print, rescore: bool = True, pipeline: bool = True, noisy: bool = False,
              profile: bool = True, rounds: int = 0) -> dict:
    """Run the benchmark; return ``{"setup", "pipeline", "results", "naive", "rescore"}``.

    ``weights``: the model (default: the shipped one, :func:`czii_kit.bundle.default_weights`; timing does
    not depend on the weights, but the pipeline runs the 3D stages its bundle has). ``pipeline``: the
    whole predict against the forward-pass limit (:func:`run_pipeline`, on the first of ``backends``
    unless OpenVINO is among them). ``noisy``: a white-noise tomogram (low-passed by ``smooth="auto"``)
    instead of a denoised-looking one. ``profile``: the stage breakdown (one more, profiled, pass).
    ``rounds``: rounds of end to end, limit and detection in the pipeline measurement (0: :data:`ROUNDS`).
    """
    tmp = tempfile.TemporaryDirectory(prefix="czii_bench_") if workdir is None else None
    work = Path(workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        root = work / "dataset"
        tomo = bench_dataset(root, 0.0 if noisy else SMOOTH_SIGMA)
        progress(f"synthetic tomogram {FULL_SHAPE} ({'white noise' if noisy else 'denoised-looking'}) written in "
                 f"{time.perf_counter() - t0:.1f} s")
        weights = Path(weights or default_weights())
        results = []
        for zs in z_strides:
            for be in backends:
                r = _run_worker(tomo, weights, be, "predict", batch, zs, imgsz)
                progress(f"{be:<9} z-stride {zs}: detect {r['predict_s']:.2f} s/tomogram, model-only "
                         f"{r['forward_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
                results.append(r)
        naive_r = None
        if naive:
            naive_r = _run_worker(tomo, weights, "torch", "naive", 1, 1, imgsz)
            progress(f"naive per-slice model.predict loop (torch): {naive_r['naive_s']:.2f} s/tomogram, "
                     f"peak RSS {naive_r['peak_rss_mb']:.0f} MB")
        pipe = None
        if pipeline:
            be = "openvino" if "openvino" in backends else backends[0]
            pipe = run_pipeline(root, weights, be, naive_r and naive_r["naive_s"], progress, profile, rounds)
        rescore_r = None
        if rescore:
            shipped = ModelBundle.load(weights).weights.parent / RESCORER_FILE
            if shipped.is_file():
                rescorer = shipped
            else:
                import torch

                torch.manual_seed(0)
                rescorer = save_rescorer(build_network(), work / "bench_rescorer.pt", overwrite=True)
            rescore_r = _run_worker(tomo, rescorer, "torch", "rescore", 1, 1, imgsz)
            progress(f"3D rescorer, {rescore_r['candidates']} candidates: {rescore_r['rescore_s']:.2f} s/tomogram, "
                     f"peak RSS {rescore_r['peak_rss_mb']:.0f} MB; centre refinement of them as apo-ferritin: "
                     f"{rescore_r['refine_s']:.2f} s" + (f"; template matching: {rescore_r['templates_s']:.2f} s"
                                                         if "templates_s" in rescore_r else "")
                     + f"; low-pass check {rescore_r['smooth_check_s']:.2f} s, filter {rescore_r['smooth_s']:.2f} s")
        setup = {"shape": list(FULL_SHAPE), "weights": str(weights), "batch": batch, "imgsz": imgsz,
                 "tomogram": "white noise" if noisy else "denoised-looking", **machine()}
        return {"setup": setup, "pipeline": pipe, "results": results, "naive": naive_r, "rescore": rescore_r}
    finally:
        if tmp is not None:
            tmp.cleanup()


def main(argv=None) -> int:  # the worker entry point (the user-facing command is `czii-kit bench`)
    p = argparse.ArgumentParser(prog="python -m czii_kit.bench")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--tomogram")
    p.add_argument("--weights")
    p.add_argument("--root", help="the bench dataset (pipeline and startup modes)")
    p.add_argument("--profile", action="store_true", help="pipeline mode: also a profiled pass (stage breakdown)")
    p.add_argument("--rounds", type=int, default=ROUNDS, help="pipeline mode: rounds of end to end, limit, detection")
    p.add_argument("--backend", default="openvino")
    p.add_argument("--mode", default="predict", choices=["predict", "naive", "rescore", "pipeline", "startup", "limit"])
    p.add_argument("--slices", type=int, default=FULL_SHAPE[0], help="limit mode: forward passes")
    p.add_argument("--device", help="limit mode: the inference device (InferenceConfig.device)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--z-stride", type=int, default=1)
    p.add_argument("--imgsz", type=int)
    args = p.parse_args(argv)
    print(json.dumps(_worker(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def bench_scaleout(workdir: str | Path | None = None, n_runs: int = 4, shape=(92, 316, 316), workers=(1, 2),
                   backend: str = "openvino", repeats: int = 2, progress=print) -> dict:
    """``predict --workers N`` for each ``N`` of ``workers`` over ``n_runs`` synthetic runs of ``shape``
    (the shipped model, every stage; best of ``repeats``), timed on warm workers (the cluster start and
    each worker's model loading timed apart), and the projected hours for 500 full-size tomograms
    (:func:`czii_kit.scaleout.bench_workers`)."""
    tmp = tempfile.TemporaryDirectory(prefix="czii_bench_scaleout_") if workdir is None else None
    root = Path(workdir or tmp.name) / "scaleout"
    names = [f"TS_bench_{i}" for i in range(max(n_runs, *workers))]
    try:
        for i, name in enumerate(names):
            synthetic_tomogram(root / "test" / "static" / "ExperimentRuns" / name / "VoxelSpacing10.000"
                               / "denoised.zarr", shape, n_per_type=5, seed=i)

        def job(n: int) -> tuple[float, float]:
            t0 = time.perf_counter()
            with cluster(n) as client:
                predict(root, runs=names[:n], client=client, backend=backend, progress=False)  # one per worker
                t1 = time.perf_counter()
                predict(root, runs=names[:n_runs], client=client, backend=backend, progress=False)
                return time.perf_counter() - t1, t1 - t0

        predict(root, runs=names[:1], backend=backend, progress=False)  # the export made once, not timed
        out = bench_workers(job, n_runs, int(np.prod(shape)), workers, repeats=repeats)
        times = ", ".join(f"{n}: {v['seconds']:.1f} s (start {v['start_s']:.1f} s)" for n, v in out["workers"].items())
        progress(f"predict --workers {times} for {n_runs} runs of {shape}; most/fewest workers {out['ratio']:.2f}; "
                 f"about {out['hours_for_500']:.1f} h for 500 full-size tomograms on this machine")
        return {**out, "shape": list(shape), "backend": backend}
    finally:
        if tmp is not None:
            tmp.cleanup()
