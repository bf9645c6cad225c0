"""``czii-kit templates``: build the template file of :mod:`czii_kit.templates` from density maps."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "templates",
        help="build the template-matching file (czii_kit_templates.npz) from the particles' density maps",
        description=(
            "Reads the density maps of the template types (default: the maps shipped with czii_kit; or a folder "
            "of MRC maps named as in the catalog), "
            "block-averages them BIN x and writes an .npz that `tune` and `predict` use when it lies beside the "
            "detector weights as czii_kit_templates.npz: each rescored candidate of those types is matched "
            "against every template over 1,500 orientations, and one that another template fits better than its "
            "own loses score (weight tuned by `tune`)."
        ),
    )
    p.add_argument("maps", metavar="MAPS_DIR", nargs="?", default="shipped",
                   help="folder of MRC density maps (default 'shipped': the maps in czii_kit)")
    p.add_argument("--out", required=True, help="template file to write (.npz)")
    p.add_argument("--types", nargs="+", default=None,
                   help="particle types (default beta-galactosidase thyroglobulin: the pair the rescorer confuses)")
    p.add_argument("--bin", type=int, default=2, help="block-averaging factor (default 2: 20 Å voxels)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    return p


def run(args) -> int:
    from czii_kit.maps import map_sources
    from czii_kit.templates import DEFAULT_TYPES, build_templates, save_templates

    types = tuple(args.types or DEFAULT_TYPES)
    templates = build_templates(args.maps, types, args.bin)
    sources = map_sources(args.maps, list(templates))
    out = save_templates(templates, args.out, {"bin": args.bin, "sources": sources}, overwrite=args.force)
    for name, t in templates.items():
        print(f"{name}: {t.density.shape} voxels of {t.voxel_size:.2f} Å")
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} kB)")
    return 0
