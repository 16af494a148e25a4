"""The package structure docs/ARCHITECTURE.md promises: no import cycles inside megamoe/, and the
lower packages (parallel/, moe/, data/, and the bottom modules) never import model/ or training/."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megamoe"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """megamoe modules ``path`` imports, at module level, inside functions or under TYPE_CHECKING (a
    lazy or annotation-only import is still a dependency a reader follows)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megamoe"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("megamoe"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_cycles():
    graph, state, stack = _graph(), {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert len(graph) > 20  # the walk really saw the package


def test_lower_packages_do_not_import_model_or_training():
    lower = ("megamoe.parallel", "megamoe.moe", "megamoe.data", "megamoe.params", "megamoe.ops",
             "megamoe.config", "megamoe.arguments")
    upper = ("megamoe.model", "megamoe.training")
    bad = [f"{module} imports {dep}" for module, deps in _graph().items() if module.startswith(lower)
           for dep in deps if dep.startswith(upper)]
    assert not bad, bad


def test_params_is_the_bottom_layer():
    assert _graph()["megamoe.params"] == set()
