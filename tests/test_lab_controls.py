"""Widget controls must keep working after Run All: a function that ``plots.explore`` puts
behind a control runs again whenever the control moves, so nothing it reads may be deleted by a
later cell (lab 2.4.2 once freed ``traces`` at its end, and moving the layer dropdown then raised
``NameError``). Checked statically on every notebook's source."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "solutions").glob("*.ipynb")) + sorted((ROOT / "labs").glob("*.ipynb"))


def cells(path: Path) -> list[ast.Module]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return [ast.parse("".join(c["source"])) for c in nb["cells"] if c["cell_type"] == "code"]


def free_names(fn: ast.FunctionDef) -> set[str]:
    """Names a function reads that it neither takes nor assigns (globals of the notebook)."""
    bound = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
    bound |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
            and n.id not in bound}


def controls(trees: list[ast.Module]) -> list[tuple[int, str]]:
    """(cell index, function name) of every ``plots.explore(fn, ...)`` call."""
    return [(i, call.args[0].id) for i, tree in enumerate(trees) for call in ast.walk(tree)
            if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "explore"
            and call.args and isinstance(call.args[0], ast.Name)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_nothing_a_control_reads_is_deleted_later(path):
    trees = cells(path)
    functions = {node.name: node for tree in trees for node in ast.walk(tree)
                 if isinstance(node, ast.FunctionDef)}
    for index, name in controls(trees):
        reads = free_names(functions[name])
        deleted = {target.id for tree in trees[index + 1:] for node in ast.walk(tree)
                   if isinstance(node, ast.Delete) for target in node.targets
                   if isinstance(target, ast.Name)}
        assert not reads & deleted, (f"{path.name}: {name}() behind a control reads "
                                     f"{sorted(reads & deleted)}, which a later cell deletes")


def test_the_check_finds_a_deleted_name(tmp_path):
    nb = {"cells": [{"cell_type": "code", "source": ["def show(layer=0):\n", "    traces[layer]\n",
                                                      "plots.explore(show, layer=[0, 1])\n"]},
                    {"cell_type": "code", "source": ["del traces\n"]}]}
    path = tmp_path / "x.ipynb"
    path.write_text(json.dumps(nb))
    with pytest.raises(AssertionError, match="traces"):
        test_nothing_a_control_reads_is_deleted_later(path)
