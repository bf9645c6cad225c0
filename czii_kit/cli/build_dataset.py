"""``czii-kit build-dataset ROOT [ROOT ...] --out DIR``: tomograms + picks -> ultralytics YOLO dataset."""

from __future__ import annotations

import argparse
import json


def _offsets(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "build-dataset",
        help="turn tomograms + picks into a YOLO detection dataset (2.5D slices, boxes, data.yaml)",
        description=(
            "Write per-slice 2.5D images (PNG, channels = slices z+offsets) and YOLO box labels for every "
            "run of a split: a particle of radius r at depth z0 gets on slice z a box of side "
            "2*sqrt(r^2-(z-z0)^2). Full slices by default, or random crops (--crop). Train/val split by run. "
            "Writes data.yaml (absolute path, catalog class names) and czii_kit_dataset.json."
        ),
    )
    p.add_argument("root", metavar="ROOT", nargs="+",
                   help="dataset root(s) with tomograms and picks (the runs of several roots are pooled)")
    p.add_argument("--out", required=True, help="new dataset folder")
    p.add_argument("--split", default="train", help="split to read (default: train)")
    p.add_argument("--tomogram", nargs="+", default=["denoised"],
                   help="tomogram name(s) (default: denoised); with several, each image is cut from one drawn "
                        "at random (--tomogram-weights)")
    p.add_argument("--tomogram-weights", type=_floats, help="relative frequency of each tomogram, e.g. 4,1")
    p.add_argument("--runs", nargs="+", help="only these runs")
    p.add_argument("--val-runs", nargs="+", help="validation runs (default: a seeded 20%% of the runs)")
    p.add_argument("--crop", type=int, help="random square crops of this side (pixels) instead of full slices")
    p.add_argument("--crops-per-slice", type=int, default=1, help="random crops per slice (default 1)")
    p.add_argument("--full-slices", action="store_true", help="also write full slices when cropping")
    p.add_argument("--z-stride", type=int, default=1, help="use every S-th slice (default 1)")
    p.add_argument("--offsets", type=_offsets, default=(-2, 0, 2), help="channel z offsets (default -2,0,2)")
    p.add_argument("--slab", type=int, default=1, help="slices averaged per channel (odd, default 1)")
    p.add_argument("--min-frac", type=float, default=0.3,
                   help="skip a particle on slices where its box half-side < FRAC * radius (default 0.3)")
    p.add_argument("--degrade", type=float, default=0.0, metavar="P",
                   help="blur and add correlated noise to a fraction P of the images (imaging augmentation; "
                        "default 0)")
    p.add_argument("--window", type=float, default=0.0, metavar="P",
                   help="narrow or widen the intensity window of a fraction P of the images (clipping the "
                        "densest or lightest 0-20%% of the range, or a margin of up to 10%%; augmentation "
                        "for other intensity histograms; default 0)")
    p.add_argument("--voxel-size", type=float, metavar="A",
                   help="Å per voxel of the images: tomograms of another voxel size (by more than 5%%) are "
                        "resampled to it (default: the voxel size of most runs)")
    p.add_argument("--seed", type=int, default=0, help="random seed (crops, val split)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    import sys

    from czii_kit.preprocess import PreprocessConfig
    from czii_kit.yolo_dataset import MANIFEST, build_dataset

    w = args.tomogram_weights
    if w is not None and (len(w) != len(args.tomogram) or min(w) < 0 or not sum(w) > 0):
        print(f"czii-kit build-dataset: error: --tomogram-weights needs {len(args.tomogram)} non-negative "
              f"number(s), not all 0, one per --tomogram; got {','.join(map(str, w))}", file=sys.stderr)
        return 2
    for flag, value in (("--degrade", args.degrade), ("--window", args.window)):
        if not 0 <= value <= 1:
            print(f"czii-kit build-dataset: error: {flag} must be in [0, 1], got {value}", file=sys.stderr)
            return 2
    if args.voxel_size is not None and not args.voxel_size > 0:
        print(f"czii-kit build-dataset: error: --voxel-size must be > 0 Å, got {args.voxel_size}", file=sys.stderr)
        return 2
    cfg = PreprocessConfig(offsets=args.offsets, slab=args.slab)
    tomogram = args.tomogram[0] if len(args.tomogram) == 1 else args.tomogram
    data_yaml = build_dataset(
        args.root, args.out, split=args.split, tomogram=tomogram, runs=args.runs, val_runs=args.val_runs,
        crop=args.crop, crops_per_slice=args.crops_per_slice,
        full_slices=True if args.full_slices else None, z_stride=args.z_stride, min_frac=args.min_frac,
        preprocess=cfg, tomogram_weights=args.tomogram_weights,
        degrade_config={"prob": args.degrade}, window_config={"prob": args.window}, voxel_size=args.voxel_size, seed=args.seed, overwrite=args.force, progress=not args.quiet,
    )
    m = json.loads((data_yaml.parent / MANIFEST).read_text())
    c = m["counts"]
    print(f"wrote {data_yaml}")
    print(f"train runs: {', '.join(m['train_runs'])}  ({c['train']['images']} images, {c['train']['boxes']} boxes)")
    val = ", ".join(m["val_runs"]) or "(none: validation uses the training images)"
    print(f"val runs:   {val}  ({c['val']['images']} images, {c['val']['boxes']} boxes)")
    if len(m["images_per_tomogram"]) > 1 or m["degraded_images"] or m["rewindowed_images"]:
        print("images per tomogram: " + ", ".join(f"{k} {v}" for k, v in m["images_per_tomogram"].items())
              + f"; degraded: {m['degraded_images']}; re-windowed: {m['rewindowed_images']}")
    if m.get("resampled_from"):
        print(f"resampled to {m['grid_voxel_size']:g} Å voxels: "
              + ", ".join(f"{k} ({v['voxel_size']:g} Å)" for k, v in m["resampled_from"].items()))
    print("boxes per class: " + ", ".join(f"{k} {v}" for k, v in m["boxes_per_class"].items()))
    return 0
