"""``czii-kit rescorer collect|train``: build the second-stage 3D rescorer's training patches and train it."""

from __future__ import annotations

import argparse

from czii_kit.cli.predict import smooth_arg


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "rescorer",
        help="collect training patches for the 3D rescorer, and train it",
        description=(
            "The rescorer is a small 3D CNN that looks at a 32^3 cube around each merged candidate and gives the "
            "probability of each particle type or of none; `tune` and `predict` use it when "
            "czii_kit_rescorer.pt lies beside the detector weights. `collect` cuts patches at the reference "
            "picks, at random background and at the detector's own candidates of training runs; `train` "
            "fits the network on one or more patch files (resumable after an interruption)."
        ),
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser("collect", help="cut training patches from runs with picks")
    c.add_argument("root", metavar="ROOT", nargs="+", help="dataset root(s) with tomograms and picks")
    c.add_argument("--out", required=True, help="patch file to write (.npz)")
    c.add_argument("--split", default="train")
    c.add_argument("--runs", nargs="+", help="only these runs")
    c.add_argument("--weights", help="detector whose candidates become hard examples (default: the shipped "
                                     "model; 'none' for references and background only)")
    c.add_argument("--backend", default="openvino", choices=["openvino", "onnx", "torch"])
    c.add_argument("--tomograms", nargs="+", default=["denoised"],
                   help="tomogram kinds to cut from (default denoised; candidates come from the first)")
    c.add_argument("--floor", type=float, default=0.5,
                   help="keep detector candidates scoring >= FLOOR x the tuned threshold (default 0.5)")
    c.add_argument("--background-ratio", type=float, default=1.0, help="random background patches per reference")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--smooth", type=smooth_arg, default="auto", metavar="auto|off|SIGMA",
                   help="low-pass of each tomogram before cutting patches, as at prediction (default auto: noisy "
                        "tomograms only; the shipped rescorer was collected with 0)")
    c.add_argument("--force", action="store_true", help="overwrite --out")
    c.add_argument("--quiet", action="store_true")
    t = sub.add_parser("train", help="train the rescorer on patch files")
    t.add_argument("patches", nargs="+", help="patch files from `collect`")
    t.add_argument("--out", required=True, help="rescorer file (put it beside the detector as czii_kit_rescorer.pt)")
    t.add_argument("--val-runs", nargs="+", default=[], help="runs held out and scored after every epoch")
    t.add_argument("--epochs", type=int, default=6)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--init", help="start from this rescorer's weights (fine-tuning; recorded with its SHA-256)")
    t.add_argument("--force", action="store_true", help="overwrite --out")
    t.add_argument("--quiet", action="store_true")
    return p


def run(args) -> int:
    return _collect(args) if args.action == "collect" else _train(args)


def _collect(args) -> int:
    from pathlib import Path

    import numpy as np

    from czii_kit.errors import DataError, FileExistsNoForce
    from czii_kit.layout import select_runs
    from czii_kit.picks import read_picks
    from czii_kit.rescore import CLASSES
    from czii_kit.rescore_train import collect_patches, detector_candidates, save_patches

    if Path(args.out).exists() and not args.force:
        raise FileExistsNoForce(f"{args.out}: already exists (use --force to replace it)")
    runs = select_runs(args.root, args.split, args.runs)
    solution = read_picks(args.root, split=args.split, runs=[r.name for r in runs])
    runs = [r for r in runs if r.name in set(solution["experiment"].astype(str))]
    if not runs:
        raise DataError(args.root, "no runs with picks to collect patches from")
    from czii_kit.coords import KAGGLE_VOXEL_SIZE

    cands, prep, voxel_size = None, None, KAGGLE_VOXEL_SIZE
    if (args.weights or "").lower() != "none":
        from czii_kit.bundle import ModelBundle

        model = ModelBundle.load(args.weights or None)
        prep, voxel_size = model.preprocess, model.voxel_size
        cands = detector_candidates(model, runs, args.tomograms[0], args.backend, args.floor,
                                    progress=not args.quiet)
    # patches at the detector's voxel size (tomograms more than 5 % off are resampled, as at inference)
    data = collect_patches(runs, solution, cands, args.tomograms, args.background_ratio, prep, args.seed,
                           progress=not args.quiet, smooth=args.smooth, voxel_size=voxel_size)
    path = save_patches(data, args.out, overwrite=args.force)
    counts = np.bincount(data["y"], minlength=len(CLASSES))
    print(f"{len(data['y'])} patches from {len(runs)} run(s): "
          + ", ".join(f"{n} {c}" for n, c in zip(CLASSES, counts, strict=True)))
    for src in ("reference", "background", "candidate"):
        print(f"  {src:<11}{int((data['source'] == src).sum()):>7}")
    print(f"wrote {path}")
    return 0


def _train(args) -> int:
    from czii_kit.rescore_train import train_rescorer

    meta = train_rescorer(args.patches, args.out, val_runs=args.val_runs, overwrite=args.force,
                          progress=not args.quiet, epochs=args.epochs, batch=args.batch, lr=args.lr,
                          seed=args.seed, threads=args.threads, init=args.init)
    for rec in meta["history"]:
        extra = f"  val accuracy {rec['val_accuracy']:.3f}" if "val_accuracy" in rec else ""
        print(f"epoch {rec['epoch']}: loss {rec['loss']:.3f}{extra}")
    print(f"{meta['n_train']} training patches; wrote {args.out}")
    return 0
