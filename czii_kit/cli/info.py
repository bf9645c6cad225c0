"""``czii-kit info PATH``: runs, tomograms (levels, shapes, voxel size) and pick counts of a dataset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from czii_kit.catalog import PARTICLE_NAMES
from czii_kit.layout import find_runs
from czii_kit.picks import read_picks
from czii_kit.tomogram import describe_tomogram


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "info",
        help="list runs, tomograms and pick counts of a dataset",
        description=(
            "Describe a dataset in the Kaggle/copick layout: its runs, each tomogram's multiscale levels "
            "(shape z,y,x and voxel size in Å, read from the zarr metadata) and the number of picks per "
            "particle type. PATH may be a dataset root, a split folder, a static or overlay root, an "
            "ExperimentRuns folder, one run folder, or one tomogram (.zarr)."
        ),
    )
    p.add_argument("path", metavar="PATH", help="dataset root, split, static/overlay root or run folder")
    p.add_argument("--split", help="only runs of this split (e.g. train)")
    p.add_argument("--user-id", help="only copick-named picks of this user (Kaggle-named files are always read)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return p


def collect(path, split: str | None = None, user_id: str | None = None) -> dict:
    """Everything ``info`` shows, as plain Python data.

    Returns
    -------
    dict
        ``{"path", "runs": [{"name", "split", "tomograms": {name: [{level, shape, voxel_size, dtype}]},
        "picks": {particle: count}}], "picks_total": {particle: count}}``.
    """
    runs = find_runs(path, split)
    picks = read_picks(path, split=split, user_id=user_id)
    counts = picks.groupby(["experiment", "particle_type"]).size() if len(picks) else pd.Series(dtype=int)
    out_runs = []
    for run in runs:
        tomos = {name: describe_tomogram(p) for name, p in run.tomograms().items()}
        for levels in tomos.values():
            for lv in levels:
                lv["shape"] = list(lv["shape"])
        run_counts = {t: int(counts.get((run.name, t), 0)) for t in PARTICLE_NAMES}
        out_runs.append({"name": run.name, "split": run.split, "tomograms": tomos, "picks": run_counts})
    total = {t: sum(r["picks"][t] for r in out_runs) for t in PARTICLE_NAMES}
    return {"path": str(path), "runs": out_runs, "picks_total": total}


def format_info(info: dict) -> str:
    """Readable tables: one for tomograms, one for pick counts."""
    runs = info["runs"]
    lines = [f"{info['path']}: {len(runs)} run(s)", ""]
    name_w = max([len("run"), *(len(r["name"]) for r in runs)]) + 2
    split_w = max([len("split"), *(len(str(r["split"] or "-")) for r in runs)]) + 2
    tomo_rows = [(r, t, lv) for r in runs for t, lv in r["tomograms"].items()]
    if tomo_rows:
        tw = max(len("tomogram"), *(len(t) for _, t, _ in tomo_rows)) + 2
        lines.append(f"{'run':<{name_w}}{'split':<{split_w}}{'tomogram':<{tw}}{'voxel Å':>9}  levels: shape z,y,x")
        for r, t, levels in tomo_rows:
            vs = levels[0]["voxel_size"] if levels else float("nan")
            lv = "  ".join(f"{d['level']}: {'x'.join(str(s) for s in d['shape'])}" for d in levels)
            lines.append(f"{r['name']:<{name_w}}{str(r['split'] or '-'):<{split_w}}{t:<{tw}}{vs:>9.4f}  {lv}")
    else:
        lines.append("no tomograms")
    lines.append("")
    if any(info["picks_total"].values()):
        short = {t: t.replace("beta-", "b-").replace("virus-like-particle", "VLP") for t in PARTICLE_NAMES}
        widths = {t: max(len(short[t]), 5) + 2 for t in PARTICLE_NAMES}
        lines.append(f"{'picks':<{name_w}}" + "".join(f"{short[t]:>{widths[t]}}" for t in PARTICLE_NAMES)
                     + f"{'total':>8}")
        for r in runs:
            c = r["picks"]
            lines.append(f"{r['name']:<{name_w}}" + "".join(f"{c[t]:>{widths[t]}d}" for t in PARTICLE_NAMES)
                         + f"{sum(c.values()):>8d}")
        c = info["picks_total"]
        lines.append(f"{'total':<{name_w}}" + "".join(f"{c[t]:>{widths[t]}d}" for t in PARTICLE_NAMES)
                     + f"{sum(c.values()):>8d}")
    else:
        lines.append("no picks")
    return "\n".join(lines)


def run(args) -> int:
    if Path(args.path).suffix == ".zarr":  # one tomogram
        levels = describe_tomogram(args.path)
        if args.json:
            print(json.dumps({"path": str(args.path), "levels": [{**lv, "shape": list(lv["shape"])} for lv in levels]}))
        else:
            print(f"{args.path}: {len(levels)} level(s)")
            for lv in levels:
                print(f"  level {lv['level']}: {'x'.join(map(str, lv['shape']))} (z,y,x) {lv['dtype']}, "
                      f"{lv['voxel_size']:.4f} Å/voxel")
        return 0
    info = collect(args.path, args.split, args.user_id)
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0
