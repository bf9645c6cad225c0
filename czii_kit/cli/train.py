"""``czii-kit train DATA_YAML --out DIR``: train a YOLO detector offline (resumable)."""

from __future__ import annotations

import argparse


def _override(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    import yaml

    return k, yaml.safe_load(v)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a YOLO detector on a dataset from build-dataset (offline, resumable)",
        description=(
            "Train an ultralytics YOLO detector without touching the network: the model is built from "
            "yolo11n.yaml (or your own .pt), hue/saturation augmentation is off (colour channels are z-slices), "
            "scale jitter small. Weights go to OUT/weights/{best,last}.pt with czii_kit_train.json beside them."
        ),
    )
    p.add_argument("data", metavar="DATA_YAML", help="data.yaml written by build-dataset")
    p.add_argument("--out", required=True, help="run folder (weights in OUT/weights)")
    p.add_argument("--model", default="yolo11n.yaml", help="model yaml or local .pt (default yolo11n.yaml)")
    p.add_argument("--epochs", type=int, help="epochs (default 50)")
    p.add_argument("--imgsz", type=int, help="image size (default: the dataset's crop side or slice size)")
    p.add_argument("--batch", type=int, help="batch size (default 16)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--device", help="ultralytics device, e.g. cpu or 0")
    p.add_argument("--resume", action="store_true", help="continue OUT/weights/last.pt")
    p.add_argument("--force", action="store_true", help="start afresh in an OUT that already has weights")
    p.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE",
                   help="any other ultralytics train argument, e.g. --set mosaic=0.5 (repeatable)")
    return p


def run(args) -> int:
    from czii_kit.train import TRAIN_RECORD, train

    overrides = dict(args.overrides)
    if args.device is not None:
        overrides["device"] = args.device
    best = train(args.data, args.out, model=args.model, epochs=args.epochs, imgsz=args.imgsz, batch=args.batch,
                 seed=args.seed, resume=args.resume, overwrite=args.force, **overrides)
    print(f"best weights: {best}")
    print(f"training record: {best.parent / TRAIN_RECORD}")
    return 0
