"""The package's layers: every import runs down, and no two units import each other.

A unit is a top-level module (``megapairs_ray/pixels.py``) or a subpackage (``megapairs_ray/io``).
A module may import from its own unit or from a unit of a lower rank — at module level and inside
functions alike, since a function-level import is as much a dependency as a top-level one. Read
with ``ast``: nothing of the package is imported, so this runs in well under a second.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

import megapairs_ray

PACKAGE = "megapairs_ray"
ROOT = Path(megapairs_ray.__file__).parent

# Lowest first. ``__init__`` is run by every import of every module of the package, so it is
# the bottom, not the top: it may import nothing of the package.
RANKS: dict[str, int] = {
    "__init__": 0, "errors": 0, "reasons": 0,
    "config": 1, "ids": 1, "imaging": 1,
    "io": 2, "pixels": 2,
    "manifest": 3, "runtime": 3,
    "models": 4,
    "stages": 5,
    "synth": 6,
    "serve": 7,
    "pipeline": 8,
    "train": 9,
    "plan": 10, "corpus": 10,
    "cli": 11,
}

Edge = tuple[str, int, str, str, str]  # (importing file, line, imported module, from unit, to unit)


def unit_of(module: str) -> str | None:
    """The unit of a dotted module name of the package, or None for one outside it."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _is_unit(name: str) -> bool:
    return (ROOT / f"{name}.py").is_file() or (ROOT / name / "__init__.py").is_file()


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) for every import anywhere in the tree; ``from megapairs_ray import x``
    names the submodule ``megapairs_ray.x`` where x is one, else the package itself."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == PACKAGE:
                out += [(node.lineno, f"{PACKAGE}.{a.name}" if _is_unit(a.name) else PACKAGE)
                        for a in node.names]
            else:
                out.append((node.lineno, target))
    return out


def package_edges() -> list[Edge]:
    edges: list[Edge] = []
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        src = unit_of(module) if path.parent != ROOT or path.stem != "__init__" else "__init__"
        assert src is not None
        tree = ast.parse(path.read_text(), str(path))
        for line, target in imported_modules(tree, module, path.stem == "__init__"):
            dst = unit_of(target)
            if dst is not None and dst != src:
                edges.append((str(path.relative_to(ROOT.parent)), line, target, src, dst))
    return edges


def upward(edges: list[Edge], ranks: dict[str, int]) -> list[str]:
    return [f"{f}:{line}: {target} ({src}, rank {ranks[src]} -> {dst}, rank {ranks[dst]})"
            for f, line, target, src, dst in edges if ranks[dst] > ranks[src]]


def unit_cycle(edges: list[Edge]) -> list[str] | None:
    """One cycle of the unit graph as [a, b, ..., a], or None: a depth-first search that meets
    a unit still on its stack."""
    graph: dict[str, set[str]] = {}
    for _, _, _, src, dst in edges:
        graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return [*stack[stack.index(v):], v]
            if v not in state and (found := visit(v)):
                return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (found := visit(u)):
            return found
    return None


def _where(edges: list[Edge], cycle: list[str]) -> list[str]:
    pairs = set(itertools.pairwise(cycle))
    return [f"{f}:{line}: {target}" for f, line, target, src, dst in edges if (src, dst) in pairs]


EDGES = package_edges()


def test_the_walk_sees_the_imports() -> None:
    """The walk finds function-level imports and the ``from megapairs_ray import x`` form (a
    walk that missed them would pass everything)."""
    found = {(f, target) for f, _, target, _, _ in EDGES}
    assert ("megapairs_ray/cli.py", "megapairs_ray.plan") in found  # in a function
    assert ("megapairs_ray/manifest.py", "megapairs_ray.io") in found
    assert len({src for *_, src, _ in EDGES}) >= 10


def test_every_unit_has_a_rank() -> None:
    units = ({p.stem for p in ROOT.glob("*.py")}
             | {p.parent.name for p in ROOT.glob("*/__init__.py")})
    missing = sorted(units - RANKS.keys())
    assert not missing, f"units with no place in the layers (give each a rank in RANKS): {missing}"


def test_no_import_runs_up() -> None:
    bad = upward(EDGES, RANKS)
    assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def test_no_cycle_between_units() -> None:
    cycle = unit_cycle(EDGES)
    assert cycle is None, (f"units import each other: {' -> '.join(cycle)}\n"
                           + "\n".join(_where(EDGES, cycle)))


@pytest.mark.parametrize("edge", [
    ("megapairs_ray/models/family.py", 70, "megapairs_ray.train.model", "models", "train"),
    ("megapairs_ray/io/runs.py", 1, "megapairs_ray.manifest", "io", "manifest"),
])
def test_an_upward_edge_is_caught(edge: Edge) -> None:
    """The two checks fail on the kinds of import these layers were made to remove."""
    edges = [*EDGES, edge]
    assert upward(edges, RANKS) == [f"{edge[0]}:{edge[1]}: {edge[2]} ({edge[3]}, rank "
                                    f"{RANKS[edge[3]]} -> {edge[4]}, rank {RANKS[edge[4]]})"]
    cycle = unit_cycle(edges)
    assert cycle is not None and edge[3] in cycle and edge[4] in cycle
    assert f"{edge[0]}:{edge[1]}: {edge[2]}" in _where(edges, cycle)


def test_the_walk_reads_each_import_form() -> None:
    tree = ast.parse("import megapairs_ray.io.storage\n"
                     "from megapairs_ray import manifest, __version__\n"
                     "def f():\n    from ..serve import app\n    from . import step\n")
    found = sorted(imported_modules(tree, "megapairs_ray.train.trainer", is_package=False))
    assert found == [(1, "megapairs_ray.io.storage"), (2, "megapairs_ray"),
                     (2, "megapairs_ray.manifest"), (4, "megapairs_ray.serve"),
                     (5, "megapairs_ray.train")]
