"""``czii-kit copick-config ROOT --out copick.json``: a copick project config for a dataset."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "copick-config",
        help="write a copick filesystem project config (static/overlay roots, the six particles) for a dataset",
        description=(
            "A dataset in the Kaggle layout is a copick project: this writes the config that opens one split of "
            "it in copick and its viewers (static root = {split}/static, overlay root = {split}/overlay or "
            "--overlay, the six pickable objects with their radii). copick reads picks named "
            "{user}_{session}_{particle}.json: write them with `synth --naming copick` or "
            "`predict --picks-out OVERLAY --naming copick`."
        ),
    )
    p.add_argument("root", metavar="ROOT", help="dataset root or split folder")
    p.add_argument("--out", required=True, help="config JSON to write (e.g. copick.json)")
    p.add_argument("--split", help="split of a dataset root (needed when it holds several, e.g. train)")
    p.add_argument("--overlay", help="overlay root for picks (default {split}/overlay)")
    p.add_argument("--name", help="project name (default {root}/{split})")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    return p


def run(args) -> int:
    from czii_kit.copick_project import write_copick_config

    out = write_copick_config(args.root, args.out, args.split, args.overlay, args.name, overwrite=args.force)
    print(f"wrote {out}; open it with copick, e.g. copick.from_file({str(out)!r})")
    return 0
