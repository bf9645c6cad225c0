"""``czii-kit demo``: simulate, pick with the shipped model, score, draw."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("demo", help="simulate a small dataset, predict with the shipped model, score it",
                       description="The whole chain offline in a few minutes: simulate small synthetic test "
                                   "tomograms, pick particles with the default model, write submission.csv, "
                                   "score it against the ground truth, and save a figure.")
    p.add_argument("--out", default="czii_kit_demo", help="output folder (default: ./czii_kit_demo)")
    p.add_argument("--weights", help="model weights (default: the model shipped with czii_kit)")
    p.add_argument("--backend", default="openvino", choices=["openvino", "onnx", "torch"])
    p.add_argument("--runs", type=int, default=2, help="synthetic test runs (default 2)")
    p.add_argument("--size", default="small", choices=["tiny", "small", "full"], help="tomogram size (default small)")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--maps", default="shipped",
                   help="density maps for the simulator: 'shipped' (default: the polnet maps in czii_kit), "
                        "'procedural' (built-in models; 'none' also), or a folder of MRC maps")
    p.add_argument("--force", action="store_true", help="use --out even if it holds other files")
    return p


def run(args) -> int:
    from czii_kit.demo import run_demo

    run_demo(args.out, args.weights, args.backend, args.runs, args.size, args.seed, args.maps, args.force)
    return 0
