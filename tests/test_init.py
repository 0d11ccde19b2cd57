"""Package-level facts: every module imports on its own, and the import graph has no cycles (lazy imports included)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ulmrec_hf"
MODULES = sorted("ulmrec_hf." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def imports_of(module: str) -> set[str]:
    """Package modules that `module` imports anywhere in its file (top level or inside functions)."""
    path = PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")
    package = module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                for name in (f"{base}.{alias.name}", base):
                    if name in MODULES:
                        found.add(name)
                        break
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in MODULES}
    return found - {module}


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports_on_its_own(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_import_graph_has_no_cycles():
    graph = {m: imports_of(m) for m in MODULES}
    assert graph["ulmrec_hf.cli"] >= {"ulmrec_hf.runner"} and "ulmrec_hf.cli" not in set().union(*graph.values())
    mutual = sorted((a, b) for a in graph for b in graph[a] if a in graph.get(b, ()))
    assert not mutual
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(path + [m])}")
        if state.get(m) != "done":
            state[m] = "open"
            for n in sorted(graph[m]):
                visit(n, path + [m])
            state[m] = "done"

    for m in MODULES:
        visit(m, [])
