"""fleet's modules import downward only: no import circle, no module importing the
layer above it, nothing inside the package importing the package root.

Measured from the source (the AST), so an import inside a function counts as much as
one at the top; imports under ``if TYPE_CHECKING:`` do not (they are for annotations).
"""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Each rule: modules matching the first pattern import nothing matching the second.
RULES = [
    # the contracts: the bottom layer, importing only each other
    (r"fleet\.(_types|_plan|_config|_nodes|exceptions)$",
     r"fleet\.(?!_types$|_plan$|_config$|_nodes$|exceptions$).*"),
    # the data plane knows nothing of what runs on it or of the public layer
    (r"fleet\.(_wire(\..*)?|_router|_runtime|_traffic)$",
     r"fleet\.(_api|_deployment|_handle|_refs|dag|drivers|testing|_cli|_controller|_proxy"
     r"|_replica|_backends)(\..*)?$"),
    # the controller works from plans, never from the user-facing layer or a process
    (r"fleet\._controller(\..*)?$",
     r"fleet\.(_api|_deployment|_handle|_refs|dag|drivers|testing|_cli|_proxy|_replica"
     r"|_runtime)(\..*)?$"),
    # proxies and replicas share only lower modules (gRPC schemas: fleet._grpc_schema)
    (r"fleet\._proxy(\..*)?$", r"fleet\._replica(\..*)?$"),
    (r"fleet\._replica(\..*)?$", r"fleet\._proxy(\..*)?$"),
    # a proxy's servers sit below its process entry
    (r"fleet\._proxy\.(?!process$|__main__$).*", r"fleet\._proxy\.(process|__main__)$"),
    # a replica's adapters sit below the replica (annotations aside)
    (r"fleet\._replica\.(http|grpc)$", r"fleet\._replica\.(replica|process|__main__)$"),
]


def modules(package: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted name -> file, for every module of the package."""
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports(package: pathlib.Path) -> dict[str, dict[str, int]]:
    """Module -> {module of the package it imports: first line}, at any depth."""
    mods = modules(package)
    root = package.name
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}

    def owner(name: str) -> str | None:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in mods else None

    for mod, path in mods.items():
        here = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        found = graph[mod]

        def visit(node: ast.AST, mod: str = mod, here: str = here,
                  found: dict[str, int] = found) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _type_checking(child):
                    for other in child.orelse:
                        visit(ast.Module(body=[other], type_ignores=[]))
                    continue
                names: list[str] = []
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    if child.level:
                        base = here.split(".")[:len(here.split(".")) - child.level + 1]
                        base_name = ".".join(base + ([child.module] if child.module else []))
                    else:
                        base_name = child.module or ""
                    # `from pkg import sub` imports the submodule; `from pkg import name`
                    # imports pkg itself
                    names = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in mods
                             else base_name for a in child.names]
                for name in names:
                    if name == root or name.startswith(root + "."):
                        target = owner(name)
                        if target is not None and target != mod:
                            found.setdefault(target, child.lineno)
                visit(child)

        visit(ast.parse(path.read_text(), str(path)))
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def describe(graph: dict[str, dict[str, int]], component: list[str]) -> str:
    inside = set(component)
    return "\n".join(f"  {m} -> {t} (line {line})" for m in component
                     for t, line in sorted(graph[m].items()) if t in inside)


def test_fleet_has_no_import_cycle():
    graph = imports(ROOT / "fleet")
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n\n".join(describe(graph, c) for c in found)


def test_nothing_inside_fleet_imports_the_package_root():
    graph = imports(ROOT / "fleet")
    offenders = [f"{m} (line {deps['fleet']})" for m, deps in graph.items()
                 if m != "fleet" and "fleet" in deps]
    assert not offenders, "these modules import the package root `fleet`: " + ", ".join(offenders)


def test_fleet_imports_only_downward():
    graph = imports(ROOT / "fleet")
    wrong = [f"{m} -> {t} (line {line})"
             for lower, upper in RULES for m, deps in graph.items()
             if re.match(lower, m) for t, line in deps.items() if re.match(upper, t)]
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_the_measure_finds_cycles_through_function_imports(tmp_path: pathlib.Path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg import a\n")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    # b imports a only inside a function: still a cycle
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg import a\n    return a\n")
    # c imports a for annotations only: no edge
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from pkg import d\nimport pkg.a\n")
    (pkg / "d.py").write_text("from . import c\n")
    # e imports a name of the root: an edge to the root, a cycle with it
    (pkg / "e.py").write_text("from pkg import VERSION\n")
    (pkg / "__init__.py").write_text("from pkg import a, e\nVERSION = 1\n")
    graph = imports(pkg)
    assert graph["pkg.d"] == {"pkg.c": 1}
    assert graph["pkg.c"] == {"pkg.a": 4}
    assert sorted(cycles(graph)) == [["pkg", "pkg.e"], ["pkg.a", "pkg.sub.b"]]
    assert "pkg.sub.b -> pkg.a (line 2)" in describe(graph, ["pkg.a", "pkg.sub.b"])
