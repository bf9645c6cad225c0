"""Check that czii_kit's imports form layers: no cycles, no upward imports, no hidden package imports.

Run as ``python -m tests.check_layers`` (from the repository root) or through ``tests/test_layers.py``.
Each module belongs to one layer of :data:`LAYERS` (lowest first). A module may import modules of
its own layer or of layers below; never above. Imports of czii_kit modules sit at the top of a
module, not inside functions (those hid cycles before), except in the thin command line (``cli``),
which loads a subcommand's library only when that subcommand runs. The check reads the source with
:mod:`ast`; it imports nothing.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "czii_kit"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("leaves", ("errors", "catalog", "coords", "atomic", "checksum", "rotations", "offline", "config")),
    ("io", ("layout", "tomogram", "picks", "submission", "maps", "copick_project")),
    ("scoring", ("metric",)),
    ("volume processing", ("preprocess", "augment", "wedge", "volumes")),
    ("detection", ("postprocess", "infer")),
    ("3D stages", ("refine", "rescore", "templates")),
    ("settings", ("settings",)),
    ("model bundle", ("bundle",)),
    ("pipeline", ("scaleout", "predict")),
    ("training", ("yolo_dataset", "train", "rescore_train", "tune")),
    ("tools", ("synthetic", "bench", "baseline", "demo", "plots", "kaggle", "copick")),
    ("command line", ("cli", "__main__")),
]
"""Layers from the bottom up: (name, top-level module or subpackage names)."""

LAZY_ALLOWED = ("cli", "__main__")
"""Where imports of czii_kit modules may sit inside functions."""


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of a dotted module name under czii_kit (``czii_kit.synthetic.phantom`` -> tools)."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for i, (_, names) in enumerate(LAYERS):
        if top in names:
            return i
    raise KeyError(module)


def modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(path: Path, name: str, known: set[str]) -> list[tuple[str, int, bool]]:
    """``(imported czii_kit module, line, inside a function?)`` for each import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names]
            seen = set()
            for t in targets:
                if t == "czii_kit" or t.startswith("czii_kit."):
                    while t not in known and "." in t:
                        t = t.rpartition(".")[0]
                    if t not in seen:
                        seen.add(t)
                        found.append((t, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def problems() -> list[str]:
    """Every violation, one line each (``[]``: the layering holds)."""
    mods = modules()
    known = set(mods)
    out, graph = [], {m: set() for m in mods}
    for name, path in mods.items():
        if name == "czii_kit":  # the package's __init__: only leaves
            for target, line, _ in imports(path, name, known):
                if layer_of(target) > 0 and target != "czii_kit":
                    out.append(f"{path}:{line}: czii_kit/__init__ imports {target} (only leaf modules; "
                               "the public API is loaded lazily)")
            continue
        try:
            mine = layer_of(name)
        except KeyError:
            out.append(f"{path}: module {name} is in no layer of tests/check_layers.py")
            continue
        lazy_ok = name.split(".")[1] in LAZY_ALLOWED
        for target, line, in_function in imports(path, name, known):
            if target == "czii_kit":
                continue  # __version__ and the leaf re-exports
            try:
                theirs = layer_of(target)
            except KeyError:
                continue
            if theirs > mine:
                out.append(f"{path}:{line}: {name} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]}), "
                           "a layer above")
            if in_function and not lazy_ok:
                out.append(f"{path}:{line}: {name} imports {target} inside a function (import it at the top)")
            graph[name].add(target)
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles of a directed graph, one per strongly connected component of more than one node
    (or a self-loop), shown as a path through it."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                comps.append(sorted(comp) + [sorted(comp)[0]])

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return comps


def main() -> int:
    found = problems()
    for line in found:
        print(line)
    print(f"{len(found)} layering problem(s) in {len(modules())} modules")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
