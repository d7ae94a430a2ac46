"""The house has no import circle: a module never needs, even through a function-level import, a module that
needs it back. Checked on the source (every ``import`` statement, wherever it stands) so a lazy import that
hides a circle from the interpreter is caught too."""

from __future__ import annotations

import ast
from pathlib import Path

import blazil_ai

ROOT = Path(blazil_ai.__file__).parent


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    files = {}
    for p in root.rglob("*.py"):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph: dict[str, set[str]] = {m: set() for m in files}
    # A compiled module (``transport/_wire``, from its C source; built or not) is a module importing none of ours.
    for p in [*root.rglob("*.c"), *root.rglob("*.so")]:
        graph[".".join([*p.relative_to(root.parent).parent.parts, p.name.split(".")[0]])] = set()
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                graph[mod].update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in graph:
                        graph[mod].add(full)
                    elif node.module in files:
                        graph[mod].add(node.module)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_check_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    graph = import_graph()
    assert "blazil_ai.ledger.store" in graph["blazil_ai.ledger.shards"]  # the walk sees the package's imports
    assert circles(graph) == []


def test_no_import_circle_in_the_ledger():
    graph = import_graph()
    assert [c for c in circles(graph) if any(m.startswith("blazil_ai.ledger") for m in c)] == []
