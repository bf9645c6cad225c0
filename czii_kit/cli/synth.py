"""``czii-kit synth``: simulate a training/test dataset of cryo-ET tomograms in the Kaggle layout."""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

from czii_kit.errors import CziiKitError

HELP = "simulate tomograms with picks (Kaggle layout): tilt series, CTF, noise, WBP, denoising"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "synth",
        help=HELP,
        description=(
            "Simulate cryo-ET runs (particles from density maps or built-in models, membranes, gold, "
            "distractors; tilt series about y with CTF, dose and noise; weighted back-projection; "
            "denoising) and write them as a dataset root: train/static, train/overlay (picks), "
            "test/static and solution.csv."
        ),
    )
    p.add_argument("--out", type=Path, help="dataset root to create")
    p.add_argument("--runs", type=int, default=7, help="training runs (with picks) [7]")
    p.add_argument("--test-runs", type=int, default=3, help="test runs (ground truth in solution.csv) [3]")
    p.add_argument("--size", default="full", choices=["full", "small", "tiny"],
                   help="full = 184x630x630, small = 92x316x316, tiny = 48x96x128 voxels of 10.012 Å [full]")
    p.add_argument("--voxel-size", type=float, default=None, metavar="A",
                   help="Å per voxel [10.012444, Kaggle's]; another size keeps the field of view of --size "
                        "(its shape scaled) and resamples the density maps")
    p.add_argument("--seed", type=int, default=0, help="master seed [0]")
    p.add_argument("--maps", default="shipped",
                   help="particle density: 'shipped' (default: the polnet maps in czii_kit), 'procedural' "
                        "(built-in models), or a folder of MRC maps named as in the catalog")
    p.add_argument("--picks", type=Path, default=None,
                   help="place particles at these picks (e.g. real Kaggle train/overlay), one layout per run")
    p.add_argument("--naming", default="kaggle", choices=["kaggle", "copick"],
                   help="picks file names: Kaggle's {particle}.json (default) or copick's "
                        "{user}_{session}_{particle}.json")
    p.add_argument("--user-id", default="curation", help="user id of the picks [curation]")
    p.add_argument("--session-id", default="0", help="session id of the picks (no '_') [0]")
    p.add_argument("--range", action="append", default=[], metavar="NAME=LO,HI",
                   help="override one simulation parameter range, e.g. --range dose=20,40 or "
                        "--range residual_noise=0.9 (repeatable; names and defaults: "
                        "czii_kit.synthetic.params.SimRanges)")
    p.add_argument("--threads", type=int, default=None, help="threads for the heavy stages [2]")
    p.add_argument("--workers", type=int, default=None, dest="old_workers",
                   help=argparse.SUPPRESS)  # the old name of --threads (deprecated)
    p.add_argument("--force", action="store_true", help="replace an existing synthetic dataset at --out")
    p.add_argument("--bench", action="store_true", help="time one run stage by stage (nothing is kept)")
    p.add_argument("--figure", type=Path, default=None, metavar="PNG",
                   help="write the simulator docs' figure (x-y slice with picks, x-z slice) of one simulated run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_ranges(items: list[str]):
    """``["dose=20,40", "residual_noise=0.9"]`` -> SimRanges with those ranges replaced (``None`` if empty)."""
    from czii_kit.synthetic.params import SimParamError, SimRanges

    if not items:
        return None
    given = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            nums = [float(v) for v in value.split(",")] if sep else []
        except ValueError:
            nums = []
        if len(nums) not in (1, 2):
            raise SimParamError(f"--range {item!r}: expected NAME=LO,HI or NAME=VALUE")
        given[name.strip()] = nums * 2 if len(nums) == 1 else nums
    return SimRanges.from_dict(given)


def run(args) -> int:
    from czii_kit.maps import maps_option
    from czii_kit.synthetic import benchmark, generate_dataset
    from czii_kit.synthetic.params import SimParamError

    maps = maps_option(args.maps)
    if args.old_workers is not None:
        warnings.warn("--workers is deprecated for synth (it meant threads): use --threads", FutureWarning,
                      stacklevel=2)
        args.threads = args.old_workers if args.threads is None else args.threads
    if args.threads is not None and args.threads < 1:
        raise SimParamError(f"--threads must be >= 1, got {args.threads}")
    did = False
    if args.bench:
        benchmark(args.size, seed=args.seed, maps_dir=maps, threads=args.threads)
        did = True
    if args.figure is not None:
        from czii_kit.synthetic.figure import make_figure

        path = make_figure(args.figure, maps_dir=maps, size=args.size, seed=args.seed,
                           overwrite=args.force, workers=args.threads)
        print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KB)")
        did = True
    if args.out is not None:
        if args.runs < 0 or args.test_runs < 0 or args.runs + args.test_runs == 0:
            raise SimParamError(f"need at least one run (--runs {args.runs}, --test-runs {args.test_runs})")
        root = generate_dataset(
            args.out, n_train=args.runs, n_test=args.test_runs, size=args.size, seed=args.seed,
            maps_dir=maps, picks_dir=args.picks, overwrite=args.force, progress=not args.quiet,
            threads=args.threads, ranges=parse_ranges(args.range), naming=args.naming, user_id=args.user_id,
            session_id=args.session_id,
            **({} if args.voxel_size is None else {"voxel_size": args.voxel_size}),
        )
        print(f"wrote {args.runs} training and {args.test_runs} test runs to {root}")
        did = True
    if not did:
        raise CziiKitError("nothing to do: give --out DIR (or --bench, --figure PNG)")
    return 0
