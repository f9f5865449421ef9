"""A pytest plugin for the course's test run (``pytest -p effarch.testing``).

nbmake starts each notebook's kernel with the test process's environment, so setting it per
test item is enough: solutions run strict (every check must pass), labs run as students get
them (every check may say "not attempted"), and all of them in the offline tiny profile.
"""

from __future__ import annotations

import os
from pathlib import Path


def notebook_env(path: Path) -> dict[str, str]:
    """The environment a notebook runs under in CI."""
    env = {"EFFARCH_PROFILE": "tiny", "HF_HUB_OFFLINE": "1",
           "EFFARCH_STRICT": "1" if path.parent.name == "solutions" else "0"}
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # each worker's kernel gets its share of the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    return env


def pytest_runtest_setup(item) -> None:
    path = Path(str(item.fspath))
    if path.suffix == ".ipynb":
        os.environ.update(notebook_env(path))
