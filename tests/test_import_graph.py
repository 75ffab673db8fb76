"""The import graph of `mogao/` and `callbacks/`, read from the source (no import runs): no cycle, and no import
against the layering (a package imports only packages on its own floor's left)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# floors, bottom first: a module may import modules of its own package and of packages on lower floors.
# Modules named `cli` (the `mogao VERB` front ends) and the entry points belong to the top floor.
FLOORS = [
    {"mogao.errors", "mogao._recipes"},
    {"mogao.sequence"},
    {"mogao.data", "mogao.attention", "mogao.diffusion"},
    {"mogao.model"},
    {"mogao.bagel"},
    {"mogao.lora"},
    {"mogao.inference"},
    {"mogao.training"},
    {"callbacks"},
    {"mogao.recipes"},
    {"mogao.eval", "mogao.curriculum"},
    {"mogao.report"},
    {"mogao.demo"},
    {"mogao", "mogao.cli", "cli"},
]
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}


def _modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package's __init__)."""
    out = {}
    for top in ("mogao", "callbacks"):
        for p in sorted((root / top).rglob("*.py")):
            parts = list(p.relative_to(root).with_suffix("").parts)
            pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if pkg else parts)] = (p, pkg)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file, function bodies included). `from P import
    m` where P.m is a module counts as an import of P.m only: a package's __init__ runs first whatever imports
    one of its modules, which is not a dependency on what that __init__ re-exports."""
    mods = _modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for m, (path, pkg) in mods.items():
        base = m if pkg else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    b = base
                    for _ in range(node.level - 1):
                        b = b.rpartition(".")[0]
                    src = b + ("." + node.module if node.module else "")
                else:
                    src = node.module or ""
                subs = [f"{src}.{a.name}" for a in node.names if f"{src}.{a.name}" in mods]
                targets = subs + ([src] if len(subs) < len(node.names) else [])
            for t in targets:
                r = resolve(t)
                if r is not None and r != m:
                    graph[m].add(r)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def floor_of(module: str) -> tuple[str, int]:
    """(the package the layering places the module by, its floor)."""
    if module.rpartition(".")[2] == "cli":
        return "cli", FLOOR["cli"]
    name = module
    while name:
        if name in FLOOR:
            return name, FLOOR[name]
        name = name.rpartition(".")[0]
    raise KeyError(module)


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for a, targets in sorted(graph.items()):
        pa, fa = floor_of(a)
        for b in sorted(targets):
            pb, fb = floor_of(b)
            if pa != pb and fb >= fa:
                bad.append(f"{a} ({pa}, floor {fa}) imports {b} ({pb}, floor {fb})")
    return bad


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_every_import_goes_down_the_layering():
    assert layering_violations(import_graph()) == []


def test_every_module_has_a_floor():
    for m in _modules():
        floor_of(m)  # KeyError names a module (a new package) the layering does not place


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    for name, text in {
        "mogao/__init__.py": "", "mogao/errors.py": "", "mogao/sequence/__init__.py": "",
        "mogao/sequence/a.py": "from mogao.sequence import b\n",
        "mogao/sequence/b.py": "def f():\n    from mogao.sequence.a import x\n",
        "mogao/model/__init__.py": "", "mogao/model/m.py": "from mogao.sequence import a\n",
        "mogao/data/__init__.py": "", "mogao/data/d.py": "from mogao.model.m import y\n",
        "callbacks/__init__.py": "",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["mogao.sequence.a", "mogao.sequence.b"]]
    assert layering_violations(graph) == ["mogao.data.d (mogao.data, floor 2) imports mogao.model.m (mogao.model, floor 3)"]


@pytest.mark.parametrize("module, floor", [("mogao.data.cli", "cli"), ("mogao.attention.flex", "mogao.attention"),
                                           ("mogao.recipes", "mogao.recipes")])
def test_floor_of_places_modules_by_their_package(module, floor):
    assert floor_of(module)[0] == floor


def test_tests_mirror_the_packages():
    """tests/<name>/ for a package of mogao/ (or recipes/, benchmarks/, callbacks/); no test module elsewhere
    but the whole-project ones at the top."""
    tests = ROOT / "tests"
    packages = {p.parent.name for p in (ROOT / "mogao").glob("*/__init__.py")} | {"recipes", "benchmarks", "callbacks"}
    dirs = {p.parent.relative_to(tests).parts[0] for p in tests.rglob("test_*.py") if p.parent != tests}
    assert dirs <= packages, dirs - packages
    assert sorted(p.name for p in tests.glob("test_*.py")) == ["test_import_graph.py", "test_security.py"]
