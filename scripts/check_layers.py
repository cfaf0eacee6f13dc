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
    ("sql", {"api", "copy_hook", "lib"}),
    ("run", {"run", "chunked", "parallel"}),
    ("engine", {"export", "source", "scan", "plan"}),
    ("encode/sink", {"encode", "sink", "verify"}),
    ("destination", {"destination"}),
    ("leaf", {"options", "gucs", "token", "footer", "layout", "error", "ident", "compat",
              "activity", "progress", "pgrx_tests"}),
]
ENTRY_POINTS = {"api", "copy_hook"}
# Names the storage layer must never use: running exports is run/'s.
ABOVE_STORAGE = re.compile(r"\b(Export|ExportWriter|Source)\b")

SRC = Path(__file__).resolve().parent.parent / "src"
PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")
GROUP = re.compile(r"\buse\s+crate::\{([^;]*)\}", re.S)


def layer_of(module: str) -> int:
    for index, (_, modules) in enumerate(LAYERS):
        if module in modules:
            return index
    raise SystemExit(f"check_layers: module `{module}` is in no layer: add it to LAYERS")


def module_of(path: Path) -> str:
    top = path.relative_to(SRC).parts[0]
    return top[:-3] if top.endswith(".rs") else top


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
        named = set(PATH.findall(code))
        for group in GROUP.findall(code):
            named |= {m.split("::")[0].strip() for m in group.split(",") if m.strip()}
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
        if module == "destination":
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
