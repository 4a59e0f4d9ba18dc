"""Print the import graph between the project's packages, and any import cycle.

    python -m llmctl.tools.import_graph                   # this checkout
    python -m llmctl.tools.import_graph --root OLD_CHECKOUT --flat control dataplane worker tools
    python -m llmctl.tools.import_graph --dot graph.dot   # Graphviz: dot -Tpng graph.dot

Built with grimp (import-linter's graph library), from the code's own imports: for each
pair of packages, how many modules of the first import the second, then every module
cycle inside a package (none is allowed: ``make lint``).  ``--flat`` reads a checkout
whose packages are top-level folders, without the ``llmctl`` package.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import grimp

PACKAGES = ("common", "control", "dataplane", "worker", "tools")


def build(root: Path, flat: list[str] | None) -> tuple[grimp.ImportGraph, list[str], str]:
    """(graph, package names, prefix) for the checkout at ``root``."""
    if flat:
        sys.path.insert(0, str(root))
        return grimp.build_graph(*flat, cache_dir=None), flat, ""
    # llmctl's subpackages live in folders of their own (setuptools package-dir): lay
    # them out as installed, as links, for grimp to walk.
    stage = Path(tempfile.mkdtemp(prefix="llmctl-graph-"))
    (stage / "llmctl").mkdir()
    (stage / "llmctl" / "__init__.py").write_text((root / "llmctl" / "__init__.py").read_text())
    for name in PACKAGES:
        os.symlink(root / name, stage / "llmctl" / name)
    sys.path.insert(0, str(stage))
    # This module runs from the installed llmctl: let grimp find the staged one instead.
    loaded = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "llmctl"}
    try:
        graph = grimp.build_graph("llmctl", cache_dir=None)
    finally:
        sys.modules.update(loaded)
    return graph, list(PACKAGES), "llmctl."


def package_of(module: str, prefix: str) -> str:
    return module[len(prefix):].split(".")[0]


def edges(graph: grimp.ImportGraph, prefix: str) -> Counter[tuple[str, str]]:
    out: Counter[tuple[str, str]] = Counter()
    for mod in graph.modules:
        for dep in graph.find_modules_directly_imported_by(mod):
            a, b = package_of(mod, prefix), package_of(dep, prefix)
            if a != b and dep.startswith(prefix):
                out[(a, b)] += 1
    return out


def cycles(graph: grimp.ImportGraph, package: str) -> list[list[str]]:
    """Shortest import cycles among the modules of ``package`` (each found once)."""
    mods = sorted(m for m in graph.modules if m.startswith(package + "."))
    seen: set[frozenset[str]] = set()
    out = []
    for a, b in itertools.permutations(mods, 2):
        if not graph.direct_import_exists(importer=a, imported=b):
            continue
        back = graph.find_shortest_chain(importer=b, imported=a)    # b ... a
        if back and frozenset(back) not in seen:
            seen.add(frozenset(back))
            out.append([a, *back])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmctl.tools.import_graph",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent))
    ap.add_argument("--flat", nargs="*", default=None, metavar="PACKAGE")
    ap.add_argument("--dot", default=None, help="also write the package graph in DOT")
    args = ap.parse_args(argv)
    graph, packages, prefix = build(Path(args.root).resolve(), args.flat)
    pairs = edges(graph, prefix)
    print(f"{len(graph.modules)} modules; imports between packages (importer -> imported: "
          "modules that import it):")
    for (a, b), n in sorted(pairs.items()):
        mutual = " (both ways)" if (b, a) in pairs else ""
        print(f"  {a} -> {b}: {n}{mutual}")
    found = [(p, c) for p in packages for c in cycles(graph, prefix + p)]
    print(f"module cycles inside a package: {len(found)}")
    for p, c in found:
        print(f"  {p}: " + " -> ".join(x[len(prefix):] for x in c))
    if args.dot:
        lines = ["digraph imports {", "  rankdir=BT;"]
        lines += [f'  "{a}" -> "{b}" [label="{n}"];' for (a, b), n in sorted(pairs.items())]
        Path(args.dot).write_text("\n".join([*lines, "}"]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
