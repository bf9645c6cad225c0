"""``czii-kit settings check|set FILE``: check a tuned settings file strictly, or change one setting in it."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "settings",
        help="check a tuned settings file (czii_kit_thresholds.json), or set one of its settings",
        description=(
            "check: parse a settings file as predict does (unknown keys, wrong types and out-of-range values are "
            "errors naming the key) and print what it holds. set: write a copy with KEY=VALUE changed (dotted keys, "
            "e.g. rescore.templates.config.wedge=auto; VALUE is JSON, else a string), checked the same way, with "
            "the change recorded under 'edits' in the file; this is how a shipped settings file is changed after "
            "tuning, never by hand."
        ),
    )
    p.add_argument("action", choices=("check", "set"))
    p.add_argument("file", metavar="FILE", help="settings file written by `czii-kit tune`")
    p.add_argument("assignments", nargs="*", metavar="KEY=VALUE", help="with set: the settings to change")
    p.add_argument("--note", help="with set: why (recorded with the change)")
    p.add_argument("--out", help="with set: file to write (default: FILE itself, which needs --force)")
    p.add_argument("--force", action="store_true", help="with set: replace an existing output file")
    return p


def run(args) -> int:
    import datetime as _dt
    import json
    import shlex
    import sys
    from pathlib import Path

    from czii_kit.atomic import atomic_write_text, check_out_path
    from czii_kit.errors import CziiKitError, SettingsError
    from czii_kit.settings import PipelineSettings, set_setting

    path = Path(args.file)
    if args.action == "check":
        if args.assignments:
            raise CziiKitError("settings check takes no KEY=VALUE")
        s = PipelineSettings.read(path)
        _describe(s)
        return 0
    if not args.assignments:
        raise CziiKitError("settings set needs at least one KEY=VALUE")
    out = check_out_path(args.out or path, args.force)
    PipelineSettings.read(path)  # the input itself must be valid
    doc = json.loads(path.read_text())
    changes = {}
    for item in args.assignments:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SettingsError(path, f"{item!r}: expected KEY=VALUE")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        doc = set_setting(doc, key, value, path)
        changes[key] = value
    record = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "set": changes,
              "command": "czii-kit settings set " + " ".join(shlex.quote(a) for a in sys.argv[3:])
              if len(sys.argv) > 3 else "czii-kit settings set"}
    if args.note:
        record["note"] = args.note
    doc["edits"] = [*doc.get("edits", []), record]
    PipelineSettings.from_doc(doc, out)
    atomic_write_text(out, json.dumps(doc, indent=1) + "\n", overwrite=True)
    print(f"wrote {out}: " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in changes.items()))
    return 0


def _describe(s) -> None:
    inf = s.inference
    print(f"{s.source}: valid")
    print(f"  inference  z_stride {inf.z_stride}, batch {inf.batch}, multi_label {inf.multi_label}, "
          f"smooth {inf.smooth}, polarity {inf.polarity}, flatten {inf.flatten}, tilt_axis {inf.tilt_axis}")
    print(f"  merge      {s.merge.method} (xy {s.merge.xy_frac}, z {s.merge.z_frac})"
          + (f"; per type: {', '.join(s.merge_per_type)}" if s.merge_per_type else ""))
    print(f"  refine     {', '.join(s.refine.types) if s.refine else 'off'}")
    print("  thresholds " + ", ".join(f"{k} {v:.3f}" for k, v in s.thresholds.items()))
    if s.rescore:
        r = s.rescore
        t = r.templates
        print(f"  rescore    {r.file.file} (mix {r.config.mix}, cross-type {r.config.cross_type}, template weight "
              f"{r.config.template_weight})" + (f"; templates {t.file.file} (wedge {t.config.wedge})" if t else ""))
        print("  rescored   " + ", ".join(f"{k} {v:.3f}" for k, v in r.thresholds.items()))
    else:
        print("  rescore    off")
