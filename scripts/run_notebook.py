#!/usr/bin/env python
"""Run a notebook's code cells in order, in one namespace, without Jupyter (e.g. on a GPU
machine that has PyTorch but no Jupyter), printing each cell's start time.

    EFFARCH_PROFILE=full EFFARCH_WEIGHTS=random EFFARCH_STRICT=1 \\
        python scripts/run_notebook.py solutions/lab-2.4.1-mamba-inference-solution.ipynb

Plots go to matplotlib's Agg backend (nothing is shown); widgets fall back to plain calls
(effarch.plots.explore). A cell ending in an expression prints its value, as Jupyter shows it
(a table prints as text). IPython magics are not supported: the course's notebooks have none.

Run it from the repository's root with ``effarch`` importable: installed (``make lab`` installs
it) or ``PYTHONPATH=src`` (the GPU machine, which has no install).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path


def code_cells(path: Path) -> list[tuple[int, str]]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return [(i, "".join(c["source"])) for i, c in enumerate(nb["cells"])
            if c["cell_type"] == "code"]


def run_cell(source: str, name: str, namespace: dict) -> None:
    """Execute one cell; if its last statement is an expression, print the value (not None)."""
    tree = ast.parse(source, filename=name)
    shown = tree.body and isinstance(tree.body[-1], ast.Expr) and not source.rstrip().endswith(";")
    last = tree.body.pop() if shown else None
    exec(compile(tree, name, "exec"), namespace)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), name, "eval"), namespace)
        if value is not None:
            print(value, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebook", type=Path)
    args = ap.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:  # tables as wide as a log line allows, not cut to the terminal's width
        import pandas as pd

        pd.set_option("display.width", 250, "display.max_columns", 30)
    except ImportError:
        pass
    notebook = args.notebook.resolve()
    os.chdir(notebook.parent)  # as Jupyter and nbmake run it
    namespace: dict = {"__name__": "__main__"}
    start = time.perf_counter()
    for index, source in code_cells(notebook):
        print(f"--- cell {index} at {time.perf_counter() - start:.1f} s", flush=True)
        run_cell(source, f"{notebook.name}[{index}]", namespace)
    print(f"--- done in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
