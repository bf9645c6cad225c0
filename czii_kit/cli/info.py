"""``czii-kit info PATH``: runs, tomograms (levels, shapes, voxel size) and pick counts of a dataset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from czii_kit.catalog import PARTICLE_NAMES
from czii_kit.layout import find_runs
from czii_kit.picks import read_picks, run_extents, warn_outside
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
    p.add_argument("--smoothness", action="store_true",
                   help="also read each tomogram's central block and report its x-neighbour correlation and the "
                        "low-pass sigma (or, for an over-smoothed one, the sharpening) `predict --smooth auto` would apply "
                        "(0: none), its missing-wedge ratio "
                        "and the tilt axis `predict --tilt-axis auto` reads from it; then read the whole first "
                        "level for its background unevenness (`predict --flatten auto` flattens above "
                        "0.1) and the tilt range its missing wedge shows (the directions sampled either side of "
                        "the tilt axis, as `tune --template-wedge auto` reads them); about 4 s a full-size tomogram")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return p


def smoothness(path) -> dict:
    """``{"neighbour_correlation", "auto_sigma", "auto_sharpen", "wedge_ratio", "tilt_axis", "unevenness",
    "flatten", "sampled_wedge"}`` of a tomogram's first level (``auto_sharpen``: the unsharp-mask amount ``--smooth auto``
    applies to an over-smoothed tomogram, 0 for none): the first five from its central block, the background unevenness
    from the whole level (as ``predict`` measures it; ``flatten``: whether ``--flatten auto`` would
    subtract the background), and the sampled directions of its missing wedge (:func:`czii_kit.wedge.estimate_wedge`
    on the 2x-binned level: ``{"axis", "lo", "hi"}`` in degrees, about the tilt axis; None when none shows)."""
    from czii_kit.errors import DataError
    from czii_kit.preprocess import (
        UNEVEN_LIMIT,
        auto_smoothing,
        central_block,
        neighbour_correlation,
        tilt_axis_of,
        unevenness,
        wedge_ratio,
    )
    from czii_kit.templates import block_mean
    from czii_kit.tomogram import open_tomogram
    from czii_kit.wedge import estimate_wedge

    tomo = open_tomogram(path)
    try:
        block = central_block(tomo.array)  # [z, y, x]; slicing reads only the chunks of the central block
    except Exception as exc:  # corrupt chunk, missing codec, ...
        raise DataError(path, f"cannot read voxels: {exc}") from exc
    try:
        ratio, (sigma, amount) = wedge_ratio(block), auto_smoothing(block)
        out = {"neighbour_correlation": round(neighbour_correlation(block), 4), "auto_sigma": sigma,
               "auto_sharpen": amount, "wedge_ratio": round(ratio, 4), "tilt_axis": tilt_axis_of(ratio)}
    except ValueError as exc:  # e.g. fewer than 2 voxels along x
        raise DataError(path, str(exc)) from exc
    vol = tomo.read()  # Tomogram.read raises DataError naming the file
    u = unevenness(vol)
    w = estimate_wedge(block_mean(vol, 2), 2 * tomo.voxel_size)  # as TemplateConfig.wedge="auto" measures it
    wedge = None if w is None else {"axis": w.axis, "lo": round(w.lo, 1), "hi": round(w.hi, 1)}
    return {**out, "unevenness": round(u, 4), "flatten": bool(u > UNEVEN_LIMIT), "sampled_wedge": wedge}


def collect(path, split: str | None = None, user_id: str | None = None, with_smoothness: bool = False) -> dict:
    """Everything ``info`` shows, as plain Python data (picks outside their tomogram: one warning).

    Returns
    -------
    dict
        ``{"path", "runs": [{"name", "split", "tomograms": {name: [{level, shape, voxel_size, dtype}]},
        "picks": {particle: count}}], "picks_total": {particle: count}}``; with ``with_smoothness``
        each run also has ``"smoothness": {name: {neighbour_correlation, auto_sigma, auto_sharpen, wedge_ratio,
        tilt_axis, unevenness, flatten}}`` (:func:`smoothness`).
    """
    runs = find_runs(path, split)
    picks = read_picks(path, split=split, user_id=user_id)
    warn_outside(picks, run_extents(runs), path)  # Kaggle accepts them; say how many
    counts = picks.groupby(["experiment", "particle_type"]).size() if len(picks) else pd.Series(dtype=int)
    out_runs = []
    for run in runs:
        tomos = {name: describe_tomogram(p) for name, p in run.tomograms().items()}
        for levels in tomos.values():
            for lv in levels:
                lv["shape"] = list(lv["shape"])
        run_counts = {t: int(counts.get((run.name, t), 0)) for t in PARTICLE_NAMES}
        out_runs.append({"name": run.name, "split": run.split, "tomograms": tomos, "picks": run_counts})
        if with_smoothness:
            out_runs[-1]["smoothness"] = {name: smoothness(p) for name, p in run.tomograms().items()}
    total = {t: sum(r["picks"][t] for r in out_runs) for t in PARTICLE_NAMES}
    return {"path": str(path), "runs": out_runs, "picks_total": total}


def _sampled(w: dict | None) -> str:
    """``"-58/+58° y"``: a missing wedge's sampled directions about its tilt axis, or ``"-"``."""
    return "-" if not w else f"-{w['hi']:.0f}/+{w['lo']:.0f}° {w['axis']}"


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
        smooth_rows = [(r, t, r["smoothness"][t]) for r, t, _ in tomo_rows if t in r.get("smoothness", {})]
        if smooth_rows:
            lines += ["", f"{'run':<{name_w}}{'tomogram':<{tw}}{'x-corr':>8}{'wedge':>8}{'tilt axis':>11}{'sampled':>13}"
                          f"{'uneven':>8}{'flatten':>9}{'sharpen':>9}{'auto low-pass sigma':>21}"]
            for r, t, s in smooth_rows:
                lines.append(f"{r['name']:<{name_w}}{t:<{tw}}{s['neighbour_correlation']:>8.3f}"
                             f"{s['wedge_ratio']:>8.3g}{s['tilt_axis']:>11}{_sampled(s.get('sampled_wedge')):>13}"
                             f"{s['unevenness']:>8.3f}{'yes' if s['flatten'] else 'no':>9}{s['auto_sharpen']:>9g}"
                             f"{s['auto_sigma']:>21g}")
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
        smooth = smoothness(args.path) if args.smoothness else None
        if args.json:
            doc = {"path": str(args.path), "levels": [{**lv, "shape": list(lv["shape"])} for lv in levels]}
            print(json.dumps({**doc, "smoothness": smooth} if smooth else doc))
        else:
            print(f"{args.path}: {len(levels)} level(s)")
            for lv in levels:
                print(f"  level {lv['level']}: {'x'.join(map(str, lv['shape']))} (z,y,x) {lv['dtype']}, "
                      f"{lv['voxel_size']:.4f} Å/voxel")
            if smooth:
                print(f"  x-neighbour correlation {smooth['neighbour_correlation']:.3f}; "
                      f"auto low-pass sigma {smooth['auto_sigma']:g} voxels, sharpening {smooth['auto_sharpen']:g}; "
                      "missing-wedge ratio "
                      f"{smooth['wedge_ratio']:.3g}: tilt axis along {smooth['tilt_axis']}; background "
                      f"unevenness {smooth['unevenness']:.3f}: "
                      f"{'flattened' if smooth['flatten'] else 'not flattened'} by --flatten auto; sampled "
                      f"directions {_sampled(smooth['sampled_wedge'])} (tilt range, read off the power spectrum)")
        return 0
    info = collect(args.path, args.split, args.user_id, args.smoothness)
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0
