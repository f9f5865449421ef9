#!/usr/bin/env python
"""Run a notebook's code cells in order, in one namespace, without Jupyter (e.g. on a GPU
machine that has PyTorch but no Jupyter), printing each cell's start time.

    EFFARCH_PROFILE=full EFFARCH_WEIGHTS=random EFFARCH_STRICT=1 \\
        python scripts/run_notebook.py solutions/lab-2.4.1-mamba-inference-solution.ipynb

``--stats FILE`` writes what the run cost as JSON (wall time, peak memory, device, versions):
``scripts/run_full_profile.py`` keeps it.

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
import resource
import sys
import threading
import time
import traceback
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


class PeakMemory:
    """The CUDA allocator's reserved bytes, sampled every ``interval`` s by a daemon thread and
    at every cell's end (``max_memory_reserved``; a lab resets the peak statistics itself, so no
    single reading covers the whole run). None without a CUDA GPU."""

    def __init__(self, interval: float = 0.05):
        import torch

        self.cuda = torch.cuda.is_available()
        self.peak = 0
        self._stop = threading.Event()
        if self.cuda:
            threading.Thread(target=self._sample, args=(interval,), daemon=True).start()

    def _sample(self, interval: float) -> None:
        import torch

        while not self._stop.wait(interval):
            self.peak = max(self.peak, torch.cuda.memory_reserved())

    def cell_done(self) -> None:
        if self.cuda:
            import torch

            self.peak = max(self.peak, torch.cuda.max_memory_reserved(),
                            torch.cuda.memory_reserved())

    def result(self) -> int | None:
        self._stop.set()
        self.cell_done()
        return self.peak if self.cuda else None


def run_stats(*, ok: bool, error: str | None, wall_s: float, cells: int,
              peak_gpu: int | None) -> dict:
    import torch
    import transformers

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return dict(ok=ok, error=error, wall_s=wall_s, cells=cells, peak_gpu_bytes=peak_gpu,
                peak_rss_bytes=rss, device=device, torch_version=torch.__version__,
                transformers_version=transformers.__version__)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebook", type=Path)
    ap.add_argument("--stats", type=Path, help="write the run's cost here as JSON")
    args = ap.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:  # tables as wide as a log line allows, not cut to the terminal's width
        import pandas as pd

        pd.set_option("display.width", 250, "display.max_columns", 30)
    except ImportError:
        pass
    notebook = args.notebook.resolve()
    stats = args.stats.resolve() if args.stats else None
    os.chdir(notebook.parent)  # as Jupyter and nbmake run it
    namespace: dict = {"__name__": "__main__"}
    meter, error, cells = PeakMemory(), None, code_cells(notebook)
    start = time.perf_counter()
    try:
        for index, source in cells:
            print(f"--- cell {index} at {time.perf_counter() - start:.1f} s", flush=True)
            run_cell(source, f"{notebook.name}[{index}]", namespace)
            meter.cell_done()
    except BaseException as exc:  # keep what the run cost, then fail as before
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    wall = time.perf_counter() - start
    print(f"--- {'done' if error is None else 'FAILED'} in {wall:.1f} s", flush=True)
    if stats is not None:
        stats.write_text(json.dumps(run_stats(ok=error is None, error=error, wall_s=wall,
                                              cells=len(cells), peak_gpu=meter.result())))
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main())
