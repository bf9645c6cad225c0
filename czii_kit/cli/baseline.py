"""``czii-kit baseline``: the classical LoG picker, thresholds tuned on runs with picks, as a submission."""

from __future__ import annotations

from czii_kit.atomic import check_out_path


def add_parser(sub):
    p = sub.add_parser(
        "baseline", help="classical LoG blob picker (tuned thresholds) -> submission CSV",
        description="Scale-normalised Laplacian-of-Gaussian blobs at each particle's radius, per-type score "
                    "thresholds tuned for F4 on runs with picks (--tune-root), applied to every run of ROOT. "
                    "The reference the YOLO picker is compared with.")
    p.add_argument("root", metavar="ROOT", help="dataset root to pick")
    p.add_argument("--split", default="test", help="split of ROOT to pick (default test)")
    p.add_argument("--tune-root", required=True, help="dataset root with picks to tune the thresholds on")
    p.add_argument("--tune-split", default="train")
    p.add_argument("--tune-runs", nargs="+", help="only these runs for tuning")
    p.add_argument("--level", type=int, default=1, help="multiscale level to filter (default 1: 2x binned)")
    p.add_argument("--tomogram", default="denoised")
    p.add_argument("--out", required=True, help="submission CSV to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true")
    return p


def run(args) -> int:
    import json

    from czii_kit.atomic import atomic_write_text
    from czii_kit.baseline import predict_baseline, tune_baseline
    from czii_kit.postprocess import apply_thresholds
    from czii_kit.predict import summary
    from czii_kit.submission import write_submission

    out = check_out_path(args.out, args.force)
    common = {"tomogram": args.tomogram, "level": args.level, "progress": not args.quiet}
    thresholds, table = tune_baseline(args.tune_root, args.tune_split, args.tune_runs, **common)
    print("tuned on", args.tune_root)
    print(table[["threshold", "tp", "fp", "fn", "f_beta"]].round(3).to_string())
    picks = apply_thresholds(predict_baseline(args.root, args.split, **common), thresholds)
    write_submission(picks, out, overwrite=args.force)
    atomic_write_text(out.with_suffix(".thresholds.json"), json.dumps(thresholds, indent=1), overwrite=True)
    print(summary(picks).to_string())
    print(f"wrote {out} ({len(picks)} particles)")
    return 0
