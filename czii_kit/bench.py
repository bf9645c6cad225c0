"""Benchmark inference on a full-size tomogram (184 x 630 x 630): seconds per tomogram per backend.

Each measurement runs in a fresh Python process (``python -m czii_kit.bench --worker ...``) so that
its peak RSS (``ru_maxrss``) is that of one predict job alone, with nothing else loaded. Timings
exclude the one-off export/compilation (the model is warmed up on one batch first) and include
reading the zarr, normalisation, 2.5D stacking, the forward passes, 2D NMS, and 3D merging.

Figures
-------
predict_s
    End-to-end seconds for one tomogram (czii_kit's batched streaming path).
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
    the shipped template file (``templates_setup_s``: rotating the templates once per process); absent
    when no template file is shipped.
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
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from czii_kit.bundle import MODELS_DIR
from czii_kit.catalog import PARTICLES, class_names
from czii_kit.coords import voxel_to_angstrom
from czii_kit.infer import Detector, InferenceConfig, detect_volume, ensure_export, native_imgsz
from czii_kit.offline import configure_offline
from czii_kit.postprocess import merge_detections
from czii_kit.predict import predict
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


def synthetic_tomogram(path: str | Path, shape=FULL_SHAPE, n_per_type: int = 25, seed: int = 0) -> Path:
    """Write a tomogram of dark spheres (catalog radii) in noise, float32, like the Kaggle files."""

    rng = np.random.default_rng(seed)
    vol = rng.normal(0.0, 1.0, size=shape).astype(np.float32)
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


def bench_weights(dest: str | Path) -> Path:
    """An untrained YOLO11n with the catalog's 6 classes, saved as ``dest`` (timing is weight-independent)."""

    configure_offline()
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel


    torch.manual_seed(0)
    yolo = YOLO("yolo11n.yaml")
    yolo.model = DetectionModel("yolo11n.yaml", nc=len(class_names()), verbose=False)
    yolo.model.names = class_names()
    yolo.model.args = {"imgsz": 640}
    yolo.save(str(dest))
    return Path(dest)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker(args) -> dict:
    """One measurement in this (fresh) process; returns the figures as a dict."""

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


def _run_worker(tomogram: Path, weights: Path, backend: str, mode: str, batch: int, z_stride: int,
                imgsz: int | None) -> dict:
    cmd = [sys.executable, "-m", "czii_kit.bench", "--worker", "--tomogram", str(tomogram), "--weights",
           str(weights), "--backend", backend, "--mode", mode, "--batch", str(batch), "--z-stride", str(z_stride)]
    if imgsz:
        cmd += ["--imgsz", str(imgsz)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker failed ({backend}/{mode}):\n{proc.stderr[-3000:]}")
    last = [line for line in proc.stdout.splitlines() if line.startswith("{")][-1]
    return json.loads(last)


def run_bench(weights: str | Path | None = None, backends=("openvino", "onnx", "torch"), batch: int = 8,
              z_strides=(1, 2), imgsz: int | None = 640, naive: bool = True, workdir: str | Path | None = None,
              progress=print, rescore: bool = True) -> dict:
    """Run the benchmark; return ``{"results": [...], "naive": {...}, "rescore": {...}, "setup": {...}}``."""

    tmp = tempfile.TemporaryDirectory(prefix="czii_bench_") if workdir is None else None
    work = Path(workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        tomo = synthetic_tomogram(work / "bench_tomogram.zarr")
        progress(f"synthetic tomogram {FULL_SHAPE} written in {time.perf_counter() - t0:.1f} s")
        if weights is None:
            weights = bench_weights(work / "bench_yolo11n.pt")
            progress(f"weights: untrained yolo11n (6 classes) at {weights}")
        weights = Path(weights)
        for be in backends:
            if be != "torch":
                t0 = time.perf_counter()
                ensure_export(weights, be, imgsz or 640, batch)
                progress(f"{be}: export ready in {time.perf_counter() - t0:.1f} s (cached beside the weights)")
        results = []
        for zs in z_strides:
            for be in backends:
                r = _run_worker(tomo, weights, be, "predict", batch, zs, imgsz)
                progress(f"{be:<9} z-stride {zs}: predict {r['predict_s']:.2f} s/tomogram, model-only "
                         f"{r['forward_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
                results.append(r)
        naive_r = None
        if naive:
            naive_r = _run_worker(tomo, weights, "torch", "naive", 1, 1, imgsz)
            progress(f"naive per-slice model.predict loop (torch): {naive_r['naive_s']:.2f} s/tomogram, "
                     f"peak RSS {naive_r['peak_rss_mb']:.0f} MB")
        rescore_r = None
        if rescore:

            shipped = Path(__file__).parent / "models" / RESCORER_FILE
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
        import platform

        setup = {"shape": list(FULL_SHAPE), "weights": str(weights), "batch": batch, "imgsz": imgsz,
                 "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine()}
        return {"setup": setup, "results": results, "naive": naive_r, "rescore": rescore_r}
    finally:
        if tmp is not None:
            tmp.cleanup()


def main(argv=None) -> int:  # the worker entry point (the user-facing command is `czii-kit bench`)
    p = argparse.ArgumentParser(prog="python -m czii_kit.bench")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--tomogram", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--backend", default="openvino")
    p.add_argument("--mode", default="predict", choices=["predict", "naive", "rescore"])
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
