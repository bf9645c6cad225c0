"""``czii-kit bench``: seconds per full-size tomogram per backend, model-only time, naive loop, peak RSS."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="time inference on a synthetic full-size tomogram (184x630x630) for each backend",
        description=(
            "Write a synthetic full-size tomogram, then, each in a fresh process: time czii_kit's batched "
            "streaming predict (read + normalise + stack + detect + 3D merge) per backend and z-stride, the "
            "model-only forward time, and the naive per-slice `model.predict` loop; report peak RSS. Exports "
            "are made once and cached beside the weights (not timed)."
        ),
    )
    p.add_argument("--weights", help="a trained .pt (default: an untrained YOLO11n; timing does not depend on it)")
    p.add_argument("--backends", nargs="+", default=["openvino", "onnx", "torch"],
                   choices=["openvino", "onnx", "torch"])
    p.add_argument("--batch", type=int, default=8, help="slices per forward pass (default 8)")
    p.add_argument("--z-strides", type=int, nargs="+", default=[1, 2], help="z-strides to time (default 1 2)")
    p.add_argument("--imgsz", type=int, default=640, help="network input size (default 640)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive per-slice loop")
    p.add_argument("--no-rescore", action="store_true", help="skip timing the second-stage 3D rescorer")
    p.add_argument("--no-scaleout", action="store_true",
                   help="skip timing `predict --workers 1` against `--workers 2` (a few small synthetic runs)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    return p


def run(args) -> int:
    from czii_kit.bench import run_bench

    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    out = run_bench(args.weights, tuple(args.backends), args.batch, tuple(args.z_strides), args.imgsz,
                    naive=not args.no_naive, progress=log, rescore=not args.no_rescore)
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
    print(f"{'backend':<10}{'z-stride':>9}{'predict s':>11}{'model-only s':>14}{'peak RSS MB':>13}{'vs naive':>10}")
    for r in out["results"]:
        sp = f"{r['speedup_vs_naive']:.1f}x" if naive else "-"
        print(f"{r['backend']:<10}{r['z_stride']:>9}{r['predict_s']:>11.2f}{r['forward_s']:>14.2f}"
              f"{r['peak_rss_mb']:>13.0f}{sp:>10}")
    if naive:
        print(f"{'naive':<10}{1:>9}{naive['naive_s']:>11.2f}{'':>14}{naive['peak_rss_mb']:>13.0f}{'1.0x':>10}")
    if out["rescore"]:
        r = out["rescore"]
        print(f"3D rescorer: {r['rescore_s']:.2f} s for {r['candidates']} candidates (read, normalise, patches, "
              f"forward), peak RSS {r['peak_rss_mb']:.0f} MB")
        print(f"centre refinement: {r['refine_s']:.2f} s for the same candidates as apo-ferritin (local shell "
              "correlation, volume already read)")
        print(f"low-pass of noisy tomograms: {r['smooth_check_s']:.2f} s to check every tomogram, "
              f"{r['smooth_s']:.2f} s per filtering of a noisy one (twice per tomogram)")
        if "templates_s" in r:
            print(f"template matching: {r['templates_s']:.2f} s for the same candidates (binned volume, "
                  f"2 templates x 1,500 orientations; {r['templates_setup_s']:.2f} s once to rotate the templates)")
    print(f"(tomogram {out['setup']['shape']}, imgsz {out['setup']['imgsz']}, batch {out['setup']['batch']}, "
          f"{out['setup']['cpu_count']} CPUs)")
    return 0
