"""What ``tools/request_path.py`` makes of its windows: the comparison of a request window
with an idle one, the JSON document and the tables."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from rich.table import Table

from llmctl.common.console import console

Fn = tuple[str, int, str]           # a function: its file, first line, qualname

METHOD = ("raw = the files called in a window (b) holding one request; request's files = "
          "raw minus the files called in an idle window (a) of the same length; with a new "
          "function = the files of the functions called in (b) and not in (a). Total: the "
          "distinct files over the processes.")
MEASURES = ("raw", "request", "with_new_function")


def compare(request: set[Fn], idle: set[Fn]) -> dict[str, Any]:
    """One process's request window (its functions) against its idle window."""
    raw = sorted({f for f, _, _ in request})
    idle_files = {f for f, _, _ in idle}
    new: dict[str, list[str]] = {}
    for f, _, name in sorted(request - idle):
        new.setdefault(f, []).append(name)
    return {"raw": raw, "idle": sorted(idle_files),
            "request": [f for f in raw if f not in idle_files],
            "with_new_function": sorted(new), "new_functions": new,
            "called": dict(Counter(f for f, _, _ in request))}


def line_count(root: Path, file: str) -> int:
    with open(root / file, "rb") as f:
        return sum(1 for _ in f)


def _count(files: list[str] | set[str], lines: dict[str, int]) -> dict[str, int]:
    return {"files": len(files), "lines": sum(lines[f] for f in files)}


def report_json(result: dict[str, Any], root: Path) -> dict[str, Any]:
    """``measure()``'s result with line counts and the counts per process and in total."""
    files = {f for k in result.values() for p in k["processes"].values()
             for f in p["raw"] + p["idle"]}
    lines = {f: line_count(root, f) for f in sorted(files)}
    kinds = {}
    for kind, k in result.items():
        procs = k["processes"]
        counts = {name: {m: _count(p[m], lines) for m in MEASURES} for name, p in procs.items()}
        counts["total"] = {m: _count(set().union(*(p[m] for p in procs.values())), lines)
                           for m in MEASURES}
        kinds[kind] = {**k, "counts": counts}
    return {"method": METHOD, "lines": lines, "kinds": kinds}


def _files_table(kind: str, k: dict[str, Any], lines: dict[str, int]) -> Table:
    t = Table(title=f"{kind}: {k['title']} (request window {k['window_s']:.2f} s, the request "
                    f"{k['request_s']:.2f} s; idle window of the same length)")
    for col in ("process", "file", "lines", "request's file", "functions called",
                "not called idle"):
        t.add_column(col, justify="right" if col in ("lines", "functions called",
                                                     "not called idle") else "left")
    for name, p in k["processes"].items():
        for f in p["raw"]:
            t.add_row(name, f, str(lines[f]), "yes" if f in p["request"] else "no (idle too)",
                      str(p["called"][f]), str(len(p["new_functions"].get(f, []))))
    return t


def _counts_table(title: str, rows: dict[str, dict[str, dict[str, int]]]) -> Table:
    t = Table(title=title)
    t.add_column("")
    for col in ("raw files", "lines", "request's files", "lines", "with a new function",
                "lines"):
        t.add_column(col, justify="right")
    for name, c in rows.items():
        t.add_row(name, *(str(c[m][x]) for m in MEASURES for x in ("files", "lines")))
    return t


def print_report(doc: dict[str, Any]) -> None:
    out = console()
    out.print(doc["method"])
    for kind, k in doc["kinds"].items():
        out.print()
        out.print(_files_table(kind, k, doc["lines"]))
        out.print(_counts_table(f"{kind}: files and lines", k["counts"]))
    out.print()
    out.print(_counts_table("total (distinct files over the processes) per request",
                            {kind: k["counts"]["total"] for kind, k in doc["kinds"].items()}))
