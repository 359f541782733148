"""The layers import cleanly: no import cycle among sfd's modules (so every import can sit at the top of its
module), the study engine (`sfd/study/`) has every import at the top, the library never imports the scripts'
folders, and every module of sfd/, reports/ and the two scripts imports in a fresh interpreter."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SFD = ROOT / "sfd"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sfd_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SFD.rglob("*.py"))}


def _top_level_imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The sfd modules `name` imports when it is imported: its module-level imports (also those under a
    module-level `if` / `try`), relative ones resolved; `from pkg import sub` counts the submodule."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _module_level(ast.parse(path.read_text()).body):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m in modules and m != name}


def _module_level(body: list) -> list:
    """The statements a module runs when imported, looking into `if`, `try` and `with` blocks (not into
    functions or classes, whose imports run only when called)."""
    out = []
    for node in body:
        out.append(node)
        for block in ("body", "orelse", "finalbody", "handlers"):
            if isinstance(node, (ast.If, ast.Try, ast.With, ast.ExceptHandler)) and hasattr(node, block):
                out += _module_level(getattr(node, block))
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in `graph` (as a path that ends where it starts), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_sfd_modules_import_each_other_without_a_cycle():
    modules = _sfd_modules()
    graph = {name: _top_level_imports(path, name, modules) for name, path in modules.items()}
    assert graph["sfd.study.loop"] >= {"sfd.study.plan", "sfd.study.record", "sfd.tracking"}  # the parser works
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_the_study_engine_has_every_import_at_the_top_of_its_modules():
    nested = []
    for path in sorted((SFD / "study").glob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in _module_level(tree.body)}
        nested += [f"{path.name}:{node.lineno}" for node in ast.walk(tree)
                   if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top]
    assert nested == []


def test_every_module_imports_in_a_fresh_interpreter_and_the_library_never_imports_the_scripts():
    modules = sorted(_sfd_modules())
    code = f"""
import importlib, importlib.util, json, sys
sys.path.insert(0, {str(ROOT)!r})
for name in {modules!r}:
    importlib.import_module(name)
library_only = sorted({{m.split(".")[0] for m in sys.modules}} & {{"reports", "studies", "experiments"}})
for name in ["reports.data", "reports.tables", "reports.figures", "reports.notebook", "reports.build"]:
    importlib.import_module(name)
for script in ["studies/run.py", "experiments/run.py"]:
    spec = importlib.util.spec_from_file_location("script_" + script.split("/")[0], {str(ROOT)!r} + "/" + script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
print(json.dumps(library_only))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []
