#!/usr/bin/env python3
"""The dependency rule of ARCHITECTURE.md, checked: every `crate::` path in
a module's code names its own layer or one below it, the SQL entry points
do not name each other, no module names the export type in
`destination/`, and the module graph has no circle. Exits 1 and says where
when one does not hold."""

from __future__ import annotations

import re
import sys
from pathlib import Path

# Top to bottom. A top-level module of the crate is in exactly one layer.
LAYERS = [
    ("sql", {"sql", "lib"}),
    ("run", {"run"}),
    ("engine", {"engine"}),
    ("encode/sink", {"encode", "sink"}),
    ("destination", {"destination"}),
    ("leaf", {"options", "gucs", "token", "footer", "layout", "error", "ident", "compat",
              "activity", "progress", "remote", "pgrx_tests"}),
]
# The SQL entry points: they do not name each other.
ENTRY_POINTS = {"sql::api", "sql::cluster", "sql::copy_hook", "sql::jobs"}
# Names the storage layer must never use: running exports is run/'s.
ABOVE_STORAGE = re.compile(r"\b(Export|ExportWriter|Source)\b")

SRC = Path(__file__).resolve().parent.parent / "src"
# `crate::a`, `crate::a::b`, and `crate::a::{b, c::d}`.
PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)(?:::([a-z_][a-z0-9_]*|\{[^;]*?\}))?", re.S)
GROUP = re.compile(r"\buse\s+crate::\{([^;]*)\}", re.S)


def layer_of(module: str) -> int:
    top = module.split("::")[0]
    for index, (_, modules) in enumerate(LAYERS):
        if top in modules:
            return index
    raise SystemExit(f"check_layers: module `{top}` is in no layer: add it to LAYERS")


def submodules(top: str) -> set[str]:
    folder = SRC / top
    if not folder.is_dir():
        return set()
    return {f.stem for f in folder.iterdir() if f.suffix == ".rs" and f.stem != "mod"} | \
        {d.name for d in folder.iterdir() if d.is_dir()}


def unit(top: str, second: str | None) -> str:
    """The module a path names, to the depth of a folder's files: `run`
    (its mod.rs) or `run::chunked`."""
    if second and second in submodules(top):
        return f"{top}::{second}"
    return top


def module_of(path: Path) -> str:
    parts = path.relative_to(SRC).parts
    top = parts[0][:-3] if parts[0].endswith(".rs") else parts[0]
    if len(parts) == 1:
        return top
    second = parts[1][:-3] if parts[1].endswith(".rs") else parts[1]
    return top if second == "mod" else unit(top, second)


def named_in(code: str) -> set[str]:
    named = set()
    for top, rest in PATH.findall(code):
        if rest.startswith("{"):
            inner = [m.split("::")[0].strip() for m in rest[1:-1].split(",") if m.strip()]
            named |= {unit(top, m) if m != "self" else top for m in inner}
        else:
            named.add(unit(top, rest or None))
    for group in GROUP.findall(code):
        for item in (m.strip() for m in group.split(",") if m.strip()):
            first, _, second = item.partition("::")
            named.add(unit(first, second.split("::")[0] or None))
    return named


def code_of(text: str) -> str:
    """The text without comments and string literals."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'r#*"(?:.|\n)*?"#*', '""', text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


def main() -> int:
    problems: list[str] = []
    edges: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.rs")):
        module = module_of(path)
        code = code_of(path.read_text())
        named = named_in(code)
        named.discard(module)
        edges.setdefault(module, set()).update(named)
        for other in sorted(named):
            if layer_of(other) < layer_of(module):
                problems.append(f"{path.relative_to(SRC.parent)}: `{module}` "
                                f"({LAYERS[layer_of(module)][0]}) names `crate::{other}` "
                                f"({LAYERS[layer_of(other)][0]}), a layer above it")
            if module in ENTRY_POINTS and other in ENTRY_POINTS:
                problems.append(f"{path.relative_to(SRC.parent)}: entry point `{module}` "
                                f"names entry point `{other}`")
        if module.split("::")[0] == "destination":
            for number, line in enumerate(code.splitlines(), 1):
                if ABOVE_STORAGE.search(line):
                    problems.append(f"{path.relative_to(SRC.parent)}:{number}: storage names "
                                    f"the export: {line.strip()}")
    # A circle among modules (two modules of one layer naming each other).
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for other in sorted(edges.get(module, ())):
            if state.get(other) == 1:
                circle = trail[trail.index(other):] + [other] if other in trail else [module, other]
                problems.append("import circle: " + " -> ".join(circle))
            elif other not in state:
                visit(other, trail + [other])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"check_layers: {len(problems)} problem(s); see ARCHITECTURE.md", file=sys.stderr)
        return 1
    print(f"check_layers: {len(edges)} modules, every dependency points down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
