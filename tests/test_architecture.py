"""The package's layering (ARCHITECTURE.md): every module imports only from its own layer or below, and
the module import graph has no cycle — function-local imports included, since those are where cycles hide."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import dka

LIB = Path(dka.__file__).resolve().parent

# Lowest first. A module belongs to the first layer one of whose prefixes it starts with.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("dka._compat", "dka.atomic", "dka.dirlock", "dka.progress", "dka.paper", "dka.checkpoint")),
    ("core", ("dka._core",)),
    ("kernels", ("dka.kernels",)),
    ("layers", ("dka.layers",)),
    ("attribution", ("dka.attribution",)),
    ("models", ("dka.models", "dka.conversion")),
    ("data", ("dka.data",)),
    ("train", ("dka.train",)),
    ("analysis", ("dka.dissection", "dka.concepts", "dka.explain", "dka.metrics", "dka.stats", "dka.claims",
                  "dka.comparison", "dka.evaluation", "dka.baselines", "dka.summaries", "dka.posthoc",
                  "dka.related")),
    ("presentation", ("dka.results", "dka.plots", "dka.report")),
    ("application", ("dka.cli", "dka.experiments", "dka.profiles", "dka.pipeline", "dka.__main__")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(LIB.rglob("*.py"))}


def _layer(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"module {module} belongs to no layer: add it to LAYERS in {__file__} and ARCHITECTURE.md")


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """dka modules `module` imports anywhere in its source (resolved to the deepest known module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names]
            if not all(n in known for n in names):  # `from pkg import submodule` needs only the submodule
                names.append(base)
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and name != "dka":
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: _imports(m, p, known) for m, p in modules.items() if m != "dka"}


def test_every_module_imports():
    for info in pkgutil.walk_packages(dka.__path__, "dka."):
        if info.name == "dka.__main__":
            continue
        importlib.import_module(info.name)


def test_no_module_imports_from_a_higher_layer():
    bad = []
    for module, imported in _graph().items():
        for other in imported:
            if _layer(other) > _layer(module):
                bad.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {other} ({LAYERS[_layer(other)][0]})")
    assert not bad, "imports from a higher layer:\n" + "\n".join(sorted(bad))


def test_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_checker_sees_function_local_imports(tmp_path):
    """The cycle check must not be fooled by an import hidden inside a function."""
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from dka.models import build\n    return build\n")
    assert "dka.models" in _imports("dka.layers", path, set(_modules()))


def test_public_api_and_all():
    for name in ("build", "list_models", "load_model", "DynamicKLinear", "DynamicKConv2d", "dissect", "attribute"):
        assert callable(getattr(dka, name)), name
    assert "res18-d{K}a" in dka.list_models()
    missing = []
    for module in _modules():
        if module in ("dka", "dka.__main__"):
            continue
        mod = importlib.import_module(module)
        if not hasattr(mod, "__all__"):
            missing.append(module)
    assert not missing, f"modules without __all__: {missing}"
