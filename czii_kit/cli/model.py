"""``czii-kit model show|manifest|check``: the model bundle (weights and the files beside them)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "model",
        help="show a model bundle, write its manifest (every file with its SHA-256), or check it",
        description=(
            "A model bundle is a weights file and, beside it, czii_kit_train.json, czii_kit_thresholds.json, "
            "czii_kit_rescorer.pt and czii_kit_templates.npz. show: what is there and what it holds. manifest: "
            "write czii_kit_manifest.json listing every file with its SHA-256 (loading the bundle then checks "
            "them). check: verify the files against the manifest and parse the settings strictly."
        ),
    )
    p.add_argument("action", choices=("show", "manifest", "check"))
    p.add_argument("--weights", help="trained .pt (default: the model shipped in czii_kit/models/)")
    return p


def run(args) -> int:
    from czii_kit.bundle import MANIFEST_FILE, ModelBundle
    from czii_kit.checksum import file_sha256
    from czii_kit.errors import CziiKitError

    model = ModelBundle.load(args.weights, verify=args.action == "show")  # manifest: (re)write it; check: below
    if args.action == "manifest":
        path = model.write_manifest()
        print(f"wrote {path} ({len(model.files())} files)")
        return 0
    if args.action == "check":
        doc = model.check_manifest()
        model.settings()
        _ = model.preprocess
        if doc is None:
            raise CziiKitError(f"{model.folder / MANIFEST_FILE}: no manifest (write one with `czii-kit model manifest`)")
        print(f"{model.weights}: {len(doc['files'])} files match {MANIFEST_FILE}; settings valid")
        return 0
    print(f"weights   {model.weights} (sha256 {model.weights_sha256[:16]}...)")
    print(f"trained   at {model.voxel_size:.6g} Å/voxel, validation runs {', '.join(model.val_runs) or '-'}")
    for p in model.files()[1:]:
        print(f"  {p.name:<28}sha256 {file_sha256(p)[:16]}...")
    manifest = model.folder / MANIFEST_FILE
    print(f"manifest  {manifest if manifest.is_file() else 'none'}")
    return 0
