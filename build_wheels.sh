#!/usr/bin/env bash
# build_wheels.sh - bundle every wheel czii_kit needs for an offline target (default: a Kaggle notebook).
#
# Resolves czii_kit (+ extras) for the target Python and platform with pip, drops what the target already
# has (torch, torchvision and their CUDA dependencies by default, together with anything only they need),
# downloads the remaining wheels, builds wheels for pure-Python dependencies published only as source,
# builds czii_kit's own wheel, and writes DIR/*.whl + DIR/manifest.json + DIR/MANIFEST.txt and a .tar.gz
# ready to upload as a Kaggle dataset. On the target:
#     pip install --no-index --find-links DIR czii_kit
# (notebooks/inference.ipynb does that itself: it finds DIR, or the .tar.gz under its czii_kit-wheels-*
# name, in /kaggle/input/*/ or /kaggle/input/*/*/ and unpacks the archive into /kaggle/working first)
# Run ./build_wheels.sh --help for the options. Needs pip >= 22.2 and an index (PyPI) to download from.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"

# Packages a Kaggle GPU/CPU notebook image already has and that are too big or CUDA-specific to ship.
# nvidia-cu* / nvidia-nv* / nvidia-nccl* are torch's CUDA libraries (not nvidia-ml-py, which ultralytics needs).
DEFAULT_EXCLUDE="torch torchvision torchaudio triton nvidia-cu* nvidia-nv* nvidia-nccl* cuda-*"

usage() {
  cat <<'EOF'
Usage: ./build_wheels.sh [OPTIONS]

Download every wheel czii_kit needs for an offline target and pack them for a Kaggle dataset.

Target
  --python X.Y            target Python version (default: 3.11, Kaggle's)
  --platform TAG          target platform tag; repeat for several (default: manylinux_2_35_x86_64,
                          Kaggle's Ubuntu 22.04). manylinux tags are widened to every older manylinux
                          level the target accepts (manylinux_2_35 -> ..., manylinux_2_17, manylinux2014, ...)
  --implementation IMPL   target implementation (default: cp)

What to bundle
  --extras LIST           czii_kit extras, comma or space separated (default: export; '' for core only)
  --with REQ              an extra requirement to bundle, e.g. --with 'copick>=1.0' (repeatable)
  --no-project            bundle only the --with requirements, not czii_kit itself
  --exclude "A B ..."     packages the target already has, replacing the default list
                          (default: "torch torchvision torchaudio triton nvidia-cu* nvidia-nv*
                          nvidia-nccl* cuda-*"); shell-style
                          globs allowed. Packages needed only by excluded ones are left out too.
  --also-exclude "A B"    add to the exclusion list (e.g. "numpy scipy pandas" for a slimmer bundle)
  --exclude-file FILE     read the exclusion list from FILE (one name or glob a line, # comments)
  --from-source "A B"     build these packages from their sdist even if a wheel exists (pure Python only).
                          Packages with no wheel for the target are built from source automatically.

Output
  --out DIR               wheel directory (default: <repo>/wheels); stale *.whl there are removed
  --tar FILE              archive to write (default: <repo>/dist/czii_kit-wheels-<py>-<platform>.tar.gz)
  --no-tar                do not write the archive
  --force                 use --out even if it holds wheels this script did not write

Other
  --dry-run               resolve and print the plan (kept / excluded / built); download nothing
  --report FILE           plan from an existing `pip install --report` JSON instead of resolving
                          (with --dry-run only; for reproducing and testing)
  --pip-arg ARG           pass ARG to every pip call that reads an index, e.g.
                          --pip-arg=--index-url=https://mirror/simple (repeatable)
  --no-build-isolation    build czii_kit and sdists with the running Python's setuptools/wheel
  -h, --help              show this help

Environment: PYTHON selects the interpreter whose pip is used (default: python3).
EOF
}

die() { echo "build_wheels.sh: error: $*" >&2; exit 2; }
info() { echo "build_wheels.sh: $*" >&2; }

# ---------------------------------------------------------------- options
TARGET_PY="3.11"
PLATFORMS=()
IMPL="cp"
EXTRAS="export"
WITH=()
PROJECT=1
EXCLUDE="$DEFAULT_EXCLUDE"
ALSO_EXCLUDE=""
FROM_SOURCE=""
OUT="$REPO/wheels"
TAR=""
NO_TAR=0
FORCE=0
DRY_RUN=0
REPORT=""
PIP_ARGS=()
BUILD_ISOLATION=1

need_value() { [[ $# -ge 2 ]] || die "option $1 needs a value"; }
while [[ $# -gt 0 ]]; do
  opt="$1"
  # accept --opt=value as well as --opt value
  if [[ "$opt" == --*=* ]]; then
    set -- "${opt%%=*}" "${opt#*=}" "${@:2}"
    opt="$1"
  fi
  case "$opt" in
    -h|--help) usage; exit 0 ;;
    --python) need_value "$@"; TARGET_PY="$2"; shift 2 ;;
    --platform) need_value "$@"; PLATFORMS+=("$2"); shift 2 ;;
    --implementation) need_value "$@"; IMPL="$2"; shift 2 ;;
    --extras) need_value "$@"; EXTRAS="$2"; shift 2 ;;
    --with) need_value "$@"; WITH+=("$2"); shift 2 ;;
    --no-project) PROJECT=0; shift ;;
    --exclude) need_value "$@"; EXCLUDE="$2"; shift 2 ;;
    --also-exclude) need_value "$@"; ALSO_EXCLUDE="$ALSO_EXCLUDE $2"; shift 2 ;;
    --exclude-file)
      need_value "$@"
      [[ -f "$2" ]] || die "exclude file $2 does not exist"
      EXCLUDE="$(sed -e 's/#.*//' "$2" | tr -s ' \t\r\n' ' ')"
      shift 2 ;;
    --from-source) need_value "$@"; FROM_SOURCE="$FROM_SOURCE $2"; shift 2 ;;
    --out) need_value "$@"; OUT="$2"; shift 2 ;;
    --tar) need_value "$@"; TAR="$2"; shift 2 ;;
    --no-tar) NO_TAR=1; shift ;;
    --force) FORCE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --report) need_value "$@"; REPORT="$2"; shift 2 ;;
    --pip-arg) need_value "$@"; PIP_ARGS+=("$2"); shift 2 ;;
    --no-build-isolation) BUILD_ISOLATION=0; shift ;;
    *) die "unknown option '$opt' (see --help)" ;;
  esac
done

[[ "$TARGET_PY" =~ ^[23]\.[0-9]+$ ]] || die "--python must look like 3.11, got '$TARGET_PY'"
[[ "$IMPL" =~ ^[a-z]{2}$ ]] || die "--implementation must be a 2-letter tag like cp, got '$IMPL'"
[[ ${#PLATFORMS[@]} -gt 0 ]] || PLATFORMS=("manylinux_2_35_x86_64")
for p in "${PLATFORMS[@]}"; do
  [[ "$p" =~ ^[a-z0-9_]+$ ]] || die "--platform must be a wheel platform tag like manylinux_2_28_x86_64, got '$p'"
done
[[ -z "$REPORT" || $DRY_RUN -eq 1 ]] || die "--report can only be used with --dry-run"
[[ -z "$REPORT" || -f "$REPORT" ]] || die "report file $REPORT does not exist"
[[ $PROJECT -eq 1 || ${#WITH[@]} -gt 0 ]] || die "--no-project needs at least one --with requirement"
EXCLUDE="$EXCLUDE $ALSO_EXCLUDE"
PY_TAG="${IMPL}${TARGET_PY/./}"
PLAT_NAME="${PLATFORMS[0]}"
[[ -n "$TAR" ]] || TAR="$REPO/dist/czii_kit-wheels-${PY_TAG}-${PLAT_NAME}.tar.gz"

command -v "$PY" >/dev/null || die "python interpreter '$PY' not found (set PYTHON)"
"$PY" - <<'EOF' || die "pip >= 22.2 is needed (for --report); upgrade it with: $PY -m pip install -U pip"
import sys
from pip import __version__ as v
sys.exit(0 if tuple(int(x) for x in v.split(".")[:2]) >= (22, 2) else 1)
EOF

# ---------------------------------------------------------------- helpers in Python
# plan:     report.json -> kept/excluded lists (graph walk with target markers)
# platforms: widen manylinux tags
# manifest: write manifest.json / MANIFEST.txt
read -r -d '' HELPER <<'EOF' || true
import fnmatch, hashlib, json, os, re, sys
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip always vendors packaging
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

LEGACY = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}


def widen_platforms(tags):
    """manylinux_2_N_arch -> manylinux_2_N ... 2_5 plus the legacy aliases (PEP 600 compatibility)."""
    out = []
    for tag in tags:
        m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", tag)
        legacy = re.fullmatch(r"(manylinux2014|manylinux2010|manylinux1)_(\w+)", tag)
        if legacy:
            m = True
            minor, arch = LEGACY[legacy.group(1)], legacy.group(2)
        elif m:
            minor, arch = int(m.group(1)), m.group(2)
        if not m:
            out.append(tag)
            continue
        for n in range(minor, 4, -1):
            out.append(f"manylinux_2_{n}_{arch}")
        for name, n in LEGACY.items():
            if minor >= n and (name == "manylinux2014" or arch in ("x86_64", "i686")):
                out.append(f"{name}_{arch}")
    seen = set()
    return [t for t in out if not (t in seen or seen.add(t))]


def target_env(report_env, py, platforms):
    env = dict(report_env)
    env["python_version"] = py
    if not env.get("python_full_version", "").startswith(py + "."):
        env["python_full_version"] = py + ".0"
        env["implementation_version"] = py + ".0"
    plat = platforms[0]
    if plat.startswith(("manylinux", "musllinux", "linux")):
        env.update(sys_platform="linux", platform_system="Linux", os_name="posix")
        env["platform_machine"] = re.sub(r"^(manylinux|musllinux)(_\d+_\d+|\d+)_|^linux_", "", plat)
    elif plat.startswith("win"):
        env.update(sys_platform="win32", platform_system="Windows", os_name="nt",
                   platform_machine={"win_amd64": "AMD64", "win32": "x86", "win_arm64": "ARM64"}.get(plat, plat))
    elif plat.startswith("macosx"):
        env.update(sys_platform="darwin", platform_system="Darwin", os_name="posix",
                   platform_machine=plat.rsplit("_", 1)[-1])
    return env


def is_excluded(name, patterns):
    """Shell-style match on normalised names (case, '-', '_' and '.' do not matter)."""
    return any(fnmatch.fnmatchcase(canonicalize_name(name), canonicalize_name(p)) for p in patterns)


def applies(req, env, extras):
    if req.marker is None:
        return True
    for extra in extras or {""}:
        try:
            if req.marker.evaluate(dict(env, extra=extra)):
                return True
        except Exception:  # unknown marker variable: keep the dependency, better too much than too little
            return True
    return False


def plan(report_path, roots, py, platforms, patterns):
    report = json.load(open(report_path))
    items = {}
    for it in report.get("install", []):
        md = it["metadata"]
        items[canonicalize_name(md["name"])] = it
    env = target_env(report.get("environment", {}), py, platforms)
    kept, excluded, queue = {}, {}, []
    for r in roots:
        req = Requirement(r)
        queue.append((canonicalize_name(req.name), set(req.extras), "(requested)"))
    seen = set()
    while queue:
        name, extras, parent = queue.pop(0)
        if is_excluded(name, patterns):
            excluded.setdefault(name, parent)
            continue
        if name not in items:
            raise SystemExit(f"build_wheels.sh: error: {name} (needed by {parent}) is not in the pip report")
        key = (name, frozenset(extras))
        if key in seen:
            continue
        seen.add(key)
        kept.setdefault(name, parent)
        for spec in items[name]["metadata"].get("requires_dist", []) or []:
            req = Requirement(spec)
            if applies(req, env, {""} | {canonicalize_name(e) for e in extras}):
                queue.append((canonicalize_name(req.name), set(req.extras), name))
    # label what only the excluded packages need with the excluded package that pulls it in
    dropped, queue = {}, [(n, set(), n) for n in excluded]
    while queue:
        name, extras, parent = queue.pop(0)
        if name not in items or name in kept or name in dropped:
            continue
        dropped[name] = parent
        for spec in items[name]["metadata"].get("requires_dist", []) or []:
            req = Requirement(spec)
            if applies(req, env, {""} | {canonicalize_name(e) for e in extras}):
                queue.append((canonicalize_name(req.name), set(req.extras), name))
    rows = []
    for name, it in sorted(items.items()):
        url = it["download_info"]["url"]
        fname = os.path.basename(url.split("#")[0])
        from urllib.parse import unquote
        fname = unquote(fname)
        if name in kept:
            status = "keep"
        elif name in excluded:
            status = "exclude"
        else:
            status = "drop"  # only needed by excluded packages: the target has it
        rows.append({"name": it["metadata"]["name"], "version": it["metadata"]["version"], "file": fname,
                     "url": url, "status": status,
                     "sha256": it["download_info"].get("archive_info", {}).get("hashes", {}).get("sha256", ""),
                     "via": kept.get(name) or excluded.get(name) or dropped.get(name, "")})
    return rows


def cmd_platforms(args):
    print("\n".join(widen_platforms(args)))


def cmd_plan(args):
    report, py, out_tsv, plats, pats, roots = args[0], args[1], args[2], args[3].split(), args[4].split(), args[5:]
    rows = plan(report, roots, py, plats, pats)
    with open(out_tsv, "w") as f:
        for r in rows:
            # "-" for empty fields: bash's read collapses consecutive tabs
            f.write("\t".join([r["status"], r["name"], r["version"], r["file"], r["url"],
                               r["sha256"] or "-", r["via"] or "-"]) + "\n")
    w = max([len(r["name"]) + len(r["version"]) for r in rows] + [10]) + 3
    for status, title in (("keep", "bundle"), ("exclude", "excluded (target provides)"),
                          ("drop", "left out (needed only by excluded packages)")):
        sel = [r for r in rows if r["status"] == status]
        print(f"{title}: {len(sel)}")
        for r in sel:
            print(f"  {(r['name'] + '==' + r['version']).ljust(w)} {r['file'] if status == 'keep' else 'via ' + r['via']}")


def cmd_manifest(args):
    out, tsv, meta_json = args
    meta = json.loads(meta_json)
    wheels = []
    for line in open(tsv):
        status, name, version, fname, url, sha, via, source = line.rstrip("\n").split("\t")
        if status != "keep":
            continue
        path = os.path.join(out, fname)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if sha != "-" and source == "index" and h.hexdigest() != sha:
            raise SystemExit(f"build_wheels.sh: error: {path}: sha256 differs from the index's ({sha})")
        wheels.append({"name": name, "version": version, "file": fname, "sha256": h.hexdigest(),
                       "size": os.path.getsize(path), "source": source})
    wheels.sort(key=lambda w: canonicalize_name(w["name"]))
    meta["wheels"] = wheels
    meta["total_size"] = sum(w["size"] for w in wheels)
    for name, text in (("manifest.json", json.dumps(meta, indent=1) + "\n"),
                       ("MANIFEST.txt", "".join(f"{w['name']}=={w['version']}  {w['file']}\n" for w in wheels))):
        tmp = os.path.join(out, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))
    print(f"{len(wheels)} wheels, {meta['total_size'] / 2**20:.1f} MiB")


{"platforms": cmd_platforms, "plan": cmd_plan, "manifest": cmd_manifest}[sys.argv[1]](sys.argv[2:])
EOF
helper() { "$PY" -c "$HELPER" "$@"; }

mapfile -t WIDE_PLATFORMS < <(helper platforms "${PLATFORMS[@]}")
TARGET_ARGS=(--only-binary=:all: --python-version "$TARGET_PY" --implementation "$IMPL")
for p in "${WIDE_PLATFORMS[@]}"; do TARGET_ARGS+=(--platform "$p"); done

info "target: ${PY_TAG}, platforms: ${WIDE_PLATFORMS[*]}"
info "excluded (target provides): $(echo $EXCLUDE)"

# ---------------------------------------------------------------- roots
ROOTS=()
PROJECT_NAME=""
PROJECT_VERSION=""
if [[ $PROJECT -eq 1 ]]; then
  PROJECT_NAME="czii_kit"
  PROJECT_VERSION="$("$PY" - "$REPO/czii_kit/__init__.py" <<'EOF'
import re, sys
m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', open(sys.argv[1]).read(), re.M)
print(m.group(1) if m else "")
EOF
)"
  [[ -n "$PROJECT_VERSION" ]] || die "cannot read __version__ from $REPO/czii_kit/__init__.py"
  extras="$(echo "$EXTRAS" | tr ', ' '\n\n' | sed '/^$/d' | paste -sd, -)"
  if [[ -n "$extras" ]]; then ROOTS+=("czii_kit[$extras]==$PROJECT_VERSION"); else ROOTS+=("czii_kit==$PROJECT_VERSION"); fi
fi
ROOTS+=("${WITH[@]}")

# ---------------------------------------------------------------- plan from a given report (offline)
if [[ -n "$REPORT" ]]; then
  TSV="$(mktemp)"; trap 'rm -f "$TSV"' EXIT
  helper plan "$REPORT" "$TARGET_PY" "$TSV" "${PLATFORMS[*]}" "$EXCLUDE" "${ROOTS[@]}"
  exit 0
fi

BUILD="$(mktemp -d "${TMPDIR:-/tmp}/czii_wheels.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT
LOCAL="$BUILD/local"      # wheels we build: czii_kit, sdist-only dependencies
mkdir -p "$LOCAL" "$BUILD/sdist"
: >"$BUILD/constraints.txt"
: >"$BUILD/built.txt"
pip() { "$PY" -m pip "$@"; }
BUILD_ARGS=()
[[ $BUILD_ISOLATION -eq 1 ]] || BUILD_ARGS+=(--no-build-isolation)

wheel_meta() {  # wheel file -> "name version"
  "$PY" - "$1" <<'EOF'
import sys, zipfile
from email.parser import HeaderParser
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
h = HeaderParser().parsestr(z.read(meta).decode("utf-8"))
print(h["Name"], h["Version"])
EOF
}

wheel_for_this_machine() {  # requirement -> the wheel file pip would pick for this machine (metadata only)
  rm -f "$BUILD/probe.json"
  pip install --dry-run --ignore-installed --no-deps --quiet --only-binary=:all: --target "$BUILD/probe" \
      --report "$BUILD/probe.json" "${PIP_ARGS[@]}" "$1" >/dev/null 2>&1 || return 0
  "$PY" - "$BUILD/probe.json" <<'EOF'
import json, sys
from urllib.parse import unquote
items = json.load(open(sys.argv[1])).get("install", [])
print(unquote(items[0]["download_info"]["url"].split("#")[0].rsplit("/", 1)[-1]) if items else "")
EOF
}

build_from_source() {  # requirement -> pure-python wheel in $LOCAL, pinned in constraints
  local req="$1" sd whl name version
  info "building $req from its source distribution"
  rm -rf "$BUILD/sdist"/*
  pip download --no-deps --no-binary=:all: -d "$BUILD/sdist" "${BUILD_ARGS[@]}" "${PIP_ARGS[@]}" "$req" >&2 \
    || die "'$req' has no wheel for ${PY_TAG}/${PLATFORMS[*]} and no source distribution to build one from"
  sd="$(ls "$BUILD/sdist"/* | head -1)"
  pip wheel --no-deps -w "$BUILD/wheel" "${BUILD_ARGS[@]}" "${PIP_ARGS[@]}" "$sd" >&2 \
    || die "cannot build a wheel from $sd"
  whl="$(ls -t "$BUILD/wheel"/*.whl | head -1)"
  case "$(basename "$whl")" in
    *-none-any.whl) ;;
    *) die "'$req' has no wheel for ${PY_TAG}/${PLATFORMS[*]} and its source builds a platform-specific wheel ($(basename "$whl")); build it on the target instead" ;;
  esac
  mv "$whl" "$LOCAL/"
  read -r name version < <(wheel_meta "$LOCAL/$(basename "$whl")")
  echo "$name==$version" >>"$BUILD/constraints.txt"
  echo "$name" >>"$BUILD/built.txt"
}

# ---------------------------------------------------------------- czii_kit's own wheel
if [[ $PROJECT -eq 1 ]]; then
  info "building czii_kit $PROJECT_VERSION"
  # build from a copy of the source files (tracked + untracked, not ignored): a stale build/ or
  # *.egg-info in the checkout can neither leak into the wheel nor be written there
  SRC="$BUILD/src"
  mkdir -p "$SRC"
  if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
       | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
       | tar --null --files-from=- -cf -) | tar -C "$SRC" -xf - || die "cannot copy the sources of $REPO"
  else
    tar -C "$REPO" --exclude=./build --exclude=./dist --exclude=./wheels --exclude='*.egg-info' \
        --exclude=.git --exclude=__pycache__ -cf - . | tar -C "$SRC" -xf - || die "cannot copy the sources of $REPO"
  fi
  pip wheel --no-deps -w "$LOCAL" "${BUILD_ARGS[@]}" "${PIP_ARGS[@]}" "$SRC" >&2 || die "cannot build czii_kit's wheel"
  echo "czii_kit==$PROJECT_VERSION" >>"$BUILD/constraints.txt"
fi
for req in $FROM_SOURCE; do build_from_source "$req"; done

# ---------------------------------------------------------------- resolve (retry after building sdist-only deps)
for attempt in $(seq 1 20); do
  info "resolving ${ROOTS[*]} (attempt $attempt)"
  if pip install --dry-run --ignore-installed --quiet --report "$BUILD/report.json" --target "$BUILD/target" \
      "${TARGET_ARGS[@]}" --find-links "$LOCAL" -c "$BUILD/constraints.txt" "${PIP_ARGS[@]}" "${ROOTS[@]}" \
      2>"$BUILD/resolve.err"; then
    break
  fi
  missing="$(sed -n 's/.*No matching distribution found for \([^ ;]*\).*/\1/p' "$BUILD/resolve.err" | head -1)"
  name="$(echo "$missing" | sed 's/[<>=!~;[ ].*//')"
  if [[ -z "$missing" ]] || grep -qix "$name" "$BUILD/built.txt" \
      || { [[ $PROJECT -eq 1 ]] && [[ "$(echo "$name" | tr '_A-Z' '-a-z')" == "czii-kit" ]]; }; then
    cat "$BUILD/resolve.err" >&2
    die "pip could not resolve the bundle for ${PY_TAG}/${PLATFORMS[*]} (see above)"
  fi
  info "$missing has no wheel for the target"
  # a package with compiled wheels for other platforms is not "published only as source": building
  # its sdist would compile it for this machine, not for the target
  other="$(wheel_for_this_machine "$missing")"
  if [[ -n "$other" && "$other" != *-none-any.whl ]]; then
    die "'$missing' publishes compiled wheels (e.g. $other) but none for ${PY_TAG}/${PLATFORMS[*]}; choose another --python/--platform, or leave it out (--extras, --exclude)"
  fi
  build_from_source "$missing"
done
[[ -f "$BUILD/report.json" ]] || die "resolution did not converge"

TSV="$BUILD/plan.tsv"
helper plan "$BUILD/report.json" "$TARGET_PY" "$TSV" "${PLATFORMS[*]}" "$EXCLUDE" "${ROOTS[@]}"
if [[ $DRY_RUN -eq 1 ]]; then
  info "dry run: nothing downloaded"
  exit 0
fi

# ---------------------------------------------------------------- download into OUT
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if compgen -G "$OUT/*.whl" >/dev/null && [[ ! -f "$OUT/manifest.json" && $FORCE -eq 0 ]]; then
  die "$OUT already holds wheels this script did not write; pass --force or choose another --out"
fi
PINS=()
SOURCES="$BUILD/sources.tsv"
: >"$SOURCES"
while IFS=$'\t' read -r status name version file url sha via; do
  [[ "$status" == keep ]] || continue
  if [[ -f "$LOCAL/$file" ]]; then
    cp "$LOCAL/$file" "$OUT/$file.tmp" && mv "$OUT/$file.tmp" "$OUT/$file"
    if grep -qix "$name" "$BUILD/built.txt"; then src=built-from-sdist; else src=project; fi
  else
    src=index
    if [[ -f "$OUT/$file" ]] && [[ "$sha" == - || "$(sha256sum "$OUT/$file" | cut -d' ' -f1)" == "$sha" ]]; then
      :  # cached from an earlier run
    else
      PINS+=("$name==$version")
    fi
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$status" "$name" "$version" "$file" "$url" "$sha" "$via" "$src" >>"$SOURCES"
done <"$TSV"

if [[ ${#PINS[@]} -gt 0 ]]; then
  info "downloading ${#PINS[@]} wheels into $OUT"
  pip download --no-deps -d "$OUT" "${TARGET_ARGS[@]}" --find-links "$LOCAL" "${PIP_ARGS[@]}" "${PINS[@]}" >&2 \
    || die "download failed"
fi
while IFS=$'\t' read -r status name version file url sha via src; do
  [[ -f "$OUT/$file" ]] || die "pip downloaded another file than the resolved $file for $name==$version"
done <"$SOURCES"

# remove wheels of earlier runs that are not part of this bundle
for f in "$OUT"/*.whl; do
  [[ -e "$f" ]] || continue
  if ! cut -f4 "$SOURCES" | grep -qxF "$(basename "$f")"; then
    info "removing stale $(basename "$f")"
    rm -f "$f"
  fi
done

COMMIT=""
if [[ $PROJECT -eq 1 ]] && git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  COMMIT="$(git -C "$REPO" rev-parse HEAD 2>/dev/null || true)"
  [[ -z "$COMMIT" || -z "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]] || COMMIT="$COMMIT-dirty"
fi
META="$("$PY" - "$TARGET_PY" "$IMPL" "$EXTRAS" "$EXCLUDE" "$PROJECT_VERSION" "$COMMIT" "${PLATFORMS[*]}" "${WIDE_PLATFORMS[@]}" <<'EOF'
import json, sys
py, impl, extras, exclude, version, commit, plats, *tags = sys.argv[1:]
print(json.dumps({
    "format": 1,
    "created_by": "build_wheels.sh",
    "czii_kit_version": version or None,
    "source_commit": commit or None,  # git commit of the czii_kit checkout ("-dirty": uncommitted changes)
    "target": {"python": py, "implementation": impl, "platforms": plats.split(), "platform_tags": tags},
    "extras": [e for e in extras.replace(",", " ").split()],
    "exclude": exclude.split(),
    "install": "pip install --no-index --find-links <this directory> czii_kit",
}))
EOF
)"
helper manifest "$OUT" "$SOURCES" "$META" >&2
# record what was left out, for the reader of manifest.json
"$PY" - "$OUT/manifest.json" "$TSV" <<'EOF'
import json, os, sys
path, tsv = sys.argv[1:]
m = json.load(open(path))
m["not_bundled"] = [{"name": n, "version": v, "reason": "excluded" if s == "exclude" else "needed only by excluded packages",
                     "via": via}
                    for s, n, v, f, u, sha, via in (l.rstrip("\n").split("\t") for l in open(tsv)) if s != "keep"]
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(m, f, indent=1)
    f.write("\n")
os.replace(tmp, path)
EOF

# ---------------------------------------------------------------- archive
if [[ $NO_TAR -eq 0 ]]; then
  mkdir -p "$(dirname "$TAR")"
  TAR="$(cd "$(dirname "$TAR")" && pwd)/$(basename "$TAR")"  # the archive is written from inside OUT
  tmp="$TAR.tmp.$$"
  (cd "$OUT" && { cut -f4 "$SOURCES"; echo manifest.json; echo MANIFEST.txt; } | sort \
     | tar --create --no-recursion --owner=0 --group=0 --numeric-owner --mtime='2000-01-01 00:00Z' \
           --files-from=- --file=- | gzip -n -1 >"$tmp") || { rm -f "$tmp"; die "cannot write $TAR"; }
  mv "$tmp" "$TAR"
  info "wrote $TAR ($(du -h "$TAR" | cut -f1))"
fi
info "done: $OUT ($(wc -l <"$OUT/MANIFEST.txt") wheels). On the target: pip install --no-index --find-links $OUT czii_kit"
