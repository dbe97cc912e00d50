"""The layout says what is core: the modules that implement the paper's equations (spans, attention, capture,
mol, losses) import no other module of the project's but each other, and no two project modules import each other
in a cycle, directly or through others. Read from the sources (ast), so that a lazy import counts too.
attention.py, the definition of Eq. 2/3, can be copied alone: it imports torch and the standard library only, and
registers nothing with transformers; capture.py registers its attention only when `capture.register()` is called."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in ROOT.glob("*.py")} | {f"plumbing.{p.stem}": p for p in ROOT.glob("plumbing/*.py")
                                                    if p.stem != "__init__"}
CORE = {"spans", "attention", "capture", "mol", "losses"}


def imports(path):
    """The project modules a file imports anywhere in it (top level or inside functions): each imported name counts
    by its first part (data) and its first two (plumbing.models), whichever is a module here."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        names |= {".".join(n.split(".")[:k]) for n in found for k in (1, 2)}
    return names & set(MODULES)


def test_plumbing_is_seen():  # the graph below reads the plumbing modules by their dotted names
    assert imports(MODULES["train"]) >= {"plumbing.rundir", "plumbing.flags", "data", "teacher"}
    assert imports(MODULES["eval"]) >= {"plumbing.answers", "plumbing.models"}


def test_core_imports_only_core():
    for name in CORE:
        assert imports(MODULES[name]) <= CORE, (name, imports(MODULES[name]) - CORE)


def test_no_import_cycle():
    graph = {name: imports(path) - {name} for name, path in MODULES.items()}
    assert "eval" not in graph["data"] and "data" in graph["eval"]  # eval reads data, never the reverse
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


def run_python(code):
    """The JSON that `code` prints, run in a fresh interpreter from the repository root."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_attention_imports_torch_alone():
    tree = ast.parse(MODULES["attention"].read_text())
    names = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert names - set(sys.stdlib_module_names) == {"torch"}, names
    # and at run time: importing it after torch loads no other module (no project module, no transformers)
    new = run_python("import json, sys; import torch; before = set(sys.modules); import attention; "
                     "print(json.dumps(sorted(set(sys.modules) - before)))")
    assert new == ["attention"]


def test_register_only_on_request_and_idempotent():
    """Importing attention.py or capture.py registers nothing with transformers; capture.register() registers the
    attention and its mask once, returns the same name every time, and AttentionInterface then knows it."""
    out = run_python("""if True:
        import json
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        def keys():
            return sorted(AttentionInterface()), sorted(AttentionMaskInterface())

        before = keys()
        import attention, capture
        imported = keys()
        first = capture.register()
        registered = keys()
        fn = AttentionInterface()[first]
        second = capture.register()
        print(json.dumps({"before": before, "imported": imported, "first": first, "second": second,
                          "registered": registered, "again": keys(), "same_fn": AttentionInterface()[second] is fn,
                          "fn_is_capture": fn is capture._attention}))""")
    assert out["imported"] == out["before"] and out["first"] not in out["before"][0]
    assert out["first"] == out["second"] and isinstance(out["first"], str)
    assert out["first"] in out["registered"][0] and out["first"] in out["registered"][1]
    assert out["again"] == out["registered"] and out["same_fn"] and out["fn_is_capture"]
