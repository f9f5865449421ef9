"""The library's layout: imports flow one way, private names stay private."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "effarch"
SCRIPTS = PACKAGE.parents[1] / "scripts"  # scripts as programs: tests/test_scripts.py


def _imports(path: Path) -> set[str]:
    """effarch modules a file imports anywhere (module level, functions, TYPE_CHECKING blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from . import x
                base = [node.module] if node.module else [a.name for a in node.names]
                found.update(b.split(".")[0] for b in base)
            elif node.module == "effarch":
                found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("effarch."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("effarch."))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {p.stem: (_imports(p) & modules) - {p.stem} for p in PACKAGE.glob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt]
            if nxt not in state:
                found = visit(nxt, stack + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _imports(Path(__file__)) == set()  # this file imports no effarch module


def test_imports_flow_one_way():
    graph = import_graph()
    assert "models" in graph and "bench" in graph  # the graph was really read
    cycle = find_cycle(graph)
    assert cycle is None, ("import cycle in src/effarch (function-level imports count): "
                           + " -> ".join(cycle or []))


def test_low_level_modules_never_reach_up():
    graph = import_graph()
    # the foundations: nothing above them may be imported by them, even lazily
    # (paths, the lowest, also holds TROUBLE, the prefix every error's section reference uses)
    allowed = {"paths": set(), "compat": set(), "ssm": {"paths"}, "registry": {"paths"},
               "data": {"paths"}, "profile": {"registry", "paths"},
               "memory": {"compat", "profile", "registry", "paths"}}
    for module, ok in allowed.items():
        assert graph[module] <= ok, f"effarch.{module} imports {sorted(graph[module] - ok)}"


def test_no_private_names_across_modules():
    """A helper another module needs is public; a private module (``_triton_scan``, the kernels
    that ``fast`` owns) may be imported."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    pattern = re.compile(r"from effarch(?:\.\w+)? import ([^\n(]*(?:\([^)]*\))?)")
    for path in list(PACKAGE.glob("*.py")) + list(SCRIPTS.glob("*.py")):
        for names in pattern.findall(path.read_text(encoding="utf-8")):
            private = [n.strip() for n in re.split(r"[,\s()]+", names)
                       if n.strip().startswith("_") and not n.strip().startswith("__")
                       and n.strip() not in modules]
            assert not private, f"{path.name} imports private names {private}"
