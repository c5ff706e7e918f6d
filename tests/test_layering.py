"""The import graph points down only and has no cycles.

    python -m pytest -q tests/test_layering.py      # prints every offending edge

Layers: mgm_ref (0) <- mgm_runtime (1) <- build_engines, triton_models (2, siblings) <- client (3). Every module of those packages is parsed with `ast` (Triton's model.py files included),
and every import counts, wherever it is written (module level, inside a function, under `if`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RANKS = {"mgm_ref": 0, "mgm_runtime": 1, "build_engines": 2, "triton_models": 2, "client": 3}

# Known exceptions, each with its reason; (from, to). Empty: every arrow points down.
ALLOWED: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file, for every .py file of the layered packages (templates/<model>/1/model.py too)."""
    found = {}
    for package in RANKS:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[module_name(path)] = path
    return found


def imported_names(path: Path, name: str) -> set[str]:
    """Every dotted name `path` imports, at any depth; relative imports resolved against `name`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b`: b is a submodule or a name defined in a; resolve() tells which
            out.update(base if alias.name == "*" else f"{base}.{alias.name}" for alias in node.names)
    return out


def resolve(imported: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name lives in (the longest matching module), None if outside."""
    parts = imported.split(".")
    if parts[0] not in RANKS:
        return None
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if candidate in modules:
            return candidate
    return None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for name, path in modules.items():
        targets = {resolve(i, modules) for i in imported_names(path, name)}
        # a package's own __init__ runs on any import of its submodules; it is not a dependency edge
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return graph


def layer_violations(graph: dict[str, set[str]]) -> list[tuple[str, str, str]]:
    """(from, to, why) for each import of a higher layer or of a sibling package."""
    bad = []
    for src, targets in graph.items():
        s_pkg = src.split(".")[0]
        for dst in sorted(targets):
            d_pkg = dst.split(".")[0]
            if RANKS[d_pkg] > RANKS[s_pkg]:
                bad.append((src, dst, f"upward: {s_pkg} (layer {RANKS[s_pkg]}) imports {d_pkg} (layer {RANKS[d_pkg]})"))
            elif RANKS[d_pkg] == RANKS[s_pkg] and d_pkg != s_pkg:
                bad.append((src, dst, f"sideways: {s_pkg} and {d_pkg} are siblings"))
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph():
    modules = project_modules()
    assert len(modules) > 40 and "triton_models.templates.mgm_bls.1.model" in modules, sorted(modules)
    return import_graph(modules)


def test_imports_point_down_only(graph):
    bad = [(s, d, why) for s, d, why in layer_violations(graph) if (s, d) not in ALLOWED]
    assert not bad, "imports against the layering:\n" + "\n".join(f"  {s} -> {d}  ({why})" for s, d, why in bad)


def test_allow_list_has_no_stale_entries(graph):
    stale = sorted(e for e in ALLOWED if e[1] not in graph.get(e[0], ()))
    assert not stale, f"allowed edges that no longer exist (remove them): {stale}"


def test_no_import_cycles(graph):
    found = cycles(graph)
    lines = []
    for component in found:
        edges = [f"{s} -> {d}" for s in component for d in sorted(graph[s]) if d in component]
        lines.append("  cycle among " + ", ".join(component) + ":\n    " + "\n    ".join(edges))
    assert not found, "import cycles:\n" + "\n".join(lines)


def test_the_checker_sees_upward_sideways_function_level_and_cyclic_imports(tmp_path):
    """The checks above must be able to fail: a planted bad tree is reported edge by edge."""
    files = {
        "mgm_ref/__init__.py": "",
        "mgm_ref/a.py": "def f():\n    from client import c  # upward, inside a function\n",
        "build_engines/__init__.py": "",
        "build_engines/b.py": "if True:\n    import triton_models.t\n",  # sideways
        "triton_models/__init__.py": "",
        "triton_models/t.py": "from . import u\n",
        "triton_models/u.py": "from triton_models.t import x\n",  # cycle t <-> u
        "triton_models/templates/m/1/model.py": "from build_engines import b\n",
        "client/__init__.py": "",
        "client/c.py": "import numpy\nfrom mgm_ref import a\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    modules = {}
    for package in RANKS:
        for path in sorted((tmp_path / package).rglob("*.py")):
            parts = list(path.relative_to(tmp_path).with_suffix("").parts)
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    g = import_graph(modules)
    assert {(s, d) for s, d, _ in layer_violations(g)} == {
        ("mgm_ref.a", "client.c"),
        ("build_engines.b", "triton_models.t"),
        ("triton_models.templates.m.1.model", "build_engines.b"),
    }
    assert ["triton_models.t", "triton_models.u"] in cycles(g)
    assert g["client.c"] == {"mgm_ref.a"}
