"""``czii-kit maps``: pack density maps into the package's asset file, or show what a packed file holds."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "maps",
        help="density maps: pack a folder of MRC maps into one .npz (the shipped maps), or show a packed file",
        description=(
            "czii_kit ships the seven polnet density maps (six particles and a distractor) as "
            "czii_kit/assets/density_maps.npz, written by `czii-kit maps pack`. `synth`, `demo` and `templates` "
            "use them by default; their --maps option takes a folder of MRC maps instead, or 'procedural'."
        ),
    )
    sub = p.add_subparsers(dest="maps_command", metavar="ACTION", required=True)
    pack = sub.add_parser("pack", help="pack the seven MRC maps of a folder into one compressed .npz (float16)",
                          description="Reads 8cpv.mrc, 1fa2.mrc, 6drv.mrc, 6qzp.mrc, 7n4y.mrc, 6n4v.mrc and 8vaf.mrc "
                                      "and writes them, with each source's SHA-256 and this command, to --out.")
    pack.add_argument("maps", metavar="MAPS_DIR", help="folder of the MRC density maps")
    pack.add_argument("--out", required=True, help=".npz to write (e.g. czii_kit/assets/density_maps.npz)")
    pack.add_argument("--force", action="store_true", help="overwrite --out")
    info = sub.add_parser("info", help="list the maps of a packed file (default: the shipped one)")
    info.add_argument("file", nargs="?", default=None, help="packed .npz (default: the shipped maps)")
    return p


def run(args) -> int:
    from czii_kit.maps import pack_maps, read_packed_maps, shipped_maps_path

    if args.maps_command == "pack":
        command = f"czii-kit maps pack {args.maps} --out {args.out}"
        out = pack_maps(args.maps, args.out, command=command, overwrite=args.force)
        print(f"wrote {out} ({out.stat().st_size / 1024:.0f} kB)")
        return 0
    maps, meta = read_packed_maps(args.file)
    print(f"{args.file or shipped_maps_path()}: {meta['dtype']}, made by `{meta['command']}` on {meta['created']}")
    for f, rec in meta["maps"].items():
        print(f"  {f:<10s} {rec['name']:<20s} {'x'.join(map(str, maps[f][0].shape)):>9s} voxels of "
              f"{maps[f][1]:.2f} Å  sha256 {rec['sha256'][:16]}")
    return 0
