"""The ``czii-kit`` command line: a thin layer over the library.

Each sub-command is a module of this package with ``add_parser(subparsers)`` and ``run(args) -> int``;
modules import heavy libraries (torch, ultralytics) inside ``run`` only, so ``--help`` stays fast.
Errors czii_kit raises on purpose print one line and exit with code 2; warnings print once each, on one
line (``czii-kit CMD: warning: ...``), and not at all with ``--quiet``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from tqdm.auto import tqdm

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
    "settings": "settings",
    "model": "model",
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
        mod = importlib.import_module(f"czii_kit.cli.{module}")
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def _warning_printer(command: str, quiet: bool):
    """A ``warnings.showwarning`` printing each message once, on one line, without its source line."""
    seen = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        if quiet or text in seen:
            return
        seen.add(text)
        tqdm.write(f"czii-kit {command}: warning: {text}", file=sys.stderr)  # clear of any progress bar

    return show


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", UserWarning)  # repeats are dropped by text in _warning_printer
            warnings.showwarning = _warning_printer(args.command, bool(getattr(args, "quiet", False)))
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
