"""The ``czii-kit`` command line: a thin layer over the library.

Each sub-command is a module of this package with ``add_parser(subparsers)`` and ``run(args) -> int``;
modules import heavy libraries (torch, ultralytics) inside ``run`` only, so ``--help`` stays fast.
Errors czii_kit raises on purpose print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from czii_kit import __version__
from czii_kit.errors import CziiKitError

# sub-command -> module in czii_kit.cli
COMMANDS = {
    "info": "info",
    "score": "score",
    "synth": "synth",
    "build-dataset": "build_dataset",
    "train": "train",
    "tune": "tune",
    "rescorer": "rescorer",
    "templates": "templates",
    "predict": "predict",
    "bench": "bench",
    "baseline": "baseline",
    "demo": "demo",
    "maps": "maps",
    "copick-config": "copick_config",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="czii-kit",
        description="Pick protein complexes in cryo-ET tomograms (CZII Kaggle layout), offline.",
    )
    parser.add_argument("--version", action="version", version=f"czii-kit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        try:
            mod = importlib.import_module(f"czii_kit.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"czii_kit.cli.{module}":
                continue  # command not part of this build
            raise
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (CziiKitError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        message = " ".join(str(exc).split())  # always one line, whatever the underlying library said
        print(f"czii-kit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"czii-kit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
