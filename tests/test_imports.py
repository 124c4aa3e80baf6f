"""Imports follow the pipeline: capture -> ad -> rules -> passes -> runtime -> api on top.

Every module's imports are read with ``ast``, at module level and inside functions (a lazy import
is still a dependency), relative and absolute. The package's modules must form no import circle;
``capture/`` imports nothing from the layers after it; ``ad/`` and ``rules/`` never import the API.
"""
from __future__ import annotations

import ast
import pathlib
import sys

PACKAGE = "zygote_torch"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE


def _module_names() -> dict:
    """Dotted module name -> path, for every ``.py`` file of the package."""
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = (PACKAGE,) + path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _imported(module: str, path: pathlib.Path, known: dict) -> set:
    """The package's modules that ``module`` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                candidate = f"{target}.{alias.name}"
                out.add(candidate if candidate in known else target)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in known and m != module}


def import_graph() -> dict:
    """module -> the package's modules it imports."""
    known = _module_names()
    return {m: _imported(m, p, known) for m, p in known.items()}


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def _layer(module: str) -> str:
    """``capture``, ``ad``, ``rules``... for a module in a subpackage; the module's name otherwise."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _edges_from(graph: dict, layers: set, forbidden) -> list:
    return sorted(f"{m} -> {t}" for m, targets in graph.items() if _layer(m) in layers
                  for t in targets if forbidden(t))


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles among the package's modules:\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_capture_imports_no_later_layer():
    later = {"ad", "rules", "passes", "runtime", "api"}
    bad = _edges_from(import_graph(), {"capture"}, lambda t: _layer(t) in later)
    assert not bad, "capture imports a later layer of the pipeline:\n" + "\n".join(bad)


def test_ad_and_rules_do_not_import_the_api():
    bad = _edges_from(import_graph(), {"ad", "rules"}, lambda t: t == f"{PACKAGE}.api")
    assert not bad, "ad/ or rules/ import the top-level API:\n" + "\n".join(bad)


def test_the_reader_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert f"{PACKAGE}.capture.pytree" in graph[f"{PACKAGE}.ad.tape"]  # `from ..capture.pytree import`
    assert f"{PACKAGE}.passes.dce" in graph[f"{PACKAGE}.passes.partition"]  # inside a function


def test_the_cycle_finder_names_each_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    assert cycles(graph) == [["a", "b", "c"], ["d", "e"]]


# The layers in pipeline order; ops/ (the custom ops) sits beside them: the rules and ad's fusion
# call it, and it needs only capture's ``announces``.
LAYERS = ["capture", "ad", "rules", "passes", "runtime"]
MAY_IMPORT = {layer: set(LAYERS[:i + 1]) | {"ops", "errors", "params"} for i, layer in enumerate(LAYERS)}
MAY_IMPORT["ops"] = {"ops", "capture", "errors"}


def test_each_layer_imports_only_the_layers_before_it():
    graph = import_graph()
    bad = sorted(f"{m} -> {t}" for m, targets in graph.items() if _layer(m) in MAY_IMPORT
                 for t in targets if _layer(t) not in MAY_IMPORT[_layer(m)])
    assert not bad, "a layer imports a later one (capture -> ad -> rules -> passes -> runtime):\n" + "\n".join(bad)
