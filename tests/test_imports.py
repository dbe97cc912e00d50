"""The layout says what is core: the modules that implement the paper's equations (spans, attention, mol,
losses) import no other module of the project's but each other, and no two project modules import each other
in a cycle, directly or through others. Read from the sources (ast), so that a lazy import counts too."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in ROOT.glob("*.py")}
CORE = {"spans", "attention", "mol", "losses"}


def imports(path):
    """The project modules a file imports anywhere in it (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(MODULES)


def test_core_imports_only_core():
    for name in CORE:
        assert imports(MODULES[name]) <= CORE, (name, imports(MODULES[name]) - CORE)


def test_no_import_cycle():
    graph = {name: imports(path) - {name} for name, path in MODULES.items()}
    assert "eval" not in graph["data"] and "data" in graph["eval"]  # the cycle this test was written for
    done, path = set(), []

    def visit(name):  # depth-first; a module met again on the current path closes a cycle
        assert name not in path, " -> ".join(path[path.index(name):] + [name])
        if name in done:
            return
        path.append(name)
        for other in sorted(graph[name]):
            visit(other)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
