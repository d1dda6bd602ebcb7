"""The architecture, checked: imports only point down the layers, with no cycle, and core never imports Streamlit."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: bottom to top; a module may import from its own layer and the layers below it
LAYERS = ("common", "workloads", "method", "deploy", "measure", "services")
TOP = len(LAYERS)  # core/__init__.py and the commands core/train.py, core/sweep.py


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else TOP


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(p): p for p in sorted((ROOT / "core").rglob("*.py"))}
GRAPH = {name: {m for m in imports_of(path) if m in MODULES and m != name} for name, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    upward = [m for m in GRAPH[module] if layer_of(m) > layer_of(module)]
    assert not upward, f"{module} (layer {layer_of(module)}) imports from higher layers: {upward}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_core_never_imports_streamlit_or_the_app(module):
    bad = [m for m in imports_of(MODULES[module]) if m.split(".")[0] in ("streamlit", "ui", "pages", "app")]
    assert not bad, f"{module} imports {bad}"


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " → ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_every_package_says_what_it_is_for():
    for layer in LAYERS:
        doc = ast.get_docstring(ast.parse((ROOT / "core" / layer / "__init__.py").read_text()))
        assert doc and len(doc.split(". ")) <= 2, f"core/{layer}/__init__.py needs a one-sentence docstring"
