"""The library's import structure: no cycle, every import at the top of its module, no private names taken from
another of our modules, and the library never imports the scripts' folders. Each check reads the source (ast);
two also import every module (of sfd/, reports/ and the two scripts) in a fresh interpreter."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sfd"

# Imports left inside a function on purpose, each with its reason (the same reason is a comment at the import).
LAZY_IMPORTS = {
    ("sfd/losses.py", "LPIPSLoss.__init__", "lpips"):
        "the speed tools import sfd.distill -> sfd.losses on GPU machines that hold PyTorch but not lpips",
    ("sfd/metrics/inception.py", "_build_network", "torch_fidelity.feature_extractor_inceptionv3"):
        "`sfd.bench sample` imports sfd.metrics.evaluate on GPU machines that hold PyTorch but not torch-fidelity",
}


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, from its __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _targets(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """The sfd modules an import statement in `package` loads (`from sfd.bench import distill` loads the module
    sfd.bench.distill; `from sfd.config import load_config` loads sfd.config; `from .spec import X` inside
    sfd.study loads sfd.study.spec)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "sfd"]
    module = node.module or ""
    if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        module = ".".join(anchor + ([module] if module else []))
    if not module or module.split(".")[0] != "sfd":
        return []
    subs = [f"{module}.{a.name}" for a in node.names if _is_module(f"{module}.{a.name}")]
    return subs or [module]


def _import_graph() -> dict[str, set[str]]:
    """Module -> the sfd modules it loads when imported: what its top-level statements import, and the packages
    above those (their __init__ runs first), except the packages the importer itself is inside."""
    graph = {}
    for name, path in _modules().items():
        edges = set()
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]
            for target in _targets(node, package):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    above = ".".join(parts[:i])
                    if above != name and not name.startswith(above + "."):
                        edges.add(above)
        graph[name] = edges
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _imports_inside(tree: ast.Module):
    """(qualified name of the enclosing function, imported module) for every import below module level."""
    def walk(node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield from walk(child, scope + [child.name])
            elif isinstance(child, (ast.Import, ast.ImportFrom)) and scope:
                modules = [a.name for a in child.names] if isinstance(child, ast.Import) else [child.module]
                for module in modules:
                    yield ".".join(scope), module
            else:
                yield from walk(child, scope)
    yield from walk(tree, [])


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_library_has_no_import_cycle():
    graph = _import_graph()
    assert graph["sfd.config.validation"] >= {"sfd.teachers", "sfd.metrics.names"}  # the graph sees real edges
    assert graph["sfd.study.loop"] >= {"sfd.study.plan", "sfd.study.record", "sfd.tracking"}
    assert "sfd.config" not in graph["sfd.config.loading"]  # a module's own package is not an edge
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_import_is_at_the_top_of_its_module():
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        found |= {(rel, scope, module) for scope, module in _imports_inside(ast.parse(path.read_text()))}
    unexpected = sorted(found - set(LAZY_IMPORTS))
    assert not unexpected, f"imports inside functions (move them to the top of the module): {unexpected}"
    assert found == set(LAZY_IMPORTS), f"listed in LAZY_IMPORTS but now at the top: {set(LAZY_IMPORTS) - found}"


def test_no_module_imports_another_modules_private_names():
    taken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sfd":
                taken += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_")]
    assert not taken, taken


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module imported as the first of the package, with every sfd module dropped in between: a cycle would
    show as an ImportError (a partly initialised module) whichever module comes first."""
    names = [n for n in _modules() if not n.endswith("__main__")]
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'sfd' or m.startswith('sfd.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print('imported', len(" + repr(names) + "))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"imported {len(names)}"


def test_the_scripts_and_reports_import_and_the_library_never_imports_them():
    modules = sorted(n for n in _modules() if not n.endswith("__main__"))
    code = f"""
import importlib, importlib.util, json, sys
sys.path.insert(0, {str(ROOT)!r})
for name in {modules!r}:
    importlib.import_module(name)
library_only = sorted({{m.split(".")[0] for m in sys.modules}} & {{"reports", "studies", "experiments"}})
for name in ["reports.formatting", "reports.paper", "reports.rows", "reports.loading", "reports.tables",
             "reports.header", "reports.reading", "reports.figures", "reports.notebook", "reports.build"]:
    importlib.import_module(name)
for script in ["studies/run.py", "experiments/run.py"]:
    spec = importlib.util.spec_from_file_location("script_" + script.split("/")[0], {str(ROOT)!r} + "/" + script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
print(json.dumps(library_only))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == []
