"""``czii-kit bench``: the whole predict against the model's forward passes, each backend, the naive loop,
the 3D stages, startup and peak RSS, on a synthetic full-size tomogram."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="time predict on a synthetic full-size tomogram (184x630x630): pipeline, backends, naive loop",
        description=(
            "Write a synthetic full-size tomogram, then, each in a fresh process: the whole predict with all the "
            "model bundle's stages against the forward-pass limit (184 plain forward passes of the same model, "
            "batch 1, same backend, timed in rounds interleaved with it), with detection alone, the ratios, peak RSS, a "
            "profiled stage breakdown and startup; czii_kit's detection per backend and z-stride with the "
            "model-only time; the naive per-slice `model.predict` loop; the 3D stages on 1,000 candidates. "
            "Exports are made once and cached (not timed)."
        ),
    )
    p.add_argument("--weights", help="the model's .pt (default: the shipped model; timing does not depend on the "
                                     "weights, the stages run are its bundle's)")
    p.add_argument("--backends", nargs="+", default=["openvino", "onnx", "torch"],
                   choices=["openvino", "onnx", "torch"])
    p.add_argument("--batch", type=int, default=8, help="slices per forward pass of the per-backend runs (default 8)")
    p.add_argument("--z-strides", type=int, nargs="*", default=[1, 2],
                   help="z-strides of the per-backend runs (default 1 2; none: skip them)")
    p.add_argument("--imgsz", type=int, default=640, help="network input size (default 640)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive per-slice loop")
    p.add_argument("--no-rescore", action="store_true", help="skip timing the 3D stages on their own")
    p.add_argument("--no-pipeline", action="store_true", help="skip the whole-predict measurement")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled pass (stage breakdown)")
    p.add_argument("--noisy", action="store_true",
                   help="a white-noise tomogram (low-passed by smooth=auto) instead of a denoised-looking one")
    p.add_argument("--no-scaleout", action="store_true",
                   help="skip timing `predict --workers 1` against `--workers 2` (a few small synthetic runs)")
    p.add_argument("--rounds", type=int, default=0,
                   help="rounds of end to end, limit and detection in the whole-predict measurement, each figure the "
                        "best of its rounds (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    return p


def run(args) -> int:
    from czii_kit.bench import run_bench

    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    out = run_bench(args.weights, tuple(args.backends), args.batch, tuple(args.z_strides), args.imgsz,
                    naive=not args.no_naive, progress=log, rescore=not args.no_rescore,
                    pipeline=not args.no_pipeline, noisy=args.noisy, profile=not args.no_profile,
                    rounds=args.rounds)
    if not args.no_scaleout and importlib.util.find_spec("distributed"):
        from czii_kit.bench import bench_scaleout

        out["scaleout"] = bench_scaleout(progress=log)
    naive = out["naive"]
    if naive:
        for r in out["results"]:
            r["speedup_vs_naive"] = naive["naive_s"] / r["predict_s"]
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print()
    pipe = out["pipeline"]
    if pipe:
        print(f"whole predict ({pipe['backend']}; stages: {pipe['stages_run'] or 'detection only'}; {pipe['picks']} "
              "picks):")
        print(f"  forward-pass limit {pipe['forward_limit_s']:.2f} s ({pipe['slices']} passes, batch 1)")
        print(f"  detection          {pipe['detect_s']:.2f} s  {pipe['detect_ratio']:.2f}x the limit")
        print(f"  end to end         {pipe['e2e_s']:.2f} s  {pipe['e2e_ratio']:.2f}x the limit"
              + (f", {pipe['speedup_vs_naive']:.1f}x faster than the naive loop" if "speedup_vs_naive" in pipe else ""))
        print(f"  peak RSS           {pipe['peak_rss_mb']:.0f} MB")
        print(f"  startup            {pipe['startup']['total_s']:.2f} s (fresh process: imports, bundle, cached "
              "export, rotated templates)")
        if "stages_s" in pipe:
            print(f"  stages (profiled pass, {pipe['profiled_e2e_s']:.2f} s): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in pipe["stages_s"].items()))
        print()
    if out["results"]:
        print(f"{'backend':<10}{'z-stride':>9}{'detect s':>10}{'model-only s':>14}{'peak RSS MB':>13}{'vs naive':>10}")
    for r in out["results"]:
        sp = f"{r['speedup_vs_naive']:.1f}x" if naive else "-"
        print(f"{r['backend']:<10}{r['z_stride']:>9}{r['predict_s']:>10.2f}{r['forward_s']:>14.2f}"
              f"{r['peak_rss_mb']:>13.0f}{sp:>10}")
    if naive:
        print(f"{'naive':<10}{1:>9}{naive['naive_s']:>10.2f}{'':>14}{naive['peak_rss_mb']:>13.0f}{'1.0x':>10}")
    if out["rescore"]:
        r = out["rescore"]
        print(f"3D rescorer: {r['rescore_s']:.2f} s for {r['candidates']} candidates (read, normalise, patches, "
              f"forward), peak RSS {r['peak_rss_mb']:.0f} MB")
        print(f"centre refinement: {r['refine_s']:.2f} s for the same candidates as apo-ferritin (local shell "
              "correlation, volume already read)")
        print(f"low-pass of noisy tomograms: {r['smooth_check_s']:.2f} s to check every tomogram, "
              f"{r['smooth_s']:.2f} s per filtering of a noisy one (once per tomogram)")
        if "templates_s" in r:
            print(f"template matching: {r['templates_s']:.2f} s for the same candidates (binned volume, "
                  f"2 templates x 1,500 orientations; {r['templates_setup_s']:.2f} s to get the rotated templates)")
    s = out["setup"]
    print(f"(tomogram {s['shape']}, {s['tomogram']}, imgsz {s['imgsz']}, batch {s['batch']}, {s['cpu_count']} CPUs: "
          f"{s['cpu']}; GPU: {s['gpu'] or 'none'})")
    return 0
