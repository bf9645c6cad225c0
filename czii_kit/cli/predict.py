"""``czii-kit predict ROOT --out submission.csv``: detect, merge, threshold, write the submission."""

from __future__ import annotations

import argparse
from contextlib import nullcontext

from czii_kit.atomic import check_out_path

SMOOTH_HELP = ("Gaussian low-pass of each tomogram (sigma in voxels) before detection and rescoring: 'auto' "
               "(default) only for noisy ones such as raw WBP reconstructions, just enough to look like the "
               "denoised tomograms the model was trained on, and sharpening (unsharp mask) of over-smoothed "
               "ones, e.g. from a stronger denoiser; 0 or 'off' never either")


def smooth_arg(text: str):
    """argparse type of ``--smooth``: ``auto``, ``off`` or a sigma >= 0."""
    from czii_kit.preprocess import parse_smooth

    try:
        return parse_smooth(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def workers_arg(text: str):
    """argparse type of ``--workers``: a count >= 1, or ``auto`` (``None``: one per CUDA GPU, else one)."""
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of workers >= 1 or 'auto', got {text!r}")
    return n


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict",
        help="pick particles in every run of a split and write a submission CSV",
        description=(
            "Run the detector over every run (streamed slices, batched), merge the 2D boxes into 3D particles, "
            "apply the thresholds tuned beside the weights, and write id,experiment,particle_type,x,y,z (Å) "
            "atomically. Refuses to overwrite an existing file unless --force."
        ),
    )
    p.add_argument("root", metavar="ROOT", help="dataset root (or split / run folder)")
    p.add_argument("--split", default="test", help="split to predict (default test; 'all' for every run)")
    p.add_argument("--runs", nargs="+", help="only these runs")
    p.add_argument("--out", required=True, help="submission CSV to write")
    p.add_argument("--weights", help="trained .pt (default: the model shipped in czii_kit/models/)")
    p.add_argument("--thresholds", metavar="FILE",
                   help="tuned settings and thresholds to use instead of czii_kit_thresholds.json beside the "
                        "weights (a file from `czii-kit tune ... --out FILE`, e.g. tuned on your own validation runs)")
    p.add_argument("--backend", default="openvino", choices=["openvino", "onnx", "torch"])
    p.add_argument("--export-dir", metavar="DIR",
                   help="cache of ONNX/OpenVINO exports (default $CZII_KIT_EXPORTS, else exports/ in czii_kit's "
                        "cache folder ~/.cache/czii_kit); exports are keyed by the weights' SHA-256")
    p.add_argument("--tomogram", default="auto",
                   help="tomogram to pick in (denoised, wbp, ...); 'auto' (default): the denoised one, else the "
                        "best other reconstruction a run has (isonetcorrected, ctfdeconvolved, wbp), with a warning")
    p.add_argument("--z-stride", type=int, help="slice stride (default: as tuned, else 1)")
    p.add_argument("--batch", type=int, help="slices per forward pass (default: as tuned)")
    p.add_argument("--tta", action="store_true", default=None, help="flip test-time augmentation")
    p.add_argument("--polarity", choices=["auto", "dark", "bright"],
                   help="contrast of the tomograms: dark particles (cryo-ET), bright (inverted first), or auto "
                        "(inverted when the intensity skew shows bright dense matter; default)")
    p.add_argument("--smooth", type=smooth_arg, metavar="auto|off|SIGMA", help=SMOOTH_HELP)
    p.add_argument("--flatten", choices=["auto", "on", "off"],
                   help="subtract the slow lateral variation of the background (uneven ice or illumination) first: "
                        "'auto' (default) only when it is strong, with a warning")
    p.add_argument("--tilt-axis", choices=["auto", "y", "x"],
                   help="direction of the tilt axis in the tomograms: 'auto' (default) reads it from the missing "
                        "wedge; along x, slices reach the detector (trained with it along y) with x and y exchanged")
    p.add_argument("--no-rescore", action="store_true",
                   help="skip the second-stage 3D rescorer (detector-only thresholds; faster)")
    p.add_argument("--no-refine", action="store_true",
                   help="skip the centre refinement of apo-ferritin tuned beside the weights")
    p.add_argument("--no-templates", action="store_true",
                   help="rescore without the template matching of beta-galactosidase / thyroglobulin")
    p.add_argument("--template-wedge", choices=("auto", "none"),
                   help="give the matched templates each tomogram's missing wedge ('auto'), or none; default "
                        "as tuned beside the weights (the shipped model: auto)")
    p.add_argument("--picks-out", metavar="OVERLAY",
                   help="also write the picks as copick JSON under this overlay root "
                        "(OVERLAY/ExperimentRuns/{run}/Picks/, one file per run and type)")
    p.add_argument("--naming", default="copick", choices=["copick", "kaggle"],
                   help="--picks-out file names: copick's {user}_{session}_{particle}.json (default) or {particle}.json")
    p.add_argument("--user-id", default="czii-kit", help="user id of the --picks-out picks [czii-kit]")
    p.add_argument("--session-id", default="0", help="session id of the --picks-out picks (no '_') [0]")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=workers_arg, metavar="N|auto", nargs="?", const="auto", default=False,
                       help="predict on a local Dask cluster of N worker processes, one run per task, each worker "
                            "with cores/N threads; 'auto' (or no value): one worker per CUDA GPU, each pinned to "
                            "its GPU (use --backend torch there), else one (needs czii_kit[scaleout])")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="predict on the running Dask cluster at ADDRESS (e.g. tcp://10.0.0.5:8786); the "
                            "workers must see ROOT, the weights and the export cache at the same paths")
    p.add_argument("--resume", action="store_true",
                   help="reuse the runs finished by an interrupted job (kept in OUT.parts/ beside --out until "
                        "the CSV is written), if made with the same model and settings; predict only the rest")
    p.add_argument("--force", action="store_true", help="overwrite --out and --picks-out files (and start again over OUT.parts/)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="also a progress bar over each run's slices")
    return p


def run(args) -> int:
    check_out_path(args.out, args.force)  # before minutes of detection
    from czii_kit.predict import predict_to_csv, summary
    from czii_kit.scaleout import cluster

    split = None if args.split == "all" else args.split
    if args.picks_out:  # check names and existing files before the long prediction
        from czii_kit.layout import select_runs
        from czii_kit.picks import picks_files, write_picks

        runs = [r.name for r in select_runs(args.root, split, args.runs)]
        picks_files(args.picks_out, runs, naming=args.naming, user_id=args.user_id, session_id=args.session_id,
                    overwrite=args.force)
    distributed = args.workers is not False or args.scheduler
    with (cluster(args.workers or None, args.scheduler) if distributed else nullcontext()) as client:
        path, picks = predict_to_csv(
            args.root, args.out, force=args.force, resume=args.resume, client=client, verbose=args.verbose,
            split=split, runs=args.runs, model=args.weights,
            settings=args.thresholds, export_dir=args.export_dir,
            backend=args.backend, tomogram=args.tomogram, z_stride=args.z_stride, batch=args.batch, tta=args.tta,
            polarity=args.polarity, smooth=args.smooth, flatten=args.flatten, tilt_axis=args.tilt_axis,
            rescore=False if args.no_rescore else None,
            refine=False if args.no_refine else None, templates=False if args.no_templates else None,
            template_wedge=args.template_wedge, progress=not args.quiet,
        )
    print(summary(picks).to_string())
    print(f"wrote {len(picks)} picks to {path}")
    if args.picks_out:
        files = write_picks(picks, args.picks_out, naming=args.naming, user_id=args.user_id,
                            session_id=args.session_id, runs=runs, overwrite=args.force)
        print(f"wrote {len(files)} picks files ({args.naming} names) under {args.picks_out}")
    return 0
