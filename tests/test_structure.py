"""The shape of the package: the run directory's file names live in `layout`, and no stage module imports another."""

import ast
from pathlib import Path

from ulmrec_hf.layout import FOLDERS, NAMES
from ulmrec_hf.runner import STAGES

PACKAGE = Path(__file__).resolve().parents[1] / "ulmrec_hf"
BENCH = PACKAGE.parent / "bench"
STAGE_MODULES = {module for module, _ in STAGES.values()}


def modules():
    found = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "layout.py")
    assert len(found) > 15, f"{PACKAGE}: too few modules found; the checks below would pass on nothing"
    return found


def path_literals(tree) -> list[tuple[int, str]]:
    """String constants that name a run-directory file: a file-like name anywhere, any owned name joined onto a path."""
    owned = NAMES | set(FOLDERS.values())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in NAMES and ("." in node.value or node.value.startswith("_")):
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            found += [(node.lineno, side.value) for side in (node.left, node.right)
                      if isinstance(side, ast.Constant) and isinstance(side.value, str) and side.value in owned]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("joinpath", "cache"):
            found += [(node.lineno, arg.value) for arg in node.args if isinstance(arg, ast.Constant) and arg.value in owned]
    return sorted(set(found))


def test_run_directory_names_are_written_only_in_layout():
    found = {p.name: path_literals(ast.parse(p.read_text())) for p in modules()}
    assert {name: hits for name, hits in found.items() if hits} == {}


def test_benches_name_run_directory_files_through_run_dir():
    """In bench/, `data` and `runs` also name the shared data and the bench's own folder, so only file names count."""
    files = sorted(BENCH.glob("*.py"))
    assert len(files) > 10
    found = {p.name: [(n, name) for n, name in path_literals(ast.parse(p.read_text())) if "." in name or name.startswith("_")]
             for p in files}
    assert {name: hits for name, hits in found.items() if hits} == {}


def test_the_literal_check_catches_a_run_directory_name():
    tree = ast.parse('path = run.root / "eval" / "metrics.json"\nwrite(out / "per_user")\nrun.cache("embeddings", key)')
    assert [name for _, name in path_literals(tree)] == ["eval", "metrics.json", "per_user", "embeddings"]


def imported_modules(path: Path) -> set[str]:
    """ulmrec_hf modules a file imports anywhere (top level or inside functions), by their last name."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = (node.module or "").removeprefix("ulmrec_hf").lstrip(".")
            if node.level == 1 or (node.module or "").startswith("ulmrec_hf"):
                out |= {base.split(".")[0]} if base else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ulmrec_hf.")}
    return out


def test_no_stage_module_imports_another():
    """Stages share code through the shared modules (layout, prompts, metrics, ranker, cards, common, split), never
    through each other."""
    borrowed = {name: sorted(imported_modules(PACKAGE / f"{name}.py") & (STAGE_MODULES - {name})) for name in sorted(STAGE_MODULES)}
    assert {name: others for name, others in borrowed.items() if others} == {}


def test_the_import_check_sees_lazy_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from .tasks import x\n    from . import evaluate\n    import ulmrec_hf.train\n")
    assert imported_modules(path) == {"tasks", "evaluate", "train"}


def test_no_conditional_has_equal_branches():
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.IfExp, ast.If)) and node.orelse:
                body = node.body if isinstance(node, ast.IfExp) else ast.Module(body=node.body, type_ignores=[])
                orelse = node.orelse if isinstance(node, ast.IfExp) else ast.Module(body=node.orelse, type_ignores=[])
                assert ast.dump(body) != ast.dump(orelse), f"{path.name}:{node.lineno}: {ast.unparse(node)[:200]}"
