"""The layering the README's Architecture section states, read from the source with ``ast``: no import
cycle between kdseg's modules (imports inside functions included), ``kdseg.data`` imports nothing of
kdseg outside itself, and no Python file of the project (``kdseg/``, ``tests/``, ``experiments/``) is
over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kdseg"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the kdseg modules it imports anywhere in its body}; ``from pkg import name`` counts
    as importing ``pkg.name`` where that is a module, else ``pkg``."""
    def owner(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in modules else ""

    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {owner(a.name) for a in node.names if a.name.startswith("kdseg")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kdseg") and not node.level:
                targets |= {owner(f"{node.module}.{a.name}") for a in node.names}
        graph[name] = targets - {"", name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_find_cycle_reports_a_cycle_and_accepts_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_kdseg_modules() -> None:
    assert find_cycle(import_graph(_modules())) is None


def test_data_imports_nothing_of_kdseg_outside_itself() -> None:
    graph = import_graph(_modules())
    outside = {f"{m} -> {t}" for m, targets in graph.items() if m.startswith("kdseg.data")
               for t in targets if not t.startswith("kdseg.data")}
    assert not outside


def test_no_file_over_500_lines() -> None:
    root = PACKAGE.parent
    files = [p for folder in ("kdseg", "tests", "experiments") for p in (root / folder).rglob("*.py")]
    assert any(p.parent.name == "tests" for p in files)  # the walk sees the tests (this file among them)
    long = {str(p.relative_to(root)): n for p in files if (n := len(p.read_text().splitlines())) > 500}
    assert not long
