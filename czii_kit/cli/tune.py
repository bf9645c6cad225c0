"""``czii-kit tune ROOT --weights W``: pick the merging method and per-class thresholds on validation runs."""

from __future__ import annotations

import argparse

from czii_kit.atomic import check_out_path
from czii_kit.cli.predict import SMOOTH_HELP, smooth_arg


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune",
        help="choose 3D merging, centre refinement and per-class thresholds maximising F4 on validation runs",
        description=(
            "Detect on validation runs (default: the val runs recorded at training), compare the 3D merging "
            "methods (the best overall; with --per-type-merge, per particle type where another is clearly "
            "better), choose per-class score thresholds maximising F4, and save them beside the weights "
            "(czii_kit_thresholds.json), where predict picks them up. With a 3D rescorer beside the weights "
            "(czii_kit_rescorer.pt) the rescored candidates get thresholds of their own, which predict uses. "
            "Centre refinement of apo-ferritin (shell-template correlation) is kept when it raises the "
            "validation F4."
        ),
    )
    p.add_argument("root", metavar="ROOT", nargs="+", help="dataset root(s) with tomograms and picks")
    p.add_argument("--weights", required=True, help="trained .pt")
    p.add_argument("--split", default="train", help="split holding the validation runs (default train)")
    p.add_argument("--runs", nargs="+", help="validation runs (default: those recorded at training)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "openvino"])
    p.add_argument("--tomogram", default="denoised")
    p.add_argument("--z-stride", type=int, default=1,
                   help="slice stride (default 1; 2 halves the time; predict repeats the tuned stride)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument("--smooth", type=smooth_arg, default="auto", metavar="auto|off|SIGMA",
                   help=SMOOTH_HELP + " (recorded; predict repeats it)")
    p.add_argument("--multi-label", action="store_true",
                   help="keep each box for every class scoring above the detection floor, not only its best")
    p.add_argument("--per-type-merge", action="store_true",
                   help="let a particle type use another merging configuration when its own F4 is clearly higher")
    p.add_argument("--tolerance", type=float, default=None,
                   help="F4 a class threshold may give up on the validation runs to sit lower, which keeps recall "
                        "on unlike data (default 0.01; 0 = the best F4's lowest threshold)")
    r = p.add_mutually_exclusive_group()
    r.add_argument("--rescorer", help="3D rescorer to tune thresholds for as well (default: czii_kit_rescorer.pt "
                                      "beside the weights, when there is one)")
    r.add_argument("--no-rescorer", action="store_true", help="tune the detector-only thresholds alone")
    p.add_argument("--rescore-mix", type=float, default=None,
                   help="exponent of the rescorer's probability in det^(1-mix) * p^mix (default: the best of "
                        "1, 0.75 and 0.5 on the validation runs; each is tried with and without cross-type "
                        "proposals)")
    f = p.add_mutually_exclusive_group()
    f.add_argument("--refine", action="store_true", default=None,
                   help="always refine apo-ferritin centres by shell-template correlation (default: when it raises "
                        "the validation F4)")
    f.add_argument("--no-refine", dest="refine", action="store_false", help="never refine centres")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--templates", help="template file whose matching margin may enter the rescored score (default: "
                                       "czii_kit_templates.npz beside the weights, when there is one; its weight, "
                                       "0 included, is chosen on the validation runs)")
    t.add_argument("--no-templates", action="store_true", help="rescore without template matching")
    p.add_argument("--template-wedge", choices=("none", "auto"), default="none",
                   help="missing wedge given to the rotated templates: none, or each tomogram's own, estimated "
                        "from its power spectrum (auto); recorded in the thresholds file, which predict follows")
    p.add_argument("--out", help="output JSON (default czii_kit_thresholds.json beside the weights, replaced; "
                                 "`czii-kit predict --thresholds FILE` uses another one)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--quiet", action="store_true")
    return p


def run(args) -> int:
    import sys

    if args.tolerance is not None and not args.tolerance >= 0:
        print(f"czii-kit tune: error: --tolerance must be >= 0, got {args.tolerance}", file=sys.stderr)
        return 2
    if args.rescore_mix is not None and not 0 <= args.rescore_mix <= 1:
        print(f"czii-kit tune: error: --rescore-mix must lie in [0, 1], got {args.rescore_mix}", file=sys.stderr)
        return 2

    from czii_kit.infer import InferenceConfig
    from czii_kit.rescore import RescoreConfig
    from czii_kit.templates import TemplateConfig
    from czii_kit.tune import RESCORE_MIXES, THRESHOLD_TOLERANCE, tune

    if args.out:
        check_out_path(args.out, args.force)  # before minutes of detection

    cfg = InferenceConfig(z_stride=args.z_stride, batch=args.batch, tta=args.tta, multi_label=args.multi_label,
                          smooth=args.smooth)
    doc = tune(args.weights, args.root, split=args.split, runs=args.runs, backend=args.backend,
               tomogram=args.tomogram, config=cfg, out=args.out, overwrite=args.out is None or args.force,
               progress=not args.quiet,
               tolerance=THRESHOLD_TOLERANCE if args.tolerance is None else args.tolerance,
               per_type=args.per_type_merge, rescorer=False if args.no_rescorer else args.rescorer,
               rescore_config=RescoreConfig(**({} if args.rescore_mix is None else {"mix": args.rescore_mix})),
               rescore_mixes=RESCORE_MIXES if args.rescore_mix is None else None, refine=args.refine,
               templates=False if args.no_templates else args.templates,
               template_config=TemplateConfig(wedge=None if args.template_wedge == "none" else "auto"))
    print(f"validation runs: {', '.join(doc['val_runs'])}  ({doc['n_detections']} 2D detections)")
    print("merging methods (weighted F4 at tuned thresholds):")
    for row in doc["comparison"]:
        print(f"  {row['name']:<16}{row['final']:.4f}")
    print(f"chosen: {doc['merge_name']}")
    for name, cfg in doc["merge_per_type"].items():
        print(f"  except {name}: {cfg['name']}")
    rc, ref = doc.get("refine_comparison"), doc.get("refine")
    if rc:
        from czii_kit.refine import RefineConfig

        types = (ref or {}).get("types") or RefineConfig().types  # what was compared
        print(f"centre refinement ({', '.join(types)}): without {rc['none']:.4f}, "
              f"with {rc['refined']:.4f} -> " + ("refined" if ref else "not refined"))
    elif ref:
        print(f"centre refinement of {', '.join(ref['types'])} (asked for)")
    _table(doc["table"])
    print(f"final F4 on validation: {doc['final_f4']:.4f} (thresholds within {doc['threshold_tolerance']} "
          "of each class's best F4, at its low end)")
    if doc.get("rescore"):
        r = doc["rescore"]
        print(f"with the 3D rescorer {r['file']}, score = det^(1-mix) * p^mix (then sigmoid(logit + w * min(0, "
              "template margin)); validation F4:")
        for m in r["comparison"]:
            print(f"  mix {m['mix']:<5g}{'cross-type proposals' if m['cross_type'] else 'detector types only':<24}"
                  f"template weight {m.get('template_weight', 0):<5g}{m['final']:.4f}")
        w = r["config"].get("template_weight", 0)
        print(f"chosen: mix {r['config']['mix']:g}, " + ("with" if r["config"]["cross_type"] else "without")
              + " cross-type proposals, " + (f"template weight {w:g} ({r['templates']['file']})" if w
                                             else "no template matching"))
        _table(r["table"])
        print(f"final F4 on validation, rescored: {r['final_f4']:.4f} (predict uses these thresholds)")
    print(f"saved {doc['path']}")
    return 0


def _table(table: dict) -> None:
    print(f"{'particle_type':<22}{'threshold':>10}{'TP':>6}{'FP':>6}{'FN':>6}{'F4':>8}")
    for name, r in table.items():
        print(f"{name:<22}{r['threshold']:>10.3f}{int(r['tp']):>6d}{int(r['fp']):>6d}{int(r['fn']):>6d}"
              f"{r['f_beta']:>8.3f}")
